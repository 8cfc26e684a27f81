"""/v1/frontiers: the whole compression-vs-cost frontier of a problem, as a job like a plan."""

from __future__ import annotations

from service.models import FrontierJob
from service.routes.solves import solve_router
from service.states import JobKind

router = solve_router(
    JobKind.frontier, FrontierJob,
    create="Queue a frontier of the SharingProblem in the body; answer 200 with it if it finishes\n"
           "within `wait` seconds, else 202.",
    get="The job's state, and its frontier or problem document when finished.",
    cancel="Cancel a queued or running frontier job.",
)
