"""The ``vmbus`` command line: one layer, thin click commands over the library.

What lives here, one module a job:

- :mod:`.commands`: the click group ``main`` (the console script) and the core commands
  (list, show, bind, unbind, restore, enable, demo, ring, watch, mock serve / fault).
- :mod:`.ic`: ``vmbus ic ...`` and ``vmbus fcopy-daemon``, plugged into the group by
  ``register(main)``.
- :mod:`.state`: the global options and the device resolution (``CliState``), the ``--mock`` bus.
- :mod:`.views` (the data of list / show / ring), :mod:`.text` (their text rendering),
  :mod:`.output` (text or JSON lines), :mod:`.schema` (the JSON keys, pinned).
- :mod:`.enable` (``enable`` and ``demo``), :mod:`.watch` (``watch`` events),
  :mod:`.mock` (``vmbus mock fault`` reaching a running ``vmbus mock serve``).
- :mod:`.errors`: each error as one line and an exit code; :mod:`.docs` generates docs/cli.md.

What it may import: anything in :mod:`pyvmbus` (it is the top layer) and click. Nothing in
the library imports from here.
"""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
