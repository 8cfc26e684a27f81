"""Evaluation tasks by name: a model, three disjoint data splits and a metric each (see base.Task).

Task modules are imported on demand, so asking for ``digits`` never loads transformers.
"""

from __future__ import annotations

from bench.tasks.base import Task

TASKS = ("minilm", "gpt", "digits")

__all__ = ["TASKS", "Task", "load_task"]


def load_task(name: str, *, quick: bool = False, seed: int = 0) -> Task:
    """The named task; ``quick`` picks CI-sized models where training dominates (gpt), ``seed``
    draws the data splits (the trained models are fixed by their settings).

    Raises:
        ValueError: ``name`` is not one of ``TASKS``.
    """
    if name == "minilm":
        from bench.tasks.minilm import minilm_task

        return minilm_task(seed=seed)
    if name == "gpt":
        from bench.tasks.gpt import gpt_task

        return gpt_task(quick=quick, seed=seed)
    if name == "digits":
        from bench.tasks.digits import digits_task

        return digits_task(seed=seed)
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
