"""Data parallel analysis over torch.distributed: which calibration batches a process runs, the sums
it adds up with the others, and failures that reach every rank.

The statistics are sums over samples, so data parallelism is a reduction at the end of each
accumulation (all_reduce SUM), not another algorithm. A process runs whole batches of the
one-process batching (batch b on rank b mod world_size), so every per-batch figure (padding, the
output factor's per-batch weights and its random draws) is the one-process figure and the sums
agree with one process up to rounding.

Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set) the first analysis joins the
group itself: gloo on CPU, NCCL on CUDA, with a timeout (``GEOSHARE_DIST_TIMEOUT`` seconds). A
group the caller initialized is used as it is. With neither, ``join`` returns None and nothing
here runs. A group started here is destroyed at exit (``leave``), and nothing else may hold it
(``_import_dynamo_first``): gloo's threads outliving the interpreter abort the process (SIGABRT)
after its work is done.

Failures: local work runs inside ``step``; at its end every rank says whether it failed, over a
gloo group (the default one, or one made beside NCCL), so an error on one rank ends the job on
every rank with that rank's message, and a rank that died or hangs ends it at the timeout.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hessian_worker.curvature.kfac import FactorStats
from hessian_worker.errors import WorkerError

log = logging.getLogger("geoshare.distributed")
TIMEOUT_ENV = "GEOSHARE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHARDING = "batch b on rank b % world_size"


class DistributedError(WorkerError, RuntimeError):
    """Another rank failed, or the ranks stopped answering within the timeout."""


class GroupLost(DistributedError):
    """The ranks stopped answering within the timeout (one died or is stuck): the group cannot run
    another collective, so a long-running process (the worker) stops. ``retry``: the job itself
    may be sound, another worker can run it."""

    retry = True


@dataclass(frozen=True)
class Group:
    """The processes of one job.

    Attributes:
        rank, world_size: this process and how many there are.
        device: where sums are reduced (the local CUDA device under NCCL, else the CPU).
        control: the gloo group failure flags and small objects go through (None: the default group).
        timeout_s: how long a rank waits for the others.
    """

    rank: int
    world_size: int
    device: torch.device
    control: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def batches(self, count: int) -> list[int]:
        """The batches this rank runs out of ``count``: b with b % world_size == rank, so the
        gradient batches (the first ones) and the rest are spread evenly."""
        return shard(count, self.rank, self.world_size)


def shard(count: int, rank: int, world_size: int) -> list[int]:
    """Batch indices of ``rank`` out of ``count`` batches (strided)."""
    return list(range(rank, count, world_size))


def row_share(count: int, rank: int, world_size: int) -> slice:
    """The rows of a batch of ``count`` samples this rank holds when every batch is split (block-wise
    healing: each optimizer step is one batch, so its samples, not whole batches, are dealt out):
    ``world_size`` contiguous parts, the first ``count % world_size`` one row longer; empty when a
    batch has fewer rows than ranks."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


ROW_SHARDING = "rows of every batch in world_size contiguous parts"


def deal(weights: Sequence[float], world_size: int) -> list[int]:
    """The rank of each item (a family to price, of estimated cost ``weights[i]``): the heaviest
    first, each to the least loaded rank so far (ties to the lower rank and the earlier item), so
    every rank works out the same split alone."""
    load = [0.0] * world_size
    owner = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += weights[i]
    return owner


def timeout() -> timedelta:
    """The collective timeout from ``GEOSHARE_DIST_TIMEOUT`` (seconds; default 1800).

    Raises:
        DistributedError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set e.g. "
                               f"{TIMEOUT_ENV}=600 or unset it (default {DEFAULT_TIMEOUT_S:.0f})")
    return timedelta(seconds=seconds)


def launched() -> bool:
    """True in a process torchrun (or another launcher setting its variables) started."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def backend_for(device: torch.device | str) -> str:
    """The collective backend of a job on ``device``: NCCL between GPUs, gloo on CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


_JOINED: list[tuple[Any, Group]] = []  # (the default group, its Group): the gloo side group is made once


def join(device: torch.device | str) -> Group | None:
    """The job this process is part of: an initialized default group, or one started here from
    torchrun's variables (NCCL when ``device`` is CUDA, else gloo); None in a lone process.

    Raises:
        DistributedError: the group cannot be started (bad timeout, a rank missing at the rendezvous).
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched():
            return None
        device = torch.device(device)
        backend = backend_for(device)
        if backend == "nccl":  # "cuda" without an index is then this rank's device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        limit = timeout()
        _import_dynamo_first()
        try:
            dist.init_process_group(backend, timeout=limit)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {os.environ['RANK']}: cannot join the {backend} group at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                                   f"{limit.total_seconds():.0f} s ({exc})") from exc
        atexit.register(leave)
    world = dist.group.WORLD
    if _JOINED and _JOINED[0][0] is world:
        return _JOINED[0][1]
    backend = str(dist.get_backend())
    limit = timeout()
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=limit)
    on_cuda = "nccl" in backend and torch.cuda.is_available()
    group = Group(dist.get_rank(), dist.get_world_size(),
                  torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu"),
                  control, limit.total_seconds())
    _JOINED[:] = [(world, group)]
    log.info("rank %d of %d (%s)", group.rank, group.world_size, backend)
    return group


def _import_dynamo_first() -> None:
    """Imports torch._dynamo before the group exists. Its import (which the analyses' first
    torch.func pass through an nn.Linear makes) keeps references to a default group already up
    (ten, measured on torch 2.13), so ``destroy_process_group`` could not free the group: gloo's
    threads lived on into interpreter teardown and aborted a rank now and then after its work was
    done (the worker group's test, 1 run in 28)."""
    import torch._dynamo  # noqa: F401


def leave() -> None:
    """Destroys the group ``join`` started, while the interpreter is whole: a gloo group left to
    interpreter shutdown can abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489) after its work is done. Local (no collective), so a rank whose peers
    died leaves too. A no-op when no group is up."""
    _JOINED.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Step:
    """One step of local work: ``share`` is what this rank tells the others at its end (small and
    picklable); ``shared`` is every rank's, by rank, once the step is over."""

    name: str
    share: Any = None
    shared: list[Any] = field(default_factory=list)


@contextmanager
def step(group: Group | None, name: str) -> Iterator[Step]:
    """Runs local work (no collectives inside), then every rank learns whether any failed.

    The rank that failed raises its own error; the others raise DistributedError naming it and its
    message, so the job ends on every rank instead of leaving them waiting in the next collective.

    Raises:
        DistributedError: another rank failed, or the ranks did not all answer within the timeout.
    """
    current = Step(name)
    if group is None:
        yield current
        current.shared = [current.share]
        return
    error: Exception | None = None
    try:
        yield current
    except Exception as exc:  # told to the others below, then raised here
        error = exc
    mine = (None if error is None else f"{type(error).__name__}: {error}", None if error else current.share)
    answers: list[Any] = [None] * group.world_size
    _collective(group, name, lambda: dist.all_gather_object(answers, mine, group=group.control))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(answers) if message is not None]
    if failed:
        rank, message = failed[0]
        others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise DistributedError(f"rank {rank}{others} failed during {name}: {message}; the job stops on every rank "
                               f"(this is rank {group.rank})")
    current.shared = [share for _, share in answers]


def _collective(group: Group, name: str, run: Any) -> None:
    """Runs a collective; a peer that died or hangs becomes a DistributedError that says so."""
    try:
        run()
    except RuntimeError as exc:
        raise GroupLost(f"rank {group.rank}: the other ranks did not answer after {name} within "
                               f"{group.timeout_s:.0f} s ({TIMEOUT_ENV}): one died or is stuck, see its log "
                               f"({type(exc).__name__}: {exc})") from exc


def all_reduce_sums(group: Group | None, tensors: Sequence[Tensor], name: str = "the statistics") -> None:
    """Sums each tensor over the ranks, in place (one collective per dtype: the tensors flattened
    into one buffer on the group's device)."""
    if group is None or group.world_size == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for parts in by_dtype.values():
        flat = torch.cat([t.reshape(-1).to(group.device) for t in parts])
        _collective(group, name, lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        offset = 0
        for t in parts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_stats(group: Group | None, stats: Mapping[str, FactorStats]) -> None:
    """Adds up every layer's factor sums over the ranks, in place: ``a``, ``a_trace`` and ``b``
    (one collective per layer, so the buffer is one layer's sums), then every token count at once
    (int64, exact)."""
    if group is None or group.world_size == 1:
        return
    for name, s in stats.items():
        all_reduce_sums(group, [s.a, s.a_trace] + ([] if s.b is None else [s.b]), f"the sums of {name}")
    counts = torch.tensor([s.tokens for s in stats.values()], dtype=torch.int64)
    all_reduce_sums(group, [counts], "the token counts")
    for s, n in zip(stats.values(), counts.tolist(), strict=True):
        s.tokens = int(n)


def gather(group: Group | None, value: Any, name: str = "the results") -> list[Any]:
    """Every rank's ``value`` (small and picklable), by rank, on every rank."""
    if group is None or group.world_size == 1:
        return [value]
    out: list[Any] = [None] * group.world_size
    _collective(group, name, lambda: dist.all_gather_object(out, value, group=group.control))
    return out


def sum_over_ranks(group: Group | None, values: Sequence[float], name: str = "the losses") -> list[float]:
    """Each of ``values`` (this rank's partial sums) added up over the ranks, in rank order on every
    rank, so every rank holds the same floats and takes the same decisions from them."""
    if group is None or group.world_size == 1:
        return [float(v) for v in values]
    parts = gather(group, [float(v) for v in values], name)
    return [sum(p[i] for p in parts) for i in range(len(values))]


def broadcast_tensors(group: Group | None, tensors: Sequence[Tensor], name: str = "the values", src: int = 0) -> None:
    """Rank ``src``'s tensors on every rank, in place (over the group's device)."""
    if group is None or group.world_size == 1:
        return
    for t in tensors:
        moved = t.to(group.device)
        _collective(group, name, lambda moved=moved: dist.broadcast(moved, src=src))
        if moved is not t:
            t.copy_(moved)


def broadcast(group: Group | None, value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (a small picklable object)."""
    if group is None or group.world_size == 1:
        return value
    box = [value if group.rank == src else None]
    _collective(group, "the result", lambda: dist.broadcast_object_list(box, src=src, group=group.control))
    return box[0]


class SummedForm:
    """A quadratic form whose batches are split over the ranks: each rank's ``local`` form is its
    batches' share of the sum over samples (``Objective(total=...)``), and ``quad`` adds them up,
    so every rank gets the whole data's values. Every rank calls ``quad`` with the same directions
    in the same order (the pair loops are deterministic)."""

    def __init__(self, local: Any, group: Group) -> None:
        self.local = local
        self.group = group

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        with step(self.group, "the quadratic forms"):
            value = self.local.quad(deltas).detach().clone()
        all_reduce_sums(self.group, [value], "the quadratic forms")
        return value


def in_job() -> bool:
    """Whether this process is one of several: torchrun started it, or a process group is up."""
    return launched() or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


SPLIT = ("the streamed analysis and compress of a LLaMA/Mistral/Qwen2 checkpoint (backend kfac or layerwise) and "
         "the in-memory analysis with scheme tie and backend exact or layerwise")


def refuse_in_job(what: str) -> None:
    """Stops a stage that does not split across processes yet before every rank runs all of it.

    Raises:
        DistributedError: under torchrun or an initialized group of several processes.
    """
    if in_job():
        raise DistributedError(f"{what} runs in one process for now; under torchrun only {SPLIT} are split across "
                               "processes: run this without torchrun")


def is_writer(group: Group | None = None) -> bool:
    """Whether this process writes the job's outputs: rank 0, or a lone process."""
    if group is not None:
        return group.rank == 0
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
