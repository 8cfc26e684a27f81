"""``python -m geoshare``: the same as the ``geoshare`` console script."""

from __future__ import annotations

import sys

from geoshare.cli import main

if __name__ == "__main__":
    sys.exit(main())
