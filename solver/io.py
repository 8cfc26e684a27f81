"""Reading and writing the contract's JSON files, with errors that say what to fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .errors import ProblemError
from .schema import SharingPlan, SharingProblem


def describe_validation(err: ValidationError) -> str:
    """One line per problem: where it is and what is wrong."""
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def _read_text(path: str | Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.is_file():
        raise ProblemError(f"{p} does not exist or is not a file")
    return p.read_text()


def load_problem(path: str | Path) -> SharingProblem:
    """Parse a SharingProblem JSON file ('-' reads stdin)."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProblemError(f"{path} is not valid JSON: {e}") from e
    try:
        return SharingProblem.model_validate(data)
    except ValidationError as e:
        raise ProblemError(f"{path} is not a valid SharingProblem: {describe_validation(e)}") from e


def load_plan(path: str | Path) -> SharingPlan:
    """Parse a SharingPlan JSON file."""
    text = _read_text(path)
    try:
        return SharingPlan.model_validate_json(text)
    except ValidationError as e:
        raise ProblemError(f"{path} is not a valid SharingPlan: {describe_validation(e)}") from e


def dump(model: BaseModel) -> str:
    return model.model_dump_json(indent=2, exclude_none=True)


def write_or_print(model: BaseModel, out: str | Path | None) -> None:
    """Write JSON to a file (parents created) or print it to stdout."""
    text = dump(model)
    if out is None or str(out) == "-":
        print(text)
        return
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")
