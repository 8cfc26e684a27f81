"""``geoshare analyze``: a model and calibration data in, a SharingProblem (pair costs) out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from geoshare.cli import model_flags as flags
from geoshare.cli.help import add_command
from hessian_worker.options import Bulk, CurvatureKind, Eigensolver, SketchPrecision
from solver.schema import CostKind

# AnalyzeConfig.rank's default: the projected backend's eigenpairs
SKETCH_RANK = 8


def add_commands(subparsers: Any) -> None:
    """Adds ``analyze``."""
    a = add_command(
        subparsers, "analyze", summary="model + calibration data -> SharingProblem JSON",
        description="Finds the shareable layers (families of repeated blocks) and predicts the loss change of "
                    "sharing each same-family pair from the curvature of the calibration loss.",
        examples=["geoshare analyze --model minilm --data calib.txt --ratio 0.8 -o problem.json",
                  "geoshare analyze --model minilm --backend projected --sketch-rank 16 -o problem.json",
                  "geoshare analyze --model minilm --scheme basis --rank-ratio 0.4 -o problem.json"])
    flags.model_options(a)
    flags.backend_option(a, "streamed")
    flags.streaming_options(a)
    a.add_argument("--kind", choices=flags.values(CostKind), default="pairwise",
                   help="pairwise: loss when both layers take their mean; assignment: when one takes the other's")
    a.add_argument("--curvature", choices=flags.values(CurvatureKind), default="ggn",
                   help="ggn: the Gauss-Newton matrix (PSD); hessian: the full Hessian")
    a.add_argument("--ratio", type=float, default=None, metavar="FRACTION",
                   help="the problem's budget, constraints.max_params_ratio (solve --ratio overrides it)")
    a.add_argument("--sketch-rank", type=int, default=None, metavar="K",
                   help=f"projected: eigenpairs of the curvature kept (default {SKETCH_RANK})")
    a.add_argument("--basis-rank", type=int, default=None, metavar="R",
                   help="--scheme basis: the basis rank of every family (or --rank-ratio)")
    # the old --rank: the sketch rank, or with --scheme basis the basis rank
    a.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    a.add_argument("--probes", type=int, default=32, metavar="N", help="Hutchinson probes (diagonal; lanczos traces)")
    a.add_argument("--eigensolver", choices=flags.values(Eigensolver), default="auto",
                   help="projected: nystrom (one batched sketch, GGN only), lanczos, auto (nystrom for the GGN)")
    a.add_argument("--oversample", type=int, default=4, metavar="N",
                   help="projected, nystrom: sketch vectors beyond --sketch-rank")
    a.add_argument("--sketch-precision", choices=flags.values(SketchPrecision), default="auto",
                   help="projected, nystrom: the sketch's HVPs in bfloat16 (about 3x faster on AMX/AVX512-BF16 CPUs "
                        "and CUDA), the model's dtype, or auto (bfloat16 where native)")
    a.add_argument("--bulk", choices=flags.values(Bulk), default="layer",
                   help="projected: curvature off the top space, one scalar per layer or one for all (the paper)")
    a.add_argument("--targets", action="append", default=None, metavar="PATTERN",
                   help="layers to consider: a full name or re:regex (repeatable; default: every 2-D weight of "
                        "repeated blocks)")
    a.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="layers to leave alone: a full name or re:regex (repeatable)")
    flags.shrinkage_option(a)
    a.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the problem JSON")
    flags.scheme_options(a)
    a.set_defaults(func=run, extras=("worker",))


def ranks(args: argparse.Namespace) -> tuple[int, int | None]:
    """(sketch rank, basis rank) from --sketch-rank, --basis-rank and the old --rank, which meant the
    basis rank with --scheme basis and the sketch rank otherwise."""
    sketch, basis = args.sketch_rank, args.basis_rank
    if args.rank is not None:
        old = "basis" if args.scheme == "basis" else "sketch"
        if (basis if old == "basis" else sketch) is not None:
            raise ValueError(f"--rank is the old spelling of --{old}-rank here; pass one of them")
        if old == "basis":
            basis = args.rank
        else:
            sketch = args.rank
    return (SKETCH_RANK if sketch is None else sketch), basis


def run(args: argparse.Namespace) -> int:
    from hessian_worker import AnalyzeConfig, analyze
    from hessian_worker.distributed import is_writer
    from hessian_worker.llm import analyze_checkpoint, is_streamable
    from hessian_worker.models import load_model

    sketch_rank, basis_rank = ranks(args)
    basis = flags.basis_options(args, basis_rank)
    relaxed = flags.relaxed_options(args)
    # exact streams its forward-mode tangents block by block; the full Hessian needs the whole model
    streams = ("kfac", "layerwise") + (("exact",) if args.curvature == "ggn" else ())
    streamed = is_streamable(args.model) and args.backend in (None, *streams) and not basis and not relaxed
    backend = args.backend or ("kfac" if streamed else "exact")
    config = AnalyzeConfig(
        backend=backend, kind=args.kind, curvature=args.curvature, samples=args.samples,
        batch_size=args.batch_size, seed=args.seed, max_params_ratio=args.ratio,
        rank=SKETCH_RANK if basis or relaxed else sketch_rank,
        probes=args.probes, memory_limit_gb=args.memory_limit_gb or 4.0, targets=args.targets,
        eigensolver=args.eigensolver, oversample=args.oversample, bulk=args.bulk,
        sketch_precision=args.sketch_precision, kfac=flags.kfac_options(args),
        ignore=args.ignore, device=args.device, dtype=args.dtype or ("auto" if streamed else "float32"),
        progress=not args.quiet, scheme=args.scheme, **({"basis": basis} if basis else {}),
        **({"shrinkage": args.shrinkage} if args.shrinkage is not None else {}),
        **({"relaxed": relaxed} if relaxed else {}),
    )
    if streamed:
        problem = analyze_checkpoint(args.model, args.data, config, memory_limit_gb=args.memory_limit_gb,
                                     cache_dir=flags.stats_cache(args))
    else:
        if is_streamable(args.model):
            flags.check_whole_model_fits(args.model, config.dtype.value, config.backend.value, args.memory_limit_gb)
        loaded = load_model(args.model)
        problem = analyze(loaded.model, flags.data_source(args.data, loaded.tokenizer), config,
                          tokenizer=loaded.tokenizer)
    if is_writer():  # under torchrun every rank holds rank 0's problem; rank 0 writes it
        Path(args.output).write_text(problem.model_dump_json(indent=2), encoding="utf-8")
        print(json.dumps({"output": args.output, "layers": len(problem.layers),
                          "families": len({x.family for x in problem.layers})}))
    return 0
