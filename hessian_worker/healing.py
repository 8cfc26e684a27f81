"""Healing: a short self-distillation fine-tune of a tied model against the original's outputs.

Tying at real compression moves weights far beyond the quadratic model, so apply offers a few
optimizer steps that pull the tied model's outputs back to the reference's on the calibration
data. Tied layers share one Parameter, so every step keeps the sharing; the model stays in eval
mode (no dropout) so a seed fixes the whole run.

A few hundred calibration samples are easy to overfit: on the digits MLP, 100 steps at lr 1e-4 on
328 samples raised the held-out loss of every plan tried (top-4 0.0018 -> 0.0043). So by default a
seeded share of the samples (``holdout``) is kept out of the training and checked every
``check_every`` steps, step 0 (the tie as it is) included, and the weights of the best check are
kept: healing never leaves a model worse on its held-out samples than it found it. The best
weights are held as one copy beside the model's (on its device), the price of that guarantee.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn
from tqdm import tqdm

from hessian_worker.config import AnalyzeConfig, torch_device, torch_dtype
from hessian_worker.data import Calibration, DataSource, call_model, holdout_size, load_calibration
from hessian_worker.losses import extract_output
from hessian_worker.measure import objective_loss
from hessian_worker.objective import Objective
from hessian_worker.options import HealConfig
from hessian_worker.prepare import prepare
from hessian_worker.tying import unique_params


class HealReport(BaseModel):
    steps: int = Field(description="Optimizer steps taken.")
    first_loss: float = Field(description="Training loss of the first step's batch.")
    last_loss: float = Field(description="Training loss of the last step's batch.")
    unique_params: int
    best_step: int | None = Field(None, description="The step whose weights were kept (0: the tie as it was); "
                                  "None without a holdout (the last step's).")
    held_losses: dict[int, float] | None = Field(None, description="Step -> loss on the held-out samples, at every check.")


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
    acfg = AnalyzeConfig(batch_size=config.batch_size, max_length=config.max_length, seed=config.seed,
                         distill=config.distill, device=config.device, progress=False)
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size,
                             seed=config.seed, max_length=config.max_length)
    train, held = heal_parts(calib, config)
    prep = prepare(reference, train, acfg, tokenizer=tokenizer)
    target = Objective(prep.model, prep.data, [], config.distill)  # reference outputs, the distillation loss
    device, dtype = torch_device(acfg), torch_dtype(acfg.dtype)
    check = Objective(prep.model, held.to(device, dtype), [], config.distill) if held else None
    model.to(device=device, dtype=dtype)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]  # deduplicated: one per tied class
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    batches = prep.data.batches
    losses: list[float] = []
    held_losses: dict[int, float] = {}
    best_step, best = None, None  # the first step with the least held-out loss, and its weights
    for step in tqdm(range(config.steps + 1), desc="heal", disable=not config.progress):
        if check is not None and (step % config.check_every == 0 or step == config.steps):
            held_losses[step] = objective_loss(model, check)
            if best_step is None or held_losses[step] < held_losses[best_step]:
                best_step, best = step, [p.detach().clone() for p in params]
        if step == config.steps:
            break
        b = int(torch.randint(len(batches), (1,), generator=gen))
        y = extract_output(call_model(model, batches[b]), batches[b])[0]
        loss = target.loss_on_output(y, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best, strict=True):
                p.copy_(kept)
    return HealReport(steps=config.steps, first_loss=losses[0], last_loss=losses[-1], unique_params=unique_params(model),
                      best_step=best_step, held_losses=held_losses or None)


def heal_parts(calib: Calibration, config: HealConfig) -> tuple[Calibration, Calibration | None]:
    """(training part, held-out part) of the healing data: ``holdout`` of the samples, seeded;
    (all, None) when the share is 0 or would leave a part empty."""
    held = holdout_size(config.holdout, calib.num_samples)
    if not held:
        return calib, None
    return calib.split(held, seed=config.seed + 3, batch_size=config.batch_size)
