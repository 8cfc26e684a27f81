"""``geoshare solve`` and ``geoshare frontier``: a SharingProblem file in, a plan or frontier out.

Base install only (solver/): nothing here imports torch or FastAPI, at import or at run time.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from geoshare.cli.help import add_command, hide
from solver.candidates import solve_with_alternatives
from solver.io import load_problem, write_or_print
from solver.planning import SolveConfig, frontier

STRATEGIES = ("all-share", "sequence", "cycle", "cycle-rev", "adjacent-pairs", "random", "weight-distance")


def add_commands(subparsers: Any) -> None:
    """Adds ``solve`` and ``frontier``."""
    ps = add_command(
        subparsers, "solve", summary="best sharing plan within a parameter budget, with a proven bound",
        description="Solves a SharingProblem (docs/contract.md) for the coloring of least predicted loss within "
                    "the budget and proves a lower bound on the best possible; prints the SharingPlan JSON.",
        examples=["geoshare solve problem.json -o plan.json   # the optimum, with its bound and gap",
                  "geoshare solve problem.json --ratio 0.5 --top 8 --min-distance 2   # + the next best plans",
                  "geoshare solve --problem problem.json --strategy sequence   # a heuristic, for comparison"])
    _solver_options(ps)
    ps.add_argument("--strategy", choices=STRATEGIES, help="plan by a named heuristic instead (for comparisons)")
    ps.add_argument("--distances", metavar="FILE", help="JSON n x n matrix for --strategy weight-distance")
    ps.add_argument("--top", type=int, metavar="K",
                    help="also list the next best diverse plans and the pattern plans as alternatives (K plans in all)")
    ps.add_argument("--min-distance", type=int, metavar="PAIRS",
                    help="with --top: layer pairs each alternative must share differently (default 1)")
    ps.set_defaults(func=_cmd_solve)

    pf = add_command(
        subparsers, "frontier", summary="every reachable budget level: params, objective, bound",
        description="The whole compression-vs-cost frontier of a SharingProblem: at each reachable number of "
                    "unique parameters, the best plan's objective and a proven bound.",
        examples=["geoshare frontier problem.json -o frontier.json",
                  "geoshare frontier problem.json --plot frontier.png   # also draw it"])
    _solver_options(pf)
    pf.add_argument("--plot", metavar="FILE", help="also draw the frontier to this PNG/SVG file")
    pf.set_defaults(func=_cmd_frontier)


def _solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("problem_file", nargs="?", metavar="problem",
                   help="SharingProblem JSON file ('-' for stdin); or give it as --problem")
    p.add_argument("--problem", metavar="FILE", help="SharingProblem JSON file, the same as the positional")
    p.add_argument("--ratio", type=float, help="max share of the layers' parameters to keep (overrides the file)")
    p.add_argument("--max-params", type=int, help="max unique parameters (overrides the file)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="seconds for the whole solve (overrides the file)")
    p.add_argument("--gap", type=float, help="relative gap that counts as optimal")
    hide(p.add_argument("--cpsat-threads", "--workers", type=int, metavar="N",
                        help="threads the problem's options.workers records (the solve path is single-threaded "
                             "now, so this no longer changes the plan)"), "--workers")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("-o", "--output", metavar="FILE", help="write the JSON to this file instead of stdout")


def problem_path(args: argparse.Namespace) -> str:
    """The problem file, given as the positional or as --problem (one of them, once)."""
    if args.problem_file is not None and args.problem is not None:
        raise ValueError(f"the problem was given twice ({args.problem_file!r} and --problem {args.problem!r}); "
                         "give one")
    path = args.problem if args.problem is not None else args.problem_file
    if path is None:
        raise ValueError("no problem given: pass the SharingProblem JSON file (or '-' for stdin) as the "
                         "argument or as --problem FILE")
    return path


def _config(args: argparse.Namespace) -> SolveConfig:
    return SolveConfig(max_params_ratio=args.ratio, max_params=args.max_params, time_limit_s=args.time_limit,
                       relative_gap=args.gap, workers=args.cpsat_threads, seed=args.seed)


def _cmd_solve(args: argparse.Namespace) -> int:
    problem = load_problem(problem_path(args))
    if args.strategy:
        from solver.baselines import baseline

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
    front = frontier(load_problem(problem_path(args)), _config(args))
    write_or_print(front, args.output)
    if args.plot:
        from solver.plot import plot_frontier

        plot_frontier(front, args.plot)
        print(f"frontier plot written to {args.plot}", file=sys.stderr)
    return 0
