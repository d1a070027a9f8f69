"""``python -m pyvmbus.cli``: the ``vmbus`` command."""

from __future__ import annotations

import sys

from .commands import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main(prog_name="vmbus"))
