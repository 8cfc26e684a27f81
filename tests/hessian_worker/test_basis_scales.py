"""Output-weighted basis costs: the scale is K-FAC's ā/2 fitted to the diagonal GGN, and the
scaled costs are predicted loss changes that rank plans as the measured loss does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hw_cases import dense_ggn, mlp_data, tiny_mlp
from torch import Tensor, nn

from hessian_worker.analysis import analyze
from hessian_worker.basis.apply import apply_basis_plan
from hessian_worker.basis.scales import basis_covariances, layer_output_scales, output_scales
from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.layerwise import input_covariances
from hessian_worker.data import Calibration
from hessian_worker.discovery import discover_layers
from hessian_worker.measure import measure_plans
from hessian_worker.objective import Objective
from solver.planning import plan_from_coloring
from solver.schema import SharingPlan, SharingProblem


def cfg(weighting: bool = True, probes: int = 256) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="basis", basis={"rank": 1, "output_weighting": weighting}, probes=probes,
                         dtype="float64", device="cpu", progress=False)


def brute_force_scales(model: nn.Module, data: Calibration) -> dict[str, float]:
    """ā/2 with ā the least-squares scalar of F ≈ ā·1·gᵀ, F the diagonal of the dense GGN."""
    names = [x.name for x in discover_layers(model)]
    obj = Objective(model, data, names)
    diag = dense_ggn(obj).diagonal()
    covs = input_covariances(model, data, names)
    out, start = {}, 0
    for name in names:
        shape = obj.params0[name].shape
        f = diag[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
        g = covs[name].diagonal()
        a_bar = float((f * g[None, :]).sum() / (shape[0] * g.pow(2).sum()))
        out[name] = a_bar / 2
    return out


def test_scale_is_the_fit_to_the_brute_force_diagonal_ggn() -> None:
    model, data = tiny_mlp(), mlp_data()
    names = [x.name for x in discover_layers(model)]
    expected = brute_force_scales(model, data)
    covs = input_covariances(model, data, names)
    # the fit itself, on the exact diagonal
    obj = Objective(model, data, names)
    diag, start = {}, 0
    flat = dense_ggn(obj).diagonal()
    for name in names:
        size = obj.params0[name].numel()
        diag[name] = flat[start : start + size].reshape(obj.params0[name].shape)
        start += size
    assert output_scales(diag, covs) == pytest.approx(expected, rel=1e-10)
    # the product's estimate (Monte Carlo diagonal GGN) converges to it
    measured = layer_output_scales(model, data, names, covs, cfg(probes=4096))
    assert measured == pytest.approx(expected, rel=0.03)
    assert len({round(v, 6) for v in expected.values()}) == len(names)  # the layers really differ
    scaled = basis_covariances(model, data, names, cfg(probes=4096))
    for name in names:
        torch.testing.assert_close(scaled[name], covs[name] * measured[name])
    plain = basis_covariances(model, data, names, cfg(weighting=False))
    for name in names:
        torch.testing.assert_close(plain[name], covs[name])


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)


class Heads(nn.Module):
    """Three same-shape linear layers side by side; output ℓ is multiplied by gain ℓ, so the loss
    feels layer ℓ's output error gain_ℓ² times (no cross terms: the outputs are concatenated)."""

    def __init__(self, gains: tuple[float, ...]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head() for _ in gains)
        self.gains = gains

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([g * h.fc(x) for g, h in zip(self.gains, self.heads, strict=True)], dim=-1)


def heads_case() -> tuple[Heads, Calibration]:
    """Rank-1 layers u_ℓ vᵀ with cos(u0, u1) = 0.7, cos(u1, u2) = 0.6, cos(u0, u2) = 0.1 and layer 0's
    output 100 times louder. A rank-1 basis for a pair of equal layers loses 1 − |cos|, so the plain
    output error prefers pair (0, 1); but layer 0 dictates a shared basis it is in, which leaves
    layer 1 an error of 1 − cos² = 0.51 > 0.4 for pair (1, 2): the loss prefers (1, 2)."""
    c01, c12, c02 = 0.7, 0.6, 0.1
    y = (c12 - c01 * c02) / (1 - c01**2) ** 0.5
    u = torch.tensor([[1.0, 0, 0, 0], [c01, (1 - c01**2) ** 0.5, 0, 0],
                      [c02, y, (1 - c02**2 - y**2) ** 0.5, 0]])
    v = torch.full((4,), 0.5)
    model = Heads((10.0, 1.0, 1.0)).double().eval()
    with torch.no_grad():
        for i, head in enumerate(model.heads):
            head.fc.weight.copy_(torch.outer(u[i], v))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, Calibration([{"input": x[i : i + 16]} for i in range(0, 64, 16)])


def pair_plans(problem: SharingProblem) -> list[SharingPlan]:
    names = [x.name for x in problem.layers]
    return [plan_from_coloring(problem, {names[a]: 0, names[b]: 0, names[c]: 1}, method="test")
            for a, b, c in [(0, 1, 2), (0, 2, 1), (1, 2, 0)]]


def test_scaled_costs_rank_pairs_as_the_measured_loss_does() -> None:
    model, data = heads_case()
    scaled, plain = analyze(model, data, cfg()), analyze(model, data, cfg(weighting=False))
    # each problem file says whether its costs were output-weighted
    assert scaled.source and plain.source and scaled.source["scheme"] == "basis"
    assert (scaled.source["basis"]["output_weighting"], plain.source["basis"]["output_weighting"]) == (True, False)
    plans = pair_plans(scaled)
    measured = measure_plans(model, data, plans, cfg(), problem=scaled)  # the product's apply
    predicted = [p.objective for p in plans]
    unscaled = [p.objective for p in pair_plans(plain)]
    order = list(np.argsort(measured))
    assert order == [2, 0, 1]  # (1, 2) < (0, 1) < (0, 2)
    assert list(np.argsort(predicted)) == order
    assert list(np.argsort(unscaled)) != order and int(np.argmin(unscaled)) == 0
    # on the loss scale: the solver objective is the predicted loss change of the plan
    assert predicted == pytest.approx(measured, rel=0.05)
    # what each option's own pick loses once applied: the unscaled pick, whitened its way, loses far more
    plain_pick = measure_plans(model, data, [pair_plans(plain)[0]], cfg(weighting=False), problem=plain)[0]
    assert plain_pick > 10 * measured[2]


def test_apply_whitens_as_the_costs_did() -> None:
    model, data = heads_case()
    for weighting in (True, False):
        problem = analyze(model, data, cfg(weighting))
        for plan in pair_plans(problem):
            copy = Heads(model.gains).double().eval()
            copy.load_state_dict(model.state_dict())
            report = apply_basis_plan(copy, plan, problem, data=data, config=cfg(weighting))
            # classes of at most two: the solver objective is the exact error of the installed bases
            assert report.whitened_error == pytest.approx(plan.objective, rel=1e-8, abs=1e-15)
