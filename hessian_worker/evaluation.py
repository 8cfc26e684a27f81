"""``geoshare evaluate``: a saved model against its source on the user's own samples.

Quality is measured the way the model is used: perplexity for a causal LM (next-token NLL over
the real tokens, both models, plus the mean KL of the source's next-token distribution to the
model's), embedding cosine for an encoder (masked mean pooling, as sentence-transformers and the
project's MiniLM distillation measure it), the distillation loss to the source's outputs for
anything else, or a task loss the caller passes. Cost is measured by ``footprint``: parameters
counted from the loaded tensors' storage, weight bytes on disk, and the peak memory of loading
plus one forward pass, each model in a fresh process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from hessian_worker.companions import CAUSAL_SUFFIXES
from hessian_worker.data import INPUT_KEY, DataSource, call_model, load_calibration
from hessian_worker.errors import DataError, ModelSpecError
from hessian_worker.footprint import (
    MemoryPeak,
    StorageCount,
    count_storage,
    disk_bytes,
    measure_peak,
    open_model,
)
from hessian_worker.losses import TaskLoss, extract_output, resolve_distill
from hessian_worker.options import DistillLoss

REPORT_VERSION = "1"


class Metric(str, Enum):
    """What quality means for the model (auto: perplexity for a causal LM, cosine for an encoder's
    hidden states, the distillation loss otherwise, the task loss when one is given)."""

    auto = "auto"
    perplexity = "perplexity"
    cosine = "cosine"
    distill = "distill"
    task = "task"


class EvaluateConfig(BaseModel):
    """How to read the samples and what to measure."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = Metric.auto
    samples: int | None = Field(None, ge=1, description="Samples drawn from the data (default: all).")
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    max_length: int = Field(128, ge=2, description="Tokens per text sample (longer ones are truncated).")
    device: str = "cpu"
    memory: bool = Field(True, description="Measure each model's peak memory in a fresh process.")


class ModelFigures(BaseModel):
    """One model's figures."""

    model_config = ConfigDict(extra="forbid")

    spec: str
    score: float = Field(description="The metric: perplexity; cosine to the reference (1 for the reference); "
                         "distillation loss to the reference (0 for it); or the task loss.")
    storage: StorageCount
    disk_bytes: int | None = Field(description="Weight files on disk; None for a module:factory model.")
    memory: MemoryPeak | None = None


class EvaluationReport(BaseModel):
    """A saved model against its reference on the same samples."""

    model_config = ConfigDict(extra="forbid")

    version: str = REPORT_VERSION
    metric: Metric = Field(description="The metric measured (never auto).")
    samples: int
    tokens: int | None = Field(description="Real tokens scored (perplexity), else None.")
    model: ModelFigures
    reference: ModelFigures
    quality: dict[str, float] = Field(description="Comparisons: perplexity_ratio and kl (perplexity); mean_cosine "
                                      "and min_cosine (cosine); loss (distill); loss_change (task).")


def evaluate(model: str, reference: str, data: DataSource | None, config: EvaluateConfig | None = None, *,
             loss_fn: TaskLoss | None = None) -> EvaluationReport:
    """Measures the model ``model`` (a spec: a compressed directory, ``minilm``, a Hugging Face
    directory, ``module:factory``) against ``reference`` (the source's spec) on ``data`` (text
    file, token tensors, ...; the built-in sentences when None and the model has a tokenizer).

    Raises:
        DataError: no usable data, or a metric the outputs cannot give (the message says which).
    """
    config = config or EvaluateConfig()
    mine, ref = open_model(model), open_model(reference)
    tokenizer = ref.tokenizer or mine.tokenizer
    if data is None:
        if tokenizer is None:
            raise DataError("these models have no tokenizer; pass data as a torch.save'd tensor file")
        from hessian_worker.data import DEFAULT_SENTENCES

        data = DEFAULT_SENTENCES
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size,
                             seed=config.seed, max_length=config.max_length)
    device = torch.device(config.device)
    mine.model.to(device).eval()
    ref.model.to(device).eval()
    metric = resolve_metric(config.metric, mine.model, calib.batches[0], loss_fn)
    scores = compare(mine.model, ref.model, [{k: v.to(device) for k, v in b.items()} for b in calib.batches],
                     metric, loss_fn)
    figures = {}
    for role, spec, loaded in (("model", model, mine), ("reference", reference, ref)):
        figures[role] = ModelFigures(spec=spec, score=scores.pop(role), storage=count_storage(loaded.model),
                                     disk_bytes=disk_bytes(spec))
    del mine, ref, loaded  # their memory maps must go before the files are evicted (footprint.evict)
    if config.memory:
        batch = calib.batches[0]
        for role, spec in (("model", model), ("reference", reference)):
            figures[role].memory = measure_peak(spec, batch, device=config.device)
    tokens = scores.pop("tokens", None)
    return EvaluationReport(metric=metric, samples=calib.num_samples, tokens=None if tokens is None else int(tokens),
                            model=figures["model"], reference=figures["reference"], quality=scores)


def reference_of(model: str) -> str:
    """The source a compressed directory records in its plan.json (what ``evaluate`` compares with
    by default).

    Raises:
        ModelSpecError: ``model`` is not a compressed directory, or records no source.
    """
    import json
    from pathlib import Path

    from hessian_worker.model_dir import PLAN, is_compressed

    if is_compressed(model):
        meta = json.loads((Path(model) / PLAN).read_text(encoding="utf-8"))
        source = (meta.get("source") or {}).get("model") or meta.get("source_model")
        if source:
            return str(source)
    raise ModelSpecError(f"{model!r} records no source model; pass the reference (--reference SPEC)")


def task_loss(spec: str) -> TaskLoss:
    """The task loss a ``module:function`` spec names: (output, batch) -> scalar mean over the batch.

    Raises:
        ModelSpecError: the module does not import or has no such callable.
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr, None) if attr else None
    except ImportError as exc:
        raise ModelSpecError(f"task loss {spec!r}: cannot import {module_name!r} ({exc})") from exc
    if not callable(fn):
        raise ModelSpecError(f"task loss {spec!r}: give module:function, a callable (output, batch) -> scalar")
    return fn


def resolve_metric(metric: Metric, model: torch.nn.Module, batch: Mapping[str, Tensor],
                   loss_fn: TaskLoss | None) -> Metric:
    """The metric ``auto`` stands for with this model and data.

    Raises:
        DataError: ``task`` without a task loss.
    """
    if metric is Metric.task and loss_fn is None:
        raise DataError("metric task needs a task loss (loss_fn; on the command line --task-loss module:function)")
    if metric is not Metric.auto:
        return metric
    if loss_fn is not None:
        return Metric.task
    if type(model).__name__.endswith(CAUSAL_SUFFIXES):
        return Metric.perplexity
    with torch.no_grad():
        out = call_model(model, batch)
    hidden = out.get("last_hidden_state") if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    return Metric.cosine if hidden is not None and logits is None else Metric.distill


@torch.no_grad()
def compare(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict[str, Tensor]], metric: Metric,
            loss_fn: TaskLoss | None = None) -> dict[str, float]:
    """The metric of both models over the batches: ``model`` and ``reference`` scores plus the
    comparisons of ``EvaluationReport.quality`` (and ``tokens`` for perplexity)."""
    if metric is Metric.perplexity:
        return _perplexity(model, reference, batches)
    if metric is Metric.cosine:
        cos = torch.cat([_cosines(call_model(model, b), call_model(reference, b), b) for b in batches])
        return {"model": float(cos.mean()), "reference": 1.0, "mean_cosine": float(cos.mean()),
                "min_cosine": float(cos.min())}
    total = {"model": 0.0, "reference": 0.0}
    count = 0
    for b in batches:
        n = int(next(iter(b.values())).shape[0])
        y, is_logits = extract_output(call_model(model, b), b)
        target, _ = extract_output(call_model(reference, b), b)
        if metric is Metric.task:
            assert loss_fn is not None  # resolve_metric refused task without one
            total["model"] += n * float(loss_fn(y, b))
            total["reference"] += n * float(loss_fn(target, b))
        else:
            total["model"] += n * float(resolve_distill(DistillLoss.auto, is_logits)(y, target, b))
        count += n
    scores = {k: v / count for k, v in total.items()}
    if metric is Metric.task:
        return {**scores, "loss_change": scores["model"] - scores["reference"]}
    return {**scores, "loss": scores["model"]}


def _cosines(out: Any, ref: Any, batch: Mapping[str, Tensor]) -> Tensor:
    """Per sample: cosine of the masked mean-pooled embeddings (sentence-transformers' pooling)."""
    y, _ = extract_output(out, batch)
    target, _ = extract_output(ref, batch)
    if y.dim() != 2:
        raise DataError(f"metric cosine needs one embedding per sample; the outputs are {tuple(y.shape)}")
    return F.cosine_similarity(y.double(), target.double(), dim=-1)


def _ids_and_mask(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    ids = batch.get("input_ids", batch.get(INPUT_KEY))
    if ids is None or ids.is_floating_point() or ids.dim() != 2:
        raise DataError("metric perplexity needs token ids [samples, tokens] (input_ids, or a tensor file of ids)")
    mask = batch.get("attention_mask")
    return ids, torch.ones_like(ids) if mask is None else mask


def _logits(out: Any, batch: Mapping[str, Tensor]) -> Tensor:
    y, _ = extract_output(out, batch)
    if y.dim() != 3:
        raise DataError(f"metric perplexity needs logits [samples, tokens, vocab]; the output is {tuple(y.shape)}")
    return y[:, :-1].double()


def _perplexity(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """exp(mean NLL) of each model over every real token that has a real token before it, and the
    mean KL(reference || model) of the next-token distributions there."""
    nll = {"model": 0.0, "reference": 0.0}
    kl, count = 0.0, 0
    for b in batches:
        ids, mask = _ids_and_mask(b)
        real = (mask[:, 1:] * mask[:, :-1]).reshape(-1).double()
        targets = ids[:, 1:].reshape(-1)
        logp = {}
        for role, m in (("model", model), ("reference", reference)):
            logits = _logits(call_model(m, b), b)
            logp[role] = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
            nll[role] += float((F.nll_loss(logp[role], targets, reduction="none") * real).sum())
        kl += float(((logp["reference"].exp() * (logp["reference"] - logp["model"])).sum(-1) * real).sum())
        count += int(real.sum())
    if count == 0:
        raise DataError("no token to score: every sample has fewer than two real tokens")
    scores = {role: math.exp(v / count) for role, v in nll.items()}
    return {**scores, "perplexity_ratio": scores["model"] / scores["reference"], "kl": kl / count, "tokens": count}


def format_report(report: EvaluationReport) -> str:
    """The report as a readable table (what ``geoshare evaluate`` prints)."""
    m, r = report.model, report.reference
    label = {Metric.perplexity: "perplexity", Metric.cosine: "embedding cosine to the reference",
             Metric.distill: "distillation loss to the reference", Metric.task: "task loss"}[report.metric]
    rows = [(label, _num(m.score), _num(r.score), _ratio(m.score, r.score) if report.metric is Metric.perplexity else ""),
            ("unique parameters (storage)", f"{m.storage.unique_params:,}", f"{r.storage.unique_params:,}",
             _ratio(m.storage.unique_params, r.storage.unique_params)),
            ("parameters by name", f"{m.storage.named_params:,}", f"{r.storage.named_params:,}", ""),
            ("parameter memory", _size(m.storage.param_bytes), _size(r.storage.param_bytes),
             _ratio(m.storage.param_bytes, r.storage.param_bytes)),
            ("weights on disk", _size(m.disk_bytes), _size(r.disk_bytes), _ratio(m.disk_bytes, r.disk_bytes))]
    if m.memory is not None and r.memory is not None:
        rows.append(("peak load+forward (RSS above imports)", _size(m.memory.load_forward_bytes),
                     _size(r.memory.load_forward_bytes), _ratio(m.memory.load_forward_bytes, r.memory.load_forward_bytes)))
        rows.append(("peak process RSS", _size(m.memory.peak_bytes), _size(r.memory.peak_bytes),
                     _ratio(m.memory.peak_bytes, r.memory.peak_bytes)))
        if m.memory.cuda_peak_bytes is not None and r.memory.cuda_peak_bytes is not None:
            rows.append(("peak CUDA memory", _size(m.memory.cuda_peak_bytes), _size(r.memory.cuda_peak_bytes),
                         _ratio(m.memory.cuda_peak_bytes, r.memory.cuda_peak_bytes)))
    rows += [(k.replace("_", " "), _num(v), "", "") for k, v in report.quality.items()
             if k not in ("perplexity_ratio",)]
    tokens = f", {report.tokens:,} tokens" if report.tokens is not None else ""
    head = f"{m.spec} against {r.spec}: {report.samples} samples{tokens}, metric {report.metric.value}"
    width = max(len(row[0]) for row in rows)
    lines = [head, f"{'':<{width}}  {'model':>16}  {'reference':>16}  ratio"]
    lines += [f"{a:<{width}}  {b:>16}  {c:>16}  {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f"{a / b:.3f}x"
