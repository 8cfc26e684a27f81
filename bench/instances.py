"""Seeded benchmark problems shaped like real curvature costs.

`curvature_like`: each family's weights drift along depth (a random walk plus noise) and each
layer has its own curvature scale h; a pair costs (h_l + h_m)/4 * ||W_l - W_m||^2, the pairwise
mean-merge cost under a diagonal-isotropic Hessian. `uniform`: i.i.d. costs, no structure.
Assignment costs (layer l takes layer r's weights) are h_l/2 * ||W_l - W_r||^2: asymmetric.

`llm_problem` gives decoder-shaped problems: seven families (q, k, v, o, gate, up, down) of one
layer per block, with the parameter counts of LLaMA-3-8B (32 blocks) or LLaMA-2-70B (80 blocks),
both with grouped-query attention (k and v 8 heads of 128), and a curvature scale per family.
"""

from __future__ import annotations

import numpy as np

from solver import SharingProblem

# (d_out, d_in) per family; k and v are GQA-sized (8 key-value heads of 128)
LLM_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "llama-8b": {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
                 "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)},
    "llama-70b": {"q": (8192, 8192), "k": (1024, 8192), "v": (1024, 8192), "o": (8192, 8192),
                  "gate": (28672, 8192), "up": (28672, 8192), "down": (8192, 28672)},
}
LLM_DEPTH = {"llama-8b": 32, "llama-70b": 80}


def _walk(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Weights drifting along depth and a curvature scale per layer."""
    x = np.cumsum(rng.normal(size=(n, 16)), axis=0) + rng.normal(scale=2.0, size=(n, 16))
    h = rng.lognormal(sigma=0.7, size=n)
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), h


def family_matrix(n: int, rng: np.random.Generator, shape: str, kind: str = "pairwise") -> np.ndarray:
    if shape == "uniform":
        w = rng.random((n, n))
        w = w if kind == "assignment" else (w + w.T) / 2
    else:
        d, h = _walk(n, rng)
        w = 0.5 * h[:, None] * d if kind == "assignment" else 0.25 * (h[:, None] + h[None, :]) * d
    np.fill_diagonal(w, 0.0)
    return w


def _problem(blocks: list[np.ndarray], layers: list[dict], kind: str, ratio: float, time_limit_s: float, workers: int) -> SharingProblem:
    total = len(layers)
    matrix: list[list[float | None]] = [[None] * total for _ in range(total)]
    start = 0
    for w in blocks:
        n = len(w)
        for i in range(n):
            row = matrix[start + i]
            row[start : start + n] = [float(v) for v in w[i]]
        start += n
    return SharingProblem.model_validate(
        {
            "layers": layers,
            "costs": {"kind": kind, "matrix": matrix},
            "constraints": {"max_params_ratio": ratio},
            "options": {"time_limit_s": time_limit_s, "workers": workers, "seed": 0},
        }
    )


def make_problem(
    sizes: list[int], seed: int, ratio: float, shape: str = "curvature", time_limit_s: float = 10.0, workers: int = 2,
    kind: str = "pairwise",
) -> SharingProblem:
    rng = np.random.default_rng(seed)
    layers, blocks = [], []
    for f, n in enumerate(sizes):
        blocks.append(family_matrix(n, rng, shape, kind))
        for i in range(n):
            layers.append({"name": f"layer.{i}.fam{f}.weight", "family": f"fam{f}", "params": 4096 * (1 + f % 2), "index": i})
    return _problem(blocks, layers, kind, ratio, time_limit_s, workers)


def llm_problem(model: str, seed: int, ratio: float, time_limit_s: float = 30.0, workers: int = 2,
                kind: str = "pairwise", depth: int | None = None) -> SharingProblem:
    """A decoder-shaped problem: ``model`` in LLM_SHAPES, ``depth`` blocks (default the model's).

    Each family's costs are scaled by a curvature level of its own (lognormal), so the knapsack
    has real trade-offs between families of different sizes and sensitivities.
    """
    rng = np.random.default_rng(seed)
    depth = depth or LLM_DEPTH[model]
    layers, blocks = [], []
    for fam, (d_out, d_in) in LLM_SHAPES[model].items():
        level = float(rng.lognormal(sigma=1.0))
        blocks.append(level * family_matrix(depth, rng, "curvature", kind))
        layers += [{"name": f"model.layers.{i}.{fam}_proj.weight", "family": fam, "params": d_out * d_in, "index": i}
                   for i in range(depth)]
    return _problem(blocks, layers, kind, ratio, time_limit_s, workers)
