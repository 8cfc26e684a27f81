"""Saving a tied decoder tensor by tensor: the same files as ``io.save_shared`` (model.safetensors
with each class's tensor stored once, plan.json with the aliases), without the model in memory.

The safetensors header is written first from the names, shapes and dtypes alone (all known from
the checkpoint), then each tensor's bytes in header order as it is produced: a block's tensors are
read (or a class merged) one at a time, so the peak is one class's members, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessian_worker.companions import describe, resolve_source, write_companions
from hessian_worker.dedup_save import tensor_metadata
from hessian_worker.llm.decoder import Decoder
from hessian_worker.weights_file import (  # noqa: F401 - the streamed writer's names, importable from here as before
    SAFETENSORS_DTYPES,
    WEIGHTS,
    WEIGHTS_INDEX,
    Entry,
    write_plan_file,
    write_safetensors,
)
from solver.schema import SharingPlan

SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size


def save_streamed(decoder: Decoder, plan: SharingPlan, merged: Callable[[tuple[str, ...]], Tensor], out: str | Path,
                  extra: dict[str, Any] | None = None, *, shard_bytes: int = SHARD_BYTES, source: Any = None) -> int:
    """Writes the decoder tied by ``plan`` to ``out`` (what ``load_shared`` reads) and returns its
    unique parameters. Each class is stored once, under its first name in the model's state-dict
    order (where ``save_shared`` of the tied in-memory model puts it), with the value ``merged``
    gives; every tensor in the decoder's dtype. Above ``shard_bytes`` the tensors go to numbered
    shards with an index, as Hugging Face shards a checkpoint; below, to one model.safetensors.
    plan.json carries the manifest and ``out`` the companion files of ``source`` (the checkpoint
    directory; without one, the in-memory model's config.json), as ``save_shared`` writes them."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    state = decoder.skeleton.state_dict()
    class_of = {name: tuple(group) for group in plan.groups if len(group) >= 2 for name in group}
    aliases = _model_aliases(decoder.skeleton, list(state))
    _declared_ties(decoder, state, aliases)
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
    aliases = {name: aliases[name] for name in state if name in aliases}  # state-dict order, as save_shared lists them
    dtypes = {name: dtype for name, _, dtype in entries}

    def produce(name: str) -> Tensor:
        c = class_of.get(name)
        value = merged(c) if c is not None else decoder.checkpoint.tensor(name)
        return value.to(dtype=dtypes[name])

    src = resolve_source(source, decoder.skeleton)
    model_class = type(decoder.skeleton).__name__
    extra = {**(extra or {}), **describe(plan, aliases, None, model_class, src)}
    write_weights(folder, entries, produce, tensor_metadata(extra), shard_bytes=shard_bytes)
    unique = sum(_numel(shape) for _, shape, _ in entries)
    write_plan_file(folder, plan, aliases, unique, extra)
    write_companions(folder, src, model_class)
    return unique


def write_weights(folder: Path, entries: Sequence[Entry], produce: Callable[[str], Tensor],
                  metadata: dict[str, str], *, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """The tensors of ``entries`` (produced one at a time, in order) as Hugging Face lays them out:
    one model.safetensors up to ``shard_bytes``, above that numbered shards of at most that size with
    model.safetensors.index.json; an earlier save's other layout in ``folder`` is removed (it would be
    read first). Returns the files written."""
    shards = _shards(entries, shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / WEIGHTS, entries, produce, metadata)
        written = [WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, part in zip(names, shards, strict=True):
            write_safetensors(folder / name, part, produce, metadata)
        index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)},
                 "weight_map": {e[0]: name for name, part in zip(names, shards, strict=True) for e in part}}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        written = [WEIGHTS_INDEX, *names]
    for stale in [folder / WEIGHTS, folder / WEIGHTS_INDEX, *folder.glob("model-*-of-*.safetensors")]:
        if stale.name not in written and stale.is_file():
            stale.unlink()
    return written


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


def _declared_ties(decoder: Decoder, state: dict[str, Tensor], aliases: dict[str, str]) -> None:
    """Adds to ``aliases`` the ties transformers declares (``all_tied_weights_keys``, set when the
    config ties them: an LM head reading the embeddings) whose target the checkpoint lacks, as the
    decoder reads it: a streamed skeleton loses the tie's identity once its embeddings are loaded."""
    for target, source in (getattr(decoder.skeleton, "all_tied_weights_keys", None) or {}).items():
        if target in state and source in state and target not in aliases and target not in decoder.checkpoint:
            aliases[target] = aliases.get(source, source)


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

