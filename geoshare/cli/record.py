"""The command line that made a run, for the model card (``model_card.write_card(command=...)``).

Rebuilt from the parsed arguments rather than taken from ``sys.argv``, so it is the same whatever
process ran the command (the console script, ``python -m geoshare``, a test calling ``main``), and
written with the current spelling of every flag even when an old one was typed.
"""

from __future__ import annotations

import argparse
import shlex

from geoshare.cli.help import hidden_spellings


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``geoshare <command> ...`` with the flags whose values differ from their defaults (and the
    required ones); parsing it again with ``parser`` (the whole ``geoshare`` parser) gives ``args`` back."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parser = sub.choices[args.command]
    words = ["geoshare", args.command]
    for action in parser._actions:  # argparse keeps no public list of a parser's flags
        if not action.option_strings or action.dest in ("help", "func"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default and not action.required:
            continue
        flag = max((s for s in action.option_strings if s not in hidden_spellings(action)), key=len)
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
