"""Ways of sharing, one module each, behind one interface (``base.SharingScheme``).

    scheme = scheme_for(Scheme.basis)       # the scheme a config asks for
    scheme = scheme_of(problem)             # the scheme a problem's families use
"""

from __future__ import annotations

from torch import nn

from hessian_worker.errors import PlanError
from hessian_worker.schemes.base import DataParts, SharingScheme, State, Substitutes
from hessian_worker.schemes.basis import BasisScheme
from hessian_worker.schemes.relaxed import RelaxedScheme
from hessian_worker.schemes.tie import TieScheme
from solver.schema import Scheme, SharingProblem

SCHEMES: dict[Scheme, SharingScheme] = {Scheme.tie: TieScheme(), Scheme.basis: BasisScheme(),
                                        Scheme.relaxed: RelaxedScheme()}


def scheme_for(name: Scheme | str) -> SharingScheme:
    """The scheme of this name."""
    return SCHEMES[Scheme(name)]


def scheme_of(problem: SharingProblem | None) -> SharingScheme:
    """The scheme a problem's families use (tie when none names another).

    Raises:
        PlanError: families name two schemes besides tie (no scheme combines them).
    """
    named = {spec.scheme for spec in ((problem.families or {}).values() if problem is not None else ())}
    named.discard(Scheme.tie)
    if len(named) > 1:
        raise PlanError(f"the problem's families use the schemes {sorted(getattr(s, 'value', s) for s in named)}; "
                        "one problem combines tie with at most one other scheme")
    return scheme_for(named.pop() if named else Scheme.tie)


def scheme_installed(model: nn.Module) -> SharingScheme:
    """The scheme whose modules ``model`` holds (tie when no other's: tying changes no module)."""
    for scheme in SCHEMES.values():
        if scheme.name is not Scheme.tie and scheme.installed_in(model):
            return scheme
    return SCHEMES[Scheme.tie]


__all__ = ["SCHEMES", "DataParts", "SharingScheme", "State", "Substitutes", "scheme_for", "scheme_installed", "scheme_of"]
