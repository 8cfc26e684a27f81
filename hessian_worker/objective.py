"""The calibration loss as pure functions of the shareable parameters.

Everything that measures curvature goes through ``Objective``: parameters are passed as
``dict[str, Tensor]`` keyed by full names and applied with ``functional_call``, so the model is
never mutated while measuring. Names missing from a dict keep the model's own values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessian_worker.data import INPUT_KEY, Calibration, call_model
from hessian_worker.errors import BackendError
from hessian_worker.losses import DistillLoss, TaskLoss, extract_output, resolve_distill

Params = dict[str, Tensor]


class Objective:
    """L(θ) = Σ_b (n_b/N) ℓ_b(θ): self-distillation against the reference outputs, or a task loss.

    Args:
        model: the reference model (put in eval mode; its weights are the expansion point).
        data: calibration batches already on the model's device and dtype.
        names: the shareable parameter names the pure functions take.
        distill: which distillation loss (ignored with ``task_loss``).
        task_loss: a user loss (output, batch) -> scalar; keeps the first-order term.
        total: the samples the batches' weights n_b/N are shares of (default: those of ``data``;
            a process of a torch.distributed job holds some of the batches and gives all of them,
            so its loss and forms are its part of the whole, summed with the others').
    """

    def __init__(
        self,
        model: nn.Module,
        data: Calibration,
        names: list[str],
        distill: DistillLoss = DistillLoss.auto,
        task_loss: TaskLoss | None = None,
        total: int | None = None,
    ) -> None:
        model.eval()
        self.model = model
        self.data = data
        self.distill = distill
        own = dict(model.named_parameters())
        missing = [n for n in names if n not in own]
        if missing:
            raise BackendError(f"unknown parameter names {missing[:5]}")
        self.names = list(names)
        self.params0: Params = {n: own[n].detach() for n in names}
        self.total = total or data.num_samples
        self.weights = [s / self.total for s in data.sizes]
        self.task_loss = task_loss
        self.targets: list[Tensor] = []
        is_logits = False
        with torch.no_grad():
            for batch in data.batches:
                y, is_logits = extract_output(call_model(model, batch), batch)
                self.targets.append(y.detach())
        self.out_loss = resolve_distill(distill, is_logits)

    def to_dtype(self, dtype: torch.dtype) -> Objective:
        """The same objective over a copy of the model and data in ``dtype``, expanded around that
        copy's own outputs (so self-distillation stays at its minimum there)."""
        model = copy.deepcopy(self.model).to(dtype=dtype)
        device = self.params0[self.names[0]].device
        return Objective(model, self.data.to(device, dtype), self.names, self.distill, self.task_loss, self.total)

    @property
    def is_distill(self) -> bool:
        return self.task_loss is None

    def output(self, params: Mapping[str, Tensor], b: int) -> Tensor:
        """The model's output tensor on batch ``b`` with ``params`` substituted."""
        batch = self.data.batches[b]
        if set(batch) == {INPUT_KEY}:
            out = functional_call(self.model, dict(params), (batch[INPUT_KEY],), strict=False)
        else:
            out = functional_call(self.model, dict(params), (), dict(batch), strict=False)
        return extract_output(out, batch)[0]

    def loss_on_output(self, y: Tensor, b: int) -> Tensor:
        """ℓ_b as a function of the output alone (the GGN's outer loss)."""
        batch = self.data.batches[b]
        if self.task_loss is not None:
            return self.task_loss(y, batch)
        return self.out_loss(y, self.targets[b], batch)

    def batch_loss(self, params: Mapping[str, Tensor], b: int) -> Tensor:
        return self.loss_on_output(self.output(params, b), b)

    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """The whole calibration loss at ``params`` (weighted mean over batches)."""
        return sum(w * self.batch_loss(params, b) for b, w in enumerate(self.weights))

    def zeros(self) -> Params:
        return {n: torch.zeros_like(p) for n, p in self.params0.items()}
