"""``geoshare apply``: tie one solved plan into the model (``hessian_worker.apply_run.apply_and_save``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from geoshare.cli import model_flags as flags
from geoshare.cli.help import add_command
from hessian_worker.options import Merge

# --merge auto: compress's rule; apply's default stays mean (see ApplyRunConfig)
AUTO = "auto"


def add_commands(subparsers: Any) -> None:
    """Adds ``apply``."""
    p = add_command(
        subparsers, "apply", summary="tie a plan into the model, save it, report the loss change",
        description="Applies a plan solved elsewhere (geoshare solve) to the model: merges each class, ties or "
                    "installs the bases, optionally heals, measures the loss change on held-out samples and "
                    "saves the directory hessian_worker.load_compressed reads.",
        examples=["geoshare apply --model minilm --plan plan.json --data calib.txt --out out/",
                  "geoshare apply --model minilm --plan plan.json --data calib.txt --merge auto --heal 100 --out out/",
                  "geoshare apply --model minilm --plan plan.json --problem problem.json --out out/   # basis plan"])
    flags.model_options(p)
    p.add_argument("--plan", required=True, metavar="FILE", help="the SharingPlan JSON to apply")
    p.add_argument("--problem", default=None, metavar="FILE",
                   help="the SharingProblem the plan was solved from; needed for basis and relaxed plans (ranks, sides)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for model.safetensors + plan.json")
    p.add_argument("--merge", choices=(AUTO, *flags.values(Merge)), default="mean",
                   help="shared value of a class (default mean, as apply always did; auto: compress's rule, "
                        "layerwise when the data pins the input covariances down, else curvature)")
    flags.holdout_samples_option(p, "half of them")
    p.add_argument("--heal", type=int, default=0, metavar="STEPS",
                   help="self-distillation fine-tune steps after tying (ties kept; 0 = none)")
    p.add_argument("--heal-lr", type=float, default=5e-5, metavar="LR", help="AdamW learning rate for --heal")
    p.add_argument("--heal-holdout", type=float, default=0.2, metavar="FRACTION",
                   help="with --heal: fraction in [0, 1) of the healing samples kept out to keep the best step "
                        "(0: keep the last)")
    p.add_argument("--no-output-weighting", action="store_true",
                   help="basis and relaxed plans: whiten as a problem analyzed with --no-output-weighting did")
    p.set_defaults(func=run, extras=("worker",))


def run(args: argparse.Namespace) -> int:
    from hessian_worker.apply_run import ApplyRunConfig, apply_and_save
    from solver.io import load_plan, load_problem

    plan = load_plan(args.plan)
    problem = load_problem(args.problem) if args.problem is not None else None
    config = ApplyRunConfig(merge=None if args.merge == AUTO else args.merge, holdout=args.holdout_samples,
                            heal_steps=args.heal, heal_lr=args.heal_lr, heal_holdout=args.heal_holdout,
                            output_weighting=not args.no_output_weighting, samples=args.samples,
                            batch_size=args.batch_size, seed=args.seed, device=args.device,
                            dtype=args.dtype or "float32", progress=not args.quiet)
    done = apply_and_save(args.model, plan, args.out, problem=problem, data=args.data, config=config)
    print(json.dumps(done.to_json(), indent=2))
    return 0
