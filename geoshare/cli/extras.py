"""Which optional part of the product each command needs, and the install line when it is missing.

``geoshare solve`` needs only the base install; ``analyze``, ``apply``, ``compress``, ``export``
and ``evaluate`` need torch (the ``worker`` extra), ``serve`` needs FastAPI (``service``), and
``worker`` both. A missing part is reported as the pip command that installs it, not as a
traceback from deep inside a handler.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from solver.errors import GeoShareError

DISTRIBUTION = "geo-sharing"

# the modules that stand for each extra: the ones its commands import first (checked up front)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "worker": ("torch",),
    "service": ("fastapi", "uvicorn", "sqlalchemy", "httpx", "pydantic_settings"),
}
# the rest of each extra's modules, named when a handler meets one missing
OTHER_MODULES: dict[str, tuple[str, ...]] = {
    "worker": ("transformers", "safetensors", "psutil"),
    "service": ("prometheus_client", "fastapi_offline", "httptools", "uvloop"),
}


class MissingExtra(GeoShareError, ImportError):
    """A command's optional dependencies are not installed; the message is the pip line."""


def install_line(extras: Iterable[str]) -> str:
    return f"pip install '{DISTRIBUTION}[{','.join(extras)}]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def require(command: str, extras: Iterable[str]) -> None:
    """Raises MissingExtra naming what ``command`` lacks and how to install it; nothing if all is there."""
    extras = tuple(extras)
    missing = [m for extra in extras for m in EXTRA_MODULES[extra] if not _installed(m)]
    if missing:
        raise MissingExtra(f"geoshare {command} needs {', '.join(missing)}, which is not installed: "
                           f"{install_line(extras)}")


def extra_of(module: str | None) -> str | None:
    """The extra that installs ``module`` (a top-level name or a dotted one), if one does."""
    root = (module or "").split(".")[0]
    return next((extra for extra in EXTRA_MODULES if root in EXTRA_MODULES[extra] + OTHER_MODULES[extra]), None)
