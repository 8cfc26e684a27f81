"""Shared parameters in a module: tie layers to one Parameter object, count what is left unique."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hessian_worker.errors import PlanError


def unique_params(model: nn.Module) -> int:
    """Element count of distinct Parameter objects (tied ones count once)."""
    return sum(p.numel() for p in model.parameters())


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError as exc:
        raise PlanError(f"plan names {name!r}, which has no owning module in this model") from exc


def tie(model: nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Makes every member of each group hold the group's first Parameter object (no value change
    for the representative)."""
    for group in groups:
        owner, attr = _owner(model, group[0])
        rep = getattr(owner, attr)
        for name in group[1:]:
            module, a = _owner(model, name)
            setattr(module, a, rep)
