"""The ``vmbus`` command line (click). Commands arrive with the CLI issue; this is the group."""

from __future__ import annotations

import click

from . import __version__

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="vmbus")
def main() -> None:
    """Drive Hyper-V VMBus devices from userspace through uio_hv_generic."""
