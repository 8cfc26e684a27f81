"""A Hugging Face model directory read lazily: config.json plus safetensors, one file or sharded
with ``model.safetensors.index.json``. Tensors are memory-mapped and read one at a time (or a
slice of rows at a time), so a checkpoint larger than memory can be worked through."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from hessian_worker.errors import WorkerError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class CheckpointError(WorkerError, ValueError):
    """A checkpoint directory is incomplete or does not match its config (the message names the
    file or the tensor)."""


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
        self._handles: dict[str, Any] = {}

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
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)

    def _handle(self, name: str) -> Any:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {str(self.path)!r} (its config expects it)")
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} is stored as {code}; floating point (BF16, F16, F32, F64) only")
        return _DTYPES[code]

    @cached_property
    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the floating weights are stored in (what ``--dtype auto`` keeps)."""
        counts: dict[torch.dtype, int] = {}
        for name in self.names:
            counts[self.dtype(name)] = counts.get(self.dtype(name), 0) + 1
        return max(counts, key=lambda d: counts[d])

    def tensor(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """One tensor, read from its shard and cast (a fresh copy, never a view of the file)."""
        t = self._handle(name).get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def rows(self, name: str, rows: slice, *, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``rows`` of a 2-D tensor, without reading the rest of it."""
        t = self._handle(name).get_slice(name)[rows]
        return t.to(dtype=dtype or t.dtype)

    def nbytes(self) -> int:
        """Bytes of all the checkpoint's tensors as stored."""
        return sum((self.path / f).stat().st_size for f in set(self.files.values()))
