"""pcapng capture of a channel's traffic, and reading it back (issue 12; replay lives in mock/).

``Channel(root, guid, capture="session.pcapng")`` or ``channel.capture(path)`` records,
on the primary and each subchannel, every packet in both directions (the whole
``vmpacket_descriptor``, its extra header and the payload as the ring held it), the
lifecycle events (opened, post_started, rescind, closed with its reason), each signal
the guest sent the host and each interrupt (uio event) it took. ``vmbus enable DEVICE
--capture FILE`` does the same from the command line, ``vmbus capture show FILE`` prints
a capture back, Wireshark / tshark decode it with ``contrib/wireshark/vmbus.lua``, and
``MockVmbus.add_device(replay=FILE)`` turns it into a mock device.

The file format (docs/capture.md has it byte by byte)
    One pcapng section (little-endian), one Interface Description Block per channel
    (link type :data:`LINKTYPE` = LINKTYPE_USER12, nanosecond timestamps), one Enhanced
    Packet Block per record. Each record's data starts with the 16-byte pseudo-header
    :data:`PSEUDO` (magic ``VB``, version, record kind, direction, flags, subchannel
    index, relid, sequence number), then: for a packet, the VMBus packet exactly as it
    sat in the ring (descriptor + extra header + payload + padding to 8, without the
    8-byte trailer); for an event, a UTF-8 JSON object; for a signal or an interrupt, a
    u64 count.

Why a writer of our own and not python-pcapng (the one pure-Python pcapng library on
PyPI that writes as well as reads): its last release is from 2022, it has no type
hints, and it costs ~50 µs to write one Enhanced Packet Block here (a block object and
option validation per packet) -- more than a whole round trip through the mock, where
the issue allows capture 20 % of it. The blocks we need are three fixed layouts; this
module packs a packet record with one ``struct`` call and reads any pcapng
section Wireshark writes back (either byte order, unknown blocks skipped), so a capture
edited in Wireshark still replays.

Cost when capture is off: the channel checks one attribute per write and one per read
batch. When on: a :class:`ChannelTap` queues one numbered tuple per record (a TX packet
is numbered before its ring write, so a reply is never recorded before the request
that caused it), and the :class:`CaptureWriter` packs the queue in number order in bulk
(every :attr:`CaptureWriter.QUEUE_LIMIT` records, at every channel close, at close()).
It also reads gzip-compressed captures (``FILE.pcapng.gz``), as Wireshark does.

Imports: only the layers below (errors, packet, ring types); the channel imports this
module lazily when a capture is asked for.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import enum
import itertools
import json
import logging
import operator
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from .errors import RingCorrupt, UsageError
from .packet import DESCRIPTOR_SIZE, Packet, PacketType, parse_gpa_direct, parse_transfer_pages

if TYPE_CHECKING:
    from .ring import RingBuffer
    from .signal import HostSignal

__all__ = [
    "LINKTYPE",
    "PSEUDO",
    "PSEUDO_MAGIC",
    "PSEUDO_VERSION",
    "Capture",
    "CaptureError",
    "CaptureWriter",
    "ChannelTap",
    "Direction",
    "Interface",
    "Record",
    "RecordKind",
    "read_capture",
    "write_capture",
]

_log = logging.getLogger(__name__)

LINKTYPE: Final = 159
"""LINKTYPE_USER12 (DLT_USER12). The user range (147-162) is the one tcpdump.org reserves
for private formats; the low ones (USER0, USER1) are what tutorials and ad-hoc tools grab
first, so a user's Wireshark may already map them to something else. 12 is free of that
habit, and the dissector also checks the pseudo-header's magic before it claims a frame."""
PSEUDO_MAGIC: Final = b"VB"
PSEUDO_VERSION: Final = 1
PSEUDO: Final = struct.Struct("<2sBBBBHII")
"""magic "VB", version u8, kind u8, direction u8, flags u8, subchannel u16, relid u32, seq u32."""
NO_RELID: Final = 0xFFFF_FFFF
"""relid field of a record whose channel has no relid (never written by a channel)."""

_SHB_TYPE = 0x0A0D0D0A
_IDB_TYPE = 0x00000001
_EPB_TYPE = 0x00000006
_BOM = 0x1A2B3C4D
_OPT_COMMENT = 1
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_SHB_USERAPPL = 4
_EPB_HEAD = struct.Struct("<IIIIIII")  # type, total length, interface, ts high, ts low, caplen, origlen
_DESC = struct.Struct("<HHHHQ")
# One call packs the EPB header, the pseudo-header and the descriptor of a packet record.
_PKT_HEAD = struct.Struct("<IIIIIII2sBBBBHIIHHHHQ")
_U32 = struct.Struct("<I")
_COUNT_REC = struct.Struct("<IIIIIII2sBBBBHIIQI")  # a whole signal / interrupt EPB
_U64 = struct.Struct("<Q")
_PAD_TAIL = tuple(struct.Struct(f"<{pad}xI") for pad in range(8))
"""Zero padding of a TX payload to 8 (as the ring holds it) plus the EPB's closing length."""


class RecordKind(enum.IntEnum):
    """Pseudo-header byte 3: what a record is."""

    PACKET = 1
    """A VMBus packet (descriptor, extra header, payload) as the ring held it."""
    EVENT = 2
    """A lifecycle event: UTF-8 JSON ``{"event": "opened" | "post_started" | "rescind" | "closed", ...}``."""
    SIGNAL = 3
    """The guest signalled the host for this channel: u64 signals so far on it."""
    INTERRUPT = 4
    """The guest consumed a uio event (an interrupt) for the device: u64 kernel event count."""


class Direction(enum.IntEnum):
    """Pseudo-header byte 4: which way a record went."""

    GUEST_TO_HOST = 0
    """Written into the TX ring (or a signal to the host)."""
    HOST_TO_GUEST = 1
    """Read from the RX ring (or an interrupt from the host)."""
    LOCAL = 2
    """Neither: a lifecycle event of the guest's channel."""


class CaptureError(UsageError):
    """A capture file cannot be read (not pcapng, truncated, not a pyvmbus capture) or written."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = str(path)
        self.detail = detail
        super().__init__(f"capture {self.path}: {detail}")


@dataclass(frozen=True)
class Interface:
    """One Interface Description Block: one channel of one device."""

    index: int
    name: str
    description: str = ""
    link_type: int = LINKTYPE
    tsresol: int = 1_000_000_000
    """Timestamp units per second (if_tsresol; pyvmbus writes nanoseconds)."""


@dataclass(frozen=True)
class Record:
    """One Enhanced Packet Block of a capture, its pseudo-header decoded.

    ``number`` is its position among the file's records (1-based, as Wireshark's frame
    number); ``seq`` the sequence number the writer gave it (kept when a file is edited);
    ``data`` what follows the pseudo-header; ``comment`` the block's comment, if any
    (Wireshark's packet comment: replay reads ``pyvmbus-vary:`` lines from it).
    """

    number: int
    interface: int
    timestamp_ns: int
    kind: RecordKind
    direction: Direction
    relid: int
    subchannel: int
    seq: int
    data: bytes
    comment: str = ""
    flags: int = 0

    # -- packets ---------------------------------------------------------------------------
    @property
    def descriptor(self) -> tuple[int, int, int, int, int]:
        """(type, offset8, len8, flags, transaction_id) of a packet record."""
        if self.kind is not RecordKind.PACKET or len(self.data) < DESCRIPTOR_SIZE:
            raise ValueError(f"record {self.number} is not a packet record")
        t, off8, len8, flags, txid = _DESC.unpack_from(self.data)
        return t, off8, len8, flags, txid

    @property
    def packet(self) -> Packet:
        """The packet as a reader got it (payload from offset8*8 to len8*8, padding included).

        ValueError when the descriptor's offsets do not fit the record (an edited file).
        """
        t, off8, len8, flags, txid = self.descriptor
        off, end = off8 * 8, len8 * 8
        if not DESCRIPTOR_SIZE <= off <= end <= len(self.data):
            raise ValueError(f"record {self.number}: offset8={off8} len8={len8} do not fit its "
                             f"{len(self.data)} bytes")
        extra = self.data[DESCRIPTOR_SIZE:off]
        tp = gpa = None
        with contextlib.suppress(RingCorrupt):
            if t == PacketType.DATA_USING_XFER_PAGES:
                tp = parse_transfer_pages(extra)
            elif t == PacketType.DATA_USING_GPA_DIRECT:
                gpa = parse_gpa_direct(extra)
        return Packet(t, flags, txid, self.data[off:end], extra, tp, gpa)

    # -- events ----------------------------------------------------------------------------
    @property
    def event(self) -> dict[str, Any]:
        """The JSON object of an event record."""
        if self.kind is not RecordKind.EVENT:
            raise ValueError(f"record {self.number} is not an event record")
        try:
            obj = json.loads(self.data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"record {self.number}: event is not UTF-8 JSON: {exc}") from None
        if not isinstance(obj, dict) or "event" not in obj:
            raise ValueError(f"record {self.number}: event JSON has no 'event' key")
        return obj

    @property
    def count(self) -> int:
        """The u64 count of a signal or interrupt record."""
        return int(_U64.unpack_from(self.data)[0]) if len(self.data) >= 8 else 0


@dataclass
class Capture:
    """A capture read back: its interfaces (channels) and records, in file order."""

    path: str
    interfaces: list[Interface] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    application: str = ""

    def packets(self) -> Iterator[Record]:
        """The packet records."""
        return (r for r in self.records if r.kind is RecordKind.PACKET)

    def events(self) -> Iterator[Record]:
        """The lifecycle event records."""
        return (r for r in self.records if r.kind is RecordKind.EVENT)

    def devices(self) -> list[str]:
        """Instance GUIDs of the devices whose channels were opened in this capture, in order."""
        out: list[str] = []
        for r in self.events():
            with contextlib.suppress(ValueError):
                ev = r.event
                dev = ev.get("device")
                if ev["event"] == "opened" and isinstance(dev, str) and dev not in out:
                    out.append(dev)
        return out


# -- reading ---------------------------------------------------------------------------------------


def _options(raw: bytes, endian: str) -> Iterator[tuple[int, bytes]]:
    pos = 0
    head = struct.Struct(endian + "HH")
    while pos + 4 <= len(raw):
        code, length = head.unpack_from(raw, pos)
        pos += 4
        if code == 0:
            return
        yield code, raw[pos:pos + length]
        pos += (length + 3) & ~3


def _tsresol(value: bytes) -> int:
    if not value:
        return 1_000_000
    b = value[0]
    return int(2 ** (b & 0x7F) if b & 0x80 else 10 ** b)


_MAX_STREAM = 64 << 20
"""The most :func:`read_capture` reads from something that is not a regular file."""


_MAX_GUNZIP = 1 << 30
"""The most :func:`read_capture` decompresses from a gzip-compressed capture: a few KiB of
gzip can expand to GiBs (a "zip bomb"), which would take the guest's memory, not just ours."""


def _gunzip(p: Path, blob: bytes) -> bytes:
    """``blob`` decompressed (every gzip member, as gzip.decompress), at most :data:`_MAX_GUNZIP`."""
    import gzip
    import io

    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as z:
            out = z.read(_MAX_GUNZIP + 1)
    except (OSError, EOFError) as exc:
        raise CaptureError(p, f"gzip-compressed but cannot be decompressed: {exc}") from None
    if len(out) > _MAX_GUNZIP:
        raise CaptureError(p, f"gzip-compressed, and more than {_MAX_GUNZIP >> 20} MiB once "
                           "decompressed (a gzip bomb?); if it really is that large, gunzip it "
                           "first and give the pcapng file")
    return out


def read_capture(path: str | os.PathLike[str]) -> Capture:
    """Read a pcapng file written by pyvmbus (or edited and saved by Wireshark / editcap;
    gzip-compressed too, as Wireshark reads them).

    :class:`CaptureError` names the file and what is wrong: not pcapng, a truncated or
    malformed block, a record whose interface is not a pyvmbus channel (another link
    type) or whose pseudo-header is not ours.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                blob = f.read()
            else:  # a pipe or a device: read no more than any capture of ours could hold
                blob = f.read(_MAX_STREAM + 1)
                if len(blob) > _MAX_STREAM:
                    raise CaptureError(p, f"not a regular file, and more than {_MAX_STREAM >> 20} MiB "
                                       "came from it (/dev/zero?): give a capture file")
    except OSError as exc:
        raise CaptureError(p, f"cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise CaptureError(p, f"cannot read it: {exc}") from None
    if blob[:2] == b"\x1f\x8b":  # gzip-compressed, as Wireshark also reads (FILE.pcapng.gz)
        blob = _gunzip(p, blob)
    cap = Capture(str(p))
    pos = 0
    endian = "<"
    number = 0
    section = False
    while pos < len(blob):
        if pos + 12 > len(blob):
            raise CaptureError(p, f"truncated block header at byte {pos}")
        btype_le = _U32.unpack_from(blob, pos)[0]
        if btype_le == _SHB_TYPE:
            bom = blob[pos + 8:pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError(p, f"bad byte-order magic in the section header at byte {pos}")
            section = True
            cap.interfaces = []  # interface numbers restart in every section
        elif not section:
            raise CaptureError(p, "not a pcapng file (no section header block at the start; a "
                               "classic .pcap? save it as pcapng)")
        btype, blen = struct.unpack_from(endian + "II", blob, pos)
        if blen < 12 or blen % 4 or pos + blen > len(blob):
            raise CaptureError(p, f"block at byte {pos} claims {blen} bytes; the file is truncated "
                               "or corrupt")
        body = blob[pos + 8:pos + blen - 4]
        if btype == _SHB_TYPE:
            if len(body) >= 16:
                for code, value in _options(body[16:], endian):
                    if code == _SHB_USERAPPL:
                        cap.application = value.decode("utf-8", "replace")
        elif btype == _IDB_TYPE:
            if len(body) < 8:
                raise CaptureError(p, f"short interface block at byte {pos}")
            link = struct.unpack_from(endian + "H", body, 0)[0]
            name = desc = ""
            res = 1_000_000
            for code, value in _options(body[8:], endian):
                if code == _IF_NAME:
                    name = value.decode("utf-8", "replace")
                elif code == _IF_DESCRIPTION:
                    desc = value.decode("utf-8", "replace")
                elif code == _IF_TSRESOL:
                    res = _tsresol(value)
            cap.interfaces.append(Interface(len(cap.interfaces), name, desc, link, res))
        elif btype == _EPB_TYPE:
            number += 1
            cap.records.append(_record(p, cap, body, endian, number, pos))
        pos += blen
    if not section:
        raise CaptureError(p, "empty file (no pcapng section)")
    return cap


def _record(p: Path, cap: Capture, body: bytes, endian: str, number: int, pos: int) -> Record:
    if len(body) < 20:
        raise CaptureError(p, f"record {number} (byte {pos}): short enhanced packet block")
    iface, hi, lo, caplen, _orig = struct.unpack_from(endian + "IIIII", body, 0)
    if iface >= len(cap.interfaces):
        raise CaptureError(p, f"record {number}: interface {iface} was never described")
    itf = cap.interfaces[iface]
    if itf.link_type != LINKTYPE:
        raise CaptureError(p, f"record {number}: interface {iface} has link type {itf.link_type}, "
                           f"not {LINKTYPE} (LINKTYPE_USER12, a pyvmbus capture)")
    if 20 + caplen > len(body):
        raise CaptureError(p, f"record {number}: captured length {caplen} overruns its block")
    data = body[20:20 + caplen]
    if len(data) < PSEUDO.size:
        raise CaptureError(p, f"record {number}: {len(data)} bytes, shorter than the pseudo-header")
    magic, version, kind, direction, flags, sub, relid, seq = PSEUDO.unpack_from(data)
    if magic != PSEUDO_MAGIC or version != PSEUDO_VERSION:
        raise CaptureError(p, f"record {number}: pseudo-header magic {magic!r} version {version}, "
                           f"expected {PSEUDO_MAGIC!r} version {PSEUDO_VERSION}")
    try:
        rkind, rdir = RecordKind(kind), Direction(direction)
    except ValueError:
        raise CaptureError(p, f"record {number}: unknown record kind {kind} or direction "
                           f"{direction}") from None
    comment = ""
    for code, value in _options(body[20 + ((caplen + 3) & ~3):], endian):
        if code == _OPT_COMMENT:
            comment = (comment + "\n" if comment else "") + value.decode("utf-8", "replace")
    ts = (hi << 32 | lo) * 1_000_000_000 // itf.tsresol
    return Record(number, iface, ts, rkind, rdir, relid, sub, seq, data[PSEUDO.size:], comment, flags)


# -- writing ---------------------------------------------------------------------------------------


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def _shb(application: str) -> bytes:
    opts = _option(_SHB_USERAPPL, application.encode()) + _option(0, b"")
    return _block(_SHB_TYPE, struct.pack("<IHHq", _BOM, 1, 0, -1) + opts)


def _idb(name: str, description: str) -> bytes:
    opts = (_option(_IF_NAME, name.encode()) + _option(_IF_DESCRIPTION, description.encode())
            + _option(_IF_TSRESOL, b"\x09") + _option(0, b""))
    return _block(_IDB_TYPE, struct.pack("<HHI", LINKTYPE, 0, 0) + opts)


def _epb(iface: int, ts_ns: int, data: bytes, comment: str = "") -> bytes:
    pad = bytes(-len(data) % 4)
    opts = (_option(_OPT_COMMENT, comment.encode()) + _option(0, b"")) if comment else b""
    body = _EPB_HEAD.pack(0, 0, iface, ts_ns >> 32, ts_ns & 0xFFFF_FFFF, len(data), len(data))[8:]
    return _block(_EPB_TYPE, body + data + pad + opts)


def _app() -> str:
    from . import __version__

    return f"pyvmbus {__version__}"


def write_capture(path: str | os.PathLike[str], interfaces: Sequence[Interface],
                  records: Iterable[Record]) -> None:
    """Write ``records`` (edited or not) to a new pcapng file: how a capture is edited.

    Records keep their interface, timestamp, pseudo-header fields and comment; their
    ``number`` is ignored (the file order is what counts). Timestamps are written in ns.
    """
    p = Path(path)
    try:
        with open(p, "wb") as f:
            f.write(_shb(_app()))
            for itf in interfaces:
                f.write(_idb(itf.name, itf.description))
            for r in records:
                head = PSEUDO.pack(PSEUDO_MAGIC, PSEUDO_VERSION, r.kind, r.direction, r.flags, r.subchannel,
                                   r.relid, r.seq)
                f.write(_epb(r.interface, r.timestamp_ns, head + r.data, r.comment))
    except OSError as exc:
        raise CaptureError(p, f"cannot write it: {exc.strerror or exc}") from None


class CaptureWriter:
    """An open capture file; :class:`ChannelTap` objects queue each channel's records into it.

    Made by :meth:`pyvmbus.Channel.capture` (or ``Channel(capture=...)``); pass the same
    writer to several channels to get several devices in one file. The taps only queue
    a small tuple per record, numbered from one counter at the moment it happened (for a
    TX packet: before the ring write, under the channel's TX lock, so the reply can only
    get a later number); :meth:`flush` sorts the queue, writes the records in number
    order (holding back any that waits for an earlier number still in flight) and
    flushes the file. It runs at every channel close, when the queue passes
    :attr:`QUEUE_LIMIT`, and at :meth:`close`. A write error (disk full) stops the
    capture with a logged warning and never reaches the channel.
    """

    QUEUE_LIMIT = 2048
    """Records queued before the next tap call writes them out."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "wb", buffering=1 << 20)  # noqa: SIM115
            self._file.write(_shb(_app()))
        except OSError as exc:
            raise CaptureError(self.path, f"cannot write it: {exc.strerror or exc}") from None
        self.records = 0
        """Records written to the file so far (each one's ``seq`` in the pseudo-header)."""
        self.live = True
        """False once closed or after a write error."""
        self.next_seq = itertools.count(1).__next__
        """The record counter (thread-safe under the GIL): taken when a thing happens."""
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self.put = self._queue.append
        """Queue one record tuple ``(seq, kind, ...)`` (a deque append: thread-safe)."""
        self._held: list[tuple[Any, ...]] = []
        self._next_written = 1
        self._lock = threading.Lock()  # one flusher at a time; interface table
        self._interfaces: dict[tuple[str, int], int] = {}
        # A program that exits with the channel still open keeps what was recorded.
        atexit.register(_close_at_exit, weakref.ref(self))

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CaptureWriter {self.path} records={self.records}{'' if self.live else ' closed'}>"

    def interface(self, name: str, relid: int, description: str) -> int:
        """The interface number of channel (``name``, ``relid``); a new IDB the first time."""
        key = (name, relid)
        with self._lock:
            idx = self._interfaces.get(key)
            if idx is None:
                idx = self._interfaces[key] = len(self._interfaces)
                self.put((self.next_seq(), _Q_BLOCK, _idb(f"vmbus:{name}", description)))
            return idx

    def tap(self, name: str, relid: int, subchannel: int, description: str) -> ChannelTap:
        """A tap for one channel (its interface made on first use)."""
        return ChannelTap(self, self.interface(name, relid, description), relid, subchannel)

    def flush(self, final: bool = False) -> None:
        """Write the queued records in order and flush the file; ``final``: all of them,
        even past a number still in flight (the channel is gone)."""
        with self._lock:
            if self.live:
                self._write_queued(final)
                if self.live:
                    try:
                        self._file.flush()
                    except (OSError, ValueError) as exc:
                        self._failed(exc)

    def maybe_flush(self) -> None:
        """From a tap: write out a long queue unless someone else is writing already."""
        if len(self._queue) > self.QUEUE_LIMIT and self._lock.acquire(blocking=False):
            try:
                if self.live:
                    self._write_queued(False)
            finally:
                self._lock.release()

    def _write_queued(self, final: bool) -> None:
        """Holding the lock: serialise the queued records in seq order, one file write."""
        q = self._queue
        items = self._held
        pop = q.popleft
        for _ in range(len(q)):
            items.append(pop())
        items.sort(key=_FIRST)
        nxt = self._next_written
        n = self.records
        out: list[bytes] = []
        add = out.append
        done = 0
        # A packet's block: 28-byte EPB header + 16-byte pseudo-header + the packet (plen,
        # a multiple of 8, so no pcapng padding) + the 4-byte closing length: 48 + plen.
        for item in items:
            seq = item[0]
            if seq != nxt and not final:
                break  # an earlier record is still being made on another thread
            nxt = seq + 1
            done += 1
            kind = item[1]
            if kind == _Q_TX:
                _, _, ts, iface, relid, sub, payload, ptype, flags, txid = item
                if payload.__class__ is not bytes:
                    payload = (b"".join(bytes(p) for p in payload) if isinstance(payload, (list, tuple))
                               else bytes(memoryview(payload).cast("B")))
                ln = len(payload)
                plen = (DESCRIPTOR_SIZE + ln + 7) & ~7
                total = 48 + plen
                n += 1
                add(_PKT_HEAD.pack(_EPB_TYPE, total, iface, ts >> 32, ts & 0xFFFF_FFFF, total - 32,
                                   total - 32, PSEUDO_MAGIC, PSEUDO_VERSION, 1, 0, 0, sub, relid, n,
                                   ptype, 2, plen >> 3, flags, txid))
                add(payload)
                add(_PAD_TAIL[plen - DESCRIPTOR_SIZE - ln].pack(total))
            elif kind == _Q_RX:
                _, _, ts, iface, relid, sub, pkts = item
                hi, lo = ts >> 32, ts & 0xFFFF_FFFF
                for pkt in pkts:
                    extra = pkt.extra_header
                    off = DESCRIPTOR_SIZE + len(extra)
                    plen = off + len(pkt.payload)
                    total = 48 + plen
                    n += 1
                    add(_PKT_HEAD.pack(_EPB_TYPE, total, iface, hi, lo, total - 32, total - 32,
                                       PSEUDO_MAGIC, PSEUDO_VERSION, 1, 1, 0, sub, relid, n, pkt.type,
                                       off >> 3, plen >> 3, pkt.flags, pkt.transaction_id))
                    if extra:
                        add(extra)
                    add(pkt.payload)
                    add(_U32.pack(total))
            elif kind == _Q_COUNT:
                _, _, ts, iface, relid, sub, rkind, direction, count = item
                n += 1
                add(_COUNT_REC.pack(_EPB_TYPE, _COUNT_REC.size, iface, ts >> 32, ts & 0xFFFF_FFFF, 24, 24,
                                    PSEUDO_MAGIC, PSEUDO_VERSION, rkind, direction, 0, sub, relid, n,
                                    count & 0xFFFF_FFFF_FFFF_FFFF, _COUNT_REC.size))
            elif kind == _Q_EVENT:
                _, _, ts, iface, relid, sub, body = item
                n += 1
                head = PSEUDO.pack(PSEUDO_MAGIC, PSEUDO_VERSION, RecordKind.EVENT, Direction.LOCAL, 0, sub,
                                   relid, n)
                add(_epb(iface, ts, head + body))
            elif kind == _Q_BLOCK:
                add(item[2])
            # _Q_NONE: a number taken by a write that failed (ring full): nothing to write
        self._held = items[done:]
        self._next_written = nxt
        self.records = n
        if out:
            try:
                self._file.write(b"".join(out))
            except (OSError, ValueError) as exc:
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """A write failed (disk full, file closed under us): stop capturing, keep the channel."""
        if self.live:
            self.live = False
            self.put = _drop
            self._queue.clear()
            self._held = []
            _log.warning("capture %s stopped: %s (the channel goes on without it)", self.path, exc)
            with contextlib.suppress(OSError, ValueError):
                self._file.close()

    def close(self) -> None:
        """Write everything queued, close the file (idempotent); taps then record nothing."""
        self.flush(final=True)
        with self._lock:
            if not self.live:
                return
            self.live = False
            self.put = _drop  # a tap still hooked (a signal wrapper) queues nothing from now on
            try:
                self._file.close()
            except OSError as exc:
                _log.warning("capture %s: closing failed: %s", self.path, exc)


def _close_at_exit(ref: weakref.ref[CaptureWriter]) -> None:
    writer = ref()
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()


def _drop(item: tuple[Any, ...]) -> None:
    """``CaptureWriter.put`` once the capture is closed."""


_FIRST = operator.itemgetter(0)  # a record tuple's number (C, not a Python call per item)
_Q_NONE, _Q_TX, _Q_RX, _Q_COUNT, _Q_EVENT, _Q_BLOCK = range(6)
"""What a queued record tuple holds (its second item)."""


class ChannelTap:
    """The capture hooks of one open channel: the only capture code on the packet paths.

    The channel calls :meth:`write` / :meth:`write_batch` instead of the ring's own when
    a tap is set, and :meth:`rx` with each batch it read; each queues one tuple (a
    number, a timestamp and references: the bytes are copied when the queue is written
    out, except a payload the caller may change, which is copied at once). Events,
    signals and interrupts queue one tuple each too.
    """

    __slots__ = ("iface", "relid", "sub", "writer")

    def __init__(self, writer: CaptureWriter, iface: int, relid: int, subchannel: int) -> None:
        self.writer = writer
        self.iface = iface
        self.relid = relid
        self.sub = subchannel

    # -- packets (hot paths) ---------------------------------------------------------------
    def write(self, tx: RingBuffer, payload: Any, ptype: int, flags: int, txid: int) -> bool:
        """``tx.write(...)`` and its record (numbered before the write); RingFull as tx.write.

        Called under the channel's TX lock, so records of one ring are in ring order."""
        w = self.writer
        seq = w.next_seq()
        try:
            signal = tx.write(payload, ptype, flags, txid)
        except BaseException:
            w.put((seq, _Q_NONE))
            raise
        if payload.__class__ is not bytes:
            payload = _frozen(payload)
        w.put((seq, _Q_TX, time.time_ns(), self.iface, self.relid, self.sub, payload, ptype, flags, txid))
        if len(w._queue) > w.QUEUE_LIMIT:
            w.maybe_flush()
        return signal

    def write_batch(self, tx: RingBuffer, specs: Sequence[tuple[Any, int, int, int]]) -> bool:
        """``tx.write_batch(specs)`` and a record per packet."""
        w = self.writer
        seqs = [w.next_seq() for _ in specs]
        try:
            signal = tx.write_batch(specs)
        except BaseException:
            for seq in seqs:
                w.put((seq, _Q_NONE))
            raise
        ts = time.time_ns()
        for seq, (payload, ptype, flags, txid) in zip(seqs, specs, strict=True):
            if payload.__class__ is not bytes:
                payload = _frozen(payload)
            w.put((seq, _Q_TX, ts, self.iface, self.relid, self.sub, payload, ptype, flags, txid))
        w.maybe_flush()
        return signal

    def rx(self, pkts: Sequence[Packet]) -> None:
        """Record a batch read from the RX ring (one timestamp: they were read together)."""
        w = self.writer
        w.put((w.next_seq(), _Q_RX, time.time_ns(), self.iface, self.relid, self.sub, pkts))
        if len(w._queue) > w.QUEUE_LIMIT:
            w.maybe_flush()

    # -- the rest ----------------------------------------------------------------------------
    def event(self, name: str, **fields: Any) -> None:
        """A lifecycle event record (``opened``, ``post_started``, ``rescind``, ``closed``)."""
        body = json.dumps({"event": name, **fields}, separators=(",", ":"), default=str)
        w = self.writer
        w.put((w.next_seq(), _Q_EVENT, time.time_ns(), self.iface, self.relid, self.sub, body.encode()))

    def interrupt(self, count: int) -> None:
        """The dispatcher consumed a uio event (``Dispatcher.on_event``)."""
        w = self.writer
        w.put((w.next_seq(), _Q_COUNT, time.time_ns(), self.iface, self.relid, self.sub,
               RecordKind.INTERRUPT, Direction.HOST_TO_GUEST, count))

    def hook_signal(self, sig: HostSignal) -> None:
        """Record every signal ``sig`` sends: wrap its ``signal`` (the channel's one way to signal)."""
        inner: Callable[[], None] = sig.signal
        w = self.writer
        next_seq, ns = w.next_seq, time.time_ns
        head = (self.iface, self.relid, self.sub, RecordKind.SIGNAL, Direction.GUEST_TO_HOST)

        def signal() -> None:
            inner()
            w.put((next_seq(), _Q_COUNT, ns(), *head, sig.signals))

        sig.signal = signal

    def flush(self) -> None:
        """Write out what is queued (a channel closed)."""
        self.writer.flush()


def _frozen(payload: Any) -> Any:
    """A payload the caller may change later, copied now (bytes, or a tuple of bytes)."""
    if isinstance(payload, (list, tuple)):
        return tuple(p if p.__class__ is bytes else bytes(memoryview(p).cast("B")) for p in payload)
    return bytes(memoryview(payload).cast("B"))
