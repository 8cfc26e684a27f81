"""A group ``join`` started is destroyed before the interpreter shuts down, threads and all (real
torchrun processes, gloo on CPU): left to interpreter teardown, gloo's threads can abort a rank
with SIGABRT after its work is done, which failed a worker group's exit in CI. The group must be
freed, not only forgotten: torch.func's first pass through nn.Linear imports torch._dynamo, which
kept references to a group already up, so its threads lived on after ``destroy_process_group``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# atexit runs its handlers last registered first: this one, registered before join(), runs after
# join's leave() and reports what teardown will find: whether the group is up and how many of
# gloo's threads (named gloo_tcp_loop and pt_gloo_runloop on Linux) still run.
CHILD = r"""
import atexit, os, sys
import torch
import torch.distributed as dist
from hessian_worker.distributed import join, leave

def gloo_threads():
    tasks = "/proc/self/task"
    return sum(open(f"{tasks}/{t}/comm").read().startswith(("gloo", "pt_gloo")) for t in os.listdir(tasks))

atexit.register(lambda: os.write(2, f"at exit, group up: {dist.is_initialized()}, "
                                    f"gloo threads: {gloo_threads()}\n".encode()))  # one write
group = join("cpu")
assert gloo_threads() > 0  # the check below sees the threads it is about
seen = [None] * group.world_size
dist.all_gather_object(seen, group.rank)
assert seen == list(range(group.world_size)), seen
torch.func.jvp(torch.nn.Linear(2, 2), (torch.ones(2),), (torch.ones(2),))  # as the analyses do
assert "torch._dynamo" in sys.modules  # the import that kept the group (now made before join)
if "LEAVE" in sys.argv:  # leave early: the group is gone, and leaving again (at exit) is a no-op
    leave()
    assert not dist.is_initialized()
    leave()
os.write(2, f"rank {group.rank} ok\n".encode())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_python(*args: str) -> subprocess.CompletedProcess[str]:
    """torchrun runs a script or a module, not ``-c``: the child goes through ``python -c``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), "--no-python", sys.executable, "-c",
                           CHILD, *args], cwd=ROOT, env=env, timeout=120, capture_output=True, text=True)


def test_a_group_join_started_is_destroyed_before_interpreter_teardown():
    run = _torchrun_python()
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("at exit, group up: False, gloo threads: 0") == 2, run.stderr[-3000:]
    assert "rank 0 ok" in run.stderr and "rank 1 ok" in run.stderr


def test_leave_destroys_the_group_once_and_then_does_nothing():
    run = _torchrun_python("LEAVE")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("at exit, group up: False, gloo threads: 0") == 2, run.stderr[-3000:]
