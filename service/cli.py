"""``geoshare serve`` and ``geoshare worker``.

The solver's console script imports this module to register the subcommands, so nothing heavy
(FastAPI, uvicorn, torch) is imported until a handler runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def db_url(value: str) -> str:
    """A SQLAlchemy URL as given, or a SQLite URL for a file path."""
    if "://" in value:
        return value
    return "sqlite:///" + str(Path(value).expanduser().resolve())


def add_commands(subparsers: Any) -> None:
    """Adds ``serve`` and ``worker`` to the ``geoshare`` subparsers."""
    s = subparsers.add_parser("serve", help="run the HTTP API (plans, frontiers, analysis jobs)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--db", default=None, help="SQLite file or SQLAlchemy URL (default: GEOSHARE_DB_URL "
                                              "or sqlite:///geoshare.db)")
    s.add_argument("--concurrency", type=int, default=None, help="solves at once (default: GEOSHARE_CONCURRENCY)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=_serve)

    w = subparsers.add_parser("worker", help="GPU worker: claim analysis jobs from the API and run them")
    w.add_argument("--api", default=None, help="API base URL (default: GEOSHARE_API)")
    w.add_argument("--worker-id", default=None, help="name in leases and logs (default: host:pid)")
    w.add_argument("--poll", type=float, default=None, help="seconds between claims when idle")
    w.add_argument("--lease", type=float, default=None, help="lease seconds asked for each job")
    w.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    w.add_argument("--device", default="auto", help="torch device for the analysis (auto, cpu, cuda:N)")
    w.set_defaults(func=_worker)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides: dict[str, Any] = {}
    if args.db is not None:
        overrides["db_url"] = db_url(args.db)
    if args.concurrency is not None:
        overrides["concurrency"] = args.concurrency
    settings = Settings(**overrides)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                limit_concurrency=None, timeout_graceful_shutdown=5)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.access import AccessRules
    from service.analysis_loop import run_worker
    from service.settings import WorkerSettings

    settings = WorkerSettings()  # read once: the flags' defaults and the access rules both come from it
    api = args.api or (str(settings.api) if settings.api else None)
    if not api:
        print("geoshare worker: error: no API URL; pass --api http://host:8000 or set GEOSHARE_API",
              file=sys.stderr)
        return 2
    key = settings.api_key.get_secret_value() if settings.api_key else None
    done = run_worker(api, api_key=key, worker_id=args.worker_id or settings.worker_id,
                      poll_s=args.poll or settings.poll_s, lease_s=args.lease or settings.lease_s,
                      max_jobs=args.max_jobs, device=args.device,
                      access=AccessRules.of(settings, side="this worker"))
    print(f"geoshare worker: {done} job(s) done", file=sys.stderr)
    return 0
