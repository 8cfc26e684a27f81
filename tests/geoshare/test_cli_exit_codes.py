"""Exit codes: 2 with a message for bad input, 1 with the traceback for a bug (141 on a closed
stdout: tests/solver/test_cli.py)."""

from __future__ import annotations

import subprocess
import sys

BUG = """
import sys
from geoshare.cli import main, plans
def broken(args):
    raise RuntimeError("a bug, not bad input")
plans._cmd_solve = broken
sys.exit(main(["solve", "p.json"]))
"""


def test_an_unexpected_error_exits_1_with_its_traceback():
    out = subprocess.run([sys.executable, "-c", BUG], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "a bug, not bad input" in out.stderr


def test_bad_input_exits_2_naming_the_command(tmp_path, capsys):
    from geoshare.cli import main

    assert main(["apply", "--model", "m", "--plan", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geoshare apply: error:") and "does not exist" in err
    assert not (tmp_path / "o").exists()
