"""The compressed model directory: a Hugging Face model directory whose weights are shared.

``geoshare compress`` (and ``apply``, the service's compress jobs, the streamed decoder path) write
``out/`` as:

- ``config.json``: the source model's, with ``architectures`` naming the class whose weights were
  saved and one added field, ``transformers_weights`` (the guard, below);
- the source's tokenizer files, ``generation_config.json`` and sentence-transformers module files,
  copied unchanged (when the source is a directory or the packaged MiniLM; a model built by a
  ``module:factory`` has none, an in-memory Hugging Face model gets its own ``config.json``);
- ``model.safetensors`` (or shards with ``model.safetensors.index.json``): every tensor that is the
  same memory stored once, under its first name, in its dtype (``io.write_shared``,
  ``llm.save.save_streamed``);
- ``plan.json``, the manifest: the plan and alias map as before, plus ``format``, ``scheme``,
  ``model_class``, ``classes`` (each class's members and the stored tensor they share),
  ``layers`` (the stored tensor each planned layer reads, and its own coefficients under the basis
  scheme) and ``source`` (the source's name and the sha256 of its weight files) (``describe``).

``load_compressed(out)`` builds the architecture from config.json and loads it tied (each class's
tensor one Parameter, in its stored dtype, for every scheme); its ``save_pretrained`` (or
``save_compressed``) writes the same directory again. ``export.export_dense`` writes a standard
checkpoint with every tensor materialized.

Why plain ``transformers`` refuses ``out/`` instead of loading it. A safetensors file cannot hold
one tensor under two names (its header's data ranges may not overlap), so the deduplicated file
lacks every alias, and transformers re-ties only what the architecture itself declares: the
class attribute ``_tied_weights_keys`` (in 5.x a ``{target: source}`` map, regex allowed), honoured
only with ``config.tie_word_embeddings``. No config.json field adds ties, and the weight-conversion
mappings of 5.x are registered per ``model_type`` in transformers' own code. Every other tensor
missing from the file is initialized at random with only a log line, which is the silent failure
this module prevents; a basis-scheme model has ``basis``/``coef`` tensors that no stock module
reads, so it cannot load correctly anyway. Writing the aliases out again would undo the
compression on disk, and remote code (``auto_map``) is excluded. So ``out/`` loads correctly
through this package, and plain transformers is made to refuse it before it builds anything:

- ``config.json`` gets ``"transformers_weights": GUARD``. ``transformers_weights`` is the config
  field that names the weights file explicitly (huggingface/transformers#38152, merged May 2025;
  read by every later 4.x release and 5.x). ``from_pretrained`` of every model class (Auto
  classes, concrete ones such as ``BertModel``, pipelines, and what loads through them) resolves
  it before reading any weight and raises ``ValueError`` for a name that is not
  ``*.safetensors``/``*.safetensors.index.json``, quoting it; GUARD is such a name and says what
  to call. ``AutoConfig``, ``AutoTokenizer`` and ``GenerationConfig`` ignore the field, so they
  load from ``out/`` as from the source, and ``PreTrainedConfig.save_pretrained`` drops it (a
  config saved from a loaded model is plain).
- transformers 4.x also checked the safetensors metadata ``format`` of a single-file checkpoint
  (``pt``/``tf``/``flax``/``mlx``, else ``ValueError`` quoting it), which covers the releases
  older than that field: the shared weights carry ``format = FORMAT``, which names the loader too
  (5.x no longer reads ``format``). A sharded checkpoint's format was not checked: on a release
  older than the field, only the dense export of a sharded model is safe.

Refusing by a config field keeps every file standard (config, tokenizer, safetensors), needs no
remote code, works offline, and costs nothing on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from hessian_worker.basis.modules import rebuild as rebuild_basis
from hessian_worker.companions import (
    CAUSAL_SUFFIXES,
    CONFIG,
    FORMAT,
    GUARD,
    MANIFEST_FORMAT,
    WRITTEN,
    Source,
    _transformers_class,
    companion_files,
    describe,
    guarded_config,
    resolve_source,
    source_dir,
    weight_checksums,
    write_companions,
)
from hessian_worker.errors import PlanError
from hessian_worker.factored.layers import WEIGHT_SUFFIX
from hessian_worker.merge import plan_groups
from hessian_worker.relaxed.modules import rebuild as rebuild_relaxed
from hessian_worker.shared_params import tie
from hessian_worker.weights_file import (
    PLAN,
    WEIGHTS,
    WEIGHTS_INDEX,
    has_weights,
    read_weights,
    weight_files,
)
from solver.schema import SharingPlan

# the names of the directory's parts, importable from here as before (companions, weights_file)
__all__ = ["CONFIG", "FORMAT", "GUARD", "MANIFEST_FORMAT", "PLAN", "WRITTEN", "Source", "architecture",
           "companion_files", "describe", "guarded_config", "is_compressed", "load_mapped", "load_tokenizer",
           "open_compressed", "read_config", "resolve_source", "source_dir", "stored_dtypes", "weight_checksums",
           "weight_files", "write_companions"]


def is_compressed(folder: str | Path) -> bool:
    """``folder`` holds a saved shared model (plan.json with its alias map)."""
    plan = Path(folder) / PLAN
    try:
        meta = json.loads(plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "plan" in meta and "aliases" in meta


def architecture(config: Any, model_class: str | None) -> Any:
    """How to build the saved class from a config: the manifest's ``model_class`` when transformers
    has it, else what ``load_model`` builds (a causal LM head for ``*ForCausalLM``/``*LMHeadModel``
    architectures, the base model otherwise). Returns a callable(config, **kwargs) -> model."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = _transformers_class(model_class) if model_class else None
    if cls is not None:
        return cls._from_config
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForCausalLM if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) else AutoModel
    return auto.from_config


def read_config(folder: Path) -> Any:
    """The transformers config of a compressed directory, without the guard.

    Raises:
        PlanError: there is no config.json.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    if not (folder / CONFIG).is_file():
        raise PlanError(f"{str(folder)!r} has no {CONFIG}: it was saved before compressed directories carried the "
                        "source's config; copy the source model's config.json in, or build the model yourself and "
                        "call hessian_worker.load_shared(model, path)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "transformers_weights"):
        delattr(config, "transformers_weights")
    return config


def stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """Name -> dtype of every saved tensor, from the safetensors headers alone."""
    from safetensors import safe_open

    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    else:
        index = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = _DTYPES[fh.get_slice(name).get_dtype()]
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def build_dtype(dtypes: Mapping[str, torch.dtype]) -> torch.dtype:
    """The dtype to build a model in so that every stored floating tensor fits exactly: the one
    dtype they share, else float32 (half precisions mixed) or float64."""
    floats = {d for d in dtypes.values() if d.is_floating_point}
    if len(floats) <= 1:
        return next(iter(floats), torch.float32)
    return torch.float64 if torch.float64 in floats else torch.float32


@dataclass
class Saved:
    """What a loaded compressed model needs to be saved again as it was read; ``save`` writes it
    (``io.save_compressed``, given by ``io.load_compressed``; None: opened only to be used)."""

    plan: Any
    source: Source
    save: Callable[[nn.Module, str | Path], Path] | None = None


def open_compressed(path: str | Path, *, device: str | torch.device = "cpu", attn_implementation: str | None = None,
                    save: Callable[[nn.Module, str | Path], Path] | None = None) -> nn.Module:
    """The model saved in ``path`` (by ``geoshare compress``, ``save_shared`` or ``save_compressed``),
    built from its config.json and loaded tied: every class's tensor (or basis, under the basis
    scheme) one Parameter, each tensor in its stored dtype, in eval mode.

    The model's ``save_pretrained(directory)`` calls ``save`` (``hessian_worker.load_compressed``
    passes ``save_compressed``, which writes the same directory again); without it, it refuses.

    Raises:
        PlanError: ``path`` is not a saved shared model, has no config.json, or its tensors do not
            fit the architecture.
    """
    src = Path(path)
    if not has_weights(src) or not is_compressed(src):
        raise PlanError(f"{str(src)!r} is not a compressed model directory: it needs {WEIGHTS} (or shards) and "
                        f"{PLAN} as geoshare compress writes them")
    meta = json.loads((src / PLAN).read_text(encoding="utf-8"))
    config = read_config(src)
    dtypes = stored_dtypes(src)
    kwargs: dict[str, Any] = {"dtype": build_dtype(dtypes)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded next: random values would only cost memory
        model = architecture(config, meta.get("model_class"))(config, **kwargs)
    plan = load_mapped(model, src, meta)
    if (src / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src, local_files_only=True)
    model.to(device).eval()
    recorded = meta.get("source") or {}
    kept = {k: v for k, v in meta.items() if k not in WRITTEN}
    source = Source(recorded.get("model"), companion_files(src), recorded.get("sha256") or {}, kept)
    model._geoshare = Saved(plan, source, save)  # type: ignore[assignment]
    model.save_pretrained = MethodType(_save_pretrained, model)  # type: ignore[method-assign]
    return model


def _save_pretrained(self: nn.Module, save_directory: str | Path, **kwargs: Any) -> Path:
    """A compressed model saves its sharing, not Hugging Face's layout (which would store every
    alias again, or refuse the shared storage)."""
    if kwargs:
        raise TypeError(f"a model loaded by hessian_worker.load_compressed saves its sharing with "
                        f"hessian_worker.save_compressed(model, directory); {sorted(kwargs)} are not supported")
    saved = self._geoshare
    if saved.save is None:
        raise PlanError("this compressed model was opened to be used (hessian_worker.models.load_model); load it "
                        "with hessian_worker.load_compressed(path) to save it again")
    return saved.save(self, save_directory)


def load_mapped(model: Any, src: Path, meta: Mapping[str, Any]) -> Any:
    """Ties (and, under the basis scheme, rebuilds) ``model``, built without initializing its
    weights, as saved, then points each stored tensor's Parameter at the file's memory-mapped
    tensor instead of copying it; returns the plan.

    Why not ``load_shared``: it copies the file into weights that were already initialized, so
    loading a compressed model peaked above loading the dense original (which transformers maps).
    Mapped, an alias and its class share one Parameter and so one mapped tensor, pages are read
    only when used, and each tensor keeps its stored dtype. Weights left uninitialized are the
    non-persistent buffers (position ids, rotary frequencies) that transformers fills in
    ``_init_weights``: every loaded tensor is marked ``_is_hf_initialized`` and
    ``initialize_weights`` fills only the rest, as ``from_pretrained`` does.

    Raises:
        PlanError: the saved tensors do not fit the architecture, or an alias is a separate tensor.
    """

    plan = SharingPlan.model_validate(meta["plan"])
    aliases: dict[str, str] = meta.get("aliases", {})
    if hasattr(model, "tie_weights"):  # the architecture's own ties (skipped with the initialization)
        model.tie_weights()
    rebuilt: set[str] = set()
    scheme = meta.get("scheme")
    if scheme in _REBUILDERS and scheme in meta:  # a layout of modules the stock architecture lacks
        _to_meta(model, meta[scheme])  # the placeholders rebuild makes then take no memory
        _REBUILDERS[scheme](model, meta[scheme])
        rebuilt = {f"{path}{WEIGHT_SUFFIX}" for path in meta[scheme]}
    params = dict(model.named_parameters(remove_duplicate=False))
    tie(model, plan_groups([g for g in plan.groups if not set(g) & rebuilt], params))
    tensors = read_weights(src)
    state = model.state_dict(keep_vars=True)
    missing = [k for k in state if k not in tensors and k not in aliases]
    unexpected = [k for k in tensors if k not in state]
    wrong = [k for k, t in tensors.items() if k in state and tuple(state[k].shape) != tuple(t.shape)]
    if missing or unexpected or wrong:
        raise PlanError(f"saved tensors do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, other shapes {wrong[:5]}; is config.json the source model's?")
    for name, t in tensors.items():
        target = state[name]
        if target.is_meta:  # a rebuilt basis layer's: swapped in place, so every module sharing it sees it
            torch.utils.swap_tensors(target, nn.Parameter(t, requires_grad=target.requires_grad)
                                     if isinstance(target, nn.Parameter) else t)
        else:
            target.data = t
        target._is_hf_initialized = True
    state = model.state_dict(keep_vars=True)
    unloaded = [k for k, t in state.items() if t.is_meta]
    if unloaded:
        raise PlanError(f"these tensors of {type(model).__name__} were not in the saved tensors: {unloaded[:5]}")
    untied = [a for a, c in aliases.items() if state[a].data_ptr() != state[c].data_ptr()]
    if untied:
        raise PlanError(f"these saved aliases are separate tensors in {type(model).__name__}: {untied[:5]}")
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()
    return plan


# scheme -> what rebuilds its saved layout (plan.json's key of the layout is the scheme's name)
_REBUILDERS: dict[str, Callable[[nn.Module, Mapping[str, Any]], None]] = {
    "basis": rebuild_basis, "relaxed": rebuild_relaxed}


def _to_meta(model: nn.Module, layout: Mapping[str, Any]) -> None:
    """Moves the weights of the layers a basis layout replaces to the meta device (shape and dtype
    kept): ``rebuild`` then makes its basis and coefficient placeholders there instead of zeroed
    memory, which the allocator kept after the mapped tensors replaced them (24 MB of 44 on a
    MiniLM with per-layer bases)."""
    for path in layout:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # rebuild names the missing layer
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            module.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                         requires_grad=weight.requires_grad)


def load_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer saved next to the model (None when there is none), with a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

