"""Output of the ``vmbus`` command: text for people, JSON lines for programs.

Every command builds plain data (dicts whose keys are pinned in
:mod:`pyvmbus.cli.schema`) and hands it to :class:`Output`, which prints either one JSON
object per line (``--json``) or the text rendering. Streaming commands (enable, watch,
ring --watch, demo, mock serve) print one object per event, each with an ``event`` key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from ..packet import Packet, PacketType

__all__ = [
    "Output",
    "bar",
    "fmt",
    "packet_event",
    "render_event",
    "stamp",
    "table",
    "type_name",
]


def type_name(packet_type: int) -> str:
    """``DATA_INBAND`` for 6, ``0x2a`` for a type the protocol does not name."""
    try:
        return PacketType(packet_type).name
    except ValueError:
        return f"{packet_type:#x}"


def _printable(data: bytes, limit: int) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data[:limit])


def packet_event(device: str, pkt: Packet, preview: int) -> dict[str, Any]:
    """The ``packet`` event of ``vmbus enable`` (see cli.schema)."""
    return {
        "event": "packet",
        "device": device,
        "type": pkt.type,
        "type_name": type_name(pkt.type),
        "flags": pkt.flags,
        "transaction_id": pkt.transaction_id,
        "length": len(pkt.payload),
        "payload_hex": bytes(pkt.payload[:preview]).hex(),
    }


def bar(fraction: float, width: int = 24) -> str:
    """``[######------------------]`` for an occupancy between 0 and 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    if fraction > 0 and full == 0:
        full = 1  # a non-empty ring never looks empty
    return "[" + "#" * full + "-" * (width - full) + "]"


def fmt(value: object) -> str:
    """A value for a text table: ``-`` for None, yes/no for booleans."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> str:
    """A plain aligned table (columns in ``right`` are right-aligned)."""
    cells = [list(headers)] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    ralign = set(right)
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in ralign else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _hex_and_text(hex_text: str, length: int, preview: int) -> str:
    data = bytes.fromhex(hex_text)
    more = " ..." if length > len(data) else ""
    return f"{data.hex(' ')}{more}  |{_printable(data, preview)}|" if data else "(empty)"


def stamp(ev: dict[str, Any]) -> str:
    """The ``t`` column of a streaming event's text line (``   1.234  ``), or '' without one."""
    t = ev.get("t")
    return f"{t:8.3f}  " if isinstance(t, (int, float)) else ""


def render_event(ev: dict[str, Any], preview: int = 16) -> str:
    """Text line(s) for one streaming event (enable, demo, watch, mock serve; the events
    ``vmbus ic`` shares with them: bound, closed, restored, note)."""
    kind = ev["event"]
    ts = stamp(ev)
    if kind == "packet":
        return (f"{ts}packet    {ev['type_name']}({ev['type']}) flags={ev['flags']:#x} "
                f"txid={ev['transaction_id']} len={ev['length']}  "
                f"{_hex_and_text(ev['payload_hex'], ev['length'], preview)}")
    if kind == "reply":
        return (f"{ts}reply     to a {ev['request_length']}-byte request: len={ev['length']}  "
                f"{_hex_and_text(ev['payload_hex'], ev['length'], preview)}")
    if kind == "sent":
        what = "request (completion requested)" if ev["completion_requested"] else "packet"
        txid = "" if ev["transaction_id"] is None else f" txid={ev['transaction_id']}"
        return f"{ts}sent      {what}{txid} len={ev['length']}"
    if kind == "bound":
        was = ev["previous_driver"] or "no driver"
        return f"{ts}bound     {ev['device']} to uio_hv_generic as /dev/{ev['uio']} (was: {was})"
    if kind == "opened":
        mon = "not monitored" if ev["monitor_id"] is None else f"monitor_id {ev['monitor_id']}"
        return f"{ts}opened    relid {ev['relid']} ({mon}): rings mapped, callback on_opened"
    if kind == "started":
        return f"{ts}started   callback on_started (may send, must not wait)"
    if kind == "post_started":
        return f"{ts}post-started  callback on_post_started: packets flow from here"
    if kind == "processing_complete":
        return f"{ts}processing complete: {ev['count']} packet(s) in this batch"
    if kind == "closed":
        return f"{ts}closed    reason: {ev['reason']}"
    if kind == "restored":
        return f"{ts}restored  {ev['device']} -> {ev['driver'] or 'no driver'}"
    if kind == "stopped":
        return (f"{ts}stopped   ({ev['why']}): {ev['packets']} packet(s), {ev['replies']} repl(ies)")
    if kind == "note":
        return f"{ts}note      {ev['message']}"
    if kind in ("add", "remove", "bind", "unbind", "change"):
        what = ev["name"] if ev["subsystem"] == "uio" else (ev["device"] or ev["name"])
        extra = []
        if ev["subsystem"] == "uio" and ev["device"]:
            extra.append(f"device {ev['device']}")
        if ev.get("class"):
            extra.append(str(ev["class"]))
        if ev.get("driver"):
            extra.append(f"driver {ev['driver']}")
        tail = f"  ({', '.join(extra)})" if extra else ""
        return f"{ts}{kind:<7} {ev['subsystem']:<6} {what}{tail}"
    rest = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("event", "t"))
    return f"{ts}{kind}  {rest}"


class Output:
    """Prints data as JSON lines or text; safe to call from the dispatcher thread too."""

    def __init__(self, json_mode: bool, preview: int = 16) -> None:
        self.json = json_mode
        self.preview = preview
        self.broken = False
        """True once the reader of stdout went away (``vmbus --json watch | head -1``)."""
        self.on_broken: Callable[[], object] | None = None
        """Called once when that happens: streaming commands stop, as if interrupted."""
        self._lock = threading.Lock()

    def emit(self, data: dict[str, Any], text: str | Callable[[], str] | None = None) -> None:
        """One JSON object (``--json``), else ``text`` (a string or a function making it)."""
        with self._lock:
            if self.broken:
                return
            try:
                if self.json:
                    click.echo(json.dumps(data, separators=(",", ":"), default=str))
                elif text is not None:
                    click.echo(text() if callable(text) else text)
            except BrokenPipeError:
                self._pipe_closed()

    def _pipe_closed(self) -> None:
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        if self.on_broken is not None:
            self.on_broken()

    def event(self, ev: dict[str, Any]) -> None:
        """A streaming event: its JSON line, or :func:`render_event`'s text."""
        self.emit(ev, lambda: render_event(ev, self.preview))

    def echo(self, text: str, *, err: bool = False) -> None:
        """Text only (nothing in JSON mode): banners and hints for people."""
        if self.json:
            return
        with self._lock:
            click.echo(text, err=err)
