"""The solve process: a spawned child that runs one solve at a time for the runner.

A separate process so a solve never blocks the event loop, and so cancelling is a kill. It exits
by itself when its parent dies (a SIGKILLed server leaves no orphans solving).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def run_one(
    kind: str,
    request: str,
    workers: int | None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[str, str | dict[str, Any]]:
    """Solve one job: ("ok", result JSON) or ("error", problem document).

    ``workers`` is this process's share of the cores (CP-SAT threads); a problem may ask for fewer.
    ``on_progress`` receives each improvement of a plan solve (objective, bound, gap, elapsed_s).
    """
    from service.problems import from_solver_error
    from solver import SharingProblem, SolveConfig, frontier
    from solver.candidates import solve_with_alternatives

    try:
        problem = SharingProblem.model_validate_json(request)
        if workers is not None and problem.options.workers is not None:
            workers = min(workers, problem.options.workers)  # the server's share of the cores is a cap
        config = SolveConfig(workers=workers)
        if kind == "plan":
            report = None if on_progress is None else (lambda p: on_progress(p.model_dump()))
            result = solve_with_alternatives(problem, config, progress=report)
        else:
            result = frontier(problem, config)
        return "ok", result.model_dump_json(exclude_none=True)
    except Exception as exc:  # every failure goes back as a problem document
        return "error", from_solver_error(exc)


def main(conn: Connection, parent: int) -> None:
    """Serve solve requests on ``conn`` until it closes."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    import solver  # noqa: F401  (import once, before the first job, so it does not count in its time)

    conn.send(("ready", ""))
    while True:
        try:
            kind, request, workers = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(run_one(kind, request, workers, on_progress=lambda p: conn.send(("progress", p))))
        except (BrokenPipeError, OSError):
            return
