"""API replicas on one Postgres: plans/s and latency with 1 and 2 ``geoshare serve`` processes.

Starts a throwaway Postgres cluster (bench/pg_cluster.py), then for each replica count a fresh
database and that many servers on it (each with ``--server-concurrency`` solve processes), and N
concurrent clients spread over the replicas (client k talks to replica k mod count) posting the
36-layer problem of service_bench.py with ``wait`` (answered in the request). Reports plans/s,
p50/p99 latency and CPU ms per plan (servers, their solve processes, the client) for each count;
the 1-replica row is the baseline measured in the same run. On a 2-core machine the replicas share
the cores, so a second replica adds queue capacity and survival, not speed: the CPU per plan is
the figure that shows what a replica costs.
Writes bench/results/replica_bench.{json,md} with the command that made them.

    python bench/replica_bench.py --replicas 1,2 --clients 4,8 --requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pg_cluster import create_database, throwaway_cluster  # noqa: E402
from bench.service_bench import _Client, _loadavg, _run_clients, _start, problem_36  # noqa: E402


def run_replicas(url: str, replicas: int, concurrency: int, body: bytes, clients: list[int],
                 requests: int) -> list[dict]:
    """Every client level against ``replicas`` servers on the database at ``url``."""
    servers = [_start(url, concurrency) for _ in range(replicas)]
    try:
        urls, pids = [u for _, u in servers], [p.pid for p, _ in servers]
        for u in urls:  # warm-up: processes, connections, the pool, caches
            warm = _Client(u)
            for _ in range(10):
                warm.plan(body)
            warm.close()
        levels = []
        for n in clients:
            res = _run_clients(urls, body, n, requests, pids)
            res["replicas"] = replicas
            print(f"{replicas} replica(s), {n:>2} clients: {res}", flush=True)
            levels.append(res)
        return levels
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers:
            proc.wait(timeout=30)


def markdown(result: dict) -> str:
    base = {r["clients"]: r["plans_per_s"] for r in result["levels"] if r["replicas"] == 1}
    lines = ["# API replicas on one Postgres", "", f"Command: `{result['command']}`  ",
             f"Date: {result['date']}; machine: {result['machine']['cpus']} cores, load average before "
             f"{result['machine']['load_average_before']}, after {result['machine']['load_average_after']}", "",
             f"Problem: {result['problem']['layers']} layers, answered in the request; each replica runs "
             f"{result['server']['concurrency']} solve process(es) with 1 CP-SAT thread.", "",
             "| replicas | clients | plans/s | vs 1 replica | p50 ms | p99 ms | CPU ms/plan: servers | solve processes "
             "| client | total |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["levels"]:
        cpu = r["cpu_ms_per_plan"]
        ratio = r["plans_per_s"] / base[r["clients"]] if base.get(r["clients"]) else float("nan")
        lines.append(f"| {r['replicas']} | {r['clients']} | {r['plans_per_s']} | {ratio:.2f}x | "
                     f"{r['latency_ms']['p50']} | {r['latency_ms']['p99']} | {cpu['server']} | "
                     f"{cpu['solve_processes']} | {cpu['client']} | {cpu['total']} |")
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2", help="replica counts, the first is the baseline")
    ap.add_argument("--clients", default="4,8", help="concurrent client counts")
    ap.add_argument("--requests", type=int, default=200, help="requests per client count")
    ap.add_argument("--server-concurrency", type=int, default=1, help="GEOSHARE_CONCURRENCY of each replica")
    ap.add_argument("--note", default="", help="written under the table")
    ap.add_argument("--out", default=str(ROOT / "bench/results/replica_bench.json"))
    args = ap.parse_args(argv)

    body = problem_36().model_dump_json().encode()
    clients = [int(x) for x in args.clients.split(",")]
    load_before = _loadavg()
    levels: list[dict] = []
    with throwaway_cluster() as cluster:
        for i, replicas in enumerate(int(x) for x in args.replicas.split(",")):
            url = create_database(cluster, f"bench{i}")
            levels += run_replicas(url, replicas, args.server_concurrency, body, clients, args.requests)
    result = {
        "command": "python bench/replica_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": _loadavg()},
        "problem": {"layers": 36, "families": 6, "ratio": 0.5},
        "server": {"concurrency": args.server_concurrency, "solver_workers": 1, "db": "postgres (throwaway cluster)"},
        "levels": levels,
        "note": args.note,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"written to {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
