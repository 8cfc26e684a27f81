"""Fixtures over the shared tiny cases in hw_cases.py."""

from __future__ import annotations

import sys
from pathlib import Path

# hw_cases is imported by name from the tests (and as a module:factory spec), in any import mode
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from hw_cases import bert_data, mlp_data, tiny_bert, tiny_mlp  # noqa: E402

from hessian_worker.discovery import discover_layers
from hessian_worker.objective import Objective

# tiny models: one thread is as fast and leaves the shared cores alone
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _double_precision():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def mlp_obj() -> Objective:
    model = tiny_mlp()
    names = [x.name for x in discover_layers(model)]
    return Objective(model, mlp_data(), names)


@pytest.fixture
def logits_obj() -> Objective:
    model = tiny_mlp(logits=True)
    names = [x.name for x in discover_layers(model)]
    return Objective(model, mlp_data(), names)


@pytest.fixture
def bert_obj() -> Objective:
    model = tiny_bert()
    names = [x.name for x in discover_layers(model, targets=["re:.*query.weight", "re:.*attention.output.dense.weight"])]
    return Objective(model, bert_data(), names)


@pytest.fixture
def bert_query_obj() -> Objective:
    """The smallest BERT case (two 8x8 query weights) for full-Hessian references."""
    model = tiny_bert()
    names = [x.name for x in discover_layers(model, targets=["re:.*query.weight"])]
    return Objective(model, bert_data(), names)


@pytest.fixture
def factory_cli(tmp_path) -> list[str]:
    """CLI flags for hw_cases:factory (three 4x4 layers) on 16 float64 calibration rows saved to disk."""
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    return ["--model", "hw_cases:factory", "--data", str(data), "--dtype", "float64", "--device", "cpu", "--quiet"]
