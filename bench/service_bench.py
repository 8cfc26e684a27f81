"""Service latency and throughput over loopback: a 36-layer problem answered synchronously.

Starts ``geoshare serve`` on 127.0.0.1 with a temporary SQLite file, then measures
  * the solve alone, in process (the floor the service adds to),
  * one client, requests one after another (p50/p99 latency and its overhead over the solve time
    the plan reports),
  * N concurrent clients (plans/s, p50/p99 latency).
Each level also reports the CPU milliseconds spent per plan by the server process, its solve
processes and this client (from /proc): on 2 shared cores, plans/s is about 2000 / that total
times the share of the cores the run gets, so the CPU figures are the ones to compare between
runs. The client is kept cheap (stdlib http.client, one keep-alive connection per client thread,
the body serialized once), since it competes for the same cores.
Writes bench/results/service_bench.json with the command that made it.

    python bench/service_bench.py --clients 1,2,4,8,16 --requests 120 --server-concurrency 2
"""

from __future__ import annotations

import argparse
import http.client
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


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _start(db: Path | str, concurrency: int) -> tuple[subprocess.Popen, str]:
    """A ``geoshare serve`` on a free loopback port with this store (a SQLite file or a URL)."""
    port = _port()
    env = {**os.environ, "GEOSHARE_CONCURRENCY": str(concurrency), "GEOSHARE_SOLVER_WORKERS": "1",
           "GEOSHARE_MAX_QUEUE": "10000", "GEOSHARE_POLL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "geoshare", "serve", "--host", "127.0.0.1", "--port", str(port),
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


class _Client:
    """One keep-alive HTTP/1.1 connection (stdlib: a fraction of httpx's CPU per request)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def plan(self, body: bytes) -> tuple[float, float]:
        """POST one problem and wait for its plan: (latency, the solve time the plan reports)."""
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/plans?wait=60", body=body, headers=_HEADERS)
        r = self.conn.getresponse()
        data = r.read()
        latency = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
        return latency, float(json.loads(data)["plan"]["solver"]["time_s"])

    def close(self) -> None:
        self.conn.close()


_HEADERS = {"Content-Type": "application/json"}
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them (the runner's slots)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _cpu_snapshot(server: int) -> tuple[float, dict[int, float], float]:
    """(server CPU, CPU of each child process, this process's CPU) in seconds."""
    return _cpu_s(server), {c: _cpu_s(c) for c in _children(server)}, time.process_time()


def _run_clients(url: str | list[str], body: bytes, clients: int, requests: int, server_pid: int | list[int]) -> dict:
    """``clients`` threads share ``requests`` plans; with several servers (replicas) client k talks
    to server k mod their count, and the CPU figures add up over every server."""
    urls = [url] if isinstance(url, str) else url
    pids = [server_pid] if isinstance(server_pid, int) else server_pid
    latencies: list[float] = []
    solve_times: list[float] = []
    lock = threading.Lock()
    per = [requests // clients + (1 if k < requests % clients else 0) for k in range(clients)]
    conns = [_Client(urls[k % len(urls)]) for k in range(clients)]

    def worker(k: int) -> None:
        mine = [conns[k].plan(body) for _ in range(per[k])]
        with lock:
            latencies.extend(lat for lat, _ in mine)
            solve_times.extend(st for _, st in mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    before = [_cpu_snapshot(pid) for pid in pids]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = [_cpu_snapshot(pid) for pid in pids]
    for c in conns:
        c.close()
    n = len(latencies)
    cpu = {"server": sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / n * 1e3,
           "solve_processes": sum(v - b[1].get(c, 0.0) for a, b in zip(after, before, strict=True)
                                  for c, v in a[1].items()) / n * 1e3,
           "client": (after[0][2] - before[0][2]) / n * 1e3}
    cpu["total"] = sum(cpu.values())
    return {
        "clients": clients, "requests": n, "wall_s": round(wall, 3),
        "plans_per_s": round(n / wall, 2),
        "latency_ms": {"p50": round(_pct(latencies, 50) * 1e3, 2), "p99": round(_pct(latencies, 99) * 1e3, 2),
                       "mean": round(statistics.fmean(latencies) * 1e3, 2)},
        "solve_ms_p50": round(_pct(solve_times, 50) * 1e3, 2),
        "overhead_ms_p50": round((_pct(latencies, 50) - _pct(solve_times, 50)) * 1e3, 2),
        "cpu_ms_per_plan": {k: round(v, 2) for k, v in cpu.items()},
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
    body = problem.model_dump_json().encode()
    load_before = _loadavg()
    direct, direct_cpu = [], []
    for _ in range(50):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = solve(problem)
        direct.append(time.perf_counter() - t0)
        direct_cpu.append(time.process_time() - c0)
    print(f"direct solve: p50 {_pct(direct, 50) * 1e3:.1f} ms, CPU {statistics.fmean(direct_cpu) * 1e3:.2f} ms "
          f"({plan.status.value}, gap {plan.gap}); load average {load_before}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(Path(tmp) / "bench.db", args.server_concurrency)
        try:
            warm = _Client(url)
            for _ in range(20):  # warm-up: processes, connections, SQLite pages, caches
                warm.plan(body)
            warm.close()
            sequential = _run_clients(url, body, 1, args.sequential, proc.pid)
            print(f"sequential: {sequential}", flush=True)
            levels = []
            for n in (int(x) for x in args.clients.split(",")):
                res = _run_clients(url, body, n, args.requests, proc.pid)
                print(f"{n:>3} clients: {res}", flush=True)
                levels.append(res)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    result = {
        "command": "python bench/service_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": _loadavg(),
                    "note": "2 cores shared with other work (see the load averages): plans/s and latencies are "
                            "indicative, cpu_ms_per_plan is what changes compare"},
        "problem": {"layers": len(problem.layers), "families": 6, "ratio": 0.5, "status": plan.status.value},
        "server": {"concurrency": args.server_concurrency, "solver_workers": 1, "db": "sqlite (temp file)"},
        "direct_solve_ms": {"p50": round(_pct(direct, 50) * 1e3, 2), "p99": round(_pct(direct, 99) * 1e3, 2),
                            "cpu_mean": round(statistics.fmean(direct_cpu) * 1e3, 2)},
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
