"""save_basis / load_basis: a basis-shared model on disk, each basis stored once.

The files are the tie scheme's (``model.safetensors`` + ``plan.json``, see hessian_worker/io.py):
tensors that are the same memory (a class's basis, tied weights) are stored once under their first
name, the others listed as aliases. ``plan.json`` adds ``"scheme": "basis"`` and the layout of the
BasisLinear modules (rank, shapes, which module's basis each shares), so a fresh copy of the
ORIGINAL architecture can be rebuilt and loaded bit-exactly. ``save_shared``/``load_shared``
dispatch here on their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from hessian_worker.basis.modules import basis_layout, rebuild
from hessian_worker.factored.io import load_factored, save_factored
from solver.schema import Scheme, SharingPlan


def save_basis(model: nn.Module, plan: SharingPlan, directory: str | Path, *, source: Any = None) -> Path:
    """Writes ``directory/model.safetensors`` (each basis and tied tensor once),
    ``directory/plan.json`` (plan, aliases, basis layout, unique params, the manifest) and the
    companion files of ``source`` (as ``save_shared``).

    Returns:
        the directory.
    """
    return save_factored(model, plan, directory, Scheme.basis, {Scheme.basis: basis_layout(model)}, source=source)


def load_basis(model: nn.Module, directory: str | Path) -> SharingPlan:
    """Rebuilds the basis layers (and ties of tie families) in ``model``, a fresh copy of the
    original architecture, then loads the saved tensors into it (in place).

    Raises:
        PlanError: the files are missing or not a basis save, or the model does not fit them.
    """
    return load_factored(model, directory, Scheme.basis, {Scheme.basis: rebuild})
