"""save_relaxed / load_relaxed: a relaxed-shared model on disk, each S_c stored once.

The files are the tie scheme's (``model.safetensors`` + ``plan.json``, see hessian_worker/io.py):
tensors that are the same memory (a class's S, tied weights) are stored once under their first
name, the others listed as aliases; the corrections are stored as their factors (``left``,
``right``). ``plan.json`` adds ``"scheme": "relaxed"`` and the layout of the RelaxedLinear modules
(rank, shapes, which module's S each shares), and under ``basis`` that of the BasisLinear modules of
basis families beside them, so a fresh copy of the ORIGINAL architecture is rebuilt and loaded
bit-exactly. ``save_shared``/``load_shared`` dispatch here on their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.basis.modules import basis_layout
from hessian_worker.basis.modules import rebuild as rebuild_basis
from hessian_worker.factored.io import load_factored, save_factored
from hessian_worker.relaxed.modules import rebuild, relaxed_layout
from solver.schema import Scheme, SharingPlan


def save_relaxed(model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
    """Writes ``directory/model.safetensors`` (each S_c and tied tensor once), ``directory/plan.json``
    (plan, aliases, relaxed layout, unique params, the manifest) and the companion files of
    ``source`` (as ``save_shared``).

    Returns:
        the directory.
    """
    layouts = {Scheme.relaxed: relaxed_layout(model), Scheme.basis: basis_layout(model)}
    return save_factored(model, plan, directory, Scheme.relaxed, layouts, source=source)


def load_relaxed(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Rebuilds the relaxed layers (and ties of tie families) in ``model``, a fresh copy of the
    original architecture, then loads the saved tensors into it (in place).

    Raises:
        PlanError: the files are missing or not a relaxed save, or the model does not fit them.
    """
    return load_factored(model, directory, Scheme.relaxed, {Scheme.relaxed: rebuild, Scheme.basis: rebuild_basis})
