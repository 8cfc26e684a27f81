"""Small problem builders shared by the solver tests."""

from __future__ import annotations

import numpy as np

from solver.schema import SharingProblem


def random_problem(
    families: list[int],
    seed: int = 0,
    kind: str = "pairwise",
    ratio: float | None = 0.5,
    params: list[int] | None = None,
    null_prob: float = 0.0,
    unary: bool = False,
    time_limit_s: float = 10.0,
    **constraints,
) -> SharingProblem:
    """Families of the given sizes with random non-negative costs (null across families)."""
    rng = np.random.default_rng(seed)
    layers = []
    for f, n in enumerate(families):
        for i in range(n):
            p = params[f] if params else 10 * (f + 1)
            layers.append({"name": f"block{i}.f{f}.weight", "family": f"f{f}", "params": p, "index": i})
    n_all = len(layers)
    matrix: list[list[float | None]] = [[None] * n_all for _ in range(n_all)]
    for a in range(n_all):
        matrix[a][a] = 0.0
        for b in range(n_all):
            if a != b and layers[a]["family"] == layers[b]["family"]:
                if kind == "pairwise" and b < a:
                    matrix[a][b] = matrix[b][a]
                    continue
                matrix[a][b] = None if rng.random() < null_prob else float(rng.random() ** 2)
    if kind == "pairwise":
        for a in range(n_all):
            for b in range(a):
                matrix[a][b] = matrix[b][a]
    data = {
        "layers": layers,
        "costs": {"kind": kind, "matrix": matrix},
        "constraints": {"max_params_ratio": ratio, **constraints},
        "options": {"time_limit_s": time_limit_s, "seed": 0, "workers": 2},
    }
    if unary:
        data["costs"]["unary"] = [float(x) for x in rng.random(n_all)]
    return SharingProblem.model_validate(data)
