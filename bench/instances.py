"""Seeded benchmark problems shaped like real curvature costs.

`curvature_like`: each family's weights drift along depth (a random walk plus noise) and each
layer has its own curvature scale h; a pair costs (h_l + h_m)/4 * ||W_l - W_m||^2, the pairwise
mean-merge cost under a diagonal-isotropic Hessian. `uniform`: i.i.d. costs, no structure.
"""

from __future__ import annotations

import numpy as np

from solver import SharingProblem


def family_matrix(n: int, rng: np.random.Generator, shape: str) -> np.ndarray:
    if shape == "uniform":
        w = rng.random((n, n))
        w = (w + w.T) / 2
    else:
        x = np.cumsum(rng.normal(size=(n, 16)), axis=0) + rng.normal(scale=2.0, size=(n, 16))
        h = rng.lognormal(sigma=0.7, size=n)
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        w = 0.25 * (h[:, None] + h[None, :]) * d
    np.fill_diagonal(w, 0.0)
    return w


def make_problem(
    sizes: list[int], seed: int, ratio: float, shape: str = "curvature", time_limit_s: float = 10.0, workers: int = 2
) -> SharingProblem:
    rng = np.random.default_rng(seed)
    layers, blocks = [], []
    for f, n in enumerate(sizes):
        blocks.append(family_matrix(n, rng, shape))
        for i in range(n):
            layers.append({"name": f"layer.{i}.fam{f}.weight", "family": f"fam{f}", "params": 4096 * (1 + f % 2), "index": i})
    total = len(layers)
    matrix: list[list[float | None]] = [[None] * total for _ in range(total)]
    start = 0
    for w in blocks:
        n = len(w)
        for i in range(n):
            for j in range(n):
                matrix[start + i][start + j] = float(w[i, j])
        start += n
    return SharingProblem.model_validate(
        {
            "layers": layers,
            "costs": {"kind": "pairwise", "matrix": matrix},
            "constraints": {"max_params_ratio": ratio},
            "options": {"time_limit_s": time_limit_s, "workers": workers, "seed": 0},
        }
    )
