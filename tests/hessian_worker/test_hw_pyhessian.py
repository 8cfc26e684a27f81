"""Our Lanczos eigenvalues and Hutchinson traces against a peer implementation, PyHessian.

PyHessian (Yao et al., 2020) computes the full Hessian's top eigenvalues by power iteration with
deflation and its trace by Hutchinson, with double backward over the parameters that require
grad. Both are checked against the dense Hessian too, so a disagreement says which side is off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hw_cases import dense_hessian, tiny_mlp
from torch import nn

from hessian_worker.curvature.base import CurvatureKind
from hessian_worker.curvature.projected import Bulk, Eigensolver, ProjectedCurvature
from hessian_worker.data import Calibration
from hessian_worker.discovery import discover_layers
from hessian_worker.objective import Objective

pyhessian = pytest.importorskip("pyhessian", reason="pyhessian is in the dev extra: pip install -e .[dev]")


def _case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[str]]:
    """A tiny MLP under a task loss (MSE to fixed targets), where the Hessian is not the GGN."""
    model = tiny_mlp()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 3, generator=g)
    y = torch.randn(24, 3, generator=g)
    names = [layer.name for layer in discover_layers(model)]
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)  # PyHessian differentiates what requires grad
    return model, x, y, names


def _objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> Objective:
    return Objective(model, Calibration([{"input": x}]), names,
                     task_loss=lambda out, batch: nn.functional.mse_loss(out, y))


def test_top_eigenvalues_match_pyhessian_and_dense() -> None:
    model, x, y, names = _case()
    dense = torch.linalg.eigvalsh(dense_hessian(_objective(model, x, y, names)))
    ours = ProjectedCurvature(_objective(model, x, y, names), rank=3, kind=CurvatureKind.hessian,
                              eigensolver=Eigensolver.lanczos, iters=40,
                              generator=torch.Generator().manual_seed(0)).eigenvalues
    torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
    peer = pyhessian.hessian(model, nn.MSELoss(), data=(x, y), cuda=False)
    theirs, _ = peer.eigenvalues(maxIter=500, tol=1e-8, top_n=2)
    top = dense.flip(0)
    assert float(top[0]) > abs(float(dense[0]))  # the top eigenvalue is also the largest in size
    # PyHessian normalizes by ‖v‖ + 1e-6, which biases its Rayleigh quotient by about 1e-6/‖Hv‖
    assert float(ours[0]) == pytest.approx(theirs[0], rel=1e-5)
    assert float(ours[0]) == pytest.approx(float(top[0]), rel=1e-9)
    # the second by deflated power iteration converges slower: PyHessian within 1e-4 of ours
    assert float(ours[1]) == pytest.approx(theirs[1], rel=1e-4)
    assert float(ours[1]) == pytest.approx(float(top[1]), rel=1e-9)


def test_trace_matches_pyhessian_and_dense() -> None:
    model, x, y, names = _case()
    obj = _objective(model, x, y, names)
    truth = float(torch.trace(dense_hessian(obj)))
    ours = ProjectedCurvature(obj, rank=1, kind=CurvatureKind.hessian, eigensolver=Eigensolver.lanczos,
                              bulk=Bulk.isotropic, probes=3000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    peer = pyhessian.hessian(model, nn.MSELoss(), data=(x, y), cuda=False)
    samples = np.array([v for _ in range(30) for v in peer.trace(maxIter=100, tol=0.0)])
    theirs, their_err = float(samples.mean()), float(samples.std() / len(samples) ** 0.5)
    assert abs(ours.trace - truth) < 4 * ours.trace_err
    assert abs(theirs - truth) < 4 * their_err
    assert abs(ours.trace - theirs) < 4 * (ours.trace_err**2 + their_err**2) ** 0.5
    # both estimators are the same Rademacher Hutchinson: similar spread per probe
    assert 0.5 < ours.trace_err * 3000**0.5 / (their_err * len(samples) ** 0.5) < 2.0
