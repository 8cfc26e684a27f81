"""The heal-aware choice for the factored schemes: candidates are installed by their own scheme,
shortlisted by their form of sharing, and the least loss after healing decides."""

from __future__ import annotations

import copy

import pytest
from hw_cases import bert_data, tiny_bert

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.choose import choose_healed, heal_kind, sharing_form, shortlist
from hessian_worker.config import AnalyzeConfig
from hessian_worker.healing import heal
from hessian_worker.measure import measure_loss
from hessian_worker.options import HealConfig
from hessian_worker.relaxed.modules import RelaxedLinear
from hessian_worker.schemes import scheme_for
from solver.schema import Costs, FamilySpec, Layer, SharingPlan, SharingProblem

INTER, OUT = "intermediate.dense.weight", "output.dense.weight"


def plan_of(groups: list[list[str]], strategy: str) -> SharingPlan:
    coloring = {n: c for c, g in enumerate(groups) for n in g}
    return SharingPlan(status="feasible", coloring=coloring, groups=groups, strategy=strategy,
                       solver={"method": "test", "time_s": 0.0, "ortools": "none", "seed": 0})


@pytest.fixture(scope="module")
def toy():
    """tiny BERT's FFN layers under the relaxed scheme (rank-1 corrections), the output family also
    on a rank-2 basis in a second problem; three plans of different forms."""
    model, data = tiny_bert(), bert_data()
    config = AnalyzeConfig(scheme="relaxed", relaxed={"rank": 1}, dtype="float64", device="cpu", progress=False,
                           targets=["re:.*intermediate.dense.weight", "re:.*output.dense.weight"],
                           ignore=["re:.*attention.*"])
    problem = analyze(model, data, config)
    inter = [x.name for x in problem.layers if x.family == INTER]
    out = [x.name for x in problem.layers if x.family == OUT]
    alone_problem = problem.model_copy(update={"families": {
        f: s.model_copy(update={"alone": True}) for f, s in problem.families.items()}})
    based = dict(problem.families)
    based[OUT] = FamilySpec(scheme="basis", rank=2, class_params=8 * 2, member_params=2 * 16, side="out")
    based_problem = problem.model_copy(update={"families": based})
    candidates = [
        (plan_of([[n] for n in inter + out], "relaxed-fill-0"), alone_problem),
        (plan_of([inter, out], "relaxed-rank-0.25"), problem),
        (plan_of([inter, [out[0]], [out[1]]], "relaxed-rank-0.5"), problem),
        (plan_of([inter, out], "relaxed-mixed-basis"), based_problem),
    ]
    state = scheme_for("relaxed").state(model, data, problem, config)
    return model, data, config, candidates, state


def test_forms_of_sharing(toy) -> None:
    _, _, _, candidates, _ = toy
    forms = ["alone", "loop", "alone+loop", "bases+loop"]
    assert [sharing_form(p, q) for p, q in candidates] == forms
    assert [heal_kind(p, q) for p, q in candidates] == forms
    # a family of four: several relaxed classes are "tensors", one of all four a loop
    four = SharingProblem(layers=[Layer(name=f"l{i}", family="f", params=16, index=i) for i in range(4)],
                          costs=Costs(matrix=[[0.0] * 4 for _ in range(4)]),
                          families={"f": FamilySpec(scheme="relaxed", rank=1, class_params=16, member_params=8)})
    assert sharing_form(plan_of([["l0", "l1"], ["l2", "l3"]], "x"), four) == "tensors"
    assert sharing_form(plan_of([["l0", "l1"], ["l2"], ["l3"]], "x"), four) == "tensors"
    assert sharing_form(plan_of([["l0", "l1", "l2", "l3"]], "x"), four) == "loop"
    # a tying plan keeps its pattern as its kind
    plan = candidates[1][0].model_copy(update={"strategy": "sequence#2"})
    assert heal_kind(plan, None) == "sequence"
    # the best zero-shot one, then each other form's best
    kinds = [heal_kind(p, q) for p, q in candidates]
    assert shortlist([p for p, _ in candidates], [0.1, 0.3, 0.2, 0.4], 1, kinds) == [0, 2, 1, 3]
    assert shortlist([p for p, _ in candidates], [0.1, 0.3, 0.2, 0.4], 1, ["a", "b", "b", "a"]) == [0, 2]


def test_choose_healed_installs_each_candidate_by_its_scheme_and_keeps_the_least_healed(toy) -> None:
    model, data, config, candidates, state = toy
    heal_data, choice_data = bert_data(seed=1), bert_data(seed=2)
    heal_config = HealConfig(steps=6, lr=1e-2, holdout=0, device="cpu", progress=False)
    plans, problems = [p for p, _ in candidates], [q for _, q in candidates]
    choice = choose_healed(model, plans, [0.1, 0.3, 0.2, 0.4], heal_data, choice_data, heal_config, config,
                           best=1, problems=problems, state=state)
    assert sorted(choice.healed) == [0, 1, 2, 3]  # four forms: each its best
    real = {}
    for i in choice.healed:
        candidate = copy.deepcopy(model)
        apply_plan(candidate, plans[i], config=config, problem=problems[i], state=state)
        heal(candidate, model, heal_data, heal_config)
        real[i] = measure_loss(candidate, model, choice_data, config)
        assert choice.healed[i] == pytest.approx(real[i], rel=1e-9)
    assert choice.index == min(real, key=real.__getitem__)
    assert any(isinstance(m, RelaxedLinear) for m in choice.model.modules())
    assert measure_loss(choice.model, model, choice_data, config) == pytest.approx(real[choice.index], rel=1e-9)
