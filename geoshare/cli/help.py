"""How every ``geoshare`` command is declared: help on each flag, examples, old spellings hidden.

Renamed flags keep their old spelling as a second option string of the same action, so scripts
written against it still run and parse to the same value; ``hide`` keeps that spelling out of
``--help``. An alias whose meaning differs from the new flag's (``analyze --rank``) is its own
action with ``help=argparse.SUPPRESS`` instead.
"""

from __future__ import annotations

import argparse
import copy
import textwrap
from collections.abc import Sequence
from typing import Any

_HIDDEN = "_geoshare_hidden"  # the attribute on an action naming its hidden spellings


def hide(action: argparse.Action, *spellings: str) -> argparse.Action:
    """Keeps ``spellings`` (old names of the flag, still accepted) out of the help text."""
    unknown = set(spellings) - set(action.option_strings)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not option strings of --{action.dest}")
    setattr(action, _HIDDEN, (*getattr(action, _HIDDEN, ()), *spellings))
    return action


def hidden_spellings(action: argparse.Action) -> tuple[str, ...]:
    """The old spellings ``hide`` recorded on ``action`` (none for most)."""
    return getattr(action, _HIDDEN, ())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples in the epilog as written (no re-wrapping); hidden spellings left out."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = hidden_spellings(action)
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


def add_command(subparsers: Any, name: str, *, summary: str, description: str,
                examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``examples`` (command lines, each with a ``#`` note)."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return subparsers.add_parser(name, help=summary, description=textwrap.fill(description, 88), epilog=epilog,
                                 formatter_class=HelpFormatter)


def example_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The ``geoshare ...`` command lines of a parser's examples, notes stripped (for tests)."""
    lines = (parser.epilog or "").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip().startswith("geoshare ")]
