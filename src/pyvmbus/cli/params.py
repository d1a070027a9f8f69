"""Option types every ``vmbus`` command shares: seconds, roots, ``--send`` payloads.

Each turns a bad value into click's one-line usage error (exit 2) before anything runs,
so a refused command changes nothing:

- :class:`Seconds` (``--timeout``, ``--reply-timeout``, ``--interval``, ...): a finite
  number in a range; ``nan``, ``inf`` and ``1e23`` are refused instead of hanging or
  overflowing a wait. Leave the option out to wait without end.
- :class:`RootPath` (``--root``, ``VMBUS_ROOT``): a path the system can name, with room
  left below it for the sysfs paths read under it.
- :func:`read_payload` (``--send HEX|@FILE``): at most :data:`MAX_PAYLOAD` bytes, the
  largest in-band payload any VMBus ring takes, and never more is read (``@/dev/zero``).
  The ring of the device at hand may take less; :func:`max_payload` says how much.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from ..packet import DESCRIPTOR_SIZE, MAX_PACKET_SIZE, TRAILER_SIZE

__all__ = [
    "INTERVAL_MAX",
    "MAX_PAYLOAD",
    "MAX_ROOT_BYTES",
    "MAX_SECONDS",
    "SECONDS",
    "SECONDS_OR_ZERO",
    "RootPath",
    "SafePath",
    "Seconds",
    "max_payload",
    "read_payload",
]

MAX_SECONDS = 1_000_000.0
"""The longest wait any option takes (11.6 days): long enough for any run that should end
by itself, short enough for every wait primitive (``select``, ``Event.wait``)."""
INTERVAL_MAX = 3600.0
"""The longest ``--interval`` between two looks."""
MAX_PAYLOAD = MAX_PACKET_SIZE - DESCRIPTOR_SIZE
"""The largest in-band payload of any VMBus packet (len8 is 16 bits): 524,264 bytes."""
MAX_ROOT_BYTES = 3072
"""The longest ``--root``: PATH_MAX (4096) less room for the sysfs and /dev paths below it."""
_NAME_MAX = 255


class Seconds(click.FloatRange):
    """A finite number of seconds in ``[min, max]`` (``min`` excluded when ``min_open``)."""

    name = "seconds"

    def __init__(self, min: float = 0.0, min_open: bool = True, max: float = MAX_SECONDS) -> None:
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            value = value.strip()
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a number of seconds (a finite number; leave the option out "
                      "to wait without end)", param, ctx)
        return super().convert(number, param, ctx)


SECONDS = Seconds()
"""Seconds > 0 (timeouts)."""
SECONDS_OR_ZERO = Seconds(min_open=False)
"""Seconds >= 0 (``--reoffer-timeout 0``: give up at once)."""


class SafePath(click.Path):
    """A click.Path the system can name: no NUL, parts of at most 255 bytes, at most
    ``max_bytes`` in all (a bad one is a usage error, not an OSError or ValueError later)."""

    def __init__(self, max_bytes: int = 4095, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (str, os.PathLike)):
            raw = os.fsencode(value)
            if b"\0" in raw:
                self.fail("a path cannot hold a NUL byte", param, ctx)
            if not raw:
                self.fail("an empty path names no folder (give '.' for this one)", param, ctx)
            if len(raw) > self.max_bytes:
                why = ", to leave room for the sysfs paths below it" if self.max_bytes < 4095 else ""
                self.fail(f"path of {len(raw)} bytes is too long (at most {self.max_bytes}{why})", param, ctx)
            longest = max(raw.split(b"/"), key=len)
            if len(longest) > _NAME_MAX:
                self.fail(f"a path part of {len(longest)} bytes is too long (at most {_NAME_MAX})",
                          param, ctx)
        return super().convert(value, param, ctx)


class RootPath(SafePath):
    """``--root``: a directory path of at most :data:`MAX_ROOT_BYTES`; whether it holds a
    VMBus is checked later."""

    def __init__(self) -> None:
        super().__init__(MAX_ROOT_BYTES, file_okay=False, path_type=Path)


def max_payload(data_size: int) -> int:
    """The largest in-band payload a ring with ``data_size`` data bytes can ever take.

    A packet is padded to 8 and followed by the 8-byte trailer, and the writer leaves at
    least one byte free (so full and empty differ): ``packet + trailer < data_size``.
    """
    packet = min((data_size - TRAILER_SIZE - 1) & ~7, MAX_PACKET_SIZE)
    return max(0, packet - DESCRIPTOR_SIZE)


def read_payload(text: str, limit: int = MAX_PAYLOAD) -> bytes:
    """A ``--send`` value: hex digits (spaces, ``:`` and a ``0x`` prefix allowed) or ``@FILE``.

    Raises ValueError with the one-line reason: not hex, a file that cannot be read, or
    more than ``limit`` bytes (of which at most ``limit + 1`` are read: ``@/dev/zero``
    ends at once).
    """
    if text.startswith("@"):
        path = text[1:]
        if "\0" in path:
            raise ValueError(f"cannot read {path!r}: a path cannot hold a NUL byte")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:  # a regular file says its size: no need to read it
                    raise ValueError(_too_big(path, f"{size} bytes", limit))
                data = f.read(limit + 1)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > limit:
            raise ValueError(_too_big(path, f"more than {limit} bytes", limit))
        return data
    cleaned = text.strip()
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    cleaned = cleaned.replace(" ", "").replace(":", "")
    if len(cleaned) > 2 * limit:
        raise ValueError(_too_big("the hex value", f"{len(cleaned) // 2} bytes", limit))
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        shown = text if len(text) <= 40 else text[:36] + "..."
        raise ValueError(f"{shown!r} is not hex bytes (e.g. 68656c6c6f) or @FILE") from None


def _too_big(what: str, size: str, limit: int) -> str:
    return (f"{what} is {size}: larger than the largest VMBus packet payload ({limit} bytes); "
            "send it in pieces")
