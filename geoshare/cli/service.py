"""``geoshare serve`` (the HTTP API) and ``geoshare worker`` (the loop that runs analysis and
compress jobs on this machine). FastAPI, uvicorn and httpx are imported by the handlers only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from geoshare.cli.help import add_command

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def db_url(value: str) -> str:
    """A SQLAlchemy URL as given, or a SQLite URL for a file path."""
    if "://" in value:
        return value
    return "sqlite:///" + str(Path(value).expanduser().resolve())


def add_commands(subparsers: Any) -> None:
    """Adds ``serve`` and ``worker``."""
    s = add_command(
        subparsers, "serve", summary="run the HTTP API (plans, frontiers, analysis jobs)",
        description="Serves /v1/plans, /v1/frontiers and /v1/analyses (docs/contract.md) with a persistent job "
                    "store; settings not given here come from GEOSHARE_* environment variables.",
        examples=["geoshare serve --host 127.0.0.1 --port 8000 --db geoshare.db",
                  "geoshare serve --db postgresql+psycopg://user@host/db --concurrency 4"])
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    s.add_argument("--db", default=None, metavar="FILE|URL",
                   help="SQLite file or SQLAlchemy URL (default: GEOSHARE_DB_URL or sqlite:///geoshare.db)")
    s.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="solves at once (default: GEOSHARE_CONCURRENCY)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level (default info)")
    s.set_defaults(func=serve, extras=("service",))

    w = add_command(
        subparsers, "worker", summary="GPU worker: claim analysis jobs from the API and run them",
        description="Claims analysis and compress jobs from a geoshare serve API under a lease, runs them on "
                    "this machine (torch) and hands in the costs and reports.",
        examples=["geoshare worker --api http://127.0.0.1:8000",
                  "geoshare worker --api http://api:8000 --device cuda:0 --max-jobs 10",
                  "torchrun --nproc-per-node 8 -m geoshare worker --api http://api:8000  # one job on 8 GPUs"])
    w.add_argument("--api", default=None, metavar="URL", help="API base URL (default: GEOSHARE_API)")
    w.add_argument("--worker-id", default=None, metavar="NAME", help="name in leases and logs (default: host:pid)")
    w.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                   help="seconds between claims when idle (default: GEOSHARE_POLL_S)")
    w.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                   help="lease seconds asked for each job (default: GEOSHARE_LEASE_S)")
    w.add_argument("--max-jobs", type=int, default=None, metavar="N", help="exit after this many jobs")
    w.add_argument("--device", default="auto", help="torch device for the jobs (auto, cpu, cuda:N)")
    w.set_defaults(func=worker, extras=("service", "worker"))


def serve(args: argparse.Namespace) -> int:
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


def worker(args: argparse.Namespace) -> int:
    from service.access import AccessRules
    from service.analysis_loop import run_worker
    from service.settings import WorkerSettings

    settings = WorkerSettings()  # read once: the flags' defaults and the access rules both come from it
    api = args.api or (str(settings.api) if settings.api else None)
    if not api:
        raise ValueError("no API URL; pass --api http://host:8000 or set GEOSHARE_API")
    key = settings.api_key.get_secret_value() if settings.api_key else None
    common = {"api_key": key, "worker_id": args.worker_id or settings.worker_id, "poll_s": args.poll or settings.poll_s,
              "lease_s": args.lease or settings.lease_s, "max_jobs": args.max_jobs,
              "access": AccessRules.of(settings, side="this worker")}
    group = _group(args.device)
    if group is None:
        done = run_worker(api, device=args.device, **common)
        print(f"geoshare worker: {done} job(s) done", file=sys.stderr)
        return 0
    from service.group_worker import rank_device, run_group_worker

    done = run_group_worker(api, group=group, device=rank_device(args.device), **common)
    print(f"geoshare worker rank {group.rank} of {group.world_size}: {done} job(s) done", file=sys.stderr)
    return 0


def _group(device: str) -> Any:
    """The torch.distributed group when torchrun started this worker (None: a lone worker; torch
    is not imported for one)."""
    import os

    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    from hessian_worker.distributed import join
    from service.group_worker import rank_device

    group = join(rank_device(device))
    return group if group is not None and group.world_size > 1 else None
