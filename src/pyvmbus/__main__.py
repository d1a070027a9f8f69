"""``python -m pyvmbus``: the ``vmbus`` command, for hosts where the console script is not on PATH."""

from __future__ import annotations

import sys

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main(prog_name="vmbus"))
