"""Every validation error names what is wrong and how to fix it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from solver import SharingProblem


def _base(n=3, **over):
    layers = [{"name": f"l{i}", "family": "f", "params": 10, "index": i} for i in range(n)]
    matrix = [[0.0 if i == j else 1.0 for j in range(n)] for i in range(n)]
    data = {"layers": layers, "costs": {"kind": "pairwise", "matrix": matrix}, "constraints": {"max_params_ratio": 0.5}}
    for key, value in over.items():
        data[key] = value
    return data


def _error(data) -> str:
    with pytest.raises(ValidationError) as err:
        SharingProblem.model_validate(data)
    return str(err.value)


def test_valid_base_passes():
    SharingProblem.model_validate(_base())


def test_non_square_matrix():
    data = _base()
    data["costs"]["matrix"] = [[0.0, 1.0], [1.0, 0.0]]
    assert "must be 3x3" in _error(data)


def test_asymmetric_pairwise_matrix_names_entries():
    data = _base()
    data["costs"]["matrix"][0][2] = 5.0
    msg = _error(data)
    assert "not symmetric" in msg and "(0, 2)" in msg and "assignment" in msg


def test_asymmetric_assignment_matrix_is_fine():
    data = _base()
    data["costs"]["kind"] = "assignment"
    data["costs"]["matrix"][0][2] = 5.0
    SharingProblem.model_validate(data)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf(value):
    data = _base()
    data["costs"]["matrix"][0][1] = data["costs"]["matrix"][1][0] = value
    msg = _error(data)
    assert "NaN or infinite" in msg and "(0, 1)" in msg and "null" in msg


def test_negative_costs_name_entries():
    data = _base()
    data["costs"]["matrix"][1][2] = data["costs"]["matrix"][2][1] = -0.5
    msg = _error(data)
    assert "negative" in msg and "(1, 2)" in msg


def test_unknown_names_in_constraints():
    data = _base()
    data["constraints"]["pinned"] = ["nope"]
    data["constraints"]["forbid"] = [["l0", "ghost"]]
    msg = _error(data)
    assert "unknown layers" in msg and "ghost" in msg and "nope" in msg


def test_pair_with_itself():
    data = _base()
    data["constraints"]["require"] = [["l1", "l1"]]
    assert "with itself" in _error(data)


def test_duplicate_names():
    data = _base()
    data["layers"][2]["name"] = "l0"
    assert "duplicate layer names: l0" in _error(data)


def test_family_with_two_sizes():
    data = _base()
    data["layers"][1]["params"] = 20
    assert "mixes tensor sizes" in _error(data)


def test_misspelled_field_is_an_error():
    data = _base()
    data["constraints"]["max_param_ratio"] = 0.5
    assert "max_param_ratio" in _error(data)


def test_ratio_out_of_range():
    data = _base()
    data["constraints"]["max_params_ratio"] = 1.5
    assert "max_params_ratio" in _error(data)


def test_unary_length():
    data = _base()
    data["costs"]["unary"] = [0.0]
    assert "one entry per layer" in _error(data)


def test_basis_needs_accounting():
    data = _base()
    data["families"] = {"f": {"scheme": "basis", "rank": 2}}
    assert "class_params" in _error(data)


def test_unknown_family_spec():
    data = _base()
    data["families"] = {"g": {"scheme": "tie"}}
    assert "unknown families" in _error(data)
