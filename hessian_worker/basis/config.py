"""BasisOptions: how the ``basis`` scheme picks ranks, whitens, and corrects (no torch here).

Defined in hessian_worker.options with the other shared configs; re-exported here.
"""

from __future__ import annotations

from hessian_worker.options import BasisOptions, SideChoice

__all__ = ["BasisOptions", "SideChoice"]
