"""Saving and loading a model with factored layers: each shared Parameter stored once.

The files are the tie scheme's (``model.safetensors`` + ``plan.json``, see hessian_worker/io.py):
tensors that are the same memory (a class's shared factor, tied weights) are stored once under
their first name, the others listed as aliases. ``plan.json`` adds ``"scheme"`` and, under the
scheme's name, the layout of the factored modules, so a fresh copy of the ORIGINAL architecture is
rebuilt and loaded bit-exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.dedup_save import write_shared
from hessian_worker.errors import PlanError
from hessian_worker.factored.layers import WEIGHT_SUFFIX
from hessian_worker.merge import plan_groups
from hessian_worker.shared_params import tie
from hessian_worker.weights_file import PLAN, WEIGHTS, has_weights, load_tensors
from solver.schema import Scheme, SharingPlan


def save_factored(model: nn.Module, plan: SharingPlan, directory: str | Path, scheme: Scheme,
                  layouts: Mapping[Scheme, Mapping[str, Any]], *, source: Any = None) -> Path:
    """Writes the tensors (each shared one once), plan.json with ``scheme`` and the layout of each
    kind of factored module the model holds (``layouts``: the scheme's own, and any other beside
    it), and the companion files of ``source`` (as ``save_shared``); returns the directory."""
    kept = {kind.value: dict(layout) for kind, layout in layouts.items() if layout or kind is scheme}
    return write_shared(model, plan, directory, {"scheme": scheme.value, **kept}, source=source)


Rebuild = Callable[[nn.Module, Mapping[str, Any]], None]


def load_factored(model: nn.Module, directory: str | Path, scheme: Scheme, rebuilds: Mapping[Scheme, Rebuild]) -> SharingPlan:
    """Rebuilds the saved factored layers (``rebuilds``: per kind of module, the scheme's own and
    any other its saves may carry) and the ties of tie families in ``model``, a fresh copy of the
    original architecture, then loads the saved tensors into it (in place).

    Raises:
        PlanError: the files are missing or not a save of ``scheme``, or the model does not fit them.
    """
    src = Path(directory)
    if not has_weights(src) or not (src / PLAN).is_file():
        raise PlanError(f"{str(src)!r} needs {WEIGHTS} and {PLAN} "
                         f"(written by save_shared or save_{scheme.value})")
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    if meta.get("scheme") != scheme.value or scheme.value not in meta:
        raise PlanError(f"{str(src / PLAN)!r} is not a {scheme.value} save; use load_shared")
    plan = SharingPlan.model_validate(meta["plan"])
    rebuilt: set[str] = set()
    for kind, rebuild in rebuilds.items():
        layout = meta.get(kind.value) or {}
        rebuild(model, layout)
        rebuilt |= {f"{path}{WEIGHT_SUFFIX}" for path in layout}
    params = dict(model.named_parameters(remove_duplicate=False))
    tie(model, plan_groups([g for g in plan.groups if not set(g) & rebuilt], params))
    load_tensors(model, src, meta.get("aliases", {}), f"load_{scheme.value}")
    return plan
