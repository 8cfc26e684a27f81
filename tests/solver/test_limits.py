"""Numbers the solver can take, refused at the door otherwise, with the field in ``loc``.

Issue 15: seeds of 2^31 and more crashed CP-SAT on families of 17+ layers, a max_group_size of
2^63 crashed the model build, and model-level checks reached clients with ``loc == ()``.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from solver import SharingProblem, SolveConfig, solve
from solver.evaluate import violations
from solver.schema import MAX_COUNT, MAX_SEED

from .cases import random_problem


def _base(n: int = 3) -> dict:
    layers = [{"name": f"l{i}", "family": "f", "params": 10, "index": i} for i in range(n)]
    matrix = [[0.0 if i == j else 1.0 for j in range(n)] for i in range(n)]
    return {"layers": layers, "costs": {"kind": "pairwise", "matrix": matrix}, "constraints": {"max_params_ratio": 0.5}}


def _errors(data: dict) -> list[dict]:
    with pytest.raises(ValidationError) as err:
        SharingProblem.model_validate(data)
    return err.value.errors()


def _with(section: str, **values) -> dict:
    data = random_problem([17], seed=1, ratio=0.5, time_limit_s=2).model_dump(mode="json")
    data[section].update(values)
    return data


@pytest.mark.parametrize("seed", [2**31, 2**32 + 5, MAX_SEED])
def test_large_seeds_solve_a_17_layer_family(seed):
    plan = solve(SharingProblem.model_validate(_with("options", seed=seed)))
    assert plan.solver.seed == seed
    assert violations(SharingProblem.model_validate(_with("options", seed=seed)), plan.coloring) == []


def test_seed_beyond_int64_is_refused():
    errs = _errors(_with("options", seed=2**63))
    assert errs[0]["loc"] == ("options", "seed")
    with pytest.raises(ValidationError):
        SolveConfig(seed=2**63)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("constraints", "max_group_size", 2**63),
        ("constraints", "max_group_size", MAX_COUNT + 1),
        ("constraints", "max_params", 2**64),
        ("options", "min_distance", 10**20),
        ("options", "time_limit_s", 1e9),
        ("options", "time_limit_s", float("nan")),
        ("options", "time_limit_s", 0.0),
        ("options", "top", 1001),
        ("options", "relative_gap", float("inf")),
        ("constraints", "max_params_ratio", float("nan")),
    ],
)
def test_out_of_range_numbers_name_their_field(section, field, value):
    errs = _errors(_with(section, **{field: value}))
    assert [e["loc"] for e in errs] == [(section, field)]


@pytest.mark.parametrize(("field", "value"), [("params", MAX_COUNT + 1), ("params", 0), ("index", 2**63), ("index", -1)])
def test_layer_numbers_are_bounded(field, value):
    data = _base()
    data["layers"][1][field] = value
    assert _errors(data)[0]["loc"] == ("layers", 1, field)


def test_huge_group_size_cap_that_fits_is_no_cap():
    """A cap at or above the family size never binds: the plan is the uncapped one."""
    capped = solve(SharingProblem.model_validate(_with("constraints", max_group_size=MAX_COUNT)))
    free = solve(SharingProblem.model_validate(_with("constraints", max_group_size=None)))
    assert capped.coloring == free.coloring and capped.status == free.status


def test_budget_is_exact_for_large_params():
    """0.7 of 10 x 10^13 params is 7 x 10^13: in floats it came out one parameter short, and the
    plan lost a class (the issue's 11 classes instead of 12 with params times 1e30)."""
    small = random_problem([10], seed=0, ratio=0.7, time_limit_s=5)
    data = small.model_dump(mode="json")
    for layer in data["layers"]:
        layer["params"] = 10**13
    large = SharingProblem.model_validate(data)
    assert large.budget_params() == 7 * 10**13
    plan, reference = solve(large), solve(small)
    assert len(plan.groups) == len(reference.groups) == 7
    assert plan.coloring == reference.coloring


def test_quotient_ratios_keep_their_budget():
    """1/3 as a float is an ulp below one third: the budget is still a third of 30 layers."""
    data = _base(30)
    data["constraints"]["max_params_ratio"] = 1 / 3
    assert SharingProblem.model_validate(data).budget_params() == 100


# --- schema checks with a located error (issue 15, item 4) -------------------------------------


@pytest.mark.parametrize("version", ["2", "", "1.0"])
def test_unknown_version_is_refused(version):
    data = _base()
    data["version"] = version
    errs = _errors(data)
    assert errs[0]["loc"] == ("version",) and "version" in errs[0]["msg"] and repr(version) in errs[0]["msg"]


def test_version_one_passes():
    data = _base()
    data["version"] = "1"
    assert SharingProblem.model_validate(data).version == "1"


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "new\nline", "bell\x07", "del\x7f", "c1\x85"])
@pytest.mark.parametrize("field", ["name", "family"])
def test_control_characters_in_names_are_refused(field, name):
    data = _base()
    data["layers"][2][field] = name
    errs = _errors(data)
    assert errs[0]["loc"] == ("layers", 2, field)
    assert "control characters" in errs[0]["msg"]


def test_printable_unicode_names_pass():
    data = _base()
    data["layers"][0]["name"] = "encoder.层.0.weight"
    SharingProblem.model_validate(data)


@pytest.mark.parametrize("kind", ["pairwise", "assignment"])
def test_costs_whose_sum_overflows_are_refused(kind):
    data = _base(4)
    data["costs"]["kind"] = kind
    big = 1e308
    data["costs"]["matrix"] = [[0.0 if i == j else big for j in range(4)] for i in range(4)]
    errs = _errors(data)
    assert errs[0]["loc"] == ("costs", "matrix")
    assert "overflow" in errs[0]["msg"] and "costs.matrix" in errs[0]["msg"]


def test_unary_that_tips_the_sum_over_is_refused():
    data = _base(2)
    data["costs"]["matrix"] = [[0.0, 1e308], [1e308, 0.0]]
    SharingProblem.model_validate(data)  # pairwise: the pair counts once, 1e308 is a finite objective
    data["costs"]["unary"] = [1e308, 0.0]
    assert _errors(data)[0]["loc"] == ("costs", "matrix")


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda d: d["costs"]["matrix"][1].__setitem__(2, float("nan")), ("costs", "matrix", 1, 2)),
        (lambda d: (d["costs"]["matrix"][2].__setitem__(0, -1.0), d["costs"]["matrix"][0].__setitem__(2, -1.0)), ("costs", "matrix", 0, 2)),
        (lambda d: d["costs"]["matrix"][0].__setitem__(1, 7.0), ("costs", "matrix", 0, 1)),
        (lambda d: d["costs"]["matrix"][2].pop(), ("costs", "matrix", 2)),
        (lambda d: d["costs"]["matrix"].pop(), ("costs", "matrix")),
        (lambda d: d["costs"].__setitem__("unary", [0.0]), ("costs", "unary")),
        (lambda d: d["costs"].__setitem__("unary", [0.0, -1.0, 0.0]), ("costs", "unary", 1)),
        (lambda d: d["layers"][2].__setitem__("name", "l0"), ("layers", 2, "name")),
        (lambda d: d["layers"][1].__setitem__("params", 20), ("layers", 1, "params")),
        (lambda d: d["constraints"].__setitem__("pinned", ["l0", "ghost"]), ("constraints", "pinned", 1)),
        (lambda d: d["constraints"].__setitem__("forbid", [["l0", "l1"], ["l1", "nope"]]), ("constraints", "forbid", 1, 1)),
        (lambda d: d["constraints"].__setitem__("require", [["l1", "l1"]]), ("constraints", "require", 0)),
        (lambda d: d.__setitem__("families", {"g": {"scheme": "tie"}}), ("families", "g")),
        (lambda d: d.__setitem__("families", {"f": {"scheme": "basis", "class_params": 4}}), ("families", "f", "member_params")),
        (lambda d: d.__setitem__("families", {"f": {"scheme": "tie", "side": "in"}}), ("families", "f", "side")),
    ],
)
def test_cross_field_errors_carry_the_field_in_loc(mutate, loc):
    data = _base()
    mutate(data)
    errs = _errors(data)
    assert len(errs) == 1
    assert errs[0]["loc"] == loc, errs[0]
    assert errs[0]["msg"]  # the message still says what is wrong and how to fix it


def test_located_errors_keep_their_path_when_nested():
    """The service validates SharingProblem inside a request body: the outer path is prefixed."""
    from pydantic import BaseModel

    class Body(BaseModel):
        problem: SharingProblem

    data = _base()
    data["costs"]["matrix"][1][2] = float("inf")
    with pytest.raises(ValidationError) as err:
        Body.model_validate_json(json.dumps({"problem": data}).replace("Infinity", "1e999"))
    assert err.value.errors()[0]["loc"] == ("problem", "costs", "matrix", 1, 2)
