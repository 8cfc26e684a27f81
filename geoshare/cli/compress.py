"""``geoshare compress``: model -> costs -> candidate plans -> measured choice -> tied model on disk.

A LLaMA/Mistral/Qwen2 checkpoint directory is compressed block by block
(``hessian_worker.llm.compress_checkpoint``, which writes the model itself); any other model in
memory (``hessian_worker.compress``). Either way ``hessian_worker.compress_run`` writes the rest.
"""

from __future__ import annotations

import argparse
from typing import Any

from geoshare.cli import model_flags as flags
from geoshare.cli.help import add_command, hide
from hessian_worker.options import DistillLoss, Merge

AUTO = "auto"  # --merge auto: CompressConfig.merge None, the rule pipeline.resolve_merge applies


def add_commands(subparsers: Any) -> None:
    """Adds ``compress``."""
    c = add_command(
        subparsers, "compress", summary="model -> costs -> candidate plans -> measured choice -> tied model",
        description="The whole chain in one command: curvature costs, the K best plans and the pattern plans, "
                    "each measured on the calibration data, the best tied with the default merge, optionally "
                    "healed, and saved with report.json and problem.json.",
        examples=["geoshare compress --model minilm --data calib.txt --ratio 0.8 --out out/",
                  "geoshare compress --model minilm --data calib.txt --ratio 0.5 --scheme auto --heal 100 --out out/",
                  "geoshare compress --model minilm --data calib.txt --ratio 0.5 --scheme relaxed --correction-rank 24 "
                  "--heal 100 --out out/"])
    flags.model_options(c)
    c.add_argument("--ratio", type=float, required=True, metavar="FRACTION",
                   help="share of the shareable parameters to keep")
    c.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the compressed model (config.json, tokenizer, model.safetensors, plan.json: "
                        "hessian_worker.load_compressed reads it) + report.json + problem.json")
    flags.backend_option(c, "compressed")
    flags.streaming_options(c)
    c.add_argument("--merge", choices=(AUTO, *flags.values(Merge)), default=AUTO,
                   help="shared value of a class (auto: layerwise when the data has at least as many input rows "
                        "as the widest tied layer has inputs, else curvature)")
    c.add_argument("--top", type=int, default=16, metavar="K",
                   help="best plans by the cost model to measure (plus pattern plans)")
    c.add_argument("--min-distance", type=int, default=1, metavar="PAIRS",
                   help="sharing pairs in which each top plan differs from every better one")
    c.add_argument("--normalized-top", type=int, default=16, metavar="K",
                   help="also measure the best plans by size-normalized pair costs (0: none)")
    c.add_argument("--per-pattern", type=int, default=2, metavar="N",
                   help="budget-filling allocations measured per pattern strategy (sequence, cycle, ...)")
    c.add_argument("--curvature-samples", type=int, default=None, metavar="N",
                   help="calibration samples for the curvature costs, a count (default: all; the choice uses all)")
    c.add_argument("--distill", choices=flags.values(DistillLoss), default="auto",
                   help="calibration loss (auto: kl for logits, mse otherwise; cosine for sentence embeddings)")
    c.add_argument("--heal", type=int, default=0, metavar="STEPS", help="self-distillation steps after tying")
    c.add_argument("--heal-lr", type=float, default=5e-5, metavar="LR", help="AdamW learning rate for --heal")
    c.add_argument("--heal-holdout", type=float, default=0.2, metavar="FRACTION",
                   help="with --heal: fraction in [0, 1) of the healing samples kept out of training, to keep the "
                        "best step (step 0 included; 0: heal on all, keep the last step)")
    c.add_argument("--heal-shortlist", type=int, default=2, metavar="N",
                   help="with --heal: best zero-shot candidates healed in the choice, besides the best of each "
                        "pattern (tie) or form of sharing (relaxed, basis)")
    c.add_argument("--no-heal-choice", action="store_true",
                   help="with --heal: keep the zero-shot winner instead of healing a shortlist to choose")
    c.add_argument("--no-refit", action="store_true",
                   help="basis, relaxed: install the chosen plan as fitted for the choice (on the curvature part), "
                        "not refitted on every sample not held out")
    c.add_argument("--choice-holdout", type=float, default=0.5, metavar="FRACTION",
                   help="layerwise merge: fraction in [0, 1) of the choice samples candidates are scored on, kept "
                        "out of the covariances they are merged with (0: score on all)")
    flags.shrinkage_option(c)
    flags.holdout_samples_option(c, "a quarter of them")
    c.add_argument("--time-limit", type=float, default=10.0, metavar="SECONDS", help="solver seconds")
    hide(c.add_argument("--basis-rank", "--rank", dest="basis_rank", type=int, default=None, metavar="R",
                        help="--scheme basis: the basis rank of every family (or --rank-ratio)"), "--rank")
    flags.scheme_options(c, auto=True)
    c.add_argument("--no-relaxed-bases", action="store_true",
                   help="--scheme relaxed: keep every family relaxed (default: the candidates may keep families as "
                        "shared low-rank bases beside the relaxed ones, and the measured choice picks)")
    c.add_argument("--predict", action="store_true",
                   help="also predict every candidate's loss change to second order (one forward-mode pass each; "
                        "the report's second_order and spearman: how well predictions rank the candidates)")
    c.set_defaults(func=run, extras=("worker",))


def _relaxed_fields(relaxed: dict[str, Any]) -> dict[str, Any]:
    """CompressConfig fields of --scheme relaxed from ``model_flags.relaxed_options``."""
    fields = {"correction_rank": relaxed["rank"], "output_weighting": relaxed["output_weighting"]}
    if "pricing" in relaxed:
        fields["relaxed_pricing"] = relaxed["pricing"]
    if "rank_ratio" in relaxed:
        fields["relaxed"] = {"rank_ratio": relaxed["rank_ratio"], "output_weighting": relaxed["output_weighting"]}
    return fields


def run(args: argparse.Namespace) -> int:
    from hessian_worker.compress_run import save_compressed_run
    from hessian_worker.distributed import is_writer, refuse_in_job
    from hessian_worker.llm import compress_checkpoint, is_streamable
    from hessian_worker.models import load_model
    from hessian_worker.options import CompressConfig
    from hessian_worker.pipeline import compress

    basis = flags.basis_options(args, args.basis_rank)
    relaxed = flags.relaxed_options(args)
    if args.no_relaxed_bases and args.scheme != "relaxed":
        flags.refuse_without_scheme(["--no-relaxed-bases"], "relaxed")
    streamed = is_streamable(args.model) and args.backend in (None, "kfac", "layerwise") and args.scheme == "tie"
    backend = args.backend or ("kfac" if streamed else "exact")
    config = CompressConfig(ratio=args.ratio, backend=backend, merge=None if args.merge == AUTO else args.merge,
                            distill=args.distill, top=args.top, min_distance=args.min_distance,
                            per_pattern=args.per_pattern, normalized_top=args.normalized_top,
                            curvature_samples=args.curvature_samples, heal_steps=args.heal, heal_lr=args.heal_lr,
                            heal_holdout=args.heal_holdout, heal_choice=not args.no_heal_choice,
                            heal_shortlist=args.heal_shortlist, choice_holdout=args.choice_holdout, refit=not args.no_refit,
                            holdout=args.holdout_samples, samples=args.samples, batch_size=args.batch_size,
                            time_limit_s=args.time_limit, seed=args.seed, device=args.device, dtype=args.dtype,
                            kfac=flags.kfac_options(args), progress=not args.quiet, scheme=args.scheme,
                            predict=args.predict, **basis,
                            **(_relaxed_fields(relaxed) if relaxed else {}),
                            **({"relaxed_bases": False} if args.no_relaxed_bases else {}),
                            **({"shrinkage": args.shrinkage} if args.shrinkage is not None else {}))
    command = args.command_line  # the card's record of this run (geoshare.cli.main): flags given, defaults left out
    if streamed:
        report = compress_checkpoint(args.model, args.data, config, args.out,
                                     memory_limit_gb=args.memory_limit_gb, cache_dir=flags.stats_cache(args))
        if not is_writer():  # under torchrun every rank holds the report; rank 0 wrote the model and writes the rest
            return 0
        text = save_compressed_run(args.out, report, command=command)
    else:
        refuse_in_job(f"geoshare compress --backend {backend} on {args.model}")
        if is_streamable(args.model):
            flags.check_whole_model_fits(args.model, args.dtype or "float32", backend, args.memory_limit_gb)
        loaded = load_model(args.model)
        if args.dtype == "float64":
            loaded.model.double()
        report = compress(loaded.model, flags.data_source(args.data, loaded.tokenizer), config,
                          tokenizer=loaded.tokenizer)
        text = save_compressed_run(args.out, report, model=loaded.model, source=args.model, command=command)
    print(text)
    return 0
