"""Saving a tied decoder tensor by tensor: the same files as ``io.save_shared`` (model.safetensors
with each class's tensor stored once, plan.json with the aliases), without the model in memory.

The safetensors header is written first from the names, shapes and dtypes alone (all known from
the checkpoint), then each tensor's bytes in header order as it is produced: a block's tensors are
read (or a class merged) one at a time, so the peak is one class's members, not the model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessian_worker.io import WEIGHTS, WEIGHTS_INDEX, tensor_metadata, write_plan_file
from hessian_worker.llm.decoder import Decoder
from solver.schema import SharingPlan

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
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


SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size


def save_streamed(decoder: Decoder, plan: SharingPlan, merged: Callable[[tuple[str, ...]], Tensor], out: str | Path,
                  extra: dict[str, Any] | None = None, *, shard_bytes: int = SHARD_BYTES) -> int:
    """Writes the decoder tied by ``plan`` to ``out`` (what ``load_shared`` reads) and returns its
    unique parameters. Each class is stored once, under its first name in the model's state-dict
    order (where ``save_shared`` of the tied in-memory model puts it), with the value ``merged``
    gives; every tensor in the decoder's dtype. Above ``shard_bytes`` the tensors go to numbered
    shards with an index, as Hugging Face shards a checkpoint; below, to one model.safetensors."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = decoder.skeleton.state_dict()
    class_of = {name: tuple(group) for group in plan.groups if len(group) >= 2 for name in group}
    aliases = _model_aliases(decoder.skeleton, list(state))
    stored: dict[tuple[str, ...], str] = {}
    entries: list[Entry] = []
    for name, t in state.items():
        if name in aliases:
            continue
        c = class_of.get(name)
        if c is not None and c in stored:
            aliases[name] = stored[c]
            continue
        if c is not None:
            stored[c] = name
        entries.append((name, tuple(t.shape), decoder.dtype if t.is_floating_point() else t.dtype))
    dtypes = {name: dtype for name, _, dtype in entries}

    def produce(name: str) -> Tensor:
        c = class_of.get(name)
        value = merged(c) if c is not None else decoder.checkpoint.tensor(name)
        return value.to(dtype=dtypes[name])

    extra = extra or {}
    shards = _shards(entries, shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / WEIGHTS, entries, produce, tensor_metadata(extra))
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, part in zip(names, shards, strict=True):
            write_safetensors(folder / name, part, produce, tensor_metadata(extra))
        index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)},
                 "weight_map": {e[0]: name for name, part in zip(names, shards, strict=True) for e in part}}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    written = {WEIGHTS} if len(shards) == 1 else {WEIGHTS_INDEX, *names}
    for stale in [folder / WEIGHTS, folder / WEIGHTS_INDEX, *folder.glob("model-*-of-*.safetensors")]:
        if stale.name not in written and stale.is_file():  # an earlier save's other layout would be read first
            stale.unlink()
    unique = sum(_numel(shape) for _, shape, _ in entries)
    write_plan_file(folder, plan, aliases, unique, extra)
    return unique


def _model_aliases(model: torch.nn.Module, order: list[str]) -> dict[str, str]:
    """The model's own tied tensors outside any plan (an LM head reading the embeddings): every name
    of one parameter after the first, in state-dict order, mapped to the first (as ``save_shared``
    finds them by storage)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    rank = {name: i for i, name in enumerate(order)}
    aliases = {}
    for group in names.values():
        present = sorted((n for n in group if n in rank), key=rank.__getitem__)
        aliases.update(dict.fromkeys(present[1:], present[0]) if present else {})
    return aliases


def _shards(entries: Sequence[Entry], limit: int) -> list[list[Entry]]:
    """Consecutive runs of entries of at most ``limit`` bytes each (a larger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = _nbytes(entry)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _nbytes(entry: Entry) -> int:
    return _numel(entry[1]) * torch.empty((), dtype=entry[2]).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

