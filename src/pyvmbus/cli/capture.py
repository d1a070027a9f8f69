"""``vmbus capture show FILE``: print a pcapng capture as ``vmbus enable`` printed the session.

A capture (``vmbus enable DEVICE --capture FILE``, ``Channel(capture=...)``) holds every
packet both ways, the lifecycle events, signals and interrupts. ``show`` turns each record
into the event ``vmbus enable`` prints (``opened``, ``post_started``, ``packet`` for what
the host sent, ``sent`` for what the guest sent, ``closed``), plus ``signal``,
``interrupt`` and ``rescind``, which enable does not see; ``--json`` gives one object per
record (keys in :mod:`pyvmbus.cli.schema`, ``capture.*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..capture import Direction, Record, RecordKind, read_capture
from .output import Output, packet_event, render_event, stamp
from .params import SafePath
from .state import CliState, json_option

__all__ = ["capture", "record_event", "register", "render_capture_event"]


def record_event(r: Record, t0: int, preview: int) -> dict[str, Any]:
    """The ``capture.*`` event of one record (see cli.schema)."""
    base: dict[str, Any] = {"t": round((r.timestamp_ns - t0) / 1e9, 6), "record": r.number,
                            "relid": r.relid, "subchannel": r.subchannel}
    if r.kind is RecordKind.PACKET:
        try:
            pkt = r.packet
        except ValueError as exc:
            return {"event": "malformed", **base, "error": str(exc)}
        _, off8, len8, _, _ = r.descriptor
        ev = packet_event("", pkt, preview)
        ev.pop("device")
        ev.update(base, offset8=off8, len8=len8)
        if r.direction is Direction.GUEST_TO_HOST:
            ev["event"] = "sent"
            ev["completion_requested"] = pkt.completion_requested
        return ev
    if r.kind is RecordKind.EVENT:
        try:
            obj = r.event
        except ValueError as exc:
            return {"event": "malformed", **base, "error": str(exc)}
        name = str(obj.pop("event"))
        if name == "opened":
            return {"event": "opened", **base, "device": obj.get("device"),
                    "monitor_id": obj.get("monitor_id"), "class": obj.get("class"),
                    "class_guid": obj.get("class_guid"),
                    "tx_ring_size": obj.get("tx_ring_size"), "rx_ring_size": obj.get("rx_ring_size")}
        if name == "closed":
            return {"event": "closed", **base, "reason": obj.get("reason")}
        return {"event": name, **base}
    key = "signal" if r.kind is RecordKind.SIGNAL else "interrupt"
    return {"event": key, **base, "count": r.count}


def render_capture_event(ev: dict[str, Any], preview: int) -> str:
    """Text of one ``capture show`` event: enable's wording, with the record and channel."""
    kind = ev["event"]
    where = f"#{ev['record']:<5} relid {ev['relid']}" + (f"/{ev['subchannel']}" if ev["subchannel"] else "")
    ts = stamp(ev)
    if kind == "sent":
        what = "request (completion requested)" if ev["completion_requested"] else "packet"
        body = render_event({**ev, "event": "packet"}, preview).removeprefix(ts).removeprefix("packet    ")
        return f"{ts}{where}  sent      {what}: {body}"
    if kind in ("packet", "closed", "post_started"):
        return f"{ts}{where}  {render_event({k: v for k, v in ev.items() if k != 't'}, preview)}"
    if kind == "opened":
        mon = "not monitored" if ev["monitor_id"] is None else f"monitor_id {ev['monitor_id']}"
        return (f"{ts}{where}  opened    {ev['device']} ({ev['class'] or 'unknown class'}, {mon}), rings "
                f"{ev['tx_ring_size']}/{ev['rx_ring_size']} bytes")
    if kind == "signal":
        return f"{ts}{where}  signal    guest -> host (#{ev['count']})"
    if kind == "interrupt":
        return f"{ts}{where}  interrupt host -> guest (uio event count {ev['count']})"
    if kind == "rescind":
        return f"{ts}{where}  rescind   the host took the device away"
    if kind == "malformed":
        return f"{ts}{where}  malformed {ev['error']}"
    return f"{ts}{where}  {kind}"


@click.group()
def capture() -> None:
    """Read captures made with 'vmbus enable DEVICE --capture FILE' (pcapng; open them in
    Wireshark with contrib/wireshark/vmbus.lua)."""


@capture.command()
@click.argument("file", type=SafePath(dir_okay=False, path_type=Path))
@click.option("--preview", type=click.IntRange(min=0), metavar="N", default=16, show_default=True,
              help="Payload bytes shown per packet.")
@click.option("--packets-only", is_flag=True, help="Leave out signals and interrupts.")
@json_option
@click.pass_obj
def show(state: CliState, file: Path, preview: int, packets_only: bool) -> None:
    """Print FILE as 'vmbus enable' printed the session: lifecycle events, packets both ways
    ('packet': host to guest, 'sent': guest to host), signals and interrupts."""
    cap = read_capture(file)
    out = Output(state.json, preview=preview)
    t0 = cap.records[0].timestamp_ns if cap.records else 0
    out.echo(f"{file}: {len(cap.records)} records, {len(cap.interfaces)} channel(s)"
             + (f", written by {cap.application}" if cap.application else ""))
    for r in cap.records:
        if packets_only and r.kind in (RecordKind.SIGNAL, RecordKind.INTERRUPT):
            continue
        ev = record_event(r, t0, preview)
        out.emit(ev, lambda ev=ev: render_capture_event(ev, preview))  # type: ignore[misc]


def register(group: click.Group) -> None:
    """Add ``capture`` to the ``vmbus`` group (called by pyvmbus.cli)."""
    group.add_command(capture)
