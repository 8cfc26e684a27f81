"""One wall-clock deadline per request, handed down to every stage that can take long.

`time_limit_s` bounds a whole request (the plan, its alternatives, a frontier), so the stages
share one end instant instead of each starting its own clock. A deadline also carries its
nominal length in seconds: decisions such as whether the exact DP fits are taken from that
number, never from the clock, and the solve's work schedule is fixed (planning.py), so equal
inputs give equal plans unless the clock actually cuts the search (then plans say
``time_limit_hit``), and a longer limit only extends the search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    """An end instant on ``time.perf_counter``'s clock and the nominal seconds it stands for."""

    end: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now."""
        return cls(time.perf_counter() + seconds, seconds)

    @classmethod
    def never(cls) -> Deadline:
        """No wall-clock limit (work is still sized as for an hour)."""
        return cls(math.inf, 3600.0)

    def left(self) -> float:
        """Seconds until the end, never negative."""
        return max(0.0, self.end - time.perf_counter())

    def expired(self) -> bool:
        return time.perf_counter() >= self.end

    def cap(self, seconds: float) -> float:
        """``seconds``, or less when the deadline is nearer."""
        return min(seconds, self.left())

    def share(self, fraction: float) -> Deadline:
        """A nearer deadline for a first stage: ``fraction`` of the nominal seconds from now,
        and never past this one (later stages keep the rest)."""
        seconds = fraction * self.seconds
        return Deadline(min(self.end, time.perf_counter() + seconds), seconds)

    def split(self, fraction: float) -> Deadline:
        """A deadline ``fraction`` of the time left from now: for a stage whose later part needs
        the rest (when the clock decides, results depend on machine speed anyway)."""
        if math.isinf(self.end):
            return Deadline(math.inf, fraction * self.seconds)
        left = self.left()
        return Deadline(time.perf_counter() + fraction * left, fraction * left)
