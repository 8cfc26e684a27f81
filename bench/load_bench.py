"""Load test: good and bad requests mixed from concurrent clients against a real ``geoshare serve``.

Starts the server on 127.0.0.1 (temporary SQLite file, an API key, the default caps: 512 layers,
8 MiB bodies), then
  * idle: /healthz latency with nothing else running (the baseline of this run),
  * load: ``--clients`` async clients send a weighted mix for ``--seconds``: small plans and
    frontiers answered in the request, polls of finished jobs, and bad requests of every kind
    (not JSON, wrong content type, no key, a 7.9 MB body of 1,400 layers with and without the key,
    a declared 9 MB body, invalid problems, wrong methods, unknown ids), while /healthz is probed
    every ``--probe-ms`` from a separate process (its own interpreter: the clients' event loop
    and GIL do not inflate what it measures).
Reports every answer's status by kind, the count of 5xx and transport errors (both must be 0),
and healthz p50/p99 under load against idle (target: p99 under 50 ms).
Writes bench/results/load_bench.{json,md} with the command that made them.

    python bench/load_bench.py --clients 16 --seconds 30

``--root`` serves another checkout (e.g. a worktree of an older commit) to compare before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "load-bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}


# --- bodies ---------------------------------------------------------------------------------


def problem_body(families: tuple[int, ...], seed: int, time_limit_s: float = 2.0) -> bytes:
    """Families of the given sizes, random symmetric costs within a family, null across."""
    rng = random.Random(seed)
    layers = [{"name": f"b{i}.f{f}.weight", "family": f"f{f}", "params": 64 * (f + 1), "index": i}
              for f, n in enumerate(families) for i in range(n)]
    n = len(layers)
    m: list[list[float | None]] = [[None] * n for _ in range(n)]
    for a in range(n):
        m[a][a] = 0.0
        for b in range(a + 1, n):
            if layers[a]["family"] == layers[b]["family"]:
                m[a][b] = m[b][a] = round(rng.random() ** 2, 6)
    return json.dumps({"layers": layers, "costs": {"kind": "pairwise", "matrix": m},
                       "constraints": {"max_params_ratio": 0.5},
                       "options": {"time_limit_s": time_limit_s, "seed": 0, "workers": 1}}).encode()


def big_body(n: int = 1400) -> bytes:
    """Well-formed, over the 512-layer cap, under the 8 MiB body cap (7.9 MB at 1,400)."""
    layers = ",".join(f'{{"name":"l{i}","family":"f","params":100,"index":{i}}}' for i in range(n))
    row = "[" + ",".join(["0.5"] * n) + "]"
    return (f'{{"layers":[{layers}],"costs":{{"kind":"pairwise","matrix":[' + ",".join([row] * n)
            + ']},"constraints":{"max_params_ratio":0.5}}').encode()


# --- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, db: Path, port: int, concurrency: int) -> subprocess.Popen:
    env = {**os.environ, "GEOSHARE_API_KEY": KEY, "GEOSHARE_CONCURRENCY": str(concurrency),
           "GEOSHARE_SOLVER_WORKERS": "1", "GEOSHARE_MAX_QUEUE": "10000"}
    cmd = [sys.executable, "-m", "geoshare", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--db", str(db), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- the healthz probe (its own process) ----------------------------------------------------


def _probe(port: int, interval_s: float, seconds: float, out: Any) -> None:
    lat: list[float] = []
    errors = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors += 1
            lat.append(time.perf_counter() - t)
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        time.sleep(max(0.0, interval_s - (time.perf_counter() - t)))
    out.send((lat, errors))


def probe(port: int, interval_s: float, seconds: float) -> tuple[mp.Process, Any]:
    parent, child = mp.get_context("spawn").Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(target=_probe, args=(port, interval_s, seconds, child), daemon=True)
    proc.start()
    return proc, parent


def summary(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    if not lat:
        return {"n": 0}

    def q(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 2)

    return {"n": len(lat), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": round(lat[-1] * 1000, 2)}


# --- the mix --------------------------------------------------------------------------------

Request = tuple[str, str, dict[str, Any]]  # method, path, httpx kwargs


def make_mix(big: bytes) -> list[tuple[str, int, Callable[[random.Random, list[str]], Request]]]:
    """(kind, weight, request factory); factories see the ids of jobs made so far."""
    small = [problem_body((4, 4, 4), seed) for seed in range(16)]
    invalid = problem_body((4, 4), 0).replace(b'"params": 64', b'"params": -64', 1)
    over = b" " * 16

    def plan(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": r.choice(small), "headers": {**JSON, **AUTH}, "params": {"wait": 20}}

    def frontier(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/frontiers", {"content": small[0], "headers": {**JSON, **AUTH}, "params": {"wait": 20}}

    def poll(r: random.Random, ids: list[str]) -> Request:
        return "GET", f"/v1/plans/{r.choice(ids) if ids else 'none'}", {"headers": AUTH}

    def not_json(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": b"{not json", "headers": {**JSON, **AUTH}}

    def nan(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": small[1].replace(b"0.0", b"NaN", 1), "headers": {**JSON, **AUTH}}

    def wrong_type(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": small[2], "headers": {"Content-Type": "text/plain", **AUTH}}

    def no_key(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": small[3], "headers": JSON}

    def no_key_big(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": big, "headers": JSON}

    def big_over_cap(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": big, "headers": {**JSON, **AUTH}}

    def declared_over(r: random.Random, ids: list[str]) -> Request:
        # httpx will not send a Content-Length it does not honour: a raw socket does (see _raw)
        return "RAW", "/v1/plans", {"declared": 9 * 1024 * 1024, "content": over}

    def invalid_problem(r: random.Random, ids: list[str]) -> Request:
        return "POST", "/v1/plans", {"content": invalid, "headers": {**JSON, **AUTH}}

    def wrong_method(r: random.Random, ids: list[str]) -> Request:
        return "PUT", "/v1/plans", {"headers": AUTH}

    def unknown_id(r: random.Random, ids: list[str]) -> Request:
        return "GET", f"/v1/plans/nope-{r.randrange(10**6)}", {"headers": AUTH}

    def bad_query(r: random.Random, ids: list[str]) -> Request:
        return "GET", "/v1/plans/x", {"headers": AUTH, "params": {"wait": "soon"}}

    return [("plan", 20, plan), ("frontier", 4, frontier), ("poll", 16, poll), ("not_json", 8, not_json),
            ("nan_literal", 4, nan), ("wrong_content_type", 6, wrong_type), ("no_key", 8, no_key),
            ("no_key_7.9MB", 2, no_key_big), ("over_layer_cap_7.9MB", 2, big_over_cap),
            ("declared_9MiB", 4, declared_over), ("invalid_problem", 8, invalid_problem),
            ("wrong_method", 6, wrong_method), ("unknown_id", 6, unknown_id), ("bad_query", 6, bad_query)]


async def _raw(url: str, path: str, declared: int, content: bytes) -> int:
    """POST that declares ``declared`` bytes and sends a few: the answer must come before the body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Length: {declared}\r\n\r\n").encode()
        writer.write(head + content)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 60)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def run_load(url: str, clients: int, seconds: float, seed: int,
                   mix: list[tuple[str, int, Callable]]) -> dict[str, Any]:
    kinds, weights, factories = zip(*mix, strict=True)
    statuses: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    ids: list[str] = []
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        r = random.Random(seed * 1000 + i)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            while time.monotonic() < end:
                k = r.choices(range(len(kinds)), weights=weights)[0]
                method, path, kwargs = factories[k](r, ids)
                t = time.perf_counter()
                try:
                    if method == "RAW":
                        statuses[kinds[k]][str(await _raw(url, path, **kwargs))] += 1
                        latencies[kinds[k]].append(time.perf_counter() - t)
                        continue
                    resp = await c.request(method, path, **kwargs)
                    status = str(resp.status_code)
                    if kinds[k] == "plan" and resp.status_code in (200, 202):
                        ids.append(resp.json()["id"])
                    if resp.status_code >= 400 and not resp.headers.get("content-type", "").startswith(
                            "application/problem+json"):
                        status += " (not problem+json)"
                except (httpx.HTTPError, OSError, ValueError, IndexError) as exc:
                    status = f"error: {type(exc).__name__}"
                latencies[kinds[k]].append(time.perf_counter() - t)
                statuses[kinds[k]][status] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    total = sum(sum(c.values()) for c in statuses.values())
    return {"wall_s": round(wall, 2), "requests": total, "requests_per_s": round(total / wall, 1),
            "by_kind": {k: {"n": sum(statuses[k].values()), "statuses": dict(sorted(statuses[k].items())),
                            "p50_ms": summary(latencies[k]).get("p50_ms"), "p99_ms": summary(latencies[k]).get("p99_ms")}
                        for k in kinds if statuses[k]}}


def markdown(res: dict[str, Any]) -> str:
    idle, load = res["healthz_idle"], res["healthz_load"]
    lines = [
        "# Load bench: good and bad requests mixed, healthz latency under load",
        "",
        f"`{res['command']}`  ",
        f"{res['date']}, {res['machine']['cpus']} CPUs ({res['machine']['platform']}), "
        f"{res['load']['clients']} clients for {res['load']['seconds']} s, server concurrency {res['server']['concurrency']}",
        "",
        "| /healthz | samples | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| idle (baseline, same run) | {idle['n']} | {idle['p50_ms']} | {idle['p90_ms']} | {idle['p99_ms']} | {idle['max_ms']} |",
        f"| under load | {load['n']} | {load['p50_ms']} | {load['p90_ms']} | {load['p99_ms']} | {load['max_ms']} |",
        "",
        f"p99 under load / idle: {res['ratios']['p99_load_over_idle']}x, p50: {res['ratios']['p50_load_over_idle']}x; "
        f"target p99 < {res['target']['healthz_p99_ms']} ms: **{'met' if res['target']['met'] else 'missed'}**  ",
        f"5xx: **{res['n_5xx']}**, transport errors: **{res['n_errors']}**, answers >= 400 that were not "
        f"problem+json: **{res['n_not_problem_json']}**; healthz probe errors: {res['healthz_probe_errors']}  ",
        f"{res['load']['requests']} requests in {res['load']['wall_s']} s ({res['load']['requests_per_s']}/s)",
        "",
        "| kind | n | statuses | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for kind, row in res["load"]["by_kind"].items():
        st = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        lines.append(f"| {kind} | {row['n']} | {st} | {row['p50_ms']} | {row['p99_ms']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--probe-ms", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=1, help="the server's solve processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=str(ROOT), help="checkout to serve (default: this one)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/load_bench"), help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)

    big = big_body()
    mix = make_mix(big)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(Path(args.root), Path(tmp) / "jobs.db", port, args.concurrency)
        url = f"http://127.0.0.1:{port}"
        try:
            proc, pipe = probe(port, args.probe_ms / 1000, args.idle_seconds)
            idle_lat, idle_err = pipe.recv()
            proc.join()
            proc, pipe = probe(port, args.probe_ms / 1000, args.seconds)
            load = asyncio.run(run_load(url, args.clients, args.seconds, args.seed, mix))
            load_lat, load_err = pipe.recv()
            proc.join()
        finally:
            stop_server(server)

    statuses = [(s, n) for row in load["by_kind"].values() for s, n in row["statuses"].items()]
    idle, under = summary(idle_lat), summary(load_lat)
    res: dict[str, Any] = {
        "command": "python bench/load_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server": {"concurrency": args.concurrency, "api_key": True, "caps": "defaults (512 layers, 8 MiB body)",
                   "root": os.path.relpath(args.root, ROOT) if args.root != str(ROOT) else "."},
        "healthz_idle": idle,
        "healthz_load": under,
        "healthz_probe_errors": idle_err + load_err,
        "ratios": {"p50_load_over_idle": round(under["p50_ms"] / idle["p50_ms"], 2),
                   "p99_load_over_idle": round(under["p99_ms"] / idle["p99_ms"], 2)},
        "target": {"healthz_p99_ms": 50, "met": under["p99_ms"] < 50},
        "n_5xx": sum(n for s, n in statuses if s[:1] == "5"),
        "n_errors": sum(n for s, n in statuses if s.startswith("error")),
        "n_not_problem_json": sum(n for s, n in statuses if "not problem+json" in s),
        "load": {"clients": args.clients, "seconds": args.seconds, **load},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{out}.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if res["n_5xx"] == 0 and res["n_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
