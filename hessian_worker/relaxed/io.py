"""save_relaxed / load_relaxed: a relaxed-shared model on disk, each S_c stored once.

The files are the tie scheme's (``model.safetensors`` + ``plan.json``, see hessian_worker/io.py):
tensors that are the same memory (a class's S, tied weights) are stored once under their first
name, the others listed as aliases; the corrections are stored as their factors (``left``,
``right``). ``plan.json`` adds ``"scheme": "relaxed"`` and the layout of the RelaxedLinear modules
(rank, shapes, which module's S each shares), so a fresh copy of the ORIGINAL architecture is
rebuilt and loaded bit-exactly. ``save_shared``/``load_shared`` dispatch here on their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.basis.modules import WEIGHT_SUFFIX
from hessian_worker.dedup_save import write_shared
from hessian_worker.errors import PlanError
from hessian_worker.merge import plan_groups
from hessian_worker.relaxed.modules import rebuild, relaxed_layout
from hessian_worker.shared_params import tie
from hessian_worker.weights_file import PLAN, WEIGHTS, has_weights, load_tensors
from solver.schema import Scheme, SharingPlan

LAYOUT = Scheme.relaxed.value  # plan.json's key of the layout


def save_relaxed(model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
    """Writes ``directory/model.safetensors`` (each S_c and tied tensor once), ``directory/plan.json``
    (plan, aliases, relaxed layout, unique params, the manifest) and the companion files of
    ``source`` (as ``save_shared``).

    Returns:
        the directory.
    """
    return write_shared(model, plan, directory, {"scheme": Scheme.relaxed.value, LAYOUT: relaxed_layout(model)},
                        source=source)


def load_relaxed(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Rebuilds the relaxed layers (and ties of tie families) in ``model``, a fresh copy of the
    original architecture, then loads the saved tensors into it (in place).

    Raises:
        PlanError: the files are missing or not a relaxed save, or the model does not fit them.
    """
    src = Path(directory)
    if not has_weights(src) or not (src / PLAN).is_file():
        raise PlanError(f"{str(src)!r} needs {WEIGHTS} and {PLAN} (written by save_shared or save_relaxed)")
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    if meta.get("scheme") != Scheme.relaxed.value or LAYOUT not in meta:
        raise PlanError(f"{str(src / PLAN)!r} is not a relaxed save; use load_shared")
    plan = SharingPlan.model_validate(meta["plan"])
    layout = meta[LAYOUT]
    rebuild(model, layout)
    rebuilt = {f"{path}{WEIGHT_SUFFIX}" for path in layout}
    params = dict(model.named_parameters(remove_duplicate=False))
    tie(model, plan_groups([g for g in plan.groups if not set(g) & rebuilt], params))
    load_tensors(model, src, meta.get("aliases", {}), "load_relaxed")
    return plan
