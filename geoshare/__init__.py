"""Geo-Sharing's product layer: the ``geoshare`` command line over solver/, hessian_worker/ and
service/ (docs/design.md §Parts and data flow).

It sits above the three packages so it may import any of them; nothing below imports it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# what a source checkout reports when the distribution is not installed (tests/geoshare checks
# that it matches pyproject.toml)
SOURCE_VERSION = "0.1.0"


def product_version() -> str:
    """The installed distribution's version (geo-sharing), else the source tree's."""
    try:
        return version("geo-sharing")
    except PackageNotFoundError:
        return SOURCE_VERSION


__version__ = product_version()
