"""A relaxed plan with a basis family beside its relaxed ones: the relaxed scheme fits, installs,
measures, saves, loads and heals both kinds of class, and counts what the solver counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hw_cases import bert_data, tiny_bert
from safetensors import safe_open

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.basis.decompose import shared_basis
from hessian_worker.basis.modules import BasisLinear
from hessian_worker.config import AnalyzeConfig
from hessian_worker.healing import heal
from hessian_worker.io import load_shared, save_shared
from hessian_worker.measure import measure_loss, measure_plans
from hessian_worker.options import HealConfig
from hessian_worker.relaxed.costs import alone_cov
from hessian_worker.relaxed.modules import RelaxedLinear
from hessian_worker.schemes import scheme_for, scheme_installed, scheme_of
from hessian_worker.tying import unique_params
from solver import evaluate
from solver.schema import FamilySpec, SharingPlan

INTER, OUT = "intermediate.dense.weight", "output.dense.weight"
D_HIDDEN, D_INTER = 8, 16  # tiny BERT: intermediate.dense is [16, 8], output.dense [8, 16]
BASIS_RANK = 2


def plan_of(groups: list[list[str]]) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(status="feasible", coloring=coloring, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


@pytest.fixture
def beside():
    """tiny BERT: the intermediate layers share one S (rank-1 corrections), the output layers one
    rank-2 basis (side out), in one relaxed plan."""
    model, data = tiny_bert(), bert_data()
    config = AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1}, dtype="float64", device="cpu", progress=False,
                           targets=["re:.*intermediate.dense.weight", "re:.*output.dense.weight"],
                           ignore=["re:.*attention.*"])
    problem = analyze(model, data, config)
    families = dict(problem.families)
    families[OUT] = FamilySpec(scheme="basis", rank=BASIS_RANK, class_params=D_HIDDEN * BASIS_RANK,
                               member_params=BASIS_RANK * D_INTER, side="out")
    problem = problem.model_copy(update={"families": families})
    inter = [x.name for x in problem.layers if x.family == INTER]
    out = [x.name for x in problem.layers if x.family == OUT]
    plan = plan_of([inter, out])
    reference = copy.deepcopy(model)
    covs = scheme_for("relaxed").state(reference, data, problem, config)
    report = apply_plan(model, plan, "mean", config=config, problem=problem, state=covs)
    return model, reference, plan, problem, report, config, covs


def test_the_relaxed_scheme_fits_both_kinds_and_counts_as_the_solver(beside) -> None:
    model, reference, plan, problem, report, config, covs = beside
    assert scheme_of(problem) is scheme_for("relaxed") and scheme_installed(model) is scheme_for("relaxed")
    assert report.relaxed_classes == 1 and report.basis_classes == 1
    assert report.ranks == {INTER: 1, OUT: BASIS_RANK}
    # one S of 16x8 + two rank-1 corrections; one 8x2 basis + two 2x16 coefficient blocks
    counted = D_INTER * D_HIDDEN + 2 * (D_INTER + D_HIDDEN) + D_HIDDEN * BASIS_RANK + 2 * BASIS_RANK * D_INTER
    assert report.plan_params_shared == evaluate.unique_params(problem, plan.coloring) == counted
    layers = model.encoder.layer
    assert isinstance(layers[0].intermediate.dense, RelaxedLinear)
    assert layers[0].intermediate.dense.shared is layers[1].intermediate.dense.shared
    assert layers[0].output.dense.basis is layers[1].output.dense.basis
    # the basis class is the basis scheme's fit under the whitening a layer alone gets
    names = [f"encoder.layer.{i}.output.dense.weight" for i in range(2)]
    ws = [reference.get_submodule(n[:-7]).weight.detach() for n in names]
    fit = shared_basis(ws, BASIS_RANK, [alone_cov(covs, n) for n in names], damping=config.relaxed.damping)
    for i in range(2):
        dense = layers[i].output.dense
        assert isinstance(dense, BasisLinear)
        torch.testing.assert_close(dense.weight, fit.weight(i))
        x = torch.randn(3, D_INTER, dtype=torch.float64)
        torch.testing.assert_close(dense(x), x @ dense.weight.T + dense.bias)
    # measuring the plan substitutes exactly what apply installed
    measured = measure_plans(reference, bert_data(), [plan], config, problem=problem, covs=covs)[0]
    assert measured == pytest.approx(measure_loss(model, reference, bert_data(), config), rel=1e-9)


def test_round_trip_keeps_both_layouts_bit_exactly(beside, tmp_path) -> None:
    model, _, plan, _, _, _, _ = beside
    batch = bert_data().batches[0]
    expected = model(**batch).last_hidden_state
    save_shared(model, plan, tmp_path)
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["scheme"] == "relaxed" and meta["unique_params"] == unique_params(model)
    assert set(meta["relaxed"]) == {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    assert meta["basis"]["encoder.layer.1.output.dense"]["basis"] == "encoder.layer.0.output.dense"
    out = meta["layers"]["encoder.layer.1.output.dense.weight"]
    assert out["reads"] == "encoder.layer.0.output.dense.basis" and out["coef"] == "encoder.layer.1.output.dense.coef"
    assert "| layers on shared bases | 2 (" in (tmp_path / "README.md").read_text()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len({k for k in keys if k.endswith("output.dense.basis")}) == 1  # the basis stored once
    fresh = tiny_bert(seed=7)
    load_shared(fresh, tmp_path)
    assert isinstance(fresh.encoder.layer[1].output.dense, BasisLinear)
    assert fresh.encoder.layer[0].output.dense.basis is fresh.encoder.layer[1].output.dense.basis
    assert unique_params(fresh) == unique_params(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, rtol=0, atol=0)


def test_healing_trains_both_and_keeps_each_shared_tensor_one(beside) -> None:
    model, reference, _, _, _, _, _ = beside
    layers = model.encoder.layer
    basis, shared = layers[0].output.dense.basis, layers[0].intermediate.dense.shared
    before = basis.detach().clone(), shared.detach().clone()
    count = unique_params(model)
    heal(model, reference, bert_data(), HealConfig(steps=6, lr=1e-2, holdout=0.0, batch_size=3, device="cpu",
                                                     progress=False))
    assert unique_params(model) == count
    assert layers[1].output.dense.basis is basis and layers[1].intermediate.dense.shared is shared
    assert float((basis.detach().double() - before[0]).abs().max()) > 1e-4
    assert float((shared.detach().double() - before[1]).abs().max()) > 1e-4


def test_a_family_on_one_column_space_goes_to_shared_bases() -> None:
    """Four 8x8 layers W_ℓ = U C_ℓ on one rank-3 column space, at 0.48 of their 256 parameters
    (122): one rank-3 basis for all (24 + 4·24 = 120) loses nothing, while every relaxed form that
    fits loses something (one S alone is 64; each layer alone fits rank 1), so the descent free to
    move families to bases finds the lossless plan, which installs the layers exactly."""
    from hw_cases import TinyMLP, mlp_data

    from hessian_worker.relaxed.candidates import BASES, MIXED_BASIS, rank_candidates
    from solver import SolveConfig

    def spanned() -> TinyMLP:
        torch.manual_seed(0)
        model = TinyMLP(width=8, depth=4).double().eval()
        u = torch.randn(8, 3, dtype=torch.float64)
        with torch.no_grad():
            for block in model.blocks:
                block.fc.weight.copy_(u @ torch.randn(3, 8, dtype=torch.float64))
        return model

    config = AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1, "basis_ratios": [0.25, 0.375]}, dtype="float64",
                           device="cpu", progress=False, max_params_ratio=0.48)
    problem = analyze(spanned(), mlp_data(), config)
    scheme = scheme_for("relaxed")
    covs = scheme.state(spanned(), mlp_data(), problem, config)
    solve_config = SolveConfig(max_params_ratio=0.48)
    found = {p.strategy: (p, prob) for p, prob in rank_candidates(spanned(), problem, solve_config, covs, config.relaxed)}
    # every family on bases at the level predicting least is a candidate of its own; the descents
    # free to move families to bases reach the same forms, so they add nothing beside it
    plan, mixed = found[BASES]
    spec = mixed.families["fc.weight"]
    assert (spec.scheme.value, spec.rank) == ("basis", 3)
    assert plan.objective == pytest.approx(0.0, abs=1e-9) and plan.params.shared == 120
    assert MIXED_BASIS not in found
    assert all(p.objective > 1e-6 for s, (p, _) in found.items() if s != BASES)
    without = config.relaxed.model_copy(update={"basis_ratios": []})
    assert {p.strategy for p, _ in rank_candidates(spanned(), problem, solve_config, covs, without)} == {
        s for s, (_, prob) in found.items() if not any(f.scheme.value == "basis" for f in prob.families.values())}
    model, reference = spanned(), spanned()
    apply_plan(model, plan, "mean", config=config, problem=mixed, state=covs)
    assert all(isinstance(block.fc, BasisLinear) for block in model.blocks)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)


def test_plans_on_bases_also_come_at_the_ranks_that_spend_the_budget() -> None:
    """The basis shares leave budget unspent; each plan with basis families comes again with its
    partition kept and its basis ranks raised until the budget is spent, priced like the others."""
    from hw_cases import TinyMLP, mlp_data

    from hessian_worker.relaxed.candidates import rank_candidates
    from solver import SolveConfig

    def wide() -> TinyMLP:
        torch.manual_seed(1)
        return TinyMLP(width=8, depth=4).double().eval()

    # 4 layers of 8x8 (256), budget 0.6 (153): a rank-1 basis per class keeps 8 + 4·8 = 40 with one class,
    # 64 with four, so a rank of one family costs 40 to 64 more
    config = AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1, "basis_ratios": [0.125]}, dtype="float64",
                           device="cpu", progress=False, max_params_ratio=0.6)
    problem = analyze(wide(), mlp_data(), config)
    covs = scheme_for("relaxed").state(wide(), mlp_data(), problem, config)
    found = {p.strategy: (p, prob) for p, prob in
             rank_candidates(wide(), problem, SolveConfig(max_params_ratio=0.6), covs, config.relaxed)}
    spent = {s: f for s, f in found.items() if s.endswith("-spent")}
    assert spent
    for strategy, (plan, at) in spent.items():
        before, before_problem = found[strategy.removesuffix("-spent")]
        assert plan.coloring == before.coloring
        assert before.params.shared < plan.params.shared <= 153
        assert at.families["fc.weight"].rank > before_problem.families["fc.weight"].rank
        assert plan.objective == pytest.approx(evaluate.objective(at, plan.coloring), rel=1e-12)
        assert plan.params.shared == evaluate.unique_params(at, plan.coloring)
