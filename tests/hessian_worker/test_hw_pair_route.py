"""The per-family pair route (``quad_pairs``) against the dense directions it replaces.

Backends whose form splits by layer (diagonal, layerwise) or passes through a few projections per
layer (projected) price a family's pairs from the differences W_j − W_l; the result must be the
form of the very directions the dense route builds, pair by pair, for both cost kinds.
"""

from __future__ import annotations

import pytest
import torch
from hw_cases import TinyMLP, dense_ggn, mlp_data, quad_dense

from hessian_worker import AnalyzeConfig
from hessian_worker.costs import FamilyPairs, block_pair_quads, cost_matrix, pairs_of
from hessian_worker.curvature.diagonal import DiagonalCurvature
from hessian_worker.curvature.exact import ExactCurvature
from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.curvature.projected import Bulk, Eigensolver, ProjectedCurvature
from hessian_worker.discovery import LayerInfo, discover_layers
from hessian_worker.objective import Objective
from hessian_worker.pair_costs import build_curvature, make_predict
from solver.schema import CostKind

KINDS = [CostKind.pairwise, CostKind.assignment]


def deep_mlp() -> TinyMLP:
    """Five layers in one family, so a family is wider than the route's chunk of 2."""
    torch.manual_seed(3)
    return TinyMLP(depth=5).double().eval()


@pytest.fixture
def deep_obj() -> Objective:
    model = deep_mlp()
    return Objective(model, mlp_data(), [x.name for x in discover_layers(model)])


def family_of(obj: Objective, kind: CostKind) -> FamilyPairs:
    return FamilyPairs.of(obj.names, obj.params0, pairs_of(range(len(obj.names)), kind), kind)


def by_hand(obj: Objective, family: FamilyPairs) -> dict[str, torch.Tensor]:
    """Each pair's direction written out: pairwise both to the mean, assignment a takes b."""
    n = len(family.pairs)
    out = {name: torch.zeros(n, *obj.params0[name].shape) for name in obj.names}
    for row, (a, b) in enumerate(family.pairs):
        diff = obj.params0[obj.names[b]] - obj.params0[obj.names[a]]
        if family.coef == (0.5, -0.5):
            out[obj.names[a]][row], out[obj.names[b]][row] = diff / 2, -diff / 2
        else:
            out[obj.names[a]][row] = diff
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_dense_directions_are_the_pair_moves(deep_obj: Objective, kind: CostKind) -> None:
    family = family_of(deep_obj, kind)
    expected = by_hand(deep_obj, family)
    for rows in (slice(None), slice(3, 7)):
        got = family.dense(rows)
        for name in deep_obj.names:
            torch.testing.assert_close(got[name], expected[name][rows], rtol=0, atol=0)


def _backends(obj: Objective) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    return {
        "projected-nystrom": ProjectedCurvature(obj, rank=6, generator=gen, chunk=2),
        "projected-lanczos-isotropic": ProjectedCurvature(obj, rank=4, generator=gen, chunk=2,
                                                          eigensolver=Eigensolver.lanczos, bulk=Bulk.isotropic),
        "diagonal": DiagonalCurvature({n: torch.rand(p.shape, generator=gen) for n, p in obj.params0.items()}),
        "layerwise": LayerwiseCurvature.collect(obj.model, obj.data, obj.names),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_quad_pairs_equals_the_dense_form(deep_obj: Objective, kind: CostKind) -> None:
    family = family_of(deep_obj, kind)
    directions = by_hand(deep_obj, family)
    for name, curvature in _backends(deep_obj).items():
        got = curvature.quad_pairs(family)  # type: ignore[attr-defined]
        expected = curvature.quad(directions)  # type: ignore[attr-defined]
        assert float(expected.min()) > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0, msg=name)


def test_full_rank_projected_pairs_equal_the_dense_ggn(deep_obj: Objective) -> None:
    """At full rank the projected form is G itself: the pair route gives the exact pair costs."""
    dim = sum(p.numel() for p in deep_obj.params0.values())
    curvature = ProjectedCurvature(deep_obj, rank=dim, generator=torch.Generator().manual_seed(0), chunk=2)
    ggn = dense_ggn(deep_obj)
    for kind in KINDS:
        family = family_of(deep_obj, kind)
        torch.testing.assert_close(curvature.quad_pairs(family), quad_dense(ggn, deep_obj, by_hand(deep_obj, family)),
                                   rtol=1e-6, atol=1e-12)


def test_block_pair_quads_chunks_agree(deep_obj: Objective) -> None:
    diagonal = _backends(deep_obj)["diagonal"]
    family = family_of(deep_obj, CostKind.assignment)
    whole = block_pair_quads(diagonal.quad, family, chunk=5)  # type: ignore[attr-defined]
    torch.testing.assert_close(block_pair_quads(diagonal.quad, family, chunk=2), whole, rtol=1e-12, atol=0)  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:.*predicted costs were negative")
@pytest.mark.parametrize("backend", ["projected", "diagonal", "layerwise"])
def test_task_loss_pairs_keep_the_first_order_term(backend: str) -> None:
    """Both routes through cost_matrix give the same matrix, gradient term included."""
    model = deep_mlp()
    layers = discover_layers(model)
    obj = Objective(model, mlp_data(), [x.name for x in layers], task_loss=lambda y, batch: (y - 0.3).pow(2).mean())
    predict = make_predict(obj, build_curvature(obj, AnalyzeConfig(backend=backend, rank=6, chunk=2, seed=0,
                                                                   dtype="float64", progress=False)))
    assert predict.pair_route is not None and predict.grads is not None
    family = family_of(obj, CostKind.pairwise)
    lin = family.linear(predict.grads)
    assert float(lin.abs().max()) > 1e-6
    torch.testing.assert_close(predict.family_pairs(family), predict(by_hand(obj, family)), rtol=1e-10, atol=1e-14)
    for kind in KINDS:
        routed = cost_matrix(layers, obj.params0, predict, kind, predict_pairs=predict.pair_route, clip_negative=False)
        dense = cost_matrix(layers, obj.params0, predict, kind, chunk=3, clip_negative=False)
        torch.testing.assert_close(torch.tensor(routed), torch.tensor(dense), rtol=1e-10, atol=1e-14)


def test_exact_keeps_the_dense_route(deep_obj: Objective) -> None:
    predict = make_predict(deep_obj, ExactCurvature(deep_obj))
    assert predict.pair_route is None
    with pytest.raises(TypeError, match="no pair route"):
        predict.family_pairs(family_of(deep_obj, CostKind.pairwise))


def test_a_family_of_one_has_no_pairs(deep_obj: Objective) -> None:
    layers = discover_layers(deep_obj.model)
    lone = LayerInfo("inp.weight", "inp.weight", 0, tuple(deep_obj.model.inp.weight.shape))
    weights = {**deep_obj.params0, "inp.weight": deep_obj.model.inp.weight.detach()}
    predict = make_predict(deep_obj, _backends(deep_obj)["diagonal"])  # type: ignore[arg-type]
    matrix = cost_matrix([*layers, lone], weights, predict, CostKind.pairwise, predict_pairs=predict.pair_route)
    assert matrix[-1] == [None] * len(layers) + [0.0]
    assert all(v is not None and v > 0 for v in matrix[0][1:-1])
