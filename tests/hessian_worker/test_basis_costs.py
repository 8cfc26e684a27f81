"""Basis costs: unary = own truncated error, pair = extra error of a shared basis (>= 0, 0 for twins)."""

from __future__ import annotations

import pytest
import torch

from hessian_worker.basis.config import BasisOptions
from hessian_worker.basis.costs import (
    FamilyGrams,
    basis_costs,
    class_errors,
    family_rank,
    family_ranks,
)
from hessian_worker.basis.decompose import shared_basis, whitened_error
from hessian_worker.discovery import LayerInfo
from hessian_worker.errors import DiscoveryError


def _family(k: int, d_out: int, d_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.fc.weight" for i in range(k)]
    layers = [LayerInfo(n, "fc.weight", i, (d_out, d_in)) for i, n in enumerate(names)]
    weights = {n: torch.randn(d_out, d_in, generator=g) for n in names}
    covs = {}
    for n in names:
        x = torch.randn(9, d_in, generator=g)
        covs[n] = x.T @ x / 9
    return layers, weights, covs


@pytest.mark.parametrize(("d_out", "d_in"), [(6, 3), (3, 6), (4, 4)])
@pytest.mark.parametrize("whiten", [True, False])
def test_gram_error_equals_the_decomposition_error(d_out: int, d_in: int, whiten: bool) -> None:
    """Both Gram sides (d_out² and k·d_in square) give the real basis's whitened error."""
    layers, weights, covs = _family(3, d_out, d_in)
    ws = list(weights.values())
    cs = list(covs.values()) if whiten else None
    grams = FamilyGrams(ws, cs)
    for members in ([0], [1, 2], [0, 1, 2]):
        f = shared_basis(
            [ws[i] for i in members], 2, None if cs is None else [cs[i] for i in members]
        )
        real = whitened_error(
            [ws[i] for i in members], f, None if cs is None else [cs[i] for i in members]
        )
        assert grams.error(members, 2) == pytest.approx(real, rel=1e-9, abs=1e-10)


def test_pair_costs_are_non_negative_and_unary_is_the_own_error() -> None:
    layers, weights, covs = _family(4, 5, 4, seed=2)
    matrix, unary = basis_costs(layers, weights, covs, {"fc.weight": 2})
    for i, layer in enumerate(layers):
        f = shared_basis([weights[layer.name]], 2, [covs[layer.name]])
        assert unary[i] == pytest.approx(
            whitened_error([weights[layer.name]], f, [covs[layer.name]]), rel=1e-9
        )
        assert matrix[i][i] == 0.0
    for i in range(4):
        for j in range(4):
            assert matrix[i][j] >= 0.0 and matrix[i][j] == matrix[j][i]
    # the pair entry is E*(pair) − u_i − u_j
    pair = class_errors(
        [[layers[0].name, layers[1].name]], weights, covs, dict.fromkeys(weights, 2)
    )[0]
    assert matrix[0][1] == pytest.approx(pair - unary[0] - unary[1], rel=1e-9, abs=1e-12)


def test_identical_layers_share_for_free() -> None:
    layers, weights, covs = _family(3, 5, 4, seed=3)
    twin = layers[1].name
    weights[twin] = weights[layers[0].name].clone()
    covs[twin] = covs[layers[0].name].clone()
    matrix, unary = basis_costs(layers, weights, covs, {"fc.weight": 2})
    assert unary[0] == pytest.approx(unary[1], rel=1e-12)
    assert matrix[0][1] == pytest.approx(0.0, abs=1e-9 * unary[0])
    assert matrix[0][2] > 1e-6


def test_cross_family_pairs_are_null() -> None:
    layers, weights, covs = _family(2, 4, 3)
    g = torch.Generator().manual_seed(9)
    other = [LayerInfo(f"layers.{i}.up.weight", "up.weight", i, (3, 4)) for i in range(2)]
    for x in other:
        weights[x.name] = torch.randn(3, 4, generator=g)
        covs[x.name] = torch.eye(4)
    matrix, _ = basis_costs([*layers, *other], weights, covs, {"fc.weight": 1, "up.weight": 2})
    assert matrix[0][2] is None and matrix[1][3] is None and matrix[2][3] is not None


def test_family_ranks() -> None:
    assert family_rank("f", (1536, 384), BasisOptions()) == 96
    assert family_rank("f", (8, 16), BasisOptions(rank_ratio=0.5)) == 4
    assert family_rank("f", (8, 16), BasisOptions(rank={"f": 3})) == 3
    assert family_rank("g", (8, 16), BasisOptions(rank={"f": 3})) == 2
    assert family_rank("f", (3, 3), BasisOptions(rank_ratio=0.01)) == 1
    with pytest.raises(DiscoveryError, match="exceeds"):
        family_rank("f", (4, 4), BasisOptions(rank=5))
    layers = [LayerInfo("a.0.w", "w", 0, (4, 4))]
    with pytest.raises(DiscoveryError, match="unknown families"):
        family_ranks(layers, {"a.0.w": (4, 4)}, BasisOptions(rank={"nope": 1}))
    with pytest.raises(ValueError, match=">= 1"):
        BasisOptions(rank=0)
