"""Pictures of results people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

from .planning import Frontier, Progress


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


def plot_progress(runs: dict[str, list[Progress]], path: str | Path, title: str | None = None) -> Path:
    """Objective and proven bound over time, one colour per run (the gap closing); PNG or SVG.

    ``runs`` maps a label to the progress events of one solve (`solve(..., progress=...)`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, (label, events) in enumerate(runs.items()):
        if not events:
            continue
        colour = f"C{i}"
        times = [max(e.elapsed_s, 1e-3) for e in events]
        end = max(times[-1], 1e-3)
        ax.step([*times, end], [e.objective for e in events] + [events[-1].objective], where="post", color=colour, lw=2,
                label=f"{label}: best plan")
        ax.step([*times, end], [e.bound for e in events] + [events[-1].bound], where="post", color=colour, ls="--",
                label=f"{label}: proven bound")
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("objective (predicted loss increase)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Geo-Sharing: objective and bound over time")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
