"""Ways of sharing, one module each, behind one interface (``base.SharingScheme``).

    scheme = scheme_for(Scheme.basis)       # the scheme a config asks for
    scheme = scheme_of(problem)             # the scheme a problem's families use
"""

from __future__ import annotations

from torch import nn

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
    """The scheme a problem's families use (tie when none names another; relaxed when its families
    sit beside basis families, which the relaxed scheme fits too)."""
    named = {spec.scheme for spec in ((problem.families or {}).values() if problem is not None else ())}
    named.discard(Scheme.tie)
    if Scheme.relaxed in named:
        return scheme_for(Scheme.relaxed)
    return scheme_for(named.pop() if named else Scheme.tie)


def scheme_installed(model: nn.Module) -> SharingScheme:
    """The scheme whose modules ``model`` holds (tie when no other's: tying changes no module); the
    relaxed scheme's when it holds relaxed layers, whatever basis layers sit beside them (its save
    carries both)."""
    installed = [s for s in SCHEMES.values() if s.name is not Scheme.tie and s.installed_in(model)]
    if SCHEMES[Scheme.relaxed] in installed:
        return SCHEMES[Scheme.relaxed]
    return installed[0] if installed else SCHEMES[Scheme.tie]


__all__ = ["SCHEMES", "DataParts", "SharingScheme", "State", "Substitutes", "scheme_for", "scheme_installed", "scheme_of"]
