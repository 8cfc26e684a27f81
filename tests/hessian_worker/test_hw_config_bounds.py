"""Config seeds take what the solver takes: [0, 2^63 - 1] (solver.schema.MAX_SEED)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hessian_worker.config import AnalyzeConfig
from hessian_worker.healing import HealConfig
from hessian_worker.pipeline import CompressConfig
from solver.schema import MAX_SEED


@pytest.mark.parametrize(("config", "required"), [(AnalyzeConfig, {}), (CompressConfig, {"ratio": 0.5}),
                                                 (HealConfig, {})])
def test_seed_is_bounded_like_the_solvers(config, required):
    assert MAX_SEED == 2**63 - 1
    assert config(seed=MAX_SEED, **required).seed == MAX_SEED
    for bad in (MAX_SEED + 1, 2**64, -1):
        with pytest.raises(ValidationError, match="seed") as err:
            config(seed=bad, **required)
        assert [e["loc"] for e in err.value.errors()] == [("seed",)]
