"""A Hugging Face model directory read lazily: config.json plus safetensors, one file or sharded
with ``model.safetensors.index.json``. Each tensor (or a slice of its rows) is read on demand with
plain positioned reads into a fresh tensor, so a checkpoint larger than memory can be worked
through. Not memory-mapped on purpose: every mapped page read stays in the process's resident set
until the kernel reclaims it (a 1.1B analysis peaked 1.9 GiB higher that way); read pages stay in
the page cache, which the system reclaims first."""

from __future__ import annotations

import json
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessian_worker.errors import WorkerError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_HEADER_LIMIT = 100 * 1024**2


class CheckpointError(WorkerError, ValueError):
    """A checkpoint directory is incomplete or does not match its config (the message names the
    file or the tensor)."""


class SafetensorsFile:
    """One safetensors file: its header parsed once, tensors read by offset (the format: an 8-byte
    little-endian header size, a JSON header of dtype/shape/data_offsets, then the raw data)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > _HEADER_LIMIT:
                    raise ValueError(f"header of {size} bytes")
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + size

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} is stored as {code}; floating point (BF16, F16, F32, F64) only")
        return _DTYPES[code]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.entries[name]["shape"])

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        """The tensor (or rows ``rows`` of its first dimension) in a fresh tensor of its stored dtype."""
        dtype, shape = self.dtype(name), list(self.shape(name))
        start, end = (int(x) for x in self.entries[name]["data_offsets"])
        if rows is not None:
            first, last, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row_bytes = (end - start) // max(shape[0], 1)
            start, end = start + first * row_bytes, start + max(last, first) * row_bytes
            shape[0] = max(last - first, 0)
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
        if len(view) != end - start:
            raise CheckpointError(f"tensor {name!r} in {str(self.path)!r}: {end - start} bytes for shape {shape}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{str(self.path)!r} ends inside tensor {name!r}: the file is truncated")
                done += got
        return out


class Checkpoint:
    """The tensors of one model directory by full name, opened lazily (safetensors' mmap)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config = self.path / CONFIG
        if not config.is_file():
            raise CheckpointError(f"{str(config)!r} is missing: a Hugging Face model directory has a config.json")
        try:
            self.config: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {str(config)!r} as JSON: {exc}") from exc
        self.files = self._weight_map()
        missing = sorted({f for f in self.files.values() if not (self.path / f).is_file()})
        if missing:
            raise CheckpointError(f"checkpoint {str(self.path)!r} lacks the shard file(s) {missing} that {INDEX} "
                                  "names; copy them in or re-save the model")
        self._shards: dict[str, SafetensorsFile] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read the weight map of {str(index)!r}: {exc}") from exc
            return {str(k): str(v) for k, v in weight_map.items()}
        single = self.path / SINGLE
        if not single.is_file():
            raise CheckpointError(f"{str(self.path)!r} has neither {SINGLE} nor {INDEX}: save the model with "
                                  "save_pretrained (safetensors)")
        return dict.fromkeys(SafetensorsFile(single).entries, SINGLE)

    def _file(self, name: str) -> SafetensorsFile:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {str(self.path)!r} (its config expects it)")
        if file not in self._shards:
            self._shards[file] = SafetensorsFile(self.path / file)
        shard = self._shards[file]
        if name not in shard.entries:
            raise CheckpointError(f"tensor {name!r} is not in {str(shard.path)!r}, where {INDEX} says it is")
        return shard

    def __contains__(self, name: str) -> bool:
        return name in self.files

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).dtype(name)

    @cached_property
    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the floating weights are stored in (what ``--dtype auto`` keeps)."""
        counts: dict[torch.dtype, int] = {}
        for name in self.names:
            counts[self.dtype(name)] = counts.get(self.dtype(name), 0) + 1
        return max(counts, key=lambda d: counts[d])

    def tensor(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """One tensor, read from its shard and cast (a fresh copy, never a view of the file)."""
        t = self._file(name).read(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def rows(self, name: str, rows: slice, *, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``rows`` of a 2-D tensor, without reading the rest of it."""
        t = self._file(name).read(name, rows)
        return t.to(dtype=dtype or t.dtype)

    def nbytes(self) -> int:
        """Bytes of all the checkpoint's tensors as stored."""
        return sum((self.path / f).stat().st_size for f in set(self.files.values()))
