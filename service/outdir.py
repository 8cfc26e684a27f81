"""The output directory of a compress job, checked before any work so nothing is overwritten.

A marker file holding the job id lets a retried attempt of the same job (a lost lease, an out of
memory retry) write where its first attempt began; a directory that holds only a stale marker
from a failed job counts as empty.
"""

from __future__ import annotations

from pathlib import Path

from solver.errors import GeoShareError

MARKER = ".geoshare-job"


class OutDirError(GeoShareError, ValueError):
    """``compress.out`` cannot be used: the message says why and what to choose instead."""


def prepare_out(out: str, *, overwrite: bool, job_id: str) -> Path:
    """Creates ``out`` (parents too) and marks it as this job's; refuses someone else's files.

    Raises:
        OutDirError: ``out`` is a file, is a non-empty directory of another job and ``overwrite``
            is false, or cannot be created.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise OutDirError(
            f"compress.out {str(path)!r} is a file on this worker, not a directory; choose a "
            "directory path"
        )
    if path.is_dir() and not overwrite and not _marked_by(path, job_id):
        others = sorted(p.name for p in path.iterdir() if p.name != MARKER)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise OutDirError(
                f"compress.out {str(path)!r} exists and is not empty ({shown}); nothing was "
                "written: choose a new out, empty it, or set compress.overwrite=true to replace "
                "model.safetensors, plan.json and report.json there"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).write_text(job_id + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutDirError(
            f"cannot write compress.out {str(path)!r} on this worker ({exc.strerror or exc}); "
            "choose a writable directory, e.g. on the shared models volume"
        ) from exc
    return path


def _marked_by(path: Path, job_id: str) -> bool:
    mark = path / MARKER
    try:
        return mark.is_file() and mark.read_text(encoding="utf-8").strip() == job_id
    except OSError:
        return False
