"""The relaxed scheme on small models: costs against the fits, accounting against brute force,
apply, measuring, save/load bit-exactly, healing keeps the sharing."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from hw_cases import TinyMLP, bert_data, mlp_data, tiny_bert
from safetensors import safe_open

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.config import AnalyzeConfig
from hessian_worker.errors import PlanError
from hessian_worker.healing import heal
from hessian_worker.io import load_compressed, load_shared, save_shared
from hessian_worker.measure import measure_loss, measure_plans
from hessian_worker.options import HealConfig
from hessian_worker.relaxed.apply import RelaxedApplyReport, apply_relaxed_plan
from hessian_worker.relaxed.candidates import rank_candidates
from hessian_worker.relaxed.costs import ALONE_SUFFIX, alone_cov
from hessian_worker.relaxed.decompose import alone_fit, class_fit, relaxed_error
from hessian_worker.relaxed.io import load_relaxed, save_relaxed
from hessian_worker.relaxed.modules import RelaxedLinear
from hessian_worker.schemes import scheme_for, scheme_installed, scheme_of
from hessian_worker.tying import unique_params
from solver import SolveConfig, evaluate, solve
from solver.candidates import candidate_plans
from solver.errors import BudgetInfeasible
from solver.schema import FamilySpec, Scheme, SharingPlan, SharingProblem

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.solver.brute import family_table, set_partitions  # noqa: E402

FC = "fc.weight"


def cfg(rank: int = 1, whiten: bool = True, **more) -> AnalyzeConfig:
    return AnalyzeConfig(scheme="relaxed", relaxed={"rank": rank, "whiten": whiten}, dtype="float64",
                         device="cpu", progress=False, **more)


def deep_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(depth=4).double().eval()


def plan_of(groups: list[list[str]]) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(status="feasible", coloring=coloring, groups=groups,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


@pytest.fixture
def problems() -> dict[int, SharingProblem]:
    return {r: analyze(deep_mlp(), mlp_data(), cfg(r)) for r in (1, 2)}


def test_problem_accounting_and_pair_costs(problems) -> None:
    problem = problems[1]
    spec = problem.families[FC]
    assert (spec.scheme.value, spec.rank, spec.class_params, spec.member_params) == ("relaxed", 1, 16, 8)
    assert problem.costs.unary == [0.0] * 4
    # every pair cost is the fitted pair's whitened error under the same covariances
    model, names = deep_mlp(), [x.name for x in problem.layers]
    covs = scheme_for("relaxed").state(model, mlp_data(), problem, cfg(1))
    ws = [model.get_submodule(n[:-7]).weight.detach() for n in names]
    for i in range(4):
        for j in range(i + 1, 4):
            fit = class_fit([ws[i], ws[j]], 1, [covs[names[i]], covs[names[j]]])
            assert problem.costs.matrix[i][j] == pytest.approx(fit.history[0], rel=1e-9)
            assert problem.costs.matrix[i][j] == pytest.approx(
                relaxed_error([ws[i], ws[j]], fit.factors, [covs[names[i]], covs[names[j]]]), rel=1e-9)


def test_schema_needs_the_accounting() -> None:
    with pytest.raises(ValueError, match="scheme 'relaxed' needs rank"):
        FamilySpec(scheme="relaxed", class_params=16, member_params=8)
    with pytest.raises(ValueError, match="member_params"):
        FamilySpec(scheme="relaxed", rank=1, class_params=16)
    with pytest.raises(ValueError, match="side"):
        FamilySpec(scheme="relaxed", rank=1, class_params=16, member_params=8, side="out")


@pytest.mark.parametrize("rank", [1, 2])
def test_unique_params_and_solver_against_brute_force(rank: int, problems) -> None:
    problem = problems[rank]
    names = [x.name for x in problem.layers]
    table = family_table(problem)[FC]  # brute force: classes -> (least cost, params)
    data = mlp_data()
    for part in set_partitions(list(range(4))):
        groups = [[names[i] for i in cls] for cls in part]
        plan = plan_of(groups)
        model = deep_mlp()
        report = apply_plan(model, plan, data=data, config=cfg(rank), problem=problem)
        assert isinstance(report, RelaxedApplyReport)
        counted = evaluate.unique_params(problem, plan.coloring)
        assert counted == 16 * len(part) + 4 * rank * 8
        # a singleton keeps its dense weight: the solver's count less its unused correction
        singles = sum(len(c) == 1 for c in part)
        assert report.plan_params_shared == counted - singles * rank * 8
        assert unique_params(deep_mlp()) - report.unique_params_after == 4 * 16 - report.plan_params_shared
        for group in groups:
            mods = [model.get_submodule(n[:-7]) for n in group]
            if len(group) == 1:
                assert type(mods[0]).__name__ == "Linear"
                continue
            assert all(isinstance(m, RelaxedLinear) and m.rank == rank for m in mods)
            assert all(m.shared is mods[0].shared for m in mods)
            assert len({id(m.left) for m in mods}) == len(mods)
        # the installed error is the pairwise objective on classes of at most two
        if max(len(c) for c in part) <= 2:
            assert report.whitened_error == pytest.approx(evaluate.objective(problem, plan.coloring), rel=1e-9)
    # the solver's optimum at each budget is the brute-force least cost within it
    for ratio in (0.7, 0.8, 0.9, 1.0):
        budget = int(ratio * 64)
        best = min((cost for k, (cost, params) in table.items() if params <= budget), default=None)
        if best is None:  # rank 2: one class of four keeps 16 + 4*16 = 80 > 64; rank 1 below 48
            with pytest.raises(BudgetInfeasible):
                solve(problem, SolveConfig(max_params_ratio=ratio, time_limit_s=5))
            continue
        plan = solve(problem, SolveConfig(max_params_ratio=ratio, time_limit_s=5))
        assert plan.objective == pytest.approx(best, rel=1e-9, abs=1e-15)
        assert plan.params.shared <= budget


def test_relaxed_layer_forward_is_its_weight(problems) -> None:
    problem = problems[1]
    names = [x.name for x in problem.layers]
    model = deep_mlp()
    apply_plan(model, plan_of([names]), data=mlp_data(), config=cfg(1), problem=problem)
    layer = model.blocks[0].fc
    h = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(h), h @ layer.weight.T + layer.bias)
    assert scheme_installed(model).name.value == "relaxed"


def test_measured_plan_loss_is_the_applied_models() -> None:
    reference, calib, held = deep_mlp(), mlp_data(), mlp_data(n=12, seed=4)
    config = cfg(1)
    problem = analyze(copy.deepcopy(reference), calib, config)
    plans = candidate_plans(problem, SolveConfig(max_params_ratio=1.0, time_limit_s=2), top=3, per_pattern=1)
    names = [x.name for x in problem.layers]
    covs = scheme_for("relaxed").state(reference, calib, problem, config)
    measured = measure_plans(reference, held, plans, config, problem=problem, covs=covs)
    assert len(measured) == len(plans) >= 2
    for plan, value in zip(plans, measured, strict=True):
        model = copy.deepcopy(reference)
        apply_relaxed_plan(model, plan, problem, config=config, covs=covs)
        assert value == pytest.approx(measure_loss(model, reference, held, config), rel=1e-9, abs=1e-15)
    assert all(type(m).__name__ == "Linear" for m in reference.modules() if hasattr(m, "weight"))
    assert {n for n in covs if not n.endswith(ALONE_SUFFIX)} == set(names)


def test_unwhitened_fit_without_data(problems) -> None:
    problem = analyze(deep_mlp(), mlp_data(), cfg(1, whiten=False))
    names = [x.name for x in problem.layers]
    model = deep_mlp()
    ws = [model.get_submodule(n[:-7]).weight.detach().clone() for n in names[:2]]
    report = apply_plan(model, plan_of([names[:2], names[2:]]), problem=problem, config=cfg(1, whiten=False))
    assert not report.whitened and report.whitened_error is None
    fit = class_fit(ws, 1)
    torch.testing.assert_close(model.blocks[0].fc.weight, fit.factors.weight(0))
    s = torch.linalg.svdvals(ws[0] - ws[1])
    assert problem.costs.matrix[0][1] == pytest.approx(0.5 * float((s[2:] ** 2).sum()), rel=1e-9)


def test_rank_candidates_fit_the_budget() -> None:
    def wide() -> TinyMLP:
        torch.manual_seed(0)
        return TinyMLP(width=8, depth=4).double().eval()

    # 8x8 layers: one class of four keeps 64 + 4*16 = 128 at rank 1 (0.5), 64 + 4*32 = 192 at rank 2 (0.75)
    problem = analyze(wide(), mlp_data(), cfg(1, max_params_ratio=0.7))
    options = cfg(1).relaxed.model_copy(update={"rank_ratios": [0.125, 0.25], "basis_ratios": []})  # relaxed forms
    covs = scheme_for("relaxed").state(wide(), mlp_data(), problem, cfg(1))
    # share 0.125 of 8 is rank 1, the problem's own; share 0.25 is rank 2, which does not fit 0.7;
    # every layer alone (no shared tensor) fits at rank 2: 4*2*16 = 128 <= 179 (rank 3: 192)
    only = rank_candidates(wide(), problem, SolveConfig(max_params_ratio=0.7), covs, options)
    assert [p.strategy for p, _ in only] == ["relaxed-fill-0"]
    plan, alone = only[0]
    assert alone.alone_families() == {FC} and alone.families[FC].rank == 2
    assert plan.params.shared == 128 and all(len(g) == 1 for g in plan.groups)
    assert plan.objective == pytest.approx(sum(alone.costs.unary)) and plan.objective > 0
    extra = rank_candidates(wide(), problem, SolveConfig(max_params_ratio=0.8), covs, options)
    assert [p.strategy for p, _ in extra] == ["relaxed-rank-0.25", "relaxed-fill-0"]
    plan, at_rank = extra[0]
    assert at_rank.families[FC].rank == 2 and at_rank.families[FC].member_params == 32
    assert plan.params.shared <= 0.8 * 256 and not at_rank.alone_families()
    assert at_rank.costs.matrix[0][1] <= problem.costs.matrix[0][1]  # a higher rank loses less per pair
    assert extra[1][1].families[FC].rank == 3 and extra[1][0].params.shared == 192  # 4*3*16 <= 204


def test_fixed_groupings_join_at_the_filling_ranks() -> None:
    """At the ranks where c classes per family fill the budget, the adjacent pairs and contiguous
    runs are measured beside the solver's optimum (each partition once per rank)."""
    def six() -> TinyMLP:
        torch.manual_seed(0)
        return TinyMLP(width=16, depth=6).double().eval()

    # 16x16 layers, 6 of them (1536): at 0.8 (1228) 3 classes fill at rank 2 (768 + 6*2*32 = 1152),
    # 2 classes at rank 3 (512 + 576), 1 class at rank 5 (256 + 960), every layer alone at rank 6 (1152)
    problem = analyze(six(), mlp_data(), cfg(1, max_params_ratio=0.8))
    # rank 1: the problem's own; the relaxed forms only (bases: test_relaxed_beside_basis.py)
    options = cfg(1).relaxed.model_copy(update={"rank_ratios": [0.0625], "basis_ratios": []})
    covs = scheme_for("relaxed").state(six(), mlp_data(), problem, cfg(1))
    extra = rank_candidates(six(), problem, SolveConfig(max_params_ratio=0.8), covs, options)
    by_rank: dict[int, list[frozenset]] = {}
    for plan, at_rank in extra:
        assert plan.params.shared <= 0.8 * 1536
        classes: dict[int, set[int]] = {}
        for name, color in plan.coloring.items():
            classes.setdefault(color, set()).add(int(name.split(".")[1]))
        by_rank.setdefault(at_rank.families[FC].rank, []).append(frozenset(map(frozenset, classes.values())))
    assert sorted(by_rank) == [2, 3, 5, 6]
    for partitions in by_rank.values():
        assert len(partitions) == len(set(partitions))  # each partition once
    pairs = frozenset(map(frozenset, ({0, 1}, {2, 3}, {4, 5})))
    halves = frozenset(map(frozenset, ({0, 1, 2}, {3, 4, 5})))
    assert pairs in by_rank[2] and halves in by_rank[3]
    names = {p.strategy for p, _ in extra}
    assert names <= {"relaxed-fill-1", "relaxed-fill-2", "relaxed-fill-3", "relaxed-mixed-ranks",
                     "relaxed-fill-2-sequence", "relaxed-fill-3-adjacent-pairs", "relaxed-fill-3-sequence",
                     "relaxed-fill-0", "relaxed-mixed-alone"}


def test_budget_lowers_the_rank_until_one_class_per_family_fits() -> None:
    problem = analyze(deep_mlp(), mlp_data(), cfg(2, max_params_ratio=0.5))
    # rank 2: one class of 4 keeps 16 + 4*2*8 = 80 > 32; rank 1: 16 + 32 = 48 > 32 still: rank 1, infeasible
    assert problem.families[FC].rank == 1
    problem = analyze(deep_mlp(), mlp_data(), cfg(2, max_params_ratio=0.8))  # 51: rank 1 fits
    assert problem.families[FC].rank == 1
    problem = analyze(deep_mlp(), mlp_data(), cfg(2, max_params_ratio=1.0))  # 64 < 80: rank 1 still
    assert problem.families[FC].rank == 1
    assert analyze(deep_mlp(), mlp_data(), cfg(2)).families[FC].rank == 2  # no budget: the rank asked for


@pytest.fixture
def relaxed_bert():
    model, data = tiny_bert(), bert_data()
    config = cfg(1, targets=["re:.*intermediate.dense.weight", "re:.*output.dense.weight"],
                 ignore=["re:.*attention.*"])
    problem = analyze(model, data, config)
    fams: dict[str, list[str]] = {}
    for x in problem.layers:
        fams.setdefault(x.family, []).append(x.name)
    out = fams["output.dense.weight"]
    plan = plan_of([fams["intermediate.dense.weight"], [out[0]], [out[1]]])
    apply_plan(model, plan, "mean", data=data, config=config, problem=problem)
    return model, plan, problem


@pytest.mark.parametrize("via_shared", [False, True])
def test_round_trip_is_bit_exact(relaxed_bert, tmp_path, via_shared: bool) -> None:
    model, plan, _ = relaxed_bert
    batch = bert_data().batches[0]
    expected = model(**batch).last_hidden_state
    (save_shared if via_shared else save_relaxed)(model, plan, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len({k for k in keys if k.endswith("intermediate.dense.shared")}) == 1  # S_c stored once
    assert {k for k in keys if k.endswith("intermediate.dense.left")} == {
        f"encoder.layer.{i}.intermediate.dense.left" for i in range(2)}
    assert not any(k.endswith("output.dense.shared") for k in keys)  # singletons stay dense
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["scheme"] == "relaxed" and meta["unique_params"] == unique_params(model)
    assert meta["relaxed"]["encoder.layer.1.intermediate.dense"]["shared"] == "encoder.layer.0.intermediate.dense"
    first = meta["layers"]["encoder.layer.1.intermediate.dense.weight"]
    assert first["reads"] == "encoder.layer.0.intermediate.dense.shared"
    assert first["left"] == "encoder.layer.1.intermediate.dense.left"

    fresh = tiny_bert(seed=7)
    assert not torch.equal(fresh(**batch).last_hidden_state, expected)
    loaded = (load_shared if via_shared else load_relaxed)(fresh, tmp_path)
    assert loaded.groups == plan.groups
    layers = fresh.encoder.layer
    assert layers[0].intermediate.dense.shared is layers[1].intermediate.dense.shared
    assert unique_params(fresh) == unique_params(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, rtol=0, atol=0)


def test_load_compressed_maps_the_relaxed_layers(relaxed_bert, tmp_path) -> None:
    model, plan, _ = relaxed_bert
    batch = bert_data().batches[0]
    expected = model(**batch).last_hidden_state
    save_shared(model, plan, tmp_path)
    loaded = load_compressed(tmp_path)
    layers = loaded.encoder.layer
    assert isinstance(layers[0].intermediate.dense, RelaxedLinear)
    assert layers[0].intermediate.dense.shared.data_ptr() == layers[1].intermediate.dense.shared.data_ptr()
    saved = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, saved[name]), name  # every tensor bit-exact
    # the config's attention implementation may differ from the eager one in the last bits
    torch.testing.assert_close(loaded(**batch).last_hidden_state, expected, rtol=1e-12, atol=1e-14)


def test_dense_export_materializes_the_relaxed_layers(relaxed_bert, tmp_path) -> None:
    from transformers import BertModel

    from hessian_worker.export import export_dense

    model, plan, _ = relaxed_bert
    batch = bert_data().batches[0]
    save_shared(model, plan, tmp_path / "shared")
    export_dense(tmp_path / "shared", tmp_path / "dense")
    dense = BertModel.from_pretrained(tmp_path / "dense", attn_implementation="eager").double().eval()
    torch.testing.assert_close(dense.encoder.layer[1].intermediate.dense.weight,
                               model.encoder.layer[1].intermediate.dense.weight.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(dense(**batch).last_hidden_state, model(**batch).last_hidden_state,
                               rtol=1e-12, atol=1e-13)


def test_load_refuses_what_does_not_fit(relaxed_bert, tmp_path) -> None:
    model, plan, _ = relaxed_bert
    save_relaxed(model, plan, tmp_path)
    with pytest.raises(PlanError, match="needs"):
        load_relaxed(tiny_bert(), tmp_path / "missing")
    from transformers import BertConfig, BertModel

    wider = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                 vocab_size=40, max_position_embeddings=32)).double()
    with pytest.raises(PlanError, match="when saved"):
        load_relaxed(wider, tmp_path)


def test_healing_trains_the_shared_tensor_and_keeps_it_one(relaxed_bert) -> None:
    model, _, _ = relaxed_bert
    reference = tiny_bert()
    layers = model.encoder.layer
    shared = layers[0].intermediate.dense.shared
    before = shared.detach().clone()
    lefts = [layers[i].intermediate.dense.left.detach().clone() for i in range(2)]
    count = unique_params(model)
    report = heal(model, reference, bert_data(), HealConfig(steps=6, lr=1e-2, holdout=0.0, batch_size=3,
                                                            device="cpu", progress=False))
    assert report.steps == 6 and report.unique_params == count == unique_params(model)
    now = [layers[i].intermediate.dense for i in range(2)]
    # healing casts the model to its dtype in place: still the same Parameter, one storage for both
    assert now[0].shared is now[1].shared is shared
    assert now[0].shared.data_ptr() == now[1].shared.data_ptr()
    moved = (shared.detach().double() - before).abs().max()
    assert float(moved) > 1e-4  # S_c trained, as one tensor
    assert all(float((m.left.detach().double() - a).abs().max()) > 1e-4 for m, a in zip(now, lefts, strict=True))


@pytest.fixture
def alone_bert():
    """tiny BERT with the intermediate layers sharing one S and the output layers alone (rank 1
    factors, no shared tensor)."""
    model, data = tiny_bert(), bert_data()
    config = cfg(1, targets=["re:.*intermediate.dense.weight", "re:.*output.dense.weight"],
                 ignore=["re:.*attention.*"])
    problem = analyze(model, data, config)
    families = dict(problem.families)
    families["output.dense.weight"] = families["output.dense.weight"].model_copy(update={"alone": True})
    problem = problem.model_copy(update={"families": families})
    inter = [x.name for x in problem.layers if x.family == "intermediate.dense.weight"]
    out = [x.name for x in problem.layers if x.family == "output.dense.weight"]
    plan = solve(problem.model_copy(update={"constraints": problem.constraints.model_copy(
        update={"require": [tuple(inter)]})}))
    assert plan.groups == [inter, [out[0]], [out[1]]] or sorted(plan.groups) == sorted([inter, [out[0]], [out[1]]])
    reference = copy.deepcopy(model)
    report = apply_plan(model, plan, "mean", data=data, config=config, problem=problem)
    return model, reference, plan, problem, report, config


def test_alone_layers_keep_only_their_factors(alone_bert) -> None:
    model, reference, plan, problem, report, config = alone_bert
    spec = problem.families["output.dense.weight"]
    d_out, d_in = 8, 16  # tiny BERT's output.dense: [hidden, intermediate]
    assert spec.member_params == d_out + d_in
    assert report.alone_layers == 2 and report.relaxed_classes == 1
    # the plan's count is what the model keeps: one S of 16x8 + 2 rank-1 corrections, 2 x (8 + 16) alone
    assert report.plan_params_shared == plan.params.shared == 16 * 8 + 2 * (16 + 8) + 2 * (d_out + d_in)
    layers = model.encoder.layer
    covs = scheme_for("relaxed").state(reference, bert_data(), problem, config)
    for i in range(2):
        dense = layers[i].output.dense
        assert isinstance(dense, RelaxedLinear) and dense.alone and dense.shared is None
        name = f"encoder.layer.{i}.output.dense.weight"
        w = reference.get_submodule(name[:-7]).weight.detach()
        fit = alone_fit(w, 1, alone_cov(covs, name))  # a layer alone whitens with its own shrinkage
        torch.testing.assert_close(dense.weight, fit.weight(0))
        x = torch.randn(3, d_in, dtype=torch.float64)
        torch.testing.assert_close(dense(x), x @ dense.weight.T + dense.bias)
    # measuring the plan substitutes exactly what apply installed
    measured = measure_plans(reference, bert_data(), [plan], config, problem=problem, covs=covs)[0]
    assert measured == pytest.approx(measure_loss(model, reference, bert_data(), config), rel=1e-9)


def test_alone_round_trip_and_healing(alone_bert, tmp_path) -> None:
    model, reference, plan, _, _, _ = alone_bert
    batch = bert_data().batches[0]
    expected = model(**batch).last_hidden_state
    save_shared(model, plan, tmp_path)
    meta = json.loads((tmp_path / "plan.json").read_text())
    assert meta["relaxed"]["encoder.layer.1.output.dense"]["alone"] is True
    assert "alone" not in meta["relaxed"]["encoder.layer.1.intermediate.dense"]
    assert "| layers stored alone | 2 (low-rank factors" in (tmp_path / "README.md").read_text()  # the model card
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith("output.dense.shared") for k in keys)  # nothing shared stored
    fresh = tiny_bert(seed=7)
    load_shared(fresh, tmp_path)
    assert fresh.encoder.layer[0].output.dense.alone
    assert unique_params(fresh) == unique_params(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, rtol=0, atol=0)
    # healing trains the factors of a layer alone and stores no shared tensor for it
    dense = model.encoder.layer[0].output.dense
    before = dense.left.detach().clone()
    count = unique_params(model)
    heal(model, reference, bert_data(), HealConfig(steps=4, lr=1e-2, holdout=0.0, batch_size=3, device="cpu",
                                                     progress=False))
    assert dense.shared is None and unique_params(model) == count
    assert float((dense.left.detach().double() - before).abs().max()) > 1e-4


def test_scheme_of_a_relaxed_problem(problems) -> None:
    assert scheme_of(problems[1]).name.value == "relaxed"
    assert scheme_for("relaxed").merged_layers(problems[1]) == []


def test_mixed_ranks_descends_per_family() -> None:
    """Coordinate descent on the predicted loss: each family takes the rank that lowers it, within
    what fits; the start is the best uniform ranks."""
    from types import SimpleNamespace

    from hessian_worker.relaxed.candidates import mixed_ranks

    loss = {"a": {1: 3.0, 2: 1.0, 4: 2.0}, "b": {1: 1.0, 2: 2.5, 4: 0.5}}
    on_basis = {"a": {3: 5.0}, "b": {3: 0.1}}  # a family sharing a rank-3 basis per class

    def optimum(ranks: dict[str, int], alone: frozenset[str] = frozenset(), based: frozenset[str] = frozenset()):
        if ranks["a"] + ranks["b"] > 6:  # the budget: a at 4 with b at 4 does not fit
            return None
        families = {f: SimpleNamespace(rank=r, scheme=Scheme.basis if f in based else Scheme.relaxed)
                    for f, r in ranks.items()}
        cost = sum(apart[f][r] if f in alone else on_basis[f][r] if f in based else loss[f][r]
                   for f, r in ranks.items())
        return (SimpleNamespace(objective=cost),
                SimpleNamespace(families=families, alone_families=lambda: set(alone)))

    apart = {"a": {1: 0.2, 2: 0.1, 4: 0.05}}  # family a alone (no shared tensor) loses far less
    uniform = {"r1": {"a": 1, "b": 1}, "r2": {"a": 2, "b": 2}, "r4": {"a": 4, "b": 4}}
    plan, problem = mixed_ranks({"a": 1, "b": 1}, uniform, optimum)
    assert {f: s.rank for f, s in problem.families.items()} == {"a": 2, "b": 4}
    assert plan.objective == 1.5 and problem.alone_families() == set()  # uniform at best: 3.5 (0.5) or 4.0 (0.25)
    # free to leave a alone: the best start is r1 with a alone (1.2); a then moves alone to rank 2 (1.1)
    # and 4 (1.05); b cannot rise beside it (4 + 2 > 6). Coordinate descent: a alone at 2 with b at 4
    # (0.6) needs both to move at once.
    plan, problem = mixed_ranks({"a": 1, "b": 1}, uniform, optimum, may_leave={"a"})
    assert {f: s.rank for f, s in problem.families.items()} == {"a": 4, "b": 1}
    assert problem.alone_families() == {"a"} and plan.objective == pytest.approx(1.05)
    # free to move families to bases: every family on bases (5.1) is no start; from r2 (3.5) b moves to
    # rank 1 (2.0), 4 (1.5), then to a rank-3 basis beside a's relaxed rank 2 (1.1); a has nothing better
    plan, problem = mixed_ranks({"a": 1, "b": 1}, uniform, optimum, bases={"k3": {"a": 3, "b": 3}})
    assert {f: (s.rank, s.scheme) for f, s in problem.families.items()} == {"a": (2, Scheme.relaxed),
                                                                           "b": (3, Scheme.basis)}
    assert plan.objective == pytest.approx(1.1)
    # started with every family on bases (5.1), a leaves for its relaxed rank 2 and b stays on its basis
    plan, problem = mixed_ranks({"a": 1, "b": 1}, uniform, optimum, bases={"k3": {"a": 3, "b": 3}}, bases_first=True)
    assert {f: s.scheme for f, s in problem.families.items()} == {"a": Scheme.relaxed, "b": Scheme.basis}
    assert plan.objective == pytest.approx(1.1)


def test_fill_ranks_use_the_budget_with_c_classes() -> None:
    from hessian_worker.relaxed.costs import least_params, ranks_within

    shapes, sizes = {"q": (8, 8), "ffn": (16, 8)}, {"q": 4, "ffn": 4}
    widest = {"q": 4, "ffn": 4}
    for budget in (300, 500, 700):
        for c in (1, 2, 3):
            ranks = ranks_within(shapes, sizes, widest, budget, c)
            if least_params(shapes, sizes, ranks, c) > budget:
                continue  # even rank 1 does not fit
            # brute force: no larger common rank fits with c classes per family
            assert ranks["q"] == ranks["ffn"]
            bigger = {f: ranks[f] + 1 for f in ranks}
            assert ranks["q"] == 4 or least_params(shapes, sizes, bigger, c) > budget
            count = sum(min(c, sizes[f]) * o * i + sizes[f] * ranks[f] * (o + i) for f, (o, i) in shapes.items())
            assert count == least_params(shapes, sizes, ranks, c) <= budget


def test_fixed_groupings_join_at_every_rank_share() -> None:
    """At a share of ``rank_ratios`` the contiguous runs and adjacent pairs are candidates too, on that
    share's problem (so the measured choice never loses to them at a rank it tried)."""
    def six() -> TinyMLP:
        torch.manual_seed(0)
        return TinyMLP(width=16, depth=6).double().eval()

    problem = analyze(six(), mlp_data(), cfg(1, max_params_ratio=0.8))
    options = cfg(1).relaxed.model_copy(update={"rank_ratios": [0.125], "basis_ratios": []})  # rank 2
    covs = scheme_for("relaxed").state(six(), mlp_data(), problem, cfg(1))
    extra = rank_candidates(six(), problem, SolveConfig(max_params_ratio=0.8), covs, options)
    at_share = {p.strategy: (p, q) for p, q in extra if p.strategy.startswith("relaxed-rank-0.125")}
    patterns = {s for s in at_share if s != "relaxed-rank-0.125"}
    assert patterns and patterns <= {"relaxed-rank-0.125-adjacent-pairs", "relaxed-rank-0.125-sequence"}
    optimum = at_share["relaxed-rank-0.125"][0]
    for name in patterns:
        plan, at_rank = at_share[name]
        assert at_rank is at_share["relaxed-rank-0.125"][1] and at_rank.families[FC].rank == 2
        assert plan.coloring != optimum.coloring and plan.params.shared <= 0.8 * 1536
