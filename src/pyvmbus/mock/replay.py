"""A mock device built from a capture: the host's side played back, the guest's side checked.

``MockVmbus.add_device(replay="session.pcapng")`` (or ``vmbus mock serve --replay FILE``)
offers a device with the captured device's instance GUID, class and monitor setting, and
runs :class:`ReplayModel` on it. For each open of a channel (the primary, or subchannel
index n) the model takes the next session of that channel in the capture (the records
between its ``opened`` and ``closed`` events) and walks it in order:

- a host->guest packet record is sent at once (posted: never lost to a full ring);
- a guest->host packet record is waited for; what the guest sends is compared with it.

What may differ (the rules)
    Timestamps, signals and interrupts are never compared. The transaction id of a
    guest packet that is not a completion is the guest's own choice: not compared, but
    remembered, so a host completion (or echo) that carried the recorded id goes out
    with the id the guest used this time. A guest completion's id is compared (it names
    a host request the replay sent with its recorded id). Payload bytes the user marks
    as variable are not compared: a ``pyvmbus-vary: 28:36, 40:48`` line in the record's
    packet comment (Wireshark: Edit > Packet Comment; byte ranges of the payload, Python
    slice style, ``*`` for all of it) or ``vary={record: [(start, end)], ...}``.

A mismatch is kept as a diff line (record number, expected, got) and the replay goes
on; :meth:`pyvmbus.mock.MockVmbus.replay_report` returns them and
:meth:`~pyvmbus.mock.MockVmbus.replay_check` raises :class:`ReplayMismatch` with all of
them. The capture's ring sizes are reported next to the mock's: the mock kernel sizes
rings from the class as the generation does, so they differ only across generations.

The script is built in the test's process (:func:`build_script`) and pickled to the host
process, where :data:`SCRIPTS` holds it per instance GUID.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..capture import Capture, Direction, RecordKind, read_capture
from ..errors import VmbusError
from ..packet import Packet, PacketType
from .models import DeviceModel, HostChannel, register_model

__all__ = ["RESCIND", "SCRIPTS", "ReplayMismatch", "ReplayModel", "Script", "Step", "build_script",
           "parse_vary"]

Ranges = tuple[tuple[int, int], ...]
RESCIND = -1
"""Step.type of a host step that rescinds the device (the capture's ``rescind`` event)."""
_ALL: Ranges = ((0, 1 << 31),)
_VARY = re.compile(r"pyvmbus-vary:\s*(.*)")


class ReplayMismatch(VmbusError):
    """The guest did not do what the capture recorded: every diff, one per line."""

    def __init__(self, device: str, diffs: list[str], *, listed: bool = False) -> None:
        self.device = device
        self.diffs = diffs
        if listed:  # the diffs were printed already (vmbus mock serve's verdict)
            super().__init__(f"replay of {device}: {len(diffs)} difference(s) from the capture "
                             "(listed in the replay verdict above)")
            return
        lines = "\n  ".join(diffs)
        super().__init__(f"replay of {device}: {len(diffs)} difference(s) from the capture:\n  {lines}")


def parse_vary(text: str, where: str = "") -> Ranges:
    """``"28:36, 40:48"`` or ``"*"`` -> ((28, 36), (40, 48)); ValueError naming ``where``."""
    text = text.strip()
    if text == "*":
        return _ALL
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            a, _, b = part.partition(":")
            start, end = int(a, 0), int(b, 0)
        except ValueError:
            raise ValueError(f"{where}bad pyvmbus-vary range {part!r}: write START:END (bytes of the "
                             "payload, e.g. 28:36) or *") from None
        if not 0 <= start < end:
            raise ValueError(f"{where}bad pyvmbus-vary range {part!r}: need 0 <= START < END")
        out.append((start, end))
    return tuple(out)


@dataclass(frozen=True)
class Step:
    """One packet record of a session: sent (host) or expected (guest)."""

    number: int
    host: bool
    type: int
    flags: int
    transaction_id: int
    payload: bytes
    vary: Ranges = ()
    extra_header: bytes = b""
    delay: float = 0.0
    """A rescind: seconds after the channel opened that it came in the capture (not sooner)."""

    def describe(self, pkt: Packet | None = None) -> str:
        if pkt is None and self.type == RESCIND:
            return "rescind"
        p = pkt if pkt is not None else self
        return (f"{_tname(p.type)} flags={p.flags:#x} txid={p.transaction_id} len={len(p.payload)} "
                f"payload {_hex(p.payload)}")


def _tname(t: int) -> str:
    try:
        return PacketType(t).name
    except ValueError:
        return f"{t:#x}"


def _hex(data: bytes, limit: int = 48) -> str:
    return data[:limit].hex() + ("..." if len(data) > limit else "") if data else "(empty)"


@dataclass
class Script:
    """What the replay model plays for one device (built by :func:`build_script`)."""

    source: str
    device: str
    class_guid: str | None
    monitored: bool
    ring_sizes: dict[int, int | None]
    sessions: dict[int, list[list[Step]]]
    """subchannel index -> sessions (one per open) -> steps in order."""
    offers: dict[int, tuple[int, int]] = field(default_factory=dict)
    """primary session -> (steps played before, subchannel count): when to offer subchannels."""
    opens: dict[int, int] = field(default_factory=dict)
    diffs: list[str] = field(default_factory=list)
    matched: int = 0
    played: int = 0
    pending: dict[int, list[Step]] = field(default_factory=dict)
    """Steps not reached when a channel closed (or still waiting while it is open)."""

    def report(self) -> dict[str, Any]:
        expected = sum(1 for subs in self.sessions.values() for s in subs for st in s if not st.host)
        missing = [f"record {st.number}: expected guest->host {st.describe()}, got nothing (the "
                   "channel closed or is still open)" for steps in self.pending.values() for st in steps
                   if not st.host]
        unopened = [f"subchannel {sub} session {i + 1} (record {subs[i][0].number}) was never opened"
                    for sub, subs in self.sessions.items() for i in range(self.opens.get(sub, 0), len(subs))
                    if subs[i]]
        diffs = [*self.diffs, *missing, *unopened]
        waiting = len(missing) + sum(1 for sub, subs in self.sessions.items()
                                     for i in range(self.opens.get(sub, 0), len(subs))
                                     for st in subs[i] if not st.host)
        return {"device": self.device, "source": self.source, "ok": not diffs, "expected": expected,
                "matched": self.matched, "played": self.played, "pending": waiting, "diffs": diffs,
                "ring_sizes": dict(self.ring_sizes)}


def build_script(capture: Capture | str | os.PathLike[str], device: str | None = None,
                 vary: dict[int, Any] | None = None) -> Script:
    """The replay script of ``device`` (default: the only device opened in the capture).

    ``vary``: record number -> ranges (``[(28, 36)]`` or ``"28:36"`` or ``"*"``), on top of
    the ``pyvmbus-vary:`` comments in the file. ValueError says what is wrong with the file.
    """
    cap = capture if isinstance(capture, Capture) else read_capture(capture)
    devices = cap.devices()
    if device is None:
        if len(devices) != 1:
            raise ValueError(f"capture {cap.path} has {len(devices)} devices "
                             f"({', '.join(devices) or 'none opened'}): name the one to replay")
        device = devices[0]
    device = device.lower().strip("{}")
    if device not in devices:
        raise ValueError(f"capture {cap.path} has no channel of device {device} (it has "
                         f"{', '.join(devices) or 'none'})")
    extra_vary: dict[int, Ranges] = {}
    for num, spec in (vary or {}).items():
        extra_vary[int(num)] = parse_vary(spec, f"vary[{num}]: ") if isinstance(spec, str) \
            else tuple((int(a), int(b)) for a, b in spec)
    ifaces: dict[int, int] = {}  # interface -> subchannel index, for this device's channels
    sessions: dict[int, list[list[Step]]] = {}
    current: dict[int, list[Step] | None] = {}
    class_guid: str | None = None
    monitored = False
    rings: dict[int, int | None] = {}
    offers: dict[int, tuple[int, int]] = {}
    opened_at: dict[int, int] = {}
    for r in cap.records:
        if r.kind is RecordKind.EVENT:
            ev = r.event
            if ev["event"] == "opened":
                if str(ev.get("device", "")).lower() != device:
                    continue
                sub = int(ev.get("subchannel") or 0)
                ifaces[r.interface] = sub
                steps: list[Step] = []
                opened_at[sub] = r.timestamp_ns
                sessions.setdefault(sub, []).append(steps)
                current[sub] = steps
                if sub == 0:
                    class_guid = ev.get("class_guid") or class_guid
                    monitored = ev.get("monitor_id") is not None
                    rings[0] = ev.get("tx_ring_size")
                elif current.get(0) is not None:
                    # the host offered subchannels during this primary session: offer as many,
                    # once the primary has got as far as it had when the first one opened
                    index = len(sessions[0]) - 1
                    at, count = offers.get(index, (len(sessions[0][-1]), 0))
                    offers[index] = (at, max(count, sub))
                    rings[sub] = ev.get("tx_ring_size")
            elif ev["event"] == "rescind" and ifaces.get(r.interface) == 0:
                target = current.get(0)
                if target is not None:  # the host takes the device away here: a host step
                    delay = max(0.0, (r.timestamp_ns - opened_at.get(0, r.timestamp_ns)) / 1e9)
                    target.append(Step(r.number, True, RESCIND, 0, 0, b"", delay=delay))
            elif ev["event"] == "closed" and r.interface in ifaces:
                current[ifaces[r.interface]] = None
            continue
        if r.kind is not RecordKind.PACKET or r.interface not in ifaces:
            continue
        target = current.get(ifaces[r.interface])
        if target is None:
            continue
        try:
            pkt = r.packet
        except ValueError as exc:
            raise ValueError(f"capture {cap.path}: {exc}") from None
        ranges = extra_vary.get(r.number, ())
        m = _VARY.search(r.comment)
        if m:
            ranges = ranges + parse_vary(m.group(1), f"record {r.number} comment: ")
        target.append(Step(r.number, r.direction is Direction.HOST_TO_GUEST, pkt.type, pkt.flags,
                           pkt.transaction_id, pkt.payload, ranges, pkt.extra_header))
    return Script(cap.path, device, class_guid, monitored, rings, sessions, offers)


SCRIPTS: dict[str, Script] = {}
"""In the host process: instance GUID -> its script (MockVmbus.add_device(replay=...))."""


def _first_difference(want: bytes, got: bytes, vary: Ranges) -> int | None:
    n = max(len(want), len(got))
    for i in range(n):
        if any(a <= i < b for a, b in vary):
            continue
        if i >= len(want) or i >= len(got) or want[i] != got[i]:
            return i
    return None


class _Session:
    def __init__(self, script: Script, sub: int, steps: list[Step],
                 offer: tuple[int, int] | None = None) -> None:
        self.script = script
        self.sub = sub
        self.steps = list(steps)
        self.pos = 0
        self.txids: dict[int, int] = {}
        self.offer = offer
        self.rescind_due = False
        self.opened_at = time.monotonic()
        self.rescind_at = 0.0
        script.pending[sub] = self.steps

    def play(self, chan: HostChannel) -> None:
        if self.offer is not None and self.pos >= self.offer[0]:
            count, self.offer = self.offer[1], None
            host = getattr(chan, "host", None)  # the mock host (pyvmbus.mock.host._Chan)
            if host is not None:
                host.offer_subchannels(str(chan.instance), count)
                chan.log(f"replay: offered {count} subchannel(s), as the capture had")
        steps = self.steps
        while self.pos < len(steps) and steps[self.pos].host:
            st = steps[self.pos]
            self.pos += 1
            if st.type == RESCIND:
                self.rescind_due = True  # done by tick(), outside the host's drain, not sooner
                self.rescind_at = self.opened_at + st.delay  # than it came in the capture
                self.script.played += 1
                break
            txid = st.transaction_id
            if txid in self.txids and (st.type == PacketType.COMP or st.type == PacketType.DATA_INBAND):
                txid = self.txids[txid]
            chan.post(st.payload, st.type, st.flags, txid, st.extra_header)
            self.script.played += 1
        self.script.pending[self.sub] = steps[self.pos:]

    def check(self, pkt: Packet) -> None:
        steps = self.steps
        if self.pos >= len(steps):
            last = steps[-1].number if steps else "none"
            got = Step.describe(steps[0], pkt) if steps else str(pkt)
            self.script.diffs.append(f"after record {last}: the capture has no more guest packets on "
                                     f"subchannel {self.sub}, got {got}")
            return
        st = steps[self.pos]
        self.pos += 1
        why = []
        if pkt.type != st.type:
            why.append(f"type {_tname(pkt.type)}, expected {_tname(st.type)}")
        if pkt.flags != st.flags:
            why.append(f"flags {pkt.flags:#x}, expected {st.flags:#x}")
        if st.type == PacketType.COMP:
            if pkt.transaction_id != st.transaction_id:
                why.append(f"completion txid {pkt.transaction_id}, expected {st.transaction_id}")
        elif pkt.transaction_id != st.transaction_id:
            self.txids[st.transaction_id] = pkt.transaction_id
        if pkt.extra_header != st.extra_header:
            why.append(f"extra header {_hex(pkt.extra_header)}, expected {_hex(st.extra_header)}")
        if len(pkt.payload) != len(st.payload) and st.vary != _ALL:
            why.append(f"payload length {len(pkt.payload)}, expected {len(st.payload)}")
        diff = _first_difference(st.payload, pkt.payload, st.vary)
        if diff is not None and len(pkt.payload) == len(st.payload):
            why.append(f"payload byte {diff} is {pkt.payload[diff]:#04x}, expected {st.payload[diff]:#04x}")
        if why:
            self.script.diffs.append(
                f"record {st.number} (guest->host, subchannel {self.sub}): {'; '.join(why)}\n"
                f"      expected {st.describe()}\n      got      {st.describe(pkt)}")
        else:
            self.script.matched += 1


@register_model
class ReplayModel(DeviceModel):
    """The host of a replayed device: plays the capture's host packets, checks the guest's."""

    name = "replay"
    class_name = "replay"

    def __init__(self) -> None:
        self.session: _Session | None = None

    def opened(self, chan: HostChannel) -> None:
        script = SCRIPTS.get(str(chan.instance))
        if script is None:
            chan.log("replay: no script for this device")
            return
        sub = chan.subchannel_index
        n = script.opens.get(sub, 0)
        script.opens[sub] = n + 1
        sessions = script.sessions.get(sub, [])
        if n >= len(sessions):
            script.diffs.append(f"subchannel {sub} opened {n + 1} time(s); the capture has {len(sessions)} "
                                "session(s) of it")
            return
        self.session = _Session(script, sub, sessions[n], script.offers.get(n) if sub == 0 else None)
        self.session.play(chan)

    def packet(self, chan: HostChannel, pkt: Packet) -> None:
        if self.session is None:
            return
        self.session.check(pkt)
        self.session.play(chan)

    def tick(self, chan: HostChannel, now: float) -> None:
        session = self.session
        if session is not None and session.rescind_due and now >= session.rescind_at:
            session.rescind_due = False
            host = getattr(chan, "host", None)  # the mock host (pyvmbus.mock.host._Chan)
            if host is not None:
                chan.log("replay: rescind, as the capture had")
                host.rescind(str(chan.instance))

    def command(self, chan: HostChannel, name: str, args: dict[str, Any]) -> Any:
        if name == "report":
            script = SCRIPTS.get(str(chan.instance))
            return script.report() if script is not None else None
        return super().command(chan, name, args)
