"""``geoshare evaluate``: a saved model against its source on the user's samples
(``hessian_worker.evaluation``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from geoshare.cli.help import add_command
from solver.errors import GeoShareError


class EvaluationFailed(GeoShareError, RuntimeError):
    """A model could not be run on the samples (the message says why): bad input, not a crash."""


def add_commands(subparsers: Any) -> None:
    """Adds ``evaluate``."""
    v = add_command(
        subparsers, "evaluate", summary="a saved model against its source: quality, parameters, disk, peak memory",
        description="Measures a compressed directory (or any model spec) against its source on your samples: "
                    "perplexity and KL for causal LMs, embedding cosine for encoders, a distillation or task loss "
                    "otherwise; unique parameters, weights on disk and the peak memory of load + one forward.",
        examples=["geoshare evaluate --model out/ --data eval.txt",
                  "geoshare evaluate --model out/ --data eval.txt --card -o evaluation.json",
                  "geoshare evaluate --model out/ --data eval.pt --metric task --task-loss mypkg.losses:nll"])
    v.add_argument("--model", required=True, metavar="SPEC",
                   help="the model to measure: a compressed directory (or any model spec)")
    v.add_argument("--reference", default=None, metavar="SPEC",
                   help="the source model's spec (default: the source recorded in the directory's plan.json)")
    v.add_argument("--data", default=None, metavar="FILE",
                   help="text file (one sample a line) or torch.save'd tensor(s)")
    v.add_argument("--metric", choices=("auto", "perplexity", "cosine", "distill", "task"), default="auto",
                   help="auto: perplexity for a causal LM, embedding cosine for an encoder, else the distillation loss")
    v.add_argument("--task-loss", default=None, metavar="MODULE:FUNCTION",
                   help="a task loss (output, batch) -> scalar, measured on both models (metric task)")
    v.add_argument("--samples", type=int, default=None, metavar="N", help="samples measured (seeded; default: all)")
    v.add_argument("--batch-size", type=int, default=8, metavar="N", help="samples per forward pass")
    v.add_argument("--seed", type=int, default=0, help="seed of the sample draw")
    v.add_argument("--max-length", type=int, default=128, metavar="TOKENS", help="tokens per text sample")
    v.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    v.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    v.add_argument("--card", action="store_true", help="also write the figures into the model directory's README.md")
    v.add_argument("-o", "--output", default=None, metavar="FILE", help="where to write the report JSON")
    v.set_defaults(func=run, extras=("worker",))


def run(args: argparse.Namespace) -> int:
    from hessian_worker.evaluation import (
        EvaluateConfig,
        evaluate,
        format_report,
        reference_of,
        task_loss,
    )

    config = EvaluateConfig(metric=args.metric, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                            max_length=args.max_length, device=args.device, memory=not args.no_memory)
    try:
        loss_fn = task_loss(args.task_loss) if args.task_loss else None
        report = evaluate(args.model, args.reference or reference_of(args.model), args.data, config, loss_fn=loss_fn)
    except RuntimeError as exc:  # a model that cannot run on these samples
        raise EvaluationFailed(str(exc)) from exc
    if args.output:
        Path(args.output).write_text(report.model_dump_json(indent=2), encoding="utf-8")
    if args.card:
        from hessian_worker.model_card import write_card
        from hessian_worker.model_dir import is_compressed

        if not is_compressed(args.model):
            raise ValueError(f"--card writes into a compressed directory's README.md; {args.model!r} is not one")
        write_card(args.model, evaluation=report.model_dump(mode="json"))
    print(format_report(report))
    return 0
