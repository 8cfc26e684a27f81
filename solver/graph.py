"""The conflict graph of a family (units that may never share) and why it needs many classes."""

from __future__ import annotations

import math

import networkx as nx

from .family import FamilyInstance


def conflict_graph(fam: FamilyInstance) -> nx.Graph:
    """Nodes are free units; an edge joins two units that may never share (forbid or null)."""
    up = fam.reduced
    g = nx.Graph()
    g.add_nodes_from(range(up.m))
    g.add_edges_from((a, b) for a in range(up.m) for b in range(a + 1, up.m) if up.forbidden[a, b])
    return g


def why_classes(fam: FamilyInstance, names: list[str]) -> str | None:
    """Explain a family's least class count: pins, a clique of conflicts, or the size cap.

    `names` are the problem's layer names by global position. None when nothing forces more
    than one class.
    """
    reasons = []
    if fam.pinned:
        reasons.append(f"{len(fam.pinned)} pinned layer(s) stay alone")
    g = conflict_graph(fam)
    if g.number_of_edges():
        clique, _ = nx.max_weight_clique(g, weight=None)
        if len(clique) > 1:
            shown = [names[fam.layer_ids[fam.units[u][0]]] for u in clique[:4]]
            more = "..." if len(clique) > 4 else ""
            reasons.append(f"{len(clique)} layers may not share pairwise ({', '.join(shown)}{more}) so they need {len(clique)} classes")
    if fam.max_size is not None:
        need = math.ceil(int(fam.reduced.sizes.sum()) / fam.max_size)
        if need > 1:
            reasons.append(f"max_group_size={fam.max_size} needs at least {need} classes for {int(fam.reduced.sizes.sum())} layers")
    return "; ".join(reasons) or None
