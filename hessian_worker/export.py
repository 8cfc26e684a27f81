"""``geoshare export out/ --format hf -o dense/``: a compressed directory as a standard checkpoint.

Every tensor of the original architecture is written out (an alias gets a copy of the tensor it
reads; a basis layer's weight is its basis times its coefficients, transposed back for GPT-2's
Conv1D), so runtimes that know nothing of sharing (plain transformers, vLLM, converters) load it
and compute what ``load_compressed`` does. Only the ties the architecture declares itself (an LM
head reading the embeddings under ``tie_word_embeddings``) stay single, as ``save_pretrained``
writes them. config.json loses its guard; the tokenizer and other companion files are copied.

Streamed: the architecture is built on the meta device (names, shapes and which layers are
Conv1D, no memory), and each tensor is read from the compressed files, or multiplied out, as the
streamed safetensors writer reaches it, so the peak is about one layer, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessian_worker.errors import PlanError
from hessian_worker.model_dir import (
    CONFIG,
    PLAN,
    architecture,
    companion_files,
    is_compressed,
    read_config,
    stored_dtypes,
)
from hessian_worker.weights_file import WEIGHTS, WEIGHTS_INDEX, has_weights

FORMATS = ("hf",)


def export_dense(src: str | Path, dst: str | Path, *, format: str = "hf", shard_bytes: int | None = None) -> Path:
    """Writes the compressed model in ``src`` to ``dst`` as a standard Hugging Face checkpoint with
    every tensor materialized (one model.safetensors, or shards above ``shard_bytes``, 5 GiB by
    default) plus config.json and the companion files.

    Raises:
        PlanError: ``src`` is not a compressed directory with a config.json, ``dst`` is ``src``, or a
            tensor of the architecture is neither stored, an alias, nor a basis layer.
    """
    from hessian_worker.llm.save import SHARD_BYTES, write_weights

    if format not in FORMATS:
        raise PlanError(f"export format {format!r}: choose one of {list(FORMATS)}")
    src, dst = Path(src), Path(dst)
    if not has_weights(src) or not is_compressed(src):
        raise PlanError(f"{str(src)!r} is not a compressed model directory (model.safetensors and plan.json as "
                        "geoshare compress writes them)")
    if dst.resolve() == src.resolve():
        raise PlanError("export writes a new directory: choose an -o other than the compressed one")
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    config = read_config(src)
    with torch.device("meta"):
        skeleton = architecture(config, meta.get("model_class"))(config)
    reader = _Reader(src)
    produce, entries = _plan_tensors(skeleton, meta, reader)
    dst.mkdir(parents=True, exist_ok=True)
    write_weights(dst, entries, produce, {"format": "pt"}, shard_bytes=shard_bytes or SHARD_BYTES)
    for rel, data in companion_files(src).items():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == CONFIG:
            plain = json.loads(data)
            plain.pop("transformers_weights", None)
            data = (json.dumps(plain, indent=2) + "\n").encode()
        target.write_bytes(data)
    return dst


class _Reader:
    """The compressed directory's tensors by name, read one at a time (one file or shards)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dtypes = stored_dtypes(folder)
        if (folder / WEIGHTS).is_file():
            self.files = dict.fromkeys(self.dtypes, WEIGHTS)
        else:
            self.files = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))["weight_map"]

    def __contains__(self, name: str) -> bool:
        return name in self.dtypes

    def read(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.files[name]), framework="pt") as f:
            return f.get_tensor(name).clone()


def _plan_tensors(skeleton: torch.nn.Module, meta: dict[str, Any],
                  reader: _Reader) -> tuple[Callable[[str], Tensor], list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """The dense checkpoint's entries (name, shape, dtype in state-dict order) and how each is made."""
    from hessian_worker.curvature.layerwise import linear_modules

    aliases: dict[str, str] = meta.get("aliases", {})
    scheme = meta.get("scheme")
    layout: dict[str, dict[str, Any]] = meta.get(scheme, {}) if scheme in ("basis", "relaxed") else {}
    transposed = {name: t for name, (_, t) in linear_modules(skeleton, [f"{p}.weight" for p in layout]).items()}
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})

    def stored(name: str) -> str | None:
        name = aliases.get(name, name)
        return name if name in reader else None

    makers: dict[str, Callable[[], Tensor]] = {}
    entries = []
    for name, t in skeleton.state_dict().items():
        source = tied.get(name)
        if source is not None and stored(name) is not None and stored(name) == stored(source):
            continue  # the architecture ties it itself (from_pretrained re-ties it)
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and path in layout and scheme == "relaxed":
            parts = [stored(f"{path}.{part}") for part in ("shared", "left", "right")]
            if None in parts:
                raise PlanError(f"relaxed layer {path!r}: its shared tensor or correction factors are not in the "
                                "saved tensors")
            makers[name] = _corrected(reader, *parts, transposed[name], reader.dtypes[parts[0]])
        elif name.endswith(".weight") and path in layout:
            spec = layout[path]
            basis, coef = stored(f"{path}.basis"), stored(f"{path}.coef")
            if basis is None or coef is None:
                raise PlanError(f"basis layer {path!r}: its basis or coefficients are not in the saved tensors")
            dtype = reader.dtypes[basis]
            makers[name] = _product(reader, basis, coef, spec.get("side", "out"), transposed[name], dtype)
        else:
            key = stored(name)
            if key is None:
                raise PlanError(f"{name!r} of {type(skeleton).__name__} is not in the saved tensors, nor an alias or a "
                                "basis layer: the directory does not hold this architecture")
            dtype = reader.dtypes[key]
            makers[name] = (lambda key=key: reader.read(key))
        entries.append((name, tuple(t.shape), dtype))
    return (lambda name: makers[name]()), entries


def _product(reader: _Reader, basis: str, coef: str, side: str, transposed: bool,
             dtype: torch.dtype) -> Callable[[], Tensor]:
    """The dense weight of a basis layer: B·C (side out) or C·B (side in), in at least float32, in
    the stored dtype, [in, out] for a Conv1D."""

    def make() -> Tensor:
        acc = torch.promote_types(dtype, torch.float32)
        b, c = reader.read(basis).to(acc), reader.read(coef).to(acc)
        w = b @ c if side == "out" else c @ b
        return (w.T if transposed else w).contiguous().to(dtype)

    return make


def _corrected(reader: _Reader, shared: str, left: str, right: str, transposed: bool,
               dtype: torch.dtype) -> Callable[[], Tensor]:
    """The dense weight of a relaxed layer: S + A·B, in at least float32, in the stored dtype, [in, out]
    for a Conv1D."""

    def make() -> Tensor:
        acc = torch.promote_types(dtype, torch.float32)
        w = reader.read(shared).to(acc) + reader.read(left).to(acc) @ reader.read(right).to(acc)
        return (w.T if transposed else w).contiguous().to(dtype)

    return make
