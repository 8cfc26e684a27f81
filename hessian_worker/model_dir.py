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

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from hessian_worker.errors import PlanError

CONFIG = "config.json"
PLAN = "plan.json"
FORMAT = "geoshare-shared: load with hessian_worker.load_compressed(path) or export with geoshare export"
GUARD = ("geoshare shared weights: load this directory with hessian_worker.load_compressed(path), or write a "
         "standard checkpoint with `geoshare export PATH --format hf -o DIR`")
MANIFEST_FORMAT = "geoshare/1"
# the plan.json fields a save writes itself (io.write_plan_file, basis.io, describe)
WRITTEN = frozenset({"version", "plan", "aliases", "unique_params", "scheme", "basis", "format", "model_class",
                     "classes", "layers", "source"})
# files of a Hugging Face model directory that travel with the model (weights excluded)
COMPANIONS = (
    CONFIG, "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    # sentence-transformers (the module folders modules.json names come along)
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class Source:
    """Where a compressed model came from: its name (the model spec), the files copied next to its
    weights (relative path -> bytes) and the sha256 of the source's weight files; ``kept``: fields
    of a loaded plan.json that this package does not write itself, written again on a re-save."""

    model: str | None
    files: Mapping[str, bytes] = field(default_factory=dict)
    sha256: Mapping[str, str] = field(default_factory=dict)
    kept: Mapping[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {"model": self.model, "sha256": dict(self.sha256)}


def source_dir(spec: str | Path) -> Path | None:
    """The model directory a model spec names: the packaged MiniLM for ``minilm``, the directory
    itself when it has a config.json, else None (a ``module:factory``)."""
    from hessian_worker.models import MINILM, minilm_path

    if str(spec) == MINILM:
        return minilm_path()
    path = Path(spec)
    return path if (path / CONFIG).is_file() else None


def resolve_source(source: str | Path | Source | None, model: nn.Module | None = None) -> Source | None:
    """The Source of a save: given, read from the directory a spec names (its companion files and
    the checksum of its weights), or, for a Hugging Face model without one, its own config.json."""
    if isinstance(source, Source):
        return source
    folder = source_dir(source) if source is not None else None
    if folder is not None:
        return Source(str(source), companion_files(folder), weight_checksums(folder))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        return Source(None if source is None else str(source), {CONFIG: config.to_json_string().encode()})
    return None if source is None else Source(str(source))


def companion_files(folder: Path) -> dict[str, bytes]:
    """The files of ``folder`` that travel with the model (COMPANIONS, plus the sentence-transformers
    module folders its modules.json names), by relative path."""
    files = {name: (folder / name).read_bytes() for name in COMPANIONS if (folder / name).is_file()}
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            paths = [m.get("path") for m in json.loads(modules.read_text(encoding="utf-8"))]
        except (ValueError, AttributeError):
            paths = []
        for sub in paths:
            if not sub or not (folder / sub).is_dir() or Path(sub).is_absolute() or ".." in Path(sub).parts:
                continue
            for f in sorted((folder / sub).rglob("*")):
                if f.is_file():
                    files[f.relative_to(folder).as_posix()] = f.read_bytes()
    return files


def weight_checksums(folder: Path) -> dict[str, str]:
    """sha256 of the weight files transformers reads from ``folder`` (what the Hub shows per file):
    model.safetensors, or its index and the shards it names; else the same of pytorch_model.bin."""
    sums = {}
    for f in weight_files(folder):
        digest = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        sums[f.name] = digest.hexdigest()
    return sums


def weight_files(folder: Path) -> list[Path]:
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


def guarded_config(data: bytes, model_class: str | None) -> bytes:
    """A config.json that plain ``from_pretrained`` refuses (the guard) and whose ``architectures``
    names the saved class; unchanged bytes when it already is."""
    config = json.loads(data)
    changed = config.get("transformers_weights") != GUARD
    config["transformers_weights"] = GUARD
    if model_class is not None and _transformers_class(model_class) is not None \
            and config.get("architectures") != [model_class]:
        config["architectures"] = [model_class]
        changed = True
    return (json.dumps(config, indent=2) + "\n").encode() if changed else data


def write_companions(out: Path, source: Source | None, model_class: str | None) -> None:
    """Writes the source's companion files into ``out`` (config.json guarded) and the model card
    (README.md and sharing.png, rendered from the plan.json already written: ``model_card``)."""
    from hessian_worker.model_card import write_card

    for rel, data in (source.files if source is not None else {}).items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(guarded_config(data, model_class) if rel == CONFIG else data)
    write_card(out)


def describe(plan: Any, aliases: Mapping[str, str], layout: Mapping[str, Mapping[str, Any]] | None,
             model_class: str, source: Source | None) -> dict[str, Any]:
    """The manifest fields of plan.json: format, scheme, model class, classes (members and the stored
    tensor they share), layers (the stored tensor each reads; its own ``coef`` under the basis
    scheme) and the source."""
    layout = layout or {}

    def reads(layer: str) -> dict[str, Any]:
        path = layer.removesuffix(".weight")
        if layer.endswith(".weight") and path in layout:
            basis = f"{path}.basis"
            return {"reads": aliases.get(basis, basis), "coef": f"{path}.coef"}
        return {"reads": aliases.get(layer, layer)}

    classes, layers = [], {}
    for i, group in enumerate(plan.groups):
        for name in group:
            layers[name] = {"class": i, **reads(name)}
        classes.append({"members": list(group), "reads": reads(group[0])["reads"] if group else None})
    return {
        **(dict(source.kept) if source is not None else {}),
        "format": MANIFEST_FORMAT,
        "scheme": "basis" if layout else "tie",
        "model_class": model_class,
        "classes": classes,
        "layers": layers,
        **({"source": source.manifest()} if source is not None else {}),
    }


def is_compressed(folder: str | Path) -> bool:
    """``folder`` holds a saved shared model (plan.json with its alias map)."""
    plan = Path(folder) / PLAN
    try:
        meta = json.loads(plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "plan" in meta and "aliases" in meta


def _transformers_class(name: str) -> type | None:
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazily imported class whose optional backend is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def architecture(config: Any, model_class: str | None) -> Any:
    """How to build the saved class from a config: the manifest's ``model_class`` when transformers
    has it, else what ``load_model`` builds (a causal LM head for ``*ForCausalLM``/``*LMHeadModel``
    architectures, the base model otherwise). Returns a callable(config, **kwargs) -> model."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = _transformers_class(model_class) if model_class else None
    if cls is not None:
        return cls._from_config
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForCausalLM if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) else AutoModel
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

    from hessian_worker.io import WEIGHTS, WEIGHTS_INDEX

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
class _Saved:
    """What a loaded compressed model needs to be saved again as it was read."""

    plan: Any
    source: Source


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None) -> nn.Module:
    """The model saved in ``path`` (by ``geoshare compress``, ``save_shared`` or ``save_compressed``),
    built from its config.json and loaded tied: every class's tensor (or basis, under the basis
    scheme) one Parameter, each tensor in its stored dtype, in eval mode.

    The model's ``save_pretrained(directory)`` writes the same directory again (``save_compressed``).

    Raises:
        PlanError: ``path`` is not a saved shared model, has no config.json, or its tensors do not
            fit the architecture.
    """
    from hessian_worker.io import WEIGHTS, has_weights

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
    attach(model, plan, Source(recorded.get("model"), companion_files(src), recorded.get("sha256") or {}, kept))
    return model


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
    from hessian_worker.basis.modules import WEIGHT_SUFFIX, rebuild
    from hessian_worker.io import read_weights
    from hessian_worker.merge import plan_groups
    from hessian_worker.tying import tie
    from solver.schema import SharingPlan

    plan = SharingPlan.model_validate(meta["plan"])
    aliases: dict[str, str] = meta.get("aliases", {})
    if hasattr(model, "tie_weights"):  # the architecture's own ties (skipped with the initialization)
        model.tie_weights()
    rebuilt: set[str] = set()
    if meta.get("scheme") == "basis":
        rebuild(model, meta["basis"])
        rebuilt = {f"{path}{WEIGHT_SUFFIX}" for path in meta["basis"]}
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
        state[name].data = t
        state[name]._is_hf_initialized = True
    state = model.state_dict(keep_vars=True)
    untied = [a for a, c in aliases.items() if state[a].data_ptr() != state[c].data_ptr()]
    if untied:
        raise PlanError(f"these saved aliases are separate tensors in {type(model).__name__}: {untied[:5]}")
    if hasattr(model, "initialize_weights"):
        model.initialize_weights()
    return plan


def attach(model: nn.Module, plan: Any, source: Source) -> None:
    """Lets ``model`` be saved again as a compressed directory: ``save_compressed(model, dir)``, or
    its own ``save_pretrained(dir)``, which then writes the shared layout (not Hugging Face's)."""
    model._geoshare = _Saved(plan, source)  # type: ignore[assignment]

    def save_pretrained(self: nn.Module, save_directory: str | Path, **kwargs: Any) -> Path:
        if kwargs:
            raise TypeError(f"a model loaded by hessian_worker.load_compressed saves its sharing with "
                            f"hessian_worker.save_compressed(model, directory); {sorted(kwargs)} are not supported")
        return save_compressed(self, save_directory)

    model.save_pretrained = MethodType(save_pretrained, model)  # type: ignore[method-assign]


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Writes a model from ``load_compressed`` back as a compressed directory: the same weights,
    plan.json and companion files (config.json, tokenizer, ...) as the directory it was read from
    (report.json and problem.json, which describe the compress run, are not part of the model).

    Raises:
        PlanError: ``model`` did not come from ``load_compressed`` (save a model you tied yourself
            with ``hessian_worker.save_shared(model, plan, directory, source=...)``).
    """
    from hessian_worker.io import save_shared

    saved = getattr(model, "_geoshare", None)
    if not isinstance(saved, _Saved):
        raise PlanError("save_compressed saves a model loaded by load_compressed; save a model you tied with "
                        "hessian_worker.save_shared(model, plan, directory, source=SOURCE_MODEL)")
    return save_shared(model, saved.plan, directory, source=saved.source)


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

