"""Pictures of results people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

from .planning import Frontier


def plot_frontier(front: Frontier, path: str | Path, title: str | None = None) -> Path:
    """Objective and proven bound against the kept share of parameters (PNG or SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [p.ratio for p in front.points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.step(ratios, [p.objective for p in front.points], where="post", label="best plan found", lw=2)
    ax.step(ratios, [p.bound for p in front.points], where="post", label="proven lower bound", ls="--")
    ax.set_xlabel("unique parameters kept (share of the listed layers)")
    ax.set_ylabel("predicted loss increase (objective)")
    ax.set_yscale("symlog", linthresh=max(1e-12, min((p.objective for p in front.points if p.objective > 0), default=1.0)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Geo-Sharing: compression vs predicted cost")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
