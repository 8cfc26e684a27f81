"""What travels with saved shared weights to make a Hugging Face model directory: the source
model's config.json (guarded so plain ``from_pretrained`` refuses it), tokenizer and generation
config, the manifest of the sharing in plan.json, and the model card (docs/design.md §Saving)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.model_card import write_card
from hessian_worker.packaged import MINILM, minilm_path
from hessian_worker.weights_file import weight_files

CONFIG = "config.json"
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
# class names of the architectures that predict the next token (transformers' naming)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


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
    for rel, data in (source.files if source is not None else {}).items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(guarded_config(data, model_class) if rel == CONFIG else data)
    write_card(out)


# what a factored scheme's layer stores: (the factor its class shares, the layer's own factors)
STORED = {"basis": ("basis", ("coef",)), "relaxed": ("shared", ("left", "right"))}


def describe(plan: Any, aliases: Mapping[str, str], layouts: Mapping[str, Mapping[str, Mapping[str, Any]]] | None,
             model_class: str, source: Source | None, scheme: str | None = None) -> dict[str, Any]:
    """The manifest fields of plan.json: format, scheme, model class, classes (members and the stored
    tensor they share), layers (the stored tensor each reads; its own ``coef`` under the basis
    scheme, its own correction factors ``left`` and ``right`` under the relaxed scheme) and the
    source. ``layouts`` maps a factored scheme's name (``STORED``) to its modules' layout (a relaxed
    save may carry basis layers beside its own); ``scheme`` names the scheme saved (default: the one
    layout given, else tie)."""
    layouts = {s: layout for s, layout in (layouts or {}).items() if s in STORED and layout}
    scheme = scheme or (next(iter(layouts)) if layouts else "tie")

    def reads(layer: str) -> dict[str, Any]:
        path = layer.removesuffix(".weight")
        for kind, layout in layouts.items():
            if layer.endswith(".weight") and path in layout:
                shared, own = STORED[kind]
                stored = f"{path}.{shared}"
                return {"reads": aliases.get(stored, stored), **{part: f"{path}.{part}" for part in own}}
        return {"reads": aliases.get(layer, layer)}

    classes, layers = [], {}
    for i, group in enumerate(plan.groups):
        for name in group:
            layers[name] = {"class": i, **reads(name)}
        classes.append({"members": list(group), "reads": reads(group[0])["reads"] if group else None})
    return {
        **(dict(source.kept) if source is not None else {}),
        "format": MANIFEST_FORMAT,
        "scheme": scheme,
        "model_class": model_class,
        "classes": classes,
        "layers": layers,
        **({"source": source.manifest()} if source is not None else {}),
    }


def _transformers_class(name: str) -> type | None:
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazily imported class whose optional backend is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


