"""save_basis / load_basis: a basis-shared model on disk, each basis stored once.

The files are the tie scheme's (``model.safetensors`` + ``plan.json``, see hessian_worker/io.py):
tensors that are the same memory (a class's basis, tied weights) are stored once under their first
name, the others listed as aliases. ``plan.json`` adds ``"scheme": "basis"`` and the layout of the
BasisLinear modules (rank, shapes, which module's basis each shares), so a fresh copy of the
ORIGINAL architecture can be rebuilt and loaded bit-exactly. ``save_shared``/``load_shared``
dispatch here on their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.basis.modules import WEIGHT_SUFFIX, basis_layout, rebuild
from hessian_worker.dedup_save import write_shared
from hessian_worker.errors import PlanError
from hessian_worker.merge import plan_groups
from hessian_worker.shared_params import tie
from hessian_worker.weights_file import PLAN, WEIGHTS, has_weights, load_tensors
from solver.schema import Scheme, SharingPlan


def save_basis(model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
    """Writes ``directory/model.safetensors`` (each basis and tied tensor once),
    ``directory/plan.json`` (plan, aliases, basis layout, unique params, the manifest) and the
    companion files of ``source`` (as ``save_shared``).

    Returns:
        the directory.
    """
    return write_shared(model, plan, directory, {"scheme": Scheme.basis.value, "basis": basis_layout(model)},
                        source=source)


def load_basis(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Rebuilds the basis layers (and ties of tie families) in ``model``, a fresh copy of the
    original architecture, then loads the saved tensors into it (in place).

    Raises:
        PlanError: the files are missing or not a basis save, or the model does not fit them.
    """
    src = Path(directory)
    if not has_weights(src) or not (src / PLAN).is_file():
        raise PlanError(
            f"{str(src)!r} needs {WEIGHTS} and {PLAN} (written by save_shared or save_basis)"
        )
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    if meta.get("scheme") != Scheme.basis.value or "basis" not in meta:
        raise PlanError(f"{str(src / PLAN)!r} is not a basis save; use load_shared")
    plan = SharingPlan.model_validate(meta["plan"])
    aliases: dict[str, str] = meta.get("aliases", {})
    layout = meta["basis"]
    rebuild(model, layout)
    basis_names = {f"{path}{WEIGHT_SUFFIX}" for path in layout}
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = plan_groups([g for g in plan.groups if not set(g) & basis_names], params)
    tie(model, groups)
    load_tensors(model, src, aliases, "load_basis")
    return plan
