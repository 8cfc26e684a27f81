"""Healing: a short self-distillation fine-tune of a tied model against the original's outputs.

Tying at real compression moves weights far beyond the quadratic model, so apply offers a few
optimizer steps that pull the tied model's outputs back to the reference's on the calibration
data. Tied layers share one Parameter, so every step keeps the sharing; the model stays in eval
mode (no dropout) so a seed fixes the whole run.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from hessian_worker.analysis import prepare
from hessian_worker.apply import unique_params
from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import DataSource, call_model
from hessian_worker.losses import DistillLoss, extract_output
from hessian_worker.objective import Objective


class HealConfig(BaseModel):
    """How long and how hard to heal; the same for every strategy in a comparison."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, gt=0, description="Optimizer steps, one calibration batch each.")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    samples: int | None = Field(None, gt=0)
    max_length: int = Field(128, gt=0)
    seed: int = Field(0, ge=0)
    distill: DistillLoss = Field(DistillLoss.auto, description="The distillation loss healing minimizes.")
    device: str = "auto"
    progress: bool = True


class HealReport(BaseModel):
    steps: int
    first_loss: float
    last_loss: float
    unique_params: int


def heal(
    model: nn.Module,
    reference: nn.Module,
    data: DataSource,
    config: HealConfig | None = None,
    *,
    tokenizer: Any | None = None,
) -> HealReport:
    """Fine-tunes ``model`` in place to match ``reference``'s outputs on ``data``.

    Args:
        model: the tied model (after ``apply_plan``); its parameters are updated, ties kept.
        reference: the original model; only read.
        data: calibration data (see ``load_calibration``); use the same for every strategy.
    """
    config = config or HealConfig()
    acfg = AnalyzeConfig(samples=config.samples, batch_size=config.batch_size, max_length=config.max_length,
                         seed=config.seed, distill=config.distill, device=config.device, progress=False)
    prep = prepare(reference, data, acfg, tokenizer=tokenizer)
    target = Objective(prep.model, prep.data, [], config.distill)  # reference outputs, the distillation loss
    model.to(device=acfg.torch_device(), dtype=acfg.dtype.torch)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]  # deduplicated: one per tied class
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    batches = prep.data.batches
    losses: list[float] = []
    for _ in tqdm(range(config.steps), desc="heal", disable=not config.progress):
        b = int(torch.randint(len(batches), (1,), generator=gen))
        y = extract_output(call_model(model, batches[b]), batches[b])[0]
        loss = target.loss_on_output(y, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return HealReport(steps=config.steps, first_loss=losses[0], last_loss=losses[-1], unique_params=unique_params(model))
