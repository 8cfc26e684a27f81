"""What an analysis job may make a worker import, read and write: the one rule, applied twice.

A job names a model (``minilm``, a Hugging Face directory, or ``module:factory``), optional
calibration data (a path) and, for a compress job, an output folder. Over the API these come from
any client, while the worker runs them with its own rights, so a job may only name:

- the packaged model ``minilm``, a directory under a *read root*, or ``module:factory`` whose
  module (or the exact ``module:factory``) is on the *allowed modules* list;
- no data (the built-in sentences) or a path under a read root;
- an output folder strictly below the *out root*; a relative ``compress.out`` is taken inside it.

Paths are resolved before the check: ``..`` and symlinks are followed (``os.path.realpath``, which
resolves the part of a path that exists and normalizes the rest lexically), so neither a ``..``
nor a symlink placed under a root leads out of it. A leading ``~`` is refused, not expanded.

The API checks at submission with its own settings (``POST /v1/analyses`` answers 422 naming the
field): it always sees the lexical escapes and, where a path exists on the API host (a shared
volume mounted there too), its symlinks. The API and the worker may be different machines, so the
worker checks again with its own settings and on its own file system before it loads or writes
anything, and runs the job on the resolved paths it checked. The contents of the roots are the
operator's and trusted (a model directory's files are read as they are).

The local CLI (``geoshare analyze/compress/apply``) runs with its user's own rights and is not
restricted: this rule belongs to the service/worker boundary only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from solver.errors import GeoShareError

if TYPE_CHECKING:
    from service.models import AnalysisSpec
    from service.settings import AccessSettings

# hessian_worker.models.MINILM (repeated: the API does not import torch)
PACKAGED_MODELS = frozenset({"minilm"})
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
_FACTORY = re.compile(rf"(?P<module>{_MODULE.pattern}):(?P<attr>{_IDENT})")


class AccessDenied(GeoShareError, ValueError):
    """A job names a model, data or output folder this side's settings do not allow.

    ``loc`` is the field inside the analysis spec, e.g. ``("data",)`` or ``("compress", "out")``.
    """

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def check_module_entry(entry: str) -> str:
    """One allowed-modules entry: ``package.module`` or ``package.module:factory``.

    Raises:
        ValueError: the entry is neither (it could never match a model spec).
    """
    entry = entry.strip()
    if not (_MODULE.fullmatch(entry) or _FACTORY.fullmatch(entry)):
        raise ValueError(f"allowed model module {entry!r} is not a module name ('pkg.models') or "
                         "'pkg.models:factory'; fix GEOSHARE_MODEL_MODULES (comma-separated)")
    return entry


def resolve(path: str | Path) -> Path:
    """``path`` made absolute with ``..`` and the symlinks of its existing part resolved."""
    return Path(os.path.realpath(path))


def _no_nul(value: str, loc: tuple[str, ...]) -> None:
    if "\x00" in value:
        raise AccessDenied(loc, f"{'.'.join(loc)} holds a NUL byte; give a plain path")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class AccessRules:
    """The roots and modules of one side (API or worker), resolved on that side's file system."""

    read_roots: tuple[Path, ...] = ()
    out_root: Path = field(default_factory=lambda: resolve("geoshare-out"))
    model_modules: frozenset[str] = frozenset()
    side: str = "this service"  # who refuses, in messages: "this API", "this worker"

    @classmethod
    def of(cls, settings: AccessSettings, side: str = "this service") -> AccessRules:
        """The rules a settings object describes (roots resolved here, so a symlinked root works)."""
        return cls.build(settings.read_roots, settings.out_root, settings.model_modules, side=side)

    @classmethod
    def build(cls, read_roots: Iterable[str | Path] = (), out_root: str | Path = "geoshare-out",
              model_modules: Iterable[str] = (), *, side: str = "this service") -> AccessRules:
        """Rules from plain values (settings, tests, an embedded worker); roots are resolved here."""
        return cls(read_roots=tuple(resolve(r) for r in read_roots), out_root=resolve(out_root),
                   model_modules=frozenset(check_module_entry(m) for m in model_modules), side=side)

    def _roots_text(self) -> str:
        if not self.read_roots:
            return "none are set"
        return "they are " + ", ".join(str(r) for r in self.read_roots)

    def readable(self, value: str, loc: tuple[str, ...], what: str) -> Path:
        """The resolved path of ``value`` when it lies under a read root.

        Raises:
            AccessDenied: relative, ``~``, or outside every read root once resolved.
        """
        name = ".".join(loc)
        _no_nul(value, loc)
        if value.startswith("~") or not os.path.isabs(value):
            raise AccessDenied(loc, f"{name}={value!r} is not an absolute path; give the {what}'s absolute "
                                    f"path under a read root of {self.side} ({self._roots_text()})")
        path = resolve(value)
        if not any(_inside(path, root) for root in self.read_roots):
            via = "" if str(path) == os.path.normpath(value) else f" (it resolves to {str(path)!r})"
            raise AccessDenied(loc, f"{name}={value!r} is outside the read roots of {self.side}{via}: "
                                    f"{self._roots_text()} (GEOSHARE_READ_ROOTS); put the {what} under one, "
                                    "or ask the operator to add its folder")
        return path

    def writable(self, value: str, loc: tuple[str, ...] = ("compress", "out")) -> Path:
        """The resolved output folder of ``value``: strictly below the out root.

        Raises:
            AccessDenied: ``~``, the out root itself, or outside it once resolved.
        """
        name = ".".join(loc)
        _no_nul(value, loc)
        if value.startswith("~"):
            raise AccessDenied(loc, f"{name}={value!r}: '~' is not expanded on the worker; give a path "
                                    f"relative to the out root {str(self.out_root)!r}, e.g. 'minilm-0.8'")
        path = resolve(self.out_root / value)  # an absolute value replaces the root in the join
        if path == self.out_root or not _inside(path, self.out_root):
            via = "" if str(path) == os.path.normpath(self.out_root / value) else f" (it resolves to {str(path)!r})"
            raise AccessDenied(loc, f"{name}={value!r} is not a folder below the out root of {self.side} "
                                    f"{str(self.out_root)!r}{via} (GEOSHARE_OUT_ROOT); give a relative "
                                    "name such as 'minilm-0.8', which is created inside it")
        return path

    def allows_factory(self, module: str, attr: str) -> bool:
        """Whether ``module:attr`` may be imported and called (its module or itself is listed)."""
        return module in self.model_modules or f"{module}:{attr}" in self.model_modules

    def model(self, value: str, *, must_exist: bool = False) -> str:
        """The model spec to load: unchanged for ``minilm`` and factories, resolved for a directory.

        With ``must_exist`` (on the worker) a path must be an existing directory, so the loader never
        takes a missing one for a ``module:factory``.

        Raises:
            AccessDenied: a factory whose module is not allowed, a path outside the read roots, or
                (``must_exist``) a path that is not a directory.
        """
        if value in PACKAGED_MODELS:
            return value
        factory = _FACTORY.fullmatch(value)
        if factory is not None:
            if not self.allows_factory(factory["module"], factory["attr"]):
                allowed = ", ".join(sorted(self.model_modules)) or "none"
                raise AccessDenied(("model",), (
                    f"model={value!r} names a module:factory, and module {factory['module']!r} is not allowed "
                    f"on {self.side} (allowed: {allowed}; GEOSHARE_MODEL_MODULES); use 'minilm' or a Hugging "
                    "Face directory under a read root, or ask the operator to allow the module"))
            return value
        if not os.path.isabs(value):
            raise AccessDenied(("model",), (
                f"model={value!r} is neither 'minilm', a module:factory nor an absolute path; give "
                f"'minilm' or a Hugging Face directory's absolute path under a read root ({self._roots_text()})"))
        path = self.readable(value, ("model",), "model directory")
        if must_exist and not path.is_dir():
            raise AccessDenied(("model",), f"model={value!r} is not a directory on {self.side}; give a "
                                           "Hugging Face model directory under a read root")
        return str(path)

    def check(self, spec: AnalysisSpec, *, on_worker: bool = False) -> AnalysisSpec:
        """``spec`` with its model, data and output paths resolved, once all are allowed.

        ``on_worker``: the paths are the ones about to be used, so a model path must exist.

        Raises:
            AccessDenied: the first field that is not allowed (its ``loc`` names it).
        """
        model = self.model(spec.model, must_exist=on_worker)
        data = None if spec.data is None else str(self.readable(spec.data, ("data",), "data file"))
        update: dict[str, object] = {"model": model, "data": data}
        if spec.compress is not None:
            out = str(self.writable(spec.compress.out))
            update["compress"] = spec.compress.model_copy(update={"out": out})
        return spec.model_copy(update=update)
