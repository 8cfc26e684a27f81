"""Service latency and throughput over loopback: a 36-layer problem answered synchronously.

Starts ``geoshare serve`` on 127.0.0.1 with a temporary SQLite file, then measures
  * the solve alone, in process (the floor the service adds to),
  * one client, requests one after another (p50/p99 latency and its overhead over the solve time
    the plan reports),
  * N concurrent clients (plans/s, p50/p99 latency).
Writes bench/results/service_bench.json with the command that made it.

    python bench/service_bench.py --clients 1,2,4,8,16 --requests 120 --server-concurrency 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from solver import SharingProblem, solve  # noqa: E402


def problem_36(seed: int = 0) -> SharingProblem:
    """MiniLM-shaped: 6 families (q, k, v, o, ffn in, ffn out) x 6 layers, random pair costs."""
    rng = np.random.default_rng(seed)
    fams = {"q": 147456, "k": 147456, "v": 147456, "o": 147456, "ffn_in": 589824, "ffn_out": 589824}
    layers = [{"name": f"layer{i}.{f}.weight", "family": f, "params": p, "index": i}
              for f, p in fams.items() for i in range(6)]
    n = len(layers)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for a in range(n):
        matrix[a][a] = 0.0
        for b in range(a + 1, n):
            if layers[a]["family"] == layers[b]["family"]:
                matrix[a][b] = matrix[b][a] = float(rng.gamma(2.0, 1e-3))
    return SharingProblem.model_validate({
        "layers": layers, "costs": {"kind": "pairwise", "matrix": matrix},
        "constraints": {"max_params_ratio": 0.5}, "options": {"time_limit_s": 10, "seed": 0, "workers": 1},
    })


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _start(db: Path, concurrency: int) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "GEOSHARE_CONCURRENCY": str(concurrency), "GEOSHARE_SOLVER_WORKERS": "1",
           "GEOSHARE_MAX_QUEUE": "10000", "GEOSHARE_POLL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "solver.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--db", str(db), "--log-level", "warning"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _one(client: httpx.Client, body: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = client.post("/v1/plans", params={"wait": 60}, content=body, headers={"Content-Type": "application/json"})
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return latency, float(r.json()["plan"]["solver"]["time_s"])


def _run_clients(url: str, body: str, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    solve_times: list[float] = []
    lock = threading.Lock()
    per = [requests // clients + (1 if k < requests % clients else 0) for k in range(clients)]

    def worker(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(per[k]):
                lat, st = _one(c, body)
                with lock:
                    latencies.append(lat)
                    solve_times.append(st)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients, "requests": len(latencies), "wall_s": round(wall, 3),
        "plans_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {"p50": round(_pct(latencies, 50) * 1e3, 2), "p99": round(_pct(latencies, 99) * 1e3, 2),
                       "mean": round(statistics.fmean(latencies) * 1e3, 2)},
        "solve_ms_p50": round(_pct(solve_times, 50) * 1e3, 2),
        "overhead_ms_p50": round((_pct(latencies, 50) - _pct(solve_times, 50)) * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,2,4,8,16", help="concurrent client counts")
    ap.add_argument("--requests", type=int, default=120, help="requests per client count")
    ap.add_argument("--sequential", type=int, default=100, help="one-client requests for p50/p99")
    ap.add_argument("--server-concurrency", type=int, default=2, help="GEOSHARE_CONCURRENCY")
    ap.add_argument("--out", default=str(ROOT / "bench/results/service_bench.json"))
    args = ap.parse_args(argv)

    problem = problem_36()
    body = problem.model_dump_json()
    direct = []
    for _ in range(20):
        t0 = time.perf_counter()
        plan = solve(problem)
        direct.append(time.perf_counter() - t0)
    print(f"direct solve: p50 {_pct(direct, 50) * 1e3:.1f} ms ({plan.status.value}, gap {plan.gap})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(Path(tmp) / "bench.db", args.server_concurrency)
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                for _ in range(5):  # warm-up: processes, connections, SQLite pages
                    _one(c, body)
            sequential = _run_clients(url, body, 1, args.sequential)
            print(f"sequential: {sequential}", flush=True)
            levels = []
            for n in (int(x) for x in args.clients.split(",")):
                res = _run_clients(url, body, n, args.requests)
                print(f"{n:>3} clients: {res}", flush=True)
                levels.append(res)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    result = {
        "command": "python bench/service_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "note": "2 cores shared with other work; numbers are indicative"},
        "problem": {"layers": len(problem.layers), "families": 6, "ratio": 0.5, "status": plan.status.value},
        "server": {"concurrency": args.server_concurrency, "solver_workers": 1, "db": "sqlite (temp file)"},
        "direct_solve_ms": {"p50": round(_pct(direct, 50) * 1e3, 2), "p99": round(_pct(direct, 99) * 1e3, 2)},
        "sequential": sequential,
        "concurrent": levels,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
