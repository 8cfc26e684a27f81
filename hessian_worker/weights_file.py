"""The weight files of a saved model: names, the streamed safetensors writer, readers, plan.json.

The bottom of saving and loading: every scheme's writer and loader, the compressed model
directory and the dense export read and write through these.
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


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers reads from ``folder``: an index and its shards, or one file
    (safetensors first, else pytorch_model.bin); [] when there are none."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                shards = []
            return [folder / index, *(folder / s for s in shards if (folder / s).is_file())]
        if (folder / single).is_file():
            return [folder / single]
    return []


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
