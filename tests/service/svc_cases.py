"""Small problems and a real uvicorn server in a subprocess, shared by the service tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from solver import SharingProblem

ROOT = Path(__file__).resolve().parents[2]


def small_problem(families: tuple[int, ...] = (4, 4, 4), seed: int = 0, ratio: float | None = 0.5,
                  time_limit_s: float = 5.0, null_prob: float = 0.0, params: int = 64) -> SharingProblem:
    """Families of the given sizes, random symmetric non-negative costs, null across families."""
    rng = np.random.default_rng(seed)
    layers = [{"name": f"block{i}.f{f}.weight", "family": f"f{f}", "params": params * (f + 1), "index": i}
              for f, n in enumerate(families) for i in range(n)]
    n = len(layers)
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    for a in range(n):
        matrix[a][a] = 0.0
        for b in range(a + 1, n):
            if layers[a]["family"] == layers[b]["family"]:
                v = None if rng.random() < null_prob else float(rng.random() ** 2)
                matrix[a][b] = matrix[b][a] = v
    return SharingProblem.model_validate({
        "layers": layers,
        "costs": {"kind": "pairwise", "matrix": matrix},
        "constraints": {"max_params_ratio": ratio},
        "options": {"time_limit_s": time_limit_s, "seed": 0, "workers": 1},
    })


def long_problem(time_limit_s: float = 20.0) -> SharingProblem:
    """One 64-layer family (the test servers' layer cap) at a fifth of its parameters: the solver
    improves along the way and takes about 14 s to prove it (a 48-layer family at 0.3 is proven in
    about a second since the column-generation bound)."""
    return small_problem((64,), seed=1, ratio=0.2, time_limit_s=time_limit_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A ``geoshare serve`` subprocess on 127.0.0.1."""

    db: Path  # the SQLite file (or, with db_url, where the log goes)
    env: dict[str, str] = field(default_factory=dict)
    db_url: str | None = None  # a SQLAlchemy URL instead of the SQLite file (e.g. Postgres)
    port: int = 0
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        self.port = free_port()
        env = {**os.environ, "GEOSHARE_POLL_S": "0.2", **self.env}
        self.log = self.db.with_suffix(f".{self.port}.log")
        cmd = [sys.executable, "-m", "geoshare", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--db", self.db_url or str(self.db), "--log-level", "warning"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server alone (its solve processes must notice and exit by themselves)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def post_problem(client: httpx.Client, path: str, problem: SharingProblem | dict[str, Any], wait: float = 0.0,
                 **headers: str) -> httpx.Response:
    body = problem.model_dump_json() if isinstance(problem, SharingProblem) else problem
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    return client.post(path, params={"wait": wait}, headers={"Content-Type": "application/json", **headers},
                       **kwargs)
