"""Every ``geoshare`` command explains itself: help on each flag, real examples, a version."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from geoshare import SOURCE_VERSION, __version__
from geoshare.cli import build_parser
from geoshare.cli.help import example_commands, hidden_spellings

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


COMMANDS = _commands()


def test_the_commands_are_all_there():
    assert set(COMMANDS) == {"solve", "frontier", "analyze", "apply", "compress", "export", "evaluate", "serve",
                             "worker"}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name: str):
    for action in COMMANDS[name]._actions:
        if action.help == argparse.SUPPRESS:  # a hidden old spelling: another flag names the option
            assert action.option_strings and action.default is None, action.dest
            continue
        assert action.help and action.help.strip(), f"geoshare {name}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_examples_that_parse(name: str):
    parser = build_parser()
    examples = example_commands(COMMANDS[name])
    assert 1 <= len(examples) <= 3, name
    for line in examples:
        words = shlex.split(line)
        assert words[:2] == ["geoshare", name], line
        args = parser.parse_args(words[1:])  # exits (SystemExit) on a flag that does not exist
        assert args.command == name
    text = COMMANDS[name].format_help()
    assert "examples:" in text and examples[0] in text


@pytest.mark.parametrize("name", COMMANDS)
def test_hidden_spellings_stay_out_of_the_help(name: str):
    parser = COMMANDS[name]
    text = parser.format_help()
    for action in parser._actions:
        for spelling in hidden_spellings(action):
            assert not re.search(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", text.split("examples:")[0]), spelling
        if action.help == argparse.SUPPRESS:
            for spelling in action.option_strings:
                assert not re.search(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", text.split("examples:")[0])


def test_version_is_the_distribution_version():
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None and declared.group(1) == SOURCE_VERSION
    out = subprocess.run([sys.executable, "-m", "geoshare", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"geoshare {__version__}"


def test_python_dash_m_geoshare_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "geoshare", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in COMMANDS)
