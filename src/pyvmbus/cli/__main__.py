"""``python -m pyvmbus.cli``: the ``vmbus`` command."""

from __future__ import annotations

import sys

from .commands import main

__all__: list[str] = []

sys.exit(main(prog_name="vmbus"))
