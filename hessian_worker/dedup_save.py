"""The writer every scheme saves through: each tensor that is the same memory stored once (under
its first name, the rest as aliases), plan.json and the source's companion files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from hessian_worker.companions import FORMAT, STORED, describe, resolve_source, write_companions
from hessian_worker.shared_params import unique_params
from hessian_worker.weights_file import WEIGHTS, write_plan_file, write_safetensors
from solver.schema import SCHEMA_VERSION, SharingPlan


def _storage_key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def write_shared(model: nn.Module, plan: SharingPlan, directory: str | Path, extra: dict[str, Any] | None = None,
                 *, source: Any = None) -> Path:
    """The files of every scheme: deduplicated tensors, plan.json (plan, aliases, unique params,
    plus ``extra``, e.g. a scheme and its layout, and the manifest, ``model_dir.describe``; the
    scheme also goes into the tensors' metadata) and the source's companion files."""
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
    src = resolve_source(source, model)
    model_class = type(model).__name__
    extra = extra or {}
    layouts = {kind: extra[kind] for kind in STORED if kind in extra}
    extra = {**extra, **describe(plan, aliases, layouts, model_class, src, extra.get("scheme"))}
    entries = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    # written in state-dict order with a fixed header: the same model gives the same bytes
    write_safetensors(out / WEIGHTS, entries, tensors.__getitem__, tensor_metadata(extra))
    write_plan_file(out, plan, aliases, unique_params(model), extra)
    write_companions(out, src, model_class)
    return out


def tensor_metadata(extra: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of a saved shared model (its scheme, when ``extra`` names one).

    ``format`` is not ``pt``: transformers releases before config.json's ``transformers_weights``
    refuse such a file, quoting it, instead of loading it with the aliases initialized at random
    (hessian_worker/model_dir.py)."""
    metadata = {"format": FORMAT, "geoshare_version": SCHEMA_VERSION}
    if "scheme" in extra:
        metadata["geoshare_scheme"] = str(extra["scheme"])
    return metadata


