"""Side "in" (W_ℓ ≈ C_ℓ·B, B shared on the input side): the decomposition against numpy, the
accounting against the solver's count, the module, and the side choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hw_cases import mlp_data
from torch import Tensor, nn

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.basis.analysis import rescore_basis_plan
from hessian_worker.basis.config import BasisOptions
from hessian_worker.basis.costs import basis_costs, family_side
from hessian_worker.basis.decompose import damped, refine, shared_basis, whitened_error
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.config import AnalyzeConfig
from hessian_worker.discovery import LayerInfo
from hessian_worker.errors import PlanError
from hessian_worker.tying import unique_params
from solver import evaluate
from solver.schema import FamilySpec, SharingPlan, Side

D_OUT, D_IN = 3, 6


def _class(k: int = 3, same_cov: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) for _ in range(k)]
    covs = []
    for _ in range(k):
        x = torch.randn(9, D_IN, generator=g, dtype=torch.float64)
        x = x * torch.linspace(0.3, 2.0, D_IN, dtype=torch.float64)
        covs.append(x.T @ x / 9)
    if same_cov:
        covs = [covs[0]] * k
    return ws, covs


def _np_damped(c: np.ndarray, damping: float) -> np.ndarray:
    return c + damping * np.mean(np.diag(c)) * np.eye(c.shape[0])


def _numpy_input_side(ws, covs, rank: int, damping: float = 0.01):
    """The reference: pooled Cholesky, SVD of the vertical stack, B = V_rᵀ L̄⁻¹, C by least squares."""
    w = [x.numpy() for x in ws]
    if covs is None:
        _, s, vt = np.linalg.svd(np.concatenate(w, axis=0), full_matrices=False)
        basis = vt[:rank]
        return basis, [x @ basis.T for x in w], float((s[rank:] ** 2).sum())
    gs = [_np_damped(c.numpy(), damping) for c in covs]
    chol = np.linalg.cholesky(sum(gs) / len(gs))
    _, s, vt = np.linalg.svd(np.concatenate([x @ chol for x in w], axis=0), full_matrices=False)
    basis = vt[:rank] @ np.linalg.inv(chol)
    coefs = []
    for x, g in zip(w, gs, strict=True):
        # min_C ‖(C B − W) L‖²: least squares of (B L)ᵀ Cᵀ ≈ (W L)ᵀ
        lg = np.linalg.cholesky(g)
        coefs.append(np.linalg.lstsq((basis @ lg).T, (x @ lg).T, rcond=None)[0].T)
    return basis, coefs, float((s[rank:] ** 2).sum())


def _np_error(ws, basis, coefs, covs, damping: float = 0.01) -> float:
    total = 0.0
    for i, w in enumerate(ws):
        d = coefs[i] @ basis - w.numpy()
        g = np.eye(D_IN) if covs is None else _np_damped(covs[i].numpy(), damping)
        total += float(np.trace(d @ g @ d.T))
    return total


def _basis_gradient(ws, f, covs, damping: float = 0.01) -> Tensor:
    """∂E/∂B with the coefficients at their optimum (envelope theorem): Σ 2 C_ℓᵀ δ_ℓ G̃_ℓ."""
    return sum(
        2 * c.T @ (f.weight(i) - w) @ damped(g, damping)
        for i, (w, c, g) in enumerate(zip(ws, f.coefs, covs, strict=True))
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_unwhitened_input_side_is_eckart_young_on_the_vertical_stack(rank: int) -> None:
    ws, _ = _class()
    f = shared_basis(ws, rank, None, side="in")
    basis, _, tail = _numpy_input_side(ws, None, rank)
    assert f.side is Side.in_ and f.rank == rank and f.basis.shape == (rank, D_IN)
    assert all(c.shape == (D_OUT, rank) for c in f.coefs)
    np.testing.assert_allclose((f.basis.T @ f.basis).numpy(), basis.T @ basis, atol=1e-10)
    for w, c in zip(ws, f.coefs, strict=True):
        torch.testing.assert_close(c, w @ f.basis.T)
    assert whitened_error(ws, f) == pytest.approx(tail, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("rank", [1, 2])
def test_equal_covariances_give_the_exact_optimum(rank: int) -> None:
    """One G̃ for all members: the whitened stack's tail is the minimum, and B is stationary."""
    ws, covs = _class(same_cov=True)
    f = shared_basis(ws, rank, covs, side="in")
    basis, coefs, tail = _numpy_input_side(ws, covs, rank)
    for i in range(len(ws)):  # the same weights (factors are defined up to an r x r transform)
        np.testing.assert_allclose(f.weight(i).numpy(), coefs[i] @ basis, atol=1e-10)
    assert whitened_error(ws, f, covs) == pytest.approx(tail, rel=1e-9, abs=1e-12)
    grad = _basis_gradient(ws, f, covs)
    assert float(grad.norm()) < 1e-9 * sum(float(w.norm()) for w in ws)


@pytest.mark.parametrize("seed", [0, 1])
def test_different_covariances_pooled_basis_and_exact_coefficients(seed: int) -> None:
    """Different G̃_ℓ: the pooled basis with per-member least-squares coefficients. A feasible point
    (no better than the members' own optima), but not a stationary one: no single SVD is exact
    here, as decompose.py's docstring says."""
    ws, covs = _class(seed=seed)
    rank = 2
    f = shared_basis(ws, rank, covs, side="in")
    basis, coefs, _ = _numpy_input_side(ws, covs, rank)
    for i in range(len(ws)):
        np.testing.assert_allclose(f.weight(i).numpy(), coefs[i] @ basis, atol=1e-9)
    error = whitened_error(ws, f, covs)
    assert error == pytest.approx(_np_error(ws, basis, coefs, covs), rel=1e-9)
    own = sum(whitened_error([w], shared_basis([w], rank, [c], side="in"), [c]) for w, c in zip(ws, covs, strict=True))
    assert error >= own
    # the coefficients are exact for this basis: any move raises the error
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        moved = type(f)(f.basis, [c + 1e-4 * torch.randn(c.shape, generator=g, dtype=c.dtype) for c in f.coefs], f.side)
        assert whitened_error(ws, moved, covs) > error
    # ...but the basis is not a stationary point when the covariances differ
    assert float(_basis_gradient(ws, f, covs).norm()) > 1e-6


def test_input_side_factors_do_not_scale_with_the_inputs() -> None:
    """Unit-norm basis rows: a covariance s·G gives the same factors (what healing starts from)."""
    ws, covs = _class()
    f = shared_basis(ws, 2, covs, side="in")
    torch.testing.assert_close(f.basis.norm(dim=1), torch.ones(2, dtype=torch.float64))
    g = shared_basis(ws, 2, [1e-4 * c for c in covs], side="in")
    torch.testing.assert_close(g.basis, f.basis)
    for a, b in zip(f.coefs, g.coefs, strict=True):
        torch.testing.assert_close(a, b)


def test_a_class_of_one_is_the_same_low_rank_weight_on_both_sides() -> None:
    """Alone, both sides are the layer's own whitened truncated SVD (so unary costs agree)."""
    ws, covs = _class(k=1)
    out = shared_basis(ws, 2, covs, side="out")
    inp = shared_basis(ws, 2, covs, side="in")
    torch.testing.assert_close(out.weight(0), inp.weight(0))
    assert whitened_error(ws, inp, covs) == pytest.approx(whitened_error(ws, out, covs), rel=1e-9)


def test_input_side_costs_are_unary_exact_and_pairs_non_negative() -> None:
    ws, covs = _class(k=4, seed=3)
    names = [f"layers.{i}.down.weight" for i in range(4)]
    layers = [LayerInfo(n, "down.weight", i, (D_OUT, D_IN)) for i, n in enumerate(names)]
    weights, cmap = dict(zip(names, ws, strict=True)), dict(zip(names, covs, strict=True))
    matrix, unary = basis_costs(layers, weights, cmap, {"down.weight": 2}, sides={"down.weight": Side.in_})
    for i, (w, c) in enumerate(zip(ws, covs, strict=True)):
        _, _, tail = _numpy_input_side([w], [c], 2)
        assert unary[i] == pytest.approx(tail, rel=1e-9)
    for i in range(4):
        for j in range(i + 1, 4):
            pair = shared_basis([ws[i], ws[j]], 2, [covs[i], covs[j]], side="in")
            real = whitened_error([ws[i], ws[j]], pair, [covs[i], covs[j]])
            assert matrix[i][j] == matrix[j][i] >= 0
            assert matrix[i][j] == pytest.approx(real - unary[i] - unary[j], rel=1e-8, abs=1e-12)


def test_basis_linear_on_the_input_side() -> None:
    g = torch.Generator().manual_seed(0)
    basis = nn.Parameter(torch.randn(2, D_IN, generator=g))
    coef = nn.Parameter(torch.randn(D_OUT, 2, generator=g))
    bias = nn.Parameter(torch.randn(D_OUT, generator=g))
    layer = BasisLinear(basis, coef, bias, side="in")
    assert (layer.in_features, layer.out_features, layer.rank) == (D_IN, D_OUT, 2)
    x = torch.randn(5, D_IN, generator=g)
    torch.testing.assert_close(layer(x), x @ (coef @ basis).T + bias)
    assert "side=in" in repr(layer)
    with pytest.raises(PlanError, match="do not chain"):
        BasisLinear(basis, coef, bias, side="out")


def test_side_choice_and_contract() -> None:
    assert family_side((4, 12), BasisOptions()) is Side.in_  # the larger input side is shared
    assert family_side((12, 4), BasisOptions()) is Side.out
    assert family_side((6, 6), BasisOptions()) is Side.out
    assert family_side((4, 12), BasisOptions(side="out")) is Side.out
    assert family_side((12, 4), BasisOptions(side="in")) is Side.in_
    spec = FamilySpec(scheme="basis", rank=2, class_params=24, member_params=8)
    assert spec.side is None and spec.basis_side is Side.out
    with pytest.raises(ValueError, match="scheme 'basis' only"):
        FamilySpec(scheme="tie", side="in")
    ws, covs = _class()
    with pytest.raises(PlanError, match="side 'out' only"):
        refine(ws, shared_basis(ws, 1, covs, side="in"), covs)


class Block(nn.Module):
    """x + down(tanh(up(x))): up is 12x4 (out side by auto), down 4x12 (in side by auto)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class UpDown(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def updown(seed: int = 0) -> UpDown:
    torch.manual_seed(seed)
    return UpDown().double().eval()


def _plan(groups: list[list[str]]) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(status="feasible", coloring=coloring, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


def _cfg(side: str) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="basis", targets=["re:blocks.\\d+.down.weight"], basis={"rank": 2, "side": side},
                         dtype="float64", device="cpu", progress=False)


@pytest.mark.parametrize(("side", "class_params", "member_params"), [("auto", 2 * 12, 4 * 2), ("out", 4 * 2, 2 * 12)])
def test_unique_params_equal_the_solver_count(side: str, class_params: int, member_params: int) -> None:
    """Every partition of the three 4x12 down-projections: applied count == solver count, and the
    exact re-scoring equals the installed bases' error."""
    data = mlp_data()
    problem = analyze(updown(), data, _cfg(side))
    spec = problem.families["down.weight"]
    assert (spec.class_params, spec.member_params) == (class_params, member_params)
    assert spec.side is (Side.in_ if side == "auto" else Side.out)
    a, b, c = [x.name for x in problem.layers]
    for groups in ([[a], [b], [c]], [[a, b], [c]], [[a, c], [b]], [[a], [b, c]], [[a, b, c]]):
        plan = _plan(groups)
        model = updown()
        before = unique_params(model)
        report = apply_plan(model, plan, data=data, config=_cfg(side), problem=problem)
        expected = evaluate.unique_params(problem, plan.coloring)
        assert report.plan_params_shared == expected == len(groups) * class_params + 3 * member_params
        assert before - unique_params(model) == 3 * 48 - expected
        assert report.sides == {"down.weight": spec.side}
        for group in groups:
            mods = [model.get_submodule(n.removesuffix(".weight")) for n in group]
            assert all(m.basis is mods[0].basis and m.side is spec.side for m in mods)
        score = rescore_basis_plan(updown(), data, plan, problem, _cfg(side))
        assert score.total == pytest.approx(report.whitened_error, rel=1e-9)
        assert all(s.side is spec.side for s in score.classes)
        if max(len(g) for g in groups) <= 2:
            assert score.total == pytest.approx(score.objective, rel=1e-9)


def test_round_trip_is_bit_exact_on_the_input_side(tmp_path) -> None:
    import json

    from safetensors import safe_open

    from hessian_worker.io import load_shared, save_shared

    data = mlp_data()
    problem = analyze(updown(), data, _cfg("in"))
    names = [x.name for x in problem.layers]
    plan = _plan([names[:2], names[2:]])
    model = updown()
    apply_plan(model, plan, data=data, config=_cfg("in"), problem=problem)
    x = data.rows()["input"]
    expected = model(x)
    save_shared(model, plan, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        bases = [k for k in f.keys() if k.endswith("down.basis")]  # noqa: SIM118 (no __iter__)
        assert len(bases) == 2 and f.get_tensor(bases[0]).shape == (2, 12)
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["basis"]["blocks.1.down"] == {"rank": 2, "out": 4, "in": 12, "bias": True, "side": "in",
                                              "basis": "blocks.0.down"}
    fresh = updown(seed=5)
    load_shared(fresh, tmp_path)
    assert fresh.blocks[0].down.basis is fresh.blocks[1].down.basis
    assert fresh.blocks[2].down.side is Side.in_
    assert unique_params(fresh) == unique_params(model)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
