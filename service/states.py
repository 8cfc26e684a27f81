"""The job kinds and states, in one place: the store writes them, the API shows them.

Plain enums with no SQLAlchemy or pydantic, so the store, the routes, the runner, the GPU worker
and the client all read the same names.
"""

from __future__ import annotations

from enum import Enum


class JobKind(str, Enum):
    plan = "plan"  # one SharingPlan of a problem, solved by the server
    frontier = "frontier"  # the whole frontier of a problem, solved by the server
    analysis = "analysis"  # costs (and a compress) from a GPU worker, then a plan as a child job


class JobState(str, Enum):
    queued = "queued"
    running = "running"  # a solve process, or a GPU worker holding the lease, works on it
    solving = "solving"  # analyses only: costs are in, their plan is being solved
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


# the server's solve processes take these kinds from one queue; GPU workers take analyses
SOLVE_KINDS: tuple[str, ...] = (JobKind.plan.value, JobKind.frontier.value)
# a job in one of these states never changes again
TERMINAL: tuple[str, ...] = (JobState.succeeded.value, JobState.failed.value, JobState.cancelled.value)
# finished with an outcome: nothing left to cancel (a 409)
FINISHED: tuple[str, ...] = (JobState.succeeded.value, JobState.failed.value)
