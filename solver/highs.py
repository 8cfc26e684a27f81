"""HiGHS (highspy) made quiet and deterministic: one place that creates solver instances.

HiGHS prints a banner on stdout when the first instance of a process is made; `geoshare solve`
writes its plan to stdout, so that first instance is made with stdout pointed at devnull.
Every instance runs single-threaded with a fixed seed and no log.
"""

from __future__ import annotations

import os
import sys
import threading

import highspy

INF = highspy.kHighsInf
_lock = threading.Lock()
_banner_done = False


def _swallow_banner() -> None:
    global _banner_done
    with _lock:
        if _banner_done:
            return
        sys.stdout.flush()
        try:
            saved = os.dup(1)
        except OSError:  # no stdout to protect
            highspy.Highs()
        else:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            try:
                highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(null)
        _banner_done = True


def new_highs(time_limit_s: float | None = None, seed: int = 0) -> highspy.Highs:
    """A silent single-threaded HiGHS instance with an optional time limit."""
    _swallow_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("random_seed", int(seed % 2**31))
    # costs arrive normalized (largest entry in [0.5, 1)) but spread over many decades; HiGHS's
    # default tolerances (1e-7 absolute, MIP gap 1e-4 relative) let an LP stop short of its
    # optimum on classes that cost 1e-5, which made a "bound" above the optimum
    h.setOptionValue("dual_feasibility_tolerance", 1e-10)
    h.setOptionValue("primal_feasibility_tolerance", 1e-10)
    h.setOptionValue("mip_rel_gap", 1e-9)
    h.setOptionValue("mip_abs_gap", 0.0)
    if time_limit_s is not None:
        h.setOptionValue("time_limit", max(1e-3, float(time_limit_s)))
    return h
