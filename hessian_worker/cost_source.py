"""The problem's ``source``: the settings that made its costs, so a problem file names its cost model
and a later step can tell whether costs were made the way it would make them."""

from __future__ import annotations

from typing import Any

from hessian_worker.options import AnalyzeConfig

JOB_KEYS = ("world_size", "sharding", "rank_samples")  # a distributed job's record, kept beside the settings


def cost_source(config: AnalyzeConfig, task_loss: bool) -> dict[str, Any]:
    """The settings of ``config`` (less ``progress``) and the loss the costs are of."""
    settings = config.model_dump(mode="json", exclude={"progress"})
    return {"tool": "geoshare-worker", "loss": "task" if task_loss else "distill", **settings}


def made_with(source: dict[str, Any] | None, config: AnalyzeConfig) -> bool:
    """True when ``source`` (a problem's) records costs made with ``config`` and the distillation
    loss, whatever the job's record."""
    settings = {k: v for k, v in (source or {}).items() if k not in JOB_KEYS}
    return settings == cost_source(config, task_loss=False)
