"""The ``geoshare`` console script (``python -m geoshare`` too): one parser over every command.

Each module here declares one command group and its thin handler; the handlers call the library
verbs (solver, hessian_worker, service) and import torch or FastAPI only when they run, so
``geoshare solve`` works on the base install (tests/geoshare checks that it never imports them).

Exit codes: 0 success; 2 bad input, an infeasible request or a missing optional part (the message
says why and how to fix it); 1 anything unexpected (with its traceback); 141 when the reader of
stdout went away (``geoshare solve p.json | head``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from geoshare import __version__
from geoshare.cli import analyze, apply, compress, evaluate, export, plans, service
from geoshare.cli.extras import extra_of, install_line, require
from geoshare.cli.help import HelpFormatter
from geoshare.cli.record import command_line
from solver.errors import GeoShareError

# the command groups, in the order --help lists them
COMMAND_GROUPS = (plans, analyze, apply, compress, export, evaluate, service)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``geoshare`` parser (importing no optional dependency)."""
    parser = argparse.ArgumentParser(
        prog="geoshare", formatter_class=HelpFormatter,
        description="Geo-Sharing: optimal cross-layer parameter sharing.",
        epilog="examples:\n"
               "  geoshare analyze --model minilm --data calib.txt --ratio 0.8 -o problem.json\n"
               "  geoshare solve problem.json -o plan.json\n"
               "  geoshare compress --model minilm --data calib.txt --ratio 0.8 --out out/\n\n"
               "geoshare COMMAND --help shows a command's flags and examples.")
    parser.add_argument("--version", action="version", version=f"geoshare {__version__}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def add_model_commands(subparsers: Any) -> None:
    """Adds the commands that run models (analyze, apply, compress, export, evaluate) to ``subparsers``."""
    for group in (analyze, apply, compress, export, evaluate):
        group.add_commands(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = command_line(args, parser)  # what a saved model's card records (record.py)
    try:
        require(args.command, getattr(args, "extras", ()))
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit where it can't be caught
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except ModuleNotFoundError as e:  # an optional part missing below what require() checks
        extra = extra_of(e.name)
        if extra is None:
            raise
        return _error(args.command, f"{e}; it comes with {install_line([extra])}")
    except (GeoShareError, ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        return _error(args.command, str(e))


def _error(command: str, message: str) -> int:
    print(f"geoshare {command}: error: {message}", file=sys.stderr)
    return 2


def _closed_stdout() -> int:
    """The reader went away: not an error worth a traceback.

    As the Python docs recommend for SIGPIPE: point stdout at devnull so the interpreter's last
    flush does not raise again, and exit like a process killed by SIGPIPE (128 + 13).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141
