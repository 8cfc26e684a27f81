"""The `geoshare` console script: solve and frontier here; other parts add their subcommands.

Exit codes: 0 success, 2 bad input or an infeasible request (the message says why and how to
fix it), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from .candidates import solve_with_alternatives
from .errors import GeoShareError
from .io import load_problem, write_or_print
from .planning import SolveConfig, frontier

# parts of the product that add subcommands when they are installed
_PLUGINS = ("hessian_worker.cli", "service.cli")


def _config(args: argparse.Namespace) -> SolveConfig:
    return SolveConfig(
        max_params_ratio=args.ratio,
        max_params=args.max_params,
        time_limit_s=args.time_limit,
        relative_gap=args.gap,
        workers=args.workers,
        seed=args.seed,
    )


def _cmd_solve(args: argparse.Namespace) -> int:
    problem = load_problem(args.problem)
    if args.strategy:
        from .baselines import baseline

        distances = None
        if args.distances:
            with open(args.distances) as f:
                distances = json.load(f)
        plan = baseline(problem, args.strategy, _config(args), distances=distances)
    else:
        wanted = {k: v for k, v in (("top", args.top), ("min_distance", args.min_distance)) if v is not None}
        if wanted:
            data = problem.model_dump()
            data["options"].update(wanted)
            problem = type(problem).model_validate(data)
        plan = solve_with_alternatives(problem, _config(args))
    write_or_print(plan, args.output)
    return 0


def _cmd_frontier(args: argparse.Namespace) -> int:
    problem = load_problem(args.problem)
    front = frontier(problem, _config(args))
    write_or_print(front, args.output)
    if args.plot:
        from .plot import plot_frontier

        plot_frontier(front, args.plot)
        print(f"frontier plot written to {args.plot}", file=sys.stderr)
    return 0


def _solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("problem", help="SharingProblem JSON file ('-' for stdin)")
    p.add_argument("--ratio", type=float, help="max share of the layers' parameters to keep (overrides the file)")
    p.add_argument("--max-params", type=int, help="max unique parameters (overrides the file)")
    p.add_argument("--time-limit", type=float, help="seconds (overrides the file)")
    p.add_argument("--gap", type=float, help="relative gap that counts as optimal")
    p.add_argument("--workers", type=int, help="CP-SAT workers (default: cores, at most 8)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("-o", "--output", help="write JSON here instead of stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geoshare", description="Geo-Sharing: optimal cross-layer parameter sharing.")
    sub = parser.add_subparsers(dest="command", required=True)
    ps = sub.add_parser("solve", help="best sharing plan within a parameter budget, with a proven bound")
    _solver_options(ps)
    ps.add_argument(
        "--strategy",
        choices=["all-share", "sequence", "cycle", "cycle-rev", "adjacent-pairs", "random", "weight-distance"],
        help="plan by a named heuristic instead (for comparisons)",
    )
    ps.add_argument("--distances", help="JSON n x n matrix for --strategy weight-distance")
    ps.add_argument("--top", type=int, help="also list the next best diverse plans and the pattern plans as alternatives (K plans in all)")
    ps.add_argument("--min-distance", type=int, help="with --top: layer pairs each alternative must share differently (default 1)")
    ps.set_defaults(func=_cmd_solve)
    pf = sub.add_parser("frontier", help="every reachable budget level: params, objective, bound")
    _solver_options(pf)
    pf.add_argument("--plot", help="also draw the frontier to this PNG/SVG file")
    pf.set_defaults(func=_cmd_frontier)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        add = getattr(module, "add_commands", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit where it can't be caught
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except GeoShareError as e:
        print(f"geoshare {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic's ValidationError (bad overrides) is a ValueError
        print(f"geoshare {args.command}: error: {e}", file=sys.stderr)
        return 2


def _closed_stdout() -> int:
    """The reader went away (``geoshare solve p.json | head``): not an error worth a traceback.

    As the Python docs recommend for SIGPIPE: point stdout at devnull so the interpreter's last
    flush does not raise again, and exit like a process killed by SIGPIPE (128 + 13).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
