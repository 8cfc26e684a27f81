"""save_shared / load_shared: each shared tensor stored once, plus the sharing map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hessian_worker.apply import tie, unique_params
from hessian_worker.errors import PlanError
from hessian_worker.merge import plan_groups
from solver.schema import SCHEMA_VERSION, SharingPlan

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights (Hugging Face's layout): name -> file
PLAN = "plan.json"


def has_weights(src: Path) -> bool:
    """The directory holds saved weights: one file, or shards with their index."""
    return (src / WEIGHTS).is_file() or (src / WEIGHTS_INDEX).is_file()


def read_weights(src: Path, device: str = "cpu") -> dict[str, Tensor]:
    """Every saved tensor, from ``model.safetensors`` or from the shards its index names.

    Raises:
        PlanError: a shard the index names is missing.
    """
    if (src / WEIGHTS).is_file():
        return load_file(str(src / WEIGHTS), device=device)
    index = json.loads((src / WEIGHTS_INDEX).read_text(encoding="utf-8"))
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        if not (src / shard).is_file():
            raise PlanError(f"{str(src / shard)!r} is named by {WEIGHTS_INDEX} but missing: copy every shard")
        tensors.update(load_file(str(src / shard), device=device))
    return tensors


def _storage_key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save_shared(model: nn.Module, plan: SharingPlan, directory: str | Path) -> Path:
    """Writes ``directory/model.safetensors`` (every tensor that is the same memory stored ONCE,
    under its first name) and ``directory/plan.json`` (the plan plus the alias map).

    Returns:
        the directory.
    """
    from hessian_worker.basis.modules import has_basis_layers

    if has_basis_layers(model):  # hook: shared low-rank bases keep a layout (hessian_worker/basis)
        from hessian_worker.basis.io import save_basis

        return save_basis(model, plan, directory)
    return write_shared(model, plan, directory)


def write_shared(model: nn.Module, plan: SharingPlan, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """The files of every scheme: deduplicated tensors and plan.json (plan, aliases, unique params,
    plus ``extra``, e.g. a scheme and its layout; a ``scheme`` also goes into the tensors' metadata)."""
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
        # a view that overlaps another stored tensor gets its own copy (safetensors needs that)
        tensors[name] = t.detach().clone().contiguous() if ptr in storages else t.detach().contiguous()
        storages.add(ptr)
    extra = extra or {}
    save_file(tensors, str(out / WEIGHTS), metadata=tensor_metadata(extra))
    write_plan_file(out, plan, aliases, unique_params(model), extra)
    return out


def tensor_metadata(extra: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of a saved shared model (its scheme, when ``extra`` names one)."""
    metadata = {"format": "pt", "geoshare_version": SCHEMA_VERSION}
    if "scheme" in extra:
        metadata["geoshare_scheme"] = str(extra["scheme"])
    return metadata


def write_plan_file(out: Path, plan: SharingPlan, aliases: dict[str, str], unique: int,
                    extra: dict[str, Any] | None = None) -> None:
    """``out/plan.json``: the plan, the alias map (name -> the stored name it reads) and the unique
    parameters, which ``load_shared`` re-ties a freshly built model by."""
    meta = {
        "version": SCHEMA_VERSION,
        "plan": plan.model_dump(mode="json"),
        "aliases": aliases,
        "unique_params": unique,
        **(extra or {}),
    }
    (out / PLAN).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_shared(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Re-ties ``model`` by the saved plan and loads the saved tensors into it (in place).

    ``model`` is a freshly built model of the same architecture.

    Raises:
        PlanError: the files are missing, or the model's names do not fit the saved ones.
    """
    src = Path(directory)
    if not has_weights(src) or not (src / PLAN).is_file():
        raise PlanError(f"{str(src)!r} needs {WEIGHTS} (or its shards and {WEIGHTS_INDEX}) and {PLAN} "
                        "(written by save_shared)")
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    if meta.get("scheme") == "basis":  # hook: rebuild shared low-rank bases (hessian_worker/basis)
        from hessian_worker.basis.io import load_basis

        return load_basis(model, src)
    plan = SharingPlan.model_validate(meta["plan"])
    aliases: dict[str, str] = meta.get("aliases", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = plan_groups(plan.groups, params)
    tie(model, groups)
    load_tensors(model, src, aliases, "load_shared")
    return plan


def load_tensors(model: nn.Module, src: Path, aliases: dict[str, str], loader: str) -> None:
    """Loads ``src/model.safetensors`` into a model already tied (and rebuilt) like the saved one;
    the aliases, including the model's own tied weights outside the plan, must be tied here too.

    Raises:
        PlanError: the tensors do not fit the model, or an alias is a separate tensor in it.
    """
    device = next(model.parameters()).device
    result = model.load_state_dict(read_weights(src, device=str(device)), strict=False)
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise PlanError(
            f"saved tensors do not fit this model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; build the same architecture before {loader}"
        )
    state = model.state_dict()
    untied = [a for a, c in aliases.items() if not torch.equal(state[a], state[c])]
    if untied:
        raise PlanError(f"these saved aliases are separate tensors in this model: {untied[:5]}")
