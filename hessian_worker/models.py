"""Model specs: ``minilm`` (the packaged all-MiniLM-L6-v2), a local Hugging Face directory (a
compressed one, as ``geoshare compress`` writes it, included), or ``module:factory``. Nothing is
ever downloaded."""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.companions import CAUSAL_SUFFIXES
from hessian_worker.errors import ModelSpecError
from hessian_worker.packaged import MINILM, minilm_path


@dataclass
class LoadedModel:
    """A model in eval mode plus its tokenizer (None for plain modules)."""

    model: nn.Module
    tokenizer: Any | None
    spec: str


def _load_hf(path: Path) -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) else AutoModel
    # eager attention: the fused SDPA kernels have no double backward on CPU
    model = cls.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"model spec {spec!r}: {module_name} has no callable {attr!r}")
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise ModelSpecError(f"model spec {spec!r}: {attr} must be callable without arguments ({exc})") from exc
    except ValueError:  # builtins without a signature: just try the call
        pass
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: {attr}() returned {type(model).__name__}, not nn.Module")
    return model


def load_model(spec: str) -> LoadedModel:
    """Resolve a model spec to a model in eval mode.

    Raises:
        ModelSpecError: the spec names no packaged model, existing directory, or importable factory.
    """
    if spec == MINILM:
        model, tok = _load_hf(minilm_path())
    elif Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise ModelSpecError(f"model directory {spec!r} has no config.json (not a Hugging Face model)")
        from hessian_worker.model_dir import is_compressed, load_tokenizer, open_compressed

        if is_compressed(spec):  # a compressed model (geoshare compress): built and loaded tied
            model, tok = open_compressed(spec, attn_implementation="eager"), load_tokenizer(spec)
        else:
            model, tok = _load_hf(Path(spec))
    elif ":" in spec and not Path(spec).exists():
        model, tok = _load_factory(spec), None
    else:
        raise ModelSpecError(
            f"model spec {spec!r} is not 'minilm', an existing Hugging Face directory, or 'module:factory'"
        )
    model.eval()
    return LoadedModel(model, tok, spec)
