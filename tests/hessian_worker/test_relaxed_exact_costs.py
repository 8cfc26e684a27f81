"""Relaxed pair costs priced by the exact GGN's per-layer blocks, against a dense float64 reference."""

from __future__ import annotations

import pytest
import torch
from hw_cases import TinyMLP, dense_ggn, mlp_data, quad_dense

from hessian_worker.analysis import analyze
from hessian_worker.config import AnalyzeConfig
from hessian_worker.objective import Objective
from hessian_worker.prepare import prepare
from hessian_worker.relaxed.analysis import relaxed_covariances
from hessian_worker.relaxed.costs import PairSpectra
from hessian_worker.relaxed.decompose import alone_fit, pair_fit, relaxed_error
from hessian_worker.schemes import scheme_for
from solver import SolveConfig


def model() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(width=6, depth=4).double().eval()


def cfg(pricing: str, **more) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1, "pricing": pricing, "shrinkage": [], **more},
                         dtype="float64", device="cpu", progress=False)


def dense_setting(problem, config: AnalyzeConfig):
    """(objective, dense float64 GGN, whitening covariances, parameters) of the test model on its data."""
    prep = prepare(model(), mlp_data(), config)
    names = [x.name for x in problem.layers]
    obj = Objective(prep.model, prep.data, names, config.distill)
    with torch.no_grad():
        covs = relaxed_covariances(prep.model, prep.data, names, config)
    return obj, dense_ggn(obj), covs, dict(prep.model.named_parameters())


def reference(problem, config: AnalyzeConfig) -> dict[tuple[int, int], float]:
    """½ δ_iᵀ G_ii δ_i + ½ δ_jᵀ G_jj δ_j per pair, G the GGN built densely by autograd, δ the pair's
    whitened closed form at the problem's rank."""
    obj, ggn, covs, weights = dense_setting(problem, config)
    names = [x.name for x in problem.layers]
    out = {}
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            rank = problem.families[problem.layers[i].family].rank
            fit = pair_fit(weights[a].detach(), weights[b].detach(), rank, covs[a], covs[b])
            da, db = fit.weight(0) - weights[a].detach(), fit.weight(1) - weights[b].detach()
            out[(i, j)] = 0.5 * float(quad_dense(ggn, obj, {a: da[None]})[0] + quad_dense(ggn, obj, {b: db[None]})[0])
    return out


def test_exact_pricing_is_the_dense_ggn_blocks_of_each_pairs_residual() -> None:
    config = cfg("exact")
    problem = analyze(model(), mlp_data(), config)
    expected = reference(problem, config)
    assert len(expected) == 6  # four layers of one family
    for (i, j), value in expected.items():
        assert problem.costs.matrix[i][j] == pytest.approx(value, rel=1e-9)
        assert problem.costs.matrix[j][i] == problem.costs.matrix[i][j]
    kron = analyze(model(), mlp_data(), cfg("kronecker"))
    # the same fits, another price: the Kronecker model's differs
    assert any(abs(kron.costs.matrix[i][j] - v) > 1e-3 * v for (i, j), v in expected.items())


def test_candidates_at_other_ranks_are_priced_exactly_on_the_costs_data() -> None:
    config = cfg("exact", rank_ratios=[0.34])  # rank 2 of 6
    problem = analyze(model(), mlp_data(), config.model_copy(update={"max_params_ratio": 0.95}))
    scheme = scheme_for("relaxed")
    state = scheme.state(model(), mlp_data(), problem, config)
    with pytest.raises(ValueError, match="data="):
        scheme.extra_candidates(model(), problem, SolveConfig(max_params_ratio=0.95), state, config)
    extra = scheme.extra_candidates(model(), problem, SolveConfig(max_params_ratio=0.95), state, config,
                                    data=mlp_data())
    at_two = [p for _, p in extra if p.families[problem.layers[0].family].rank == 2]
    assert at_two
    for (i, j), value in reference(at_two[0], config).items():
        assert at_two[0].costs.matrix[i][j] == pytest.approx(value, rel=1e-9)
    alone = [p for _, p in extra if p.alone_families()]
    assert alone  # every layer alone at the filling rank is a candidate too
    for i, value in alone_reference(alone[0], config).items():
        assert alone[0].costs.unary[i] == pytest.approx(value, rel=1e-9)


def alone_reference(problem, config: AnalyzeConfig) -> dict[int, float]:
    """½ δᵀ G δ per layer of an alone family, δ = A B − W of the whitened truncated SVD at its rank."""
    obj, ggn, covs, weights = dense_setting(problem, config)
    out = {}
    for i, x in enumerate(problem.layers):
        if x.family in problem.alone_families():
            w = weights[x.name].detach()
            delta = alone_fit(w, problem.families[x.family].rank, covs[x.name]).weight(0) - w
            out[i] = 0.5 * float(quad_dense(ggn, obj, {x.name: delta[None]})[0])
    return out


def test_kronecker_alone_cost_is_the_fitted_whitened_error() -> None:
    """PairSpectra prices a layer alone as the whitened error of the fit apply installs."""
    config = cfg("kronecker")
    problem = analyze(model(), mlp_data(), config)
    prep = prepare(model(), mlp_data(), config)
    names = [x.name for x in problem.layers]
    with torch.no_grad():
        covs = relaxed_covariances(prep.model, prep.data, names, config)
    weights = {n: p.detach() for n, p in prep.model.named_parameters() if n in names}
    pricer = PairSpectra(problem.layers, weights, covs)
    fam = problem.layers[0].family
    costs = pricer.alone({fam: 2}, {fam})
    assert sorted(costs) == list(range(len(names)))
    for i, n in enumerate(names):
        fit = alone_fit(weights[n], 2, covs[n])
        assert costs[i] == pytest.approx(relaxed_error([weights[n]], fit, [covs[n]]), rel=1e-9)
    assert pricer.alone({fam: 2}, set()) == {}


def test_the_problems_own_rank_is_not_priced_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """extra_candidates takes the analysis's exact costs at the problem's ranks (same config, same
    data) instead of computing their forms again; another config prices them anew."""
    from hessian_worker.cost_source import made_with
    from hessian_worker.relaxed.exact_costs import ExactPairCosts

    config = cfg("exact", rank_ratios=[0.34]).model_copy(update={"max_params_ratio": 0.95})
    problem = analyze(model(), mlp_data(), config)
    own = problem.families[problem.layers[0].family].rank
    priced: list[int] = []
    real = ExactPairCosts._price

    def spy(self, todo):
        priced.extend(rank for _, _, rank in todo)
        return real(self, todo)

    monkeypatch.setattr(ExactPairCosts, "_price", spy)
    scheme = scheme_for("relaxed")
    state = scheme.state(model(), mlp_data(), problem, config)
    assert made_with(problem.source, config)
    extra = scheme.extra_candidates(model(), problem, SolveConfig(max_params_ratio=0.95), state, config,
                                    data=mlp_data())
    assert extra and priced and own not in priced
    other = config.model_copy(update={"chunk": 3})
    assert not made_with(problem.source, other)
    priced.clear()
    scheme.extra_candidates(model(), problem, SolveConfig(max_params_ratio=0.95), state, other, data=mlp_data())
    assert own in priced


def test_a_pricer_refuses_another_problems_costs() -> None:
    from hessian_worker.relaxed.analysis import candidate_pricer

    config = cfg("exact")
    problem = analyze(model(), mlp_data(), config)
    pricer = candidate_pricer(model(), mlp_data(), problem.layers[::-1], None, config)
    with pytest.raises(ValueError, match="not this pricer's"):
        pricer.remember(problem)


@pytest.mark.parametrize("side", ["out", "in"])
def test_basis_families_are_priced_as_the_basis_scheme_prices_them(side: str) -> None:
    """A family kept as shared bases beside the relaxed ones: the Kronecker pricer gives the basis
    scheme's costs (basis.costs.basis_costs) under a layer alone's whitening; the exact pricer the
    dense GGN's forms of the same fits' residuals, u = E({ℓ}) and w = E({ℓ, m}) − u_ℓ − u_m."""
    from hessian_worker.basis.costs import basis_costs
    from hessian_worker.basis.decompose import shared_basis
    from hessian_worker.curvature.exact import ExactCurvature
    from hessian_worker.relaxed.costs import alone_key
    from hessian_worker.relaxed.exact_costs import ExactPairCosts
    from solver.schema import Side

    config = cfg("exact")
    problem = analyze(model(), mlp_data(), config)
    obj, ggn, covs, params = dense_setting(problem, config)
    names = [x.name for x in problem.layers]
    weights = {n: params[n].detach() for n in names}
    # a layer alone (and so a basis class) whitens with its own entry where the state has one
    own = {n: 2.0 * covs[n] for n in names}
    state = {**covs, **{alone_key(n): c for n, c in own.items()}}
    fam, rank, sides = problem.layers[0].family, 2, {problem.layers[0].family: Side(side)}

    excess, unary = PairSpectra(problem.layers, weights, state).basis({fam: rank}, sides)
    matrix, expected_unary = basis_costs(problem.layers, weights, own, {fam: rank}, sides=sides)
    assert unary == pytest.approx(dict(enumerate(expected_unary)), rel=1e-9)
    assert excess == pytest.approx({(i, j): matrix[i][j] for i in range(4) for j in range(i + 1, 4)}, rel=1e-9, abs=1e-12)

    def priced(members: tuple[int, ...]) -> float:
        ws = [weights[names[i]] for i in members]
        fit = shared_basis(ws, rank, [own[names[i]] for i in members], side=side)
        return sum(0.5 * float(quad_dense(ggn, obj, {names[i]: (fit.weight(k) - ws[k])[None]})[0])
                   for k, i in enumerate(members))

    curvature = ExactCurvature(obj, config.curvature, chunk=config.chunk)
    excess, unary = ExactPairCosts(problem.layers, weights, state, curvature).basis({fam: rank}, sides)
    assert unary == pytest.approx({i: priced((i,)) for i in range(4)}, rel=1e-9)
    for (i, j), value in excess.items():
        assert value == pytest.approx(max(0.0, priced((i, j)) - unary[i] - unary[j]), rel=1e-9, abs=1e-15)
    assert any(value > 0 for value in excess.values())
