"""``geoshare analyze``, ``apply``, ``compress``, ``export`` and ``evaluate``.

This module is imported by the solver's CLI, so it must not import torch at import time: every
heavy import happens inside the handlers. The choices of the enum flags are the values of the
enums in hessian_worker.options (torch-free), and tests/hessian_worker/test_hw_cli_options.py
checks that every ``analyze`` and ``compress`` flag is a field of AnalyzeConfig or CompressConfig
(or one of the CLI's own), so the flags cannot drift from the configs.
"""

from __future__ import annotations

import argparse
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

from hessian_worker.options import (
    Backend,
    Bulk,
    CurvatureKind,
    DistillLoss,
    DType,
    Eigensolver,
    Merge,
    OutputFactor,
    SideChoice,
    SketchPrecision,
)
from solver.schema import CostKind, Scheme


def _values(enum: type[Enum]) -> tuple[str, ...]:
    """An enum's values, in its order: the choices of its flag."""
    return tuple(member.value for member in enum)


BACKENDS = _values(Backend)
DTYPES = _values(DType)
MERGES = _values(Merge)
SIDES = _values(SideChoice)


def add_commands(subparsers: Any) -> None:
    """Adds the ``analyze`` and ``apply`` subcommands to an argparse subparsers object."""
    a = subparsers.add_parser("analyze", help="model + calibration data -> SharingProblem JSON")
    _common(a)
    a.add_argument("--backend", choices=BACKENDS, default=None,
                   help="how pair costs are predicted (default: kfac for a LLaMA/Mistral/Qwen2 checkpoint directory, "
                        "streamed block by block; exact otherwise)")
    _streaming_options(a)
    a.add_argument("--kind", choices=_values(CostKind), default="pairwise")
    a.add_argument("--curvature", choices=_values(CurvatureKind), default="ggn")
    a.add_argument("--ratio", type=float, default=None, help="constraints.max_params_ratio")
    a.add_argument("--rank", type=int, default=None,
                   help="projected: eigenpairs kept (8); --scheme basis: the basis rank of every family")
    a.add_argument("--probes", type=int, default=32, help="Hutchinson probes")
    a.add_argument("--eigensolver", choices=_values(Eigensolver), default="auto",
                   help="projected: nystrom (one batched sketch, GGN only), lanczos, auto (nystrom for the GGN)")
    a.add_argument("--oversample", type=int, default=4, help="projected, nystrom: sketch vectors beyond --rank")
    a.add_argument("--sketch-precision", choices=_values(SketchPrecision), default="auto",
                   help="projected, nystrom: the sketch's HVPs in bfloat16 (about 3x faster on AMX/AVX512-BF16 CPUs "
                        "and CUDA), the model's dtype, or auto (bfloat16 where native)")
    a.add_argument("--bulk", choices=_values(Bulk), default="layer",
                   help="projected: curvature off the top space, one scalar per layer or one for all (the paper)")
    a.add_argument("--targets", action="append", default=None, help="name or re:regex (repeatable)")
    a.add_argument("--ignore", action="append", default=[], help="name or re:regex (repeatable)")
    a.add_argument("-o", "--output", required=True, help="where to write the problem JSON")
    _scheme_options(a)
    a.set_defaults(func=_run_analyze)

    p = subparsers.add_parser("apply", help="tie a plan into the model, save it, report the loss change")
    _common(p)
    p.add_argument("--plan", required=True, help="SharingPlan JSON")
    p.add_argument("--problem", default=None,
                   help="the SharingProblem the plan was solved from; needed for basis plans (ranks, sides)")
    p.add_argument("--out", required=True, help="directory for model.safetensors + plan.json")
    p.add_argument("--merge", choices=MERGES, default="mean")
    p.add_argument("--holdout", type=int, default=None,
                   help="samples kept for the measured loss (default: half of them)")
    p.add_argument("--heal", type=int, default=0, metavar="STEPS",
                   help="self-distillation fine-tune steps after tying (ties kept; 0 = none)")
    p.add_argument("--heal-lr", type=float, default=5e-5, help="AdamW learning rate for --heal")
    p.add_argument("--heal-holdout", type=float, default=0.2,
                   help="with --heal: share of the healing samples kept out to keep the best step (0: keep the last)")
    p.add_argument("--no-output-weighting", action="store_true",
                   help="basis plans: whiten as a problem analyzed with --no-output-weighting did")
    p.set_defaults(func=_run_apply)

    c = subparsers.add_parser("compress", help="model -> costs -> candidate plans -> measured choice -> tied model")
    _common(c)
    c.add_argument("--ratio", type=float, required=True, help="share of the shareable parameters to keep")
    c.add_argument("--out", required=True,
                   help="directory for the compressed model (config.json, tokenizer, model.safetensors, plan.json: "
                        "hessian_worker.load_compressed reads it) + report.json")
    c.add_argument("--backend", choices=BACKENDS, default=None,
                   help="how pair costs are predicted (default: kfac for a LLaMA/Mistral/Qwen2 checkpoint directory, "
                        "compressed block by block; exact otherwise)")
    _streaming_options(c)
    c.add_argument("--merge", choices=MERGES, default=None,
                   help="shared value of a class (default: layerwise when the data has at least as many "
                        "input rows as the widest tied layer has inputs, else curvature)")
    c.add_argument("--top", type=int, default=16, help="best plans by the cost model to measure (plus pattern plans)")
    c.add_argument("--min-distance", type=int, default=1,
                   help="sharing pairs in which each top plan differs from every better one")
    c.add_argument("--normalized-top", type=int, default=16,
                   help="also measure the best plans by size-normalized pair costs (0: none)")
    c.add_argument("--per-pattern", type=int, default=2,
                   help="budget-filling allocations measured per pattern strategy (sequence, cycle, ...)")
    c.add_argument("--curvature-samples", type=int, default=None,
                   help="calibration samples for the curvature costs (default: all; the choice uses all)")
    c.add_argument("--distill", choices=_values(DistillLoss), default="auto",
                   help="calibration loss (auto: kl for logits, mse otherwise; cosine for sentence embeddings)")
    c.add_argument("--heal", type=int, default=0, metavar="STEPS", help="self-distillation steps after tying")
    c.add_argument("--heal-lr", type=float, default=5e-5)
    c.add_argument("--heal-holdout", type=float, default=0.2,
                   help="with --heal: share of the healing samples kept out of training, to keep the best step "
                        "(step 0 included; 0: heal on all, keep the last step)")
    c.add_argument("--heal-shortlist", type=int, default=2,
                   help="with --heal: best zero-shot candidates healed in the choice, besides each pattern's best")
    c.add_argument("--no-heal-choice", action="store_true",
                   help="with --heal: keep the zero-shot winner instead of healing a shortlist to choose")
    c.add_argument("--choice-holdout", type=float, default=0.5,
                   help="layerwise merge: share of the choice samples candidates are scored on, kept out of the "
                        "covariances they are merged with (0: score on all)")
    c.add_argument("--holdout", type=int, default=None, help="samples held out for the measured figure")
    c.add_argument("--time-limit", type=float, default=10.0, help="solver seconds")
    c.add_argument("--rank", type=int, default=None, help="--scheme basis: the basis rank of every family")
    _scheme_options(c)
    c.set_defaults(func=_run_compress)

    e = subparsers.add_parser("export", help="compressed model directory -> standard checkpoint, every tensor written out")
    e.add_argument("src", help="a directory geoshare compress wrote")
    e.add_argument("--format", choices=("hf",), default="hf",
                   help="hf: a Hugging Face directory (config.json, tokenizer, model.safetensors or shards)")
    e.add_argument("-o", "--output", required=True, help="the new directory")
    e.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")
    e.set_defaults(func=_run_export)
    _add_evaluate(subparsers)


def _streaming_options(parser: argparse.ArgumentParser) -> None:
    """The kfac backend's settings and the streamed path's cache and memory limit (analyze, compress)."""
    parser.add_argument("--kfac-rank", type=int, default=64,
                        help="kfac: eigenpairs of each layer's input covariance kept, the rest as one bulk value "
                             "(0: all of them, exact K-FAC)")
    parser.add_argument("--kfac-oversample", type=int, default=64, help="kfac: sketch columns beyond --kfac-rank")
    parser.add_argument("--kfac-gradient-samples", type=int, default=16,
                        help="kfac: samples whose sampled output gradients estimate the output factor (0: all)")
    parser.add_argument("--kfac-output", choices=_values(OutputFactor), default="diagonal",
                        help="kfac: output factor from sampled output gradients (loss units), or identity (no backward)")
    parser.add_argument("--stats-cache", default="~/.cache/geoshare/stats",
                        help="streamed analysis: folder of cached per-layer statistics (one pass, many analyses)")
    parser.add_argument("--no-stats-cache", action="store_true", help="streamed analysis: neither read nor write the cache")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="refuse above this memory estimate (projected: 4; streamed: the memory available now)")


def _scheme_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheme", choices=_values(Scheme), default="tie",
                        help="tie: a class shares one tensor; basis: a class shares a low-rank basis")
    parser.add_argument("--rank-ratio", type=float, default=None,
                        help="--scheme basis: rank as a share of min(d_out, d_in) (default 0.25; or --rank)")
    parser.add_argument("--side", choices=SIDES, default=None,
                        help="--scheme basis: shared factor (auto: the larger dimension; out: d_out x r; in: r x d_in)")
    parser.add_argument("--no-output-weighting", action="store_true",
                        help="--scheme basis: count every layer's output error alike (default: weigh it by the "
                             "layer's output-side curvature, so costs are predicted loss changes)")


def _basis_options(args: argparse.Namespace) -> dict[str, Any]:
    """BasisOptions fields from --rank/--rank-ratio/--side (refused without --scheme basis)."""
    if args.scheme != "basis":
        given = [flag for flag, v in (("--rank-ratio", args.rank_ratio), ("--side", args.side),
                                      ("--no-output-weighting", args.no_output_weighting or None)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --scheme basis only; add --scheme basis or drop them")
        return {}
    if args.rank is not None and args.rank_ratio is not None:
        raise ValueError("pass --rank (one rank for every family) or --rank-ratio, not both")
    fields: dict[str, Any] = {"rank": args.rank, "side": args.side or "auto",
                              "output_weighting": not args.no_output_weighting}
    if args.rank_ratio is not None:
        fields["rank_ratio"] = args.rank_ratio
    return fields


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="minilm | HF directory | module:factory")
    parser.add_argument("--data", default=None, help="text file (one sample a line) or torch.save'd tensor(s)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default: float32; a streamed checkpoint keeps its own, auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _data_source(args: argparse.Namespace, tokenizer: Any) -> Any:
    from hessian_worker.data import DEFAULT_SENTENCES

    if args.data is not None:
        return args.data
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass --data with a torch.save'd tensor file")
    return DEFAULT_SENTENCES


def _run_analyze(args: argparse.Namespace) -> int:
    from solver.errors import GeoShareError

    try:
        from hessian_worker import AnalyzeConfig, analyze
        from hessian_worker.llm import analyze_checkpoint, is_streamable
        from hessian_worker.models import load_model

        basis = _basis_options(args)
        # exact streams its forward-mode tangents block by block; the full Hessian needs the whole model
        streams = ("kfac", "layerwise") + (("exact",) if args.curvature == "ggn" else ())
        streamed = is_streamable(args.model) and args.backend in (None, *streams) and not basis
        backend = args.backend or ("kfac" if streamed else "exact")
        config = AnalyzeConfig(
            backend=backend, kind=args.kind, curvature=args.curvature, samples=args.samples,
            batch_size=args.batch_size, seed=args.seed, max_params_ratio=args.ratio,
            rank=8 if basis or args.rank is None else args.rank,
            probes=args.probes, memory_limit_gb=args.memory_limit_gb or 4.0, targets=args.targets,
            eigensolver=args.eigensolver, oversample=args.oversample, bulk=args.bulk,
            sketch_precision=args.sketch_precision,
            kfac=_kfac_options(args),
            ignore=args.ignore, device=args.device, dtype=args.dtype or ("auto" if streamed else "float32"),
            progress=not args.quiet, scheme=args.scheme, **({"basis": basis} if basis else {}),
        )
        if streamed:
            cache = None if args.no_stats_cache else args.stats_cache
            problem = analyze_checkpoint(args.model, args.data, config, memory_limit_gb=args.memory_limit_gb,
                                         cache_dir=cache)
        else:
            if is_streamable(args.model):
                _check_whole_model_fits(args.model, config.dtype.value, config.backend.value, args.memory_limit_gb)
            loaded = load_model(args.model)
            problem = analyze(loaded.model, _data_source(args, loaded.tokenizer), config, tokenizer=loaded.tokenizer)
    except (GeoShareError, ValueError) as exc:
        return _fail(str(exc))
    Path(args.output).write_text(problem.model_dump_json(indent=2), encoding="utf-8")
    print(json.dumps({"output": args.output, "layers": len(problem.layers),
                      "families": len({x.family for x in problem.layers})}))
    return 0


def _kfac_options(args: argparse.Namespace) -> dict[str, Any]:
    """KFACOptions fields from the --kfac-* flags (0 means all: None)."""
    return {"rank": args.kfac_rank or None, "oversample": args.kfac_oversample, "output": args.kfac_output,
            "gradient_samples": args.kfac_gradient_samples or None}


def _check_whole_model_fits(model: str, dtype: str, backend: str, limit_gb: float | None) -> None:
    """Refuses a whole-model backend on a decoder checkpoint too large for memory, naming the one that fits."""
    import psutil

    from hessian_worker.errors import MemoryBudgetError
    from hessian_worker.llm.checkpoint import Checkpoint
    from hessian_worker.llm.decoder import resolve_dtype, whole_model_bytes

    checkpoint = Checkpoint(model)
    need = whole_model_bytes(checkpoint, resolve_dtype(checkpoint, dtype))
    limit = int(limit_gb * 1024**3) if limit_gb is not None else int(psutil.virtual_memory().available)
    if need > limit:
        raise MemoryBudgetError(
            f"--backend {backend} holds the whole model: at least {need / 1024**3:.1f} GiB in {dtype}, "
            f"{limit / 1024**3:.1f} GiB available; --backend kfac (the default for this checkpoint) streams it "
            "one block at a time", need, limit)


def _run_apply(args: argparse.Namespace) -> int:
    import copy

    from solver.errors import GeoShareError
    from solver.schema import SharingPlan, SharingProblem

    try:
        from hessian_worker import AnalyzeConfig, predict_plan_loss
        from hessian_worker.apply import apply_plan
        from hessian_worker.basis.analysis import has_basis
        from hessian_worker.data import load_calibration
        from hessian_worker.io import save_shared
        from hessian_worker.measure import measure_loss
        from hessian_worker.models import load_model

        plan = SharingPlan.model_validate_json(Path(args.plan).read_text(encoding="utf-8"))
        problem = None
        if args.problem is not None:
            problem = SharingProblem.model_validate_json(Path(args.problem).read_text(encoding="utf-8"))
        basis = has_basis(problem)
        config = AnalyzeConfig(samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                               device=args.device, dtype=args.dtype or "float32", progress=not args.quiet,
                               scheme="basis" if basis else "tie",
                               basis={"output_weighting": not args.no_output_weighting})
        loaded = load_model(args.model)
        model = loaded.model
        if problem is None:
            _check_tie_accounting(model, plan)
        predicted = measured = None
        fit = held = None
        if args.data is not None or loaded.tokenizer is not None:
            calib = load_calibration(_data_source(args, loaded.tokenizer), tokenizer=loaded.tokenizer,
                                     samples=args.samples, batch_size=args.batch_size, seed=args.seed)
            n = calib.num_samples
            if n >= 2:
                fit, held = calib.split(args.holdout or n // 2, seed=args.seed, batch_size=args.batch_size)
            else:
                fit = held = calib
        if fit is not None and not basis:
            predicted = predict_plan_loss(model, fit, plan, config, merge=args.merge)
        elif args.merge in ("curvature", "layerwise") and fit is None:
            raise ValueError(f"--merge {args.merge} needs --data")
        reference = copy.deepcopy(model)
        report = apply_plan(model, plan, args.merge, data=fit, config=config, problem=problem)
        if basis:  # the exact whitened error of the installed bases (a predicted loss change when output-weighted)
            predicted = getattr(report, "whitened_error", None)
        healed = None
        if args.heal > 0:
            from hessian_worker.healing import HealConfig, heal

            if fit is None:
                raise ValueError("--heal needs calibration data: pass --data")
            heal_config = HealConfig(steps=args.heal, lr=args.heal_lr, holdout=args.heal_holdout, seed=args.seed,
                                     batch_size=args.batch_size, device=args.device, progress=not args.quiet)
            healed = heal(model, reference, fit, heal_config).model_dump()
        if held is not None:
            measured = measure_loss(model, reference, held, config)
        save_shared(model, plan, args.out, source=args.model)
    except (GeoShareError, ValueError, OSError) as exc:
        return _fail(str(exc))
    out = report.model_dump(mode="json")
    out.update({"predicted_loss_change": predicted, "measured_loss_change": measured, "heal": healed,
                "out": args.out})
    print(json.dumps(out, indent=2))
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    from solver.errors import GeoShareError

    try:
        from hessian_worker.io import save_shared
        from hessian_worker.llm import compress_checkpoint, is_streamable
        from hessian_worker.models import load_model
        from hessian_worker.pipeline import CompressConfig, compress

        basis = _compress_basis(args)
        streamed = is_streamable(args.model) and args.backend in (None, "kfac", "layerwise") and not basis
        backend = args.backend or ("kfac" if streamed else "exact")
        config = CompressConfig(ratio=args.ratio, backend=backend, merge=args.merge, distill=args.distill,
                                top=args.top, min_distance=args.min_distance, per_pattern=args.per_pattern,
                                normalized_top=args.normalized_top, curvature_samples=args.curvature_samples,
                                heal_steps=args.heal, heal_lr=args.heal_lr, heal_holdout=args.heal_holdout,
                                heal_choice=not args.no_heal_choice, heal_shortlist=args.heal_shortlist,
                                choice_holdout=args.choice_holdout, holdout=args.holdout, samples=args.samples,
                                batch_size=args.batch_size, time_limit_s=args.time_limit, seed=args.seed,
                                device=args.device, dtype=args.dtype, kfac=_kfac_options(args),
                                progress=not args.quiet, **basis)
        if streamed:
            cache = None if args.no_stats_cache else args.stats_cache
            report = compress_checkpoint(args.model, args.data, config, args.out, memory_limit_gb=args.memory_limit_gb,
                                         cache_dir=cache)
        else:
            if is_streamable(args.model):
                _check_whole_model_fits(args.model, args.dtype or "float32", backend, args.memory_limit_gb)
            loaded = load_model(args.model)
            if args.dtype == "float64":
                loaded.model.double()
            report = compress(loaded.model, _data_source(args, loaded.tokenizer), config, tokenizer=loaded.tokenizer)
            save_shared(loaded.model, report.plan, args.out, source=args.model)
    except (GeoShareError, ValueError, OSError) as exc:
        return _fail(str(exc))
    text = report.model_dump_json(indent=2, exclude={"plan", "problem"})
    (Path(args.out) / "report.json").write_text(text, encoding="utf-8")
    (Path(args.out) / "problem.json").write_text(report.problem.model_dump_json(indent=2), encoding="utf-8")
    from hessian_worker.model_card import command_line, write_card

    write_card(args.out, report=json.loads(text), command=command_line(args))  # README.md: the figures, the command
    print(text)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from solver.errors import GeoShareError

    try:
        from hessian_worker.export import export_dense

        out = export_dense(args.src, args.output, format=args.format, shard_bytes=int(args.shard_gb * 1024**3))
    except (GeoShareError, ValueError, OSError) as exc:
        return _fail(str(exc))
    print(json.dumps({"output": str(out), "format": args.format}))
    return 0


def _add_evaluate(subparsers: Any) -> None:
    """``geoshare evaluate``: a saved model against its source on the user's samples (hessian_worker.evaluation)."""
    v = subparsers.add_parser("evaluate", help="a saved model against its source: quality, parameters, disk, peak memory")
    v.add_argument("--model", required=True, help="the model to measure: a compressed directory (or any model spec)")
    v.add_argument("--reference", default=None,
                   help="the source model's spec (default: the source recorded in the directory's plan.json)")
    v.add_argument("--data", default=None, help="text file (one sample a line) or torch.save'd tensor(s)")
    v.add_argument("--metric", choices=("auto", "perplexity", "cosine", "distill", "task"), default="auto",
                   help="auto: perplexity for a causal LM, embedding cosine for an encoder, else the distillation loss")
    v.add_argument("--task-loss", default=None, metavar="MODULE:FUNCTION",
                   help="a task loss (output, batch) -> scalar, measured on both models (metric task)")
    v.add_argument("--samples", type=int, default=None)
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--max-length", type=int, default=128, help="tokens per text sample")
    v.add_argument("--device", default="cpu")
    v.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    v.add_argument("--card", action="store_true", help="also write the figures into the model directory's README.md")
    v.add_argument("-o", "--output", default=None, help="where to write the report JSON")
    v.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from solver.errors import GeoShareError

    try:
        from hessian_worker.evaluation import (
            EvaluateConfig,
            evaluate,
            format_report,
            reference_of,
            task_loss,
        )

        config = EvaluateConfig(metric=args.metric, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                                max_length=args.max_length, device=args.device, memory=not args.no_memory)
        loss_fn = task_loss(args.task_loss) if args.task_loss else None
        report = evaluate(args.model, args.reference or reference_of(args.model), args.data, config, loss_fn=loss_fn)
        if args.output:
            Path(args.output).write_text(report.model_dump_json(indent=2), encoding="utf-8")
        if args.card:
            from hessian_worker.model_card import write_card
            from hessian_worker.model_dir import is_compressed

            if not is_compressed(args.model):
                raise ValueError(f"--card writes into a compressed directory's README.md; {args.model!r} is not one")
            write_card(args.model, evaluation=report.model_dump(mode="json"))
    except (GeoShareError, ValueError, OSError, RuntimeError) as exc:
        return _fail(str(exc))
    print(format_report(report))
    return 0


def _compress_basis(args: argparse.Namespace) -> dict[str, Any]:
    """CompressConfig's scheme fields from the command line."""
    basis = _basis_options(args)
    if not basis:
        if args.rank is not None:
            raise ValueError("--rank applies to --scheme basis only; add --scheme basis or drop it")
        return {}
    return {"scheme": "basis", **basis}


def _check_tie_accounting(model: Any, plan: Any) -> None:
    """Refuses a plan whose ``params.shared`` is not what tying its classes keeps: such a plan was
    solved under another scheme (a basis problem) and would be applied wrongly without it.

    Raises:
        ValueError: the counts differ; the message names the fix (--problem).
    """
    if plan.params is None:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    classes = [list(g) for g in plan.groups if g]
    listed = {n for g in classes for n in g}
    extra: dict[int, list[str]] = {}
    for name, color in plan.coloring.items():
        if name not in listed:
            extra.setdefault(color, []).append(name)
    classes += list(extra.values())
    if any(n not in params for g in classes for n in g):
        return  # apply_plan names the unknown parameters
    tied = sum(params[g[0]].numel() for g in classes)
    if tied != plan.params.shared:
        raise ValueError(
            f"the plan keeps params.shared={plan.params.shared}, but tying its classes keeps {tied}: "
            "it was solved from a problem with another sharing scheme (basis?); pass that problem "
            "with --problem problem.json"
        )


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (the product wires these commands into ``geoshare``)."""
    parser = argparse.ArgumentParser(prog="geoshare-worker")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
