"""The curvature-weighted merge Σ F_k⊙W_k / Σ F_k: the mean under equal curvature, and the exact
minimizer of a quadratic loss whose Hessian is diagonal."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.data import Calibration
from hessian_worker.merge import Merge, merge_weights
from solver.schema import SharingPlan

NAMES = ["blocks.0.fc.weight", "blocks.1.fc.weight"]


class Fc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3, bias=False)


class Parallel(nn.Module):
    """Two same-shape linear layers, each on its own slice of the input: the distillation loss is
    a quadratic in their weights with no cross terms."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Fc(), Fc()])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.blocks[0].fc(x[:, 0]), self.blocks[1].fc(x[:, 1])], dim=-1)


def _setup() -> tuple[Parallel, Tensor]:
    torch.manual_seed(0)
    model = Parallel().double().eval()
    # each sample excites one input coordinate per layer with its own scale: diagonal input
    # covariance, so the Hessian in the weights is diagonal with per-column curvature
    scales = torch.tensor([[0.2, 1.0, 3.0], [2.5, 0.5, 1.5]], dtype=torch.float64)
    x = torch.zeros(3, 2, 3, dtype=torch.float64)
    for i in range(3):
        x[i, 0, i], x[i, 1, i] = scales[0, i], scales[1, i]
    return model, x


def _loss(model: nn.Module, ref: Tensor, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
    return ((functional_call(model, weights, (x,)) - ref) ** 2).mean()


def test_equal_curvature_gives_the_mean():
    ws = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    f = torch.rand(4, 5, dtype=torch.float64) + 0.1
    merged = merge_weights(ws, Merge.curvature, diag=[f, f, f])
    torch.testing.assert_close(merged, torch.stack(ws).mean(0))


def test_curvature_merge_is_the_exact_minimizer_of_a_quadratic_loss():
    model, x = _setup()
    with torch.no_grad():
        ref = model(x)
    w = [model.get_parameter(n).detach().clone() for n in NAMES]
    shape = w[0].shape

    def loss_of(flat: Tensor) -> Tensor:
        return _loss(model, ref, x, {NAMES[0]: flat[: w[0].numel()].view(shape), NAMES[1]: flat[w[0].numel() :].view(shape)})

    h = hessian(loss_of, torch.cat([t.flatten() for t in w]))
    assert torch.allclose(h, torch.diag(torch.diagonal(h)))  # diagonal by construction
    diag = torch.diagonal(h).split(w[0].numel())
    f = [d.view(shape) for d in diag]
    merged = merge_weights(w, Merge.curvature, diag=f)
    # the tied minimizer of the quadratic: (Σ H_k)⁻¹ Σ H_k W_k, with the brute-force Hessian blocks
    blocks = [h[: w[0].numel(), : w[0].numel()], h[w[0].numel() :, w[0].numel() :]]
    best = torch.linalg.solve(blocks[0] + blocks[1], blocks[0] @ w[0].flatten() + blocks[1] @ w[1].flatten())
    torch.testing.assert_close(merged.flatten(), best)
    tied = _loss(model, ref, x, dict.fromkeys(NAMES, merged))
    mean = _loss(model, ref, x, dict.fromkeys(NAMES, (w[0] + w[1]) / 2))
    assert tied < mean
    # no tied value does better: the gradient in the shared weight vanishes there
    shared = merged.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss(model, ref, x, dict.fromkeys(NAMES, shared)), shared)
    assert grad.abs().max() < 1e-10


def test_apply_plan_curvature_merge_approaches_the_minimizer():
    """The worker estimates the diagonal GGN by sampling; with many probes it lands near the exact
    minimizer and well below the mean's loss."""
    model, x = _setup()
    with torch.no_grad():
        ref = model(x)
    plan = SharingPlan(status="feasible", coloring=dict.fromkeys(NAMES, 0), groups=[NAMES],
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})
    data = Calibration([{"input": x}])
    tied = copy.deepcopy(model)
    apply_plan(tied, plan, "curvature", data=data,
               config=AnalyzeConfig(dtype="float64", device="cpu", progress=False, probes=4096, distill="mse"))
    meaned = copy.deepcopy(model)
    apply_plan(meaned, plan, "mean")
    with torch.no_grad():
        got = float(((tied(x) - ref) ** 2).mean())
        mean = float(((meaned(x) - ref) ** 2).mean())
    w = [model.get_parameter(n).detach() for n in NAMES]
    f = [x[:, k].pow(2).sum(0).expand(3, 3) for k in range(2)]  # exact per-column curvature
    best = merge_weights(w, Merge.curvature, diag=f)
    with torch.no_grad():
        optimum = float(((_with(model, best)(x) - ref) ** 2).mean())
    assert got < 0.8 * mean
    assert got <= optimum * 1.1 + 1e-12


def _with(model: Parallel, value: Tensor) -> Parallel:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n in NAMES:
            out.get_parameter(n).copy_(value)
    return out
