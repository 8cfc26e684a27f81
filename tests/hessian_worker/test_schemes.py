"""The scheme interface: every Scheme of the contract has an implementation, problems pick theirs,
and the compress chain's per-scheme facts come from the scheme objects."""

from __future__ import annotations

from hw_cases import mlp_data

from hessian_worker.options import CompressConfig
from hessian_worker.schemes import SCHEMES, scheme_for, scheme_of
from hessian_worker.schemes.basis import BasisScheme
from hessian_worker.schemes.tie import TieScheme
from solver.schema import Costs, FamilySpec, Layer, Scheme, SharingProblem

# 4x4 weights at rank 2: a basis of 4*2 per class, 2*4 coefficients per member
BASIS = FamilySpec(scheme="basis", rank=2, class_params=8, member_params=8)


def _problem(families: dict[str, FamilySpec] | None) -> SharingProblem:
    layers = [Layer(name=f"{f}{i}.weight", family=f, params=16, index=i) for f in ("a", "b") for i in range(2)]
    matrix = [[0.0 if i == j else (1.0 if layers[i].family == layers[j].family else None) for j in range(4)]
              for i in range(4)]
    return SharingProblem(layers=layers, costs=Costs(kind="pairwise", matrix=matrix), families=families)


def test_every_scheme_of_the_contract_is_implemented() -> None:
    assert set(SCHEMES) == set(Scheme)
    for name, scheme in SCHEMES.items():
        assert scheme.name is name and scheme_for(name.value) is scheme


def test_a_problem_picks_the_scheme_its_families_use() -> None:
    assert isinstance(scheme_of(None), TieScheme)
    assert isinstance(scheme_of(_problem(None)), TieScheme)
    assert isinstance(scheme_of(_problem({"a": FamilySpec(scheme="tie")})), TieScheme)
    assert isinstance(scheme_of(_problem({"a": BASIS})), BasisScheme)
    # tie beside one other scheme is that scheme's problem (its apply ties the tie families)
    mixed = _problem({"a": BASIS, "b": FamilySpec(scheme="tie")})
    assert isinstance(scheme_of(mixed), BasisScheme)


RELAXED = FamilySpec(scheme="relaxed", rank=1, class_params=16, member_params=8)


def test_basis_families_beside_relaxed_ones_are_the_relaxed_schemes() -> None:
    problem = _problem({"a": BASIS, "b": RELAXED})
    assert scheme_of(problem) is scheme_for("relaxed")
    # it fits both families itself: nothing is left to the ordinary merge
    assert scheme_for("relaxed").merged_layers(problem) == []
    assert scheme_for("relaxed").merged_layers(_problem({"b": RELAXED})) == ["a0.weight", "a1.weight"]


def test_merged_layers_leave_out_the_basis_layers() -> None:
    problem = _problem({"a": BASIS})
    assert scheme_for("tie").merged_layers(problem) == [x.name for x in problem.layers]
    assert scheme_for("basis").merged_layers(problem) == ["b0.weight", "b1.weight"]


def test_tie_costs_use_the_curvature_subset_and_choose_on_all() -> None:
    fit = mlp_data(n=10)
    parts = scheme_for("tie").parts(fit, CompressConfig(ratio=0.5, curvature_samples=4))
    assert parts.costs.num_samples == 4 and parts.choice is fit and parts.apply is fit


def test_tie_spends_as_it_is_and_says_why_it_falls_short() -> None:
    from solver.planning import plan_from_coloring

    problem = _problem(None)
    plan = plan_from_coloring(problem, {"a0.weight": 0, "a1.weight": 0, "b0.weight": 1, "b1.weight": 2}, method="t")
    tie = scheme_for("tie")
    assert tie.spend(None, [plan], problem, None, None, None) == [(plan, problem)]
    assert tie.budget_note(plan, problem, 0.75) is None  # 48 of 64 kept
    assert "whole layers" in tie.budget_note(plan, problem, 0.8)
