"""Where ``analyze``, ``apply``, ``compress``, ``export`` and ``evaluate`` used to be declared.

They live in geoshare/cli/ now, the product layer above this package. This module stays only for
code written against its two names (bench scripts call ``main``); both reach up to geoshare
lazily, at call time, so importing this module imports nothing (no torch, and no import cycle).
New code imports geoshare.cli; nothing in the package uses this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def add_commands(subparsers: Any) -> None:
    """Adds the model commands to an argparse subparsers object (``geoshare.cli.add_model_commands``)."""
    from geoshare.cli import add_model_commands

    add_model_commands(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """``geoshare`` itself (``geoshare.cli.main``), every command included."""
    from geoshare.cli import main as geoshare_main

    return geoshare_main(argv)
