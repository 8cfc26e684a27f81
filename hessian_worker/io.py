"""save_shared / load_shared: a shared model on disk, each shared tensor stored once, plus the
sharing map; load_compressed / save_compressed: the same directory as a model to use.

The directory is also a Hugging Face model directory (config.json, tokenizer files, a manifest of
the sharing in plan.json) that plain transformers refuses rather than loading with tensors
initialized at random (hessian_worker/model_dir.py). Each scheme writes and reads its own layout
(hessian_worker.schemes: ``save``, ``load``); these pick the scheme.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessian_worker.dedup_save import write_shared
from hessian_worker.errors import PlanError
from hessian_worker.model_dir import Saved, open_compressed
from hessian_worker.schemes import scheme_for, scheme_installed
from hessian_worker.weights_file import (
    PLAN,
    SAFETENSORS_DTYPES,
    WEIGHTS,
    WEIGHTS_INDEX,
    has_weights,
    load_tensors,
    read_weights,
    write_plan_file,
    write_safetensors,
)
from solver.schema import Scheme, SharingPlan

# the parts of a saved model, importable from here as before (weights_file, dedup_save)
__all__ = ["PLAN", "SAFETENSORS_DTYPES", "WEIGHTS", "WEIGHTS_INDEX", "has_weights", "load_compressed",
           "load_shared", "load_tensors", "read_weights", "save_compressed", "save_shared", "write_plan_file",
           "write_safetensors", "write_shared"]


def save_shared(model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
    """Writes ``directory/model.safetensors`` (every tensor that is the same memory stored ONCE,
    under its first name), ``directory/plan.json`` (the plan, the alias map and the manifest of the
    sharing) and, from ``source`` (the source model's spec: ``minilm`` or its directory; or a
    ``companions.Source``), its config.json, tokenizer and generation config (a Hugging Face model
    without a source gets its own config.json), in the layout of the scheme installed in ``model``.

    Returns:
        the directory.
    """
    return scheme_installed(model).save(model, plan, directory, source=source)


def load_shared(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Re-ties ``model`` by the saved plan (rebuilding what its scheme installed) and loads the saved
    tensors into it (in place). ``model`` is a freshly built model of the same architecture.

    Raises:
        PlanError: the files are missing, or the model's names do not fit the saved ones.
    """
    src = Path(directory)
    if not has_weights(src) or not (src / PLAN).is_file():
        raise PlanError(f"{str(src)!r} needs {WEIGHTS} (or its shards and {WEIGHTS_INDEX}) and {PLAN} "
                        "(written by save_shared)")
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    return scheme_for(meta.get("scheme") or Scheme.tie).load(model, src)


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None) -> nn.Module:
    """The model saved in ``path`` (by ``geoshare compress``, ``save_shared`` or ``save_compressed``),
    built from its config.json and loaded tied: every class's tensor (or basis, under the basis
    scheme) one Parameter, each tensor in its stored dtype, in eval mode
    (``model_dir.open_compressed``). Its ``save_pretrained(directory)`` writes the same directory
    again (``save_compressed``).

    Raises:
        PlanError: ``path`` is not a saved shared model, has no config.json, or its tensors do not
            fit the architecture.
    """
    return open_compressed(path, device=device, attn_implementation=attn_implementation, save=save_compressed)


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Writes a model from ``load_compressed`` back as a compressed directory: the same weights,
    plan.json and companion files (config.json, tokenizer, ...) as the directory it was read from
    (report.json and problem.json, which describe the compress run, are not part of the model).

    Raises:
        PlanError: ``model`` did not come from ``load_compressed`` (save a model you tied yourself
            with ``hessian_worker.save_shared(model, plan, directory, source=...)``).
    """
    saved = getattr(model, "_geoshare", None)
    if not isinstance(saved, Saved):
        raise PlanError("save_compressed saves a model loaded by load_compressed; save a model you tied with "
                        "hessian_worker.save_shared(model, plan, directory, source=SOURCE_MODEL)")
    return save_shared(model, saved.plan, directory, source=saved.source)
