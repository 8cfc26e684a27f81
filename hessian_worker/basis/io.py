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

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hessian_worker.apply import tie, unique_params
from hessian_worker.basis.modules import WEIGHT_SUFFIX, basis_layout, rebuild
from hessian_worker.errors import PlanError
from hessian_worker.io import PLAN, WEIGHTS, _storage_key
from hessian_worker.merge import plan_groups
from solver.schema import SCHEMA_VERSION, Scheme, SharingPlan

FORMAT = "geoshare-basis"


def save_basis(model: nn.Module, plan: SharingPlan, directory: str | Path) -> Path:
    """Writes ``directory/model.safetensors`` (each basis and tied tensor once) and
    ``directory/plan.json`` (plan, aliases, basis layout, unique params).

    Returns:
        the directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    canonical: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in model.state_dict().items():
        key = _storage_key(t)
        if key in canonical:
            aliases[name] = canonical[key]
            continue
        canonical[key] = name
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = (
            t.detach().clone().contiguous() if ptr in storages else t.detach().contiguous()
        )
        storages.add(ptr)
    save_file(
        tensors,
        str(out / WEIGHTS),
        metadata={
            "format": "pt",
            "geoshare_version": SCHEMA_VERSION,
            "geoshare_scheme": Scheme.basis.value,
        },
    )
    meta = {
        "version": SCHEMA_VERSION,
        "scheme": Scheme.basis.value,
        "plan": plan.model_dump(mode="json"),
        "aliases": aliases,
        "basis": basis_layout(model),
        "unique_params": unique_params(model),
    }
    (out / PLAN).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def load_basis(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Rebuilds the basis layers (and ties of tie families) in ``model``, a fresh copy of the
    original architecture, then loads the saved tensors into it (in place).

    Raises:
        PlanError: the files are missing or not a basis save, or the model does not fit them.
    """
    src = Path(directory)
    if not (src / WEIGHTS).is_file() or not (src / PLAN).is_file():
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
    device = next(model.parameters()).device
    tensors = load_file(str(src / WEIGHTS), device=str(device))
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise PlanError(
            f"saved tensors do not fit this model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; build the same architecture before load_basis"
        )
    state = model.state_dict()
    untied = [a for a, c in aliases.items() if not torch.equal(state[a], state[c])]
    if untied:
        raise PlanError(f"these saved aliases are separate tensors in this model: {untied[:5]}")
    return plan
