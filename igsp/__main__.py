"""``python -m igsp``: the same command line as the ``igsp`` script."""

from __future__ import annotations

from igsp.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
