"""save_shared / load_shared: each shared tensor stored once, plus the sharing map.

The directory is also a Hugging Face model directory (config.json, tokenizer files, a manifest of
the sharing in plan.json) that plain transformers refuses rather than loading with tensors
initialized at random: see hessian_worker/model_dir.py, whose ``load_compressed`` builds the model
from it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from hessian_worker.errors import PlanError
from hessian_worker.merge import plan_groups
from hessian_worker.tying import tie, unique_params
from solver.schema import SCHEMA_VERSION, SharingPlan

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights (Hugging Face's layout): name -> file
PLAN = "plan.json"

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
Entry = tuple[str, tuple[int, ...], torch.dtype]


def write_safetensors(path: Path, entries: Sequence[Entry], produce: Callable[[str], Tensor],
                      metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors are produced one at a time, in ``entries`` order (written to
    ``path.part`` and renamed at the end: a cut-off run leaves no half-written file)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        size = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + count * size]}
        offset += count * size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    part = path.with_name(path.name + ".part")
    with part.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, dtype in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name!r} came out {tuple(t.shape)} {t.dtype}, the header says {shape} {dtype}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    part.replace(path)


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


def save_shared(model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
    """Writes ``directory/model.safetensors`` (every tensor that is the same memory stored ONCE,
    under its first name), ``directory/plan.json`` (the plan, the alias map and the manifest of the
    sharing) and, from ``source`` (the source model's spec: ``minilm`` or its directory; or a
    ``model_dir.Source``), its config.json, tokenizer and generation config (a Hugging Face model
    without a source gets its own config.json).

    Returns:
        the directory.
    """
    from hessian_worker.basis.modules import has_basis_layers

    if has_basis_layers(model):  # hook: shared low-rank bases keep a layout (hessian_worker/basis)
        from hessian_worker.basis.io import save_basis

        return save_basis(model, plan, directory, source=source)
    return write_shared(model, plan, directory, source=source)


def write_shared(model: nn.Module, plan: SharingPlan, directory: str | Path, extra: dict[str, Any] | None = None,
                 *, source: Any = None) -> Path:
    """The files of every scheme: deduplicated tensors, plan.json (plan, aliases, unique params,
    plus ``extra``, e.g. a scheme and its layout, and the manifest, ``model_dir.describe``; the
    scheme also goes into the tensors' metadata) and the source's companion files."""
    from hessian_worker.model_dir import describe, resolve_source, write_companions

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
    extra = {**(extra or {}), **describe(plan, aliases, (extra or {}).get("basis"), model_class, src)}
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
    from hessian_worker.model_dir import FORMAT

    metadata = {"format": FORMAT, "geoshare_version": SCHEMA_VERSION}
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
