"""The mock Hyper-V host: offers, device models, and the host's side of every ring.

What it does is what Hyper-V does, on the same shared pages:

- it *offers* devices (relids from 1 upward, monitor ids for monitored channels) and
  subchannels, and rescinds them;
- it reads the guest's TX ring only when signalled: for a non-monitored channel by the
  kernel's vmbus_setevent (a 4-byte write of 1 on the generations where that signals),
  for a monitored channel by the guest setting its bit in the monitor page's trigger
  group, which the host scans about every 100 µs while such a channel is open (it also
  consumes the channel's relid bit in the int page's send half). Bits are cleared
  atomically and only the channel's own;
- it writes the guest's RX ring with :class:`~pyvmbus.ring.RingBuffer` and interrupts the
  guest only when the ring engine says so (empty -> non-empty with the mask clear), or
  when a read freed the room the guest asked for in TX pending_send_size;
- when the RX ring is full it sets RX pending_send_size and waits for the guest's signal,
  and stops reading TX while replies are queued (back-pressure);
- faults: stall (stop reading TX), corrupt (the next descriptor it writes lies about its
  length), storm (interrupts with nothing new), header (store any value in any header
  word of either ring, then interrupt), descriptor (publish a packet whose descriptor
  fields are given, then interrupt).

The kernel side (pyvmbus.mock.kernel) owns uio semantics and calls in here through
:meth:`MockHost.open_channel`, :meth:`close_channel` and :meth:`signal`; the host calls
back through :class:`KernelSide`.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import itertools
import mmap
import struct
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from ..classes import HYPERV_INSTANCE_GUIDS, DeviceClass, lookup_class
from ..errors import ChannelClosed, DeviceNotFound, RingCorrupt, RingFull
from ..guid import Guid, parse_guid
from ..packet import PacketType
from ..ring import PacketSpec, RingBuffer
from ..shm import fence, load32, store32
from .models import (
    DeviceModel,
    HostChannel,
    Payload,
    model_class,
    model_for_class,
)
from .models import models as registered_models

__all__ = [
    "ACTIVE_WINDOW",
    "IC_CLASSES",
    "IDLE_SCAN_PERIOD",
    "INT_PAGE_SEND_OFFSET",
    "KernelSide",
    "HEADER_WORDS",
    "MAX_MONITOR_ID",
    "MockHost",
    "Offer",
    "clear_bits",
    "SCAN_PERIOD",
    "STORM_PERIOD",
    "TICK_PERIOD",
    "default_monitored",
    "monitor_word",
]

SCAN_PERIOD = 100e-6
"""Hyper-V's default monitor scan latency (100 µs)."""
IDLE_SCAN_PERIOD = 1e-3
"""The scan period once no monitored channel was signalled for :data:`ACTIVE_WINDOW`.

Waking 10,000 times a second costs ~15-20 % of a core here even with nothing to do, so
the mock backs off while monitored channels are quiet; the first signal after a quiet
spell is seen within 1 ms, later ones within ~100 µs."""
ACTIVE_WINDOW = 0.05
STORM_PERIOD = 50e-6
"""Pace of the storm fault: one interrupt per loop turn, about every 50 µs (so a client
wakes up for many of them instead of finding one coalesced event)."""
TICK_PERIOD = 5e-3
"""How often DeviceModel.tick runs while a channel is open."""
INT_PAGE_SEND_OFFSET = 2048
"""The guest->host half of the interrupt page (HV_HYP_PAGE_SIZE / 2); bit n = relid n."""
MAX_MONITOR_ID = 128
"""4 trigger groups of 32 bits in the monitor page."""
IC_CLASSES = frozenset({"heartbeat", "shutdown", "timesync", "kvp", "vss", "fcopy"})
"""Integration services: offered without a monitor id (the "low speed" devices)."""
_READ_BATCH = 64
_WRITE_BATCH = 64  # packets per write_batch of post_batch and flush
_INBAND = int(PacketType.DATA_INBAND)  # plain ints: an enum member costs a lookup per use
_DRAIN_BUDGET = 1024  # packets per turn of the loop, so one busy channel cannot starve the rest
_MAX_QUEUED_BEFORE_STOP = 1  # stop reading TX as soon as one reply waits for room
_STORM_DEFAULT = 1000
HEADER_WORDS = {"write_index": 0, "read_index": 4, "interrupt_mask": 8, "pending_send_sz": 12,
                "feature_bits": 64}
"""Byte offsets of the header words the "header" fault can write."""
_PENDING_OFF = HEADER_WORDS["pending_send_sz"]


_Queued = PacketSpec | tuple[Any, int, int, int, bytes]
"""A packet in post()'s queue: see _Chan.queue."""


def _payload_len(payload: Payload) -> int:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return len(payload)
    return sum(len(p) for p in payload)


def _queued(payload: Payload, type_: int, flags: int, tid: int, extra: bytes) -> _Queued:
    """A packet as post()'s queue keeps it: its own bytes (the model may reuse its buffer)."""
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    elif not isinstance(payload, bytes):
        payload = [bytes(p) for p in payload]
    return (payload, type_, flags, tid, extra) if extra else (payload, type_, flags, tid)


def monitor_word(monitor_id: int) -> tuple[int, int]:
    """(byte offset of trigger_group[id // 32].pending in the monitor page, bit mask)."""
    return 8 + 8 * (monitor_id // 32), 1 << (monitor_id % 32)


def default_monitored(cls: DeviceClass) -> bool:
    """Whether Hyper-V offers this class with a monitor id: not for integration services."""
    return cls.name not in IC_CLASSES


def _libatomic_fetch_and() -> Callable[[int, int], int] | None:
    path = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    fn = lib.__atomic_fetch_and_4
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int], ctypes.c_uint32
    return lambda addr, mask: int(fn(addr, mask, 5))


_FETCH_AND = _libatomic_fetch_and()


def clear_bits(arr: npt.NDArray[np.uint8], offset: int, mask: int) -> int:
    """Atomically clear ``mask`` in the u32 at ``offset`` of ``arr``; returns the old value.

    The guest (and, on a real system, every other VMBus driver) sets bits in the same
    words concurrently, so a plain load/store would lose theirs. pyvmbus.shm has no
    fetch-and; libatomic's is used here (only the mock host ever clears bits). Without
    libatomic this degrades to load + store, which can lose a concurrent bit.
    """
    if _FETCH_AND is not None:
        return _FETCH_AND(arr.ctypes.data + offset, (~mask) & 0xFFFFFFFF)
    old = load32(arr, offset)
    store32(arr, offset, old & ~mask & 0xFFFFFFFF)
    return old


class KernelSide(Protocol):
    """What the host needs from the mock kernel (the guest's VMBus driver + uio_hv_generic)."""

    def interrupt(self, relid: int) -> None:
        """The host signals the guest on channel ``relid`` (SynIC event -> channel callback)."""

    def offered(self, offer: Offer) -> None:
        """A new primary offer arrived (CHANNELMSG_OFFERCHANNEL)."""

    def subchannel_offered(self, offer: Offer) -> None:
        """A subchannel offer for an open device arrived."""

    def rescinded(self, offer: Offer, remove: bool) -> None:
        """The host rescinded a device (CHANNELMSG_RESCIND_CHANNELOFFER); ``remove``: for good."""

    def log(self, text: str) -> None:
        """A kernel log line."""


@dataclass(eq=False)
class Offer:
    """One channel offer: a device's primary channel, or one of its subchannels."""

    instance: Guid
    device_class: DeviceClass
    model: str
    relid: int
    monitor_id: int | None
    subchannel_index: int = 0
    primary: Offer | None = None
    subchannels: list[Offer] = field(default_factory=list)
    rescinded: bool = False

    @property
    def class_guid(self) -> Guid:
        assert self.device_class.guid is not None
        return self.device_class.guid

    @property
    def monitored(self) -> bool:
        return self.monitor_id is not None


_COUNTERS = ("packets_in", "bytes_in", "packets_out", "bytes_out", "signals", "interrupts",
             "ring_full", "corrupt_sent", "guest_ring_errors", "model_errors")


class _Device:
    """Host state of one device across opens: faults and counters."""

    def __init__(self, offer: Offer) -> None:
        self.offer = offer
        self.stalled = False
        self.corrupt_pending = 0
        self.storm_left = 0
        self.per_channel: dict[int, dict[str, int]] = {}
        self.last_error = ""

    @property
    def totals(self) -> dict[str, int]:
        """The device's counters: the sum over its channels, computed when read (stats),
        so the per-packet path counts once, per channel, not twice."""
        out = dict.fromkeys(_COUNTERS, 0)
        for c in self.per_channel.values():
            for name, n in c.items():
                out[name] += n
        return out

    def counters(self, relid: int) -> dict[str, int]:
        c = self.per_channel.get(relid)
        if c is None:
            c = self.per_channel[relid] = dict.fromkeys(_COUNTERS, 0)
        return c


class _Chan(HostChannel):
    """The host end of one open channel."""

    def __init__(self, host: MockHost, dev: _Device, offer: Offer, ring: npt.NDArray[np.uint8],
                 ring_size: int) -> None:
        self.host = host
        self.dev = dev
        self.offer = offer
        self.relid = offer.relid
        self.subchannel_index = offer.subchannel_index
        self.instance = offer.instance
        self.class_guid = offer.class_guid
        self.monitored = offer.monitored
        self.ring = ring
        self.tx = RingBuffer(ring[:ring_size], header_size=mmap.PAGESIZE)  # guest -> host
        self.rx = RingBuffer(ring[ring_size:2 * ring_size], header_size=mmap.PAGESIZE)  # host -> guest
        self.rx_raw = ring[ring_size:2 * ring_size]
        self.tx_raw = ring[:ring_size]
        self.tx_dsize = ring_size - mmap.PAGESIZE
        self._write = self.rx.write
        self.queue: collections.deque[_Queued] = collections.deque()
        """post()'s packets waiting for room: a PacketSpec (payload, type, flags,
        transaction_id), or that plus the extra header when there is one, so a run of
        plain packets goes to write_batch as it is."""
        self.open = True
        self.broken = ""
        self.stats = dev.counters(offer.relid)
        self.model: DeviceModel = model_class(offer.model)()
        self.batch_model = type(self.model).packets is not DeviceModel.packets
        """The model answers a read batch at once (it overrides DeviceModel.packets)."""
        if offer.monitor_id is not None:
            self.mon_off, self.mon_bit = monitor_word(offer.monitor_id)
        self.int_off = INT_PAGE_SEND_OFFSET + 4 * (offer.relid // 32)
        self.int_bit = 1 << (offer.relid % 32)

    # -- HostChannel ------------------------------------------------------------------------
    def send(self, payload: Payload, type: int = _INBAND, flags: int = 0,
             transaction_id: int = 0, extra_header: bytes = b"") -> bool:
        # Every packet the host writes comes here: plain attribute and dict work only.
        if not self.open:
            raise ChannelClosed(self.instance, f"relid {self.relid} is not open")
        if self.dev.corrupt_pending:
            if not self._write_corrupt(type, flags, transaction_id):
                return False
            self.dev.corrupt_pending -= 1
            return True
        try:
            # Positional, without extra_header when there is none: the compiled ring engine
            # takes only that call itself (a keyword sends it through ring.py's Python path).
            if extra_header:
                signal = self.rx.write(payload, type, flags, transaction_id, extra_header=extra_header)
            else:
                signal = self._write(payload, type, flags, transaction_id)
        except RingFull as exc:
            # Ask the guest to signal once it has read enough, then try once more: the
            # guest may have drained the ring before it could see the request.
            if not self.rx.set_pending_send_size(exc.needed):
                self._count("ring_full")
                return False
            try:
                signal = self.rx.write(payload, type, flags, transaction_id, extra_header=extra_header)
            except RingFull:
                self._count("ring_full")
                return False
            self.rx.clear_pending_send_size()
        stats = self.stats
        stats["packets_out"] += 1
        stats["bytes_out"] += len(payload) if isinstance(payload, (bytes, bytearray, memoryview)) \
            else sum(len(p) for p in payload)
        if signal:
            stats["interrupts"] += 1  # MockHost.interrupt, inlined
            self.host.kernel.interrupt(self.relid)
        return True

    def post(self, payload: Payload, type: int = _INBAND, flags: int = 0,
             transaction_id: int = 0, extra_header: bytes = b"") -> None:
        if self.queue or not self.send(payload, type, flags, transaction_id, extra_header):
            self.queue.append(_queued(payload, type, flags, transaction_id, extra_header))

    def post_batch(self, packets: Sequence[PacketSpec]) -> None:
        """post() each of ``packets`` in order; what fits goes out in write_batch chunks.

        A chunk is one write-index update and one signal decision (the kernel's rule,
        applied to the chunk), as a host that commits several writes at once does
        (openvmm's OutgoingRing.commit_write). Where a chunk does not fit, or a fault
        wants one packet at a time, the rest take post()'s own path: they fill the ring
        packet by packet, ask for room through pending_send_size and queue the others.
        """
        i = 0
        count = len(packets)
        queue = self.queue
        while i < count and not queue and self.open and not self.dev.corrupt_pending:
            chunk = packets[i:i + _WRITE_BATCH]
            try:
                signal = self.rx.write_batch(chunk)
            except (RingFull, ValueError, TypeError):
                # all or nothing: post() writes what fits, and raises for a bad packet
                # only after the ones before it went out, as it always did
                break
            self._sent(chunk, signal)
            i += len(chunk)
        while i < count and not queue:  # near full: as post(), packet by packet
            payload, type_, flags, tid = packets[i]
            self.post(payload, type_, flags, tid)
            i += 1
        if i < count:  # the ring is full: the rest wait, in order (no tuple per packet
            queue.extend(spec if spec.__class__ is tuple and spec[0].__class__ is bytes  # for bytes)
                         else _queued(*spec, b"") for spec in packets[i:])

    def _sent(self, chunk: Sequence[_Queued], signal: bool) -> None:
        """Count what one write_batch wrote, and interrupt if it said so."""
        stats = self.stats
        stats["packets_out"] += len(chunk)
        nbytes = 0
        for spec in chunk:
            p = spec[0]
            nbytes += len(p) if p.__class__ is bytes else _payload_len(p)
        stats["bytes_out"] += nbytes
        if signal:
            stats["interrupts"] += 1
            self.host.kernel.interrupt(self.relid)

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def is_open(self) -> bool:
        return self.open

    def log(self, text: str) -> None:
        self.host.kernel.log(f"host: {self.instance} relid {self.relid}: {text}")

    # -- host internals ---------------------------------------------------------------------
    def release(self) -> None:
        """Let go of the ring memory (the kernel frees it); the channel is closed for good."""
        self.queue.clear()
        self.tx.close()
        self.rx.close()
        empty = np.zeros(0, dtype=np.uint8)
        self.ring = self.rx_raw = self.tx_raw = empty

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] += n

    def flush(self) -> None:
        """Send queued packets while they fit (after the guest signalled it read some).

        In write_batch chunks while whole chunks fit (see :meth:`post_batch`), then one
        at a time (the last ones that fit, then pending_send_size for the next)."""
        queue = self.queue
        batch = True
        while queue and self.open:
            if batch and len(queue) > 1 and not self.dev.corrupt_pending:
                chunk = list(itertools.islice(queue, _WRITE_BATCH))
                for i, spec in enumerate(chunk):
                    if len(spec) != 4:  # an extra header: written by send() below, in its turn
                        del chunk[i:]
                        break
                if len(chunk) > 1:
                    try:
                        signal = self.rx.write_batch(cast("list[PacketSpec]", chunk))
                    except (RingFull, ValueError, TypeError):
                        batch = False  # near full (or a bad packet): one at a time from here
                    else:
                        popleft = queue.popleft
                        for _ in chunk:
                            popleft()
                        self._sent(chunk, signal)
                        continue
            if not self.send(*queue[0]):
                return
            queue.popleft()
        if not queue:
            self.rx.clear_pending_send_size()

    def drain(self) -> None:
        """Read the guest's TX ring (the host was signalled), unless stalled or backed up."""
        budget = _DRAIN_BUDGET
        queue = self.queue
        dev = self.dev
        read_batch = self.tx.read_batch
        handle = self.model.packet
        stats = self.stats
        tx_raw, dsize = self.tx_raw, self.tx_dsize
        while self.open and not self.broken and not dev.stalled and \
                len(queue) < _MAX_QUEUED_BEFORE_STOP:
            if budget <= 0:
                self.host.more_to_drain.add(self)  # go on in the next turn of the loop
                return
            try:
                packets, signal = read_batch(_READ_BATCH)
            except RingCorrupt as exc:
                self.broken = str(exc)
                self.dev.last_error = f"relid {self.relid}: guest TX ring corrupt: {exc}"
                self._count("guest_ring_errors")
                self.host.kernel.log(f"host: {self.instance} relid {self.relid}: guest TX ring "
                                     f"corrupt, channel stopped: {exc}")
                return
            if signal:
                self.host.interrupt(self)  # the guest waits for TX room (pending_send_size)
            if not packets:
                return
            n = len(packets)
            budget -= n
            stats["packets_in"] += n
            stats["bytes_in"] += len(packets[0].payload) if n == 1 else sum(len(p.payload) for p in packets)
            if n > 1 and self.batch_model:
                try:
                    self.model.packets(self, packets)
                except Exception as exc:
                    self.host.model_failed(self, exc)
            else:
                for pkt in packets:
                    # call_model's rule inlined (no frame per packet): an exception is
                    # logged and counted there, never fatal.
                    try:
                        handle(self, pkt)
                    except Exception as exc:
                        self.host.model_failed(self, exc)
            # Read again unless the ring is empty now. On an empty ring read_batch loads
            # the write index (acquire), finds it at our read index (ours, committed by
            # the batch above) and returns nothing, storing nothing: these two seq_cst
            # loads, in the same order, decide the same without its list and frame
            # (indices out of range or unaligned still go to read_batch, which raises).
            # Stopping on an empty ring is safe: our read index is published, so the
            # guest's next write sees empty -> non-empty and signals (hv_signal_on_write).
            w = load32(tx_raw, 0)
            if w == load32(tx_raw, 4) and w < dsize and not w & 7:
                return

    def write_header(self, ring: str, name: str, value: int | None, add: int | None = None) -> None:
        """Fault "header": store ``value`` (or the word's value now + ``add``, mod 2**32) in
        header word ``name`` of the ``ring`` ("tx": the guest's TX, "rx": the guest's RX),
        whoever owns it."""
        if ring not in ("tx", "rx"):
            raise ValueError(f"ring must be 'tx' or 'rx', not {ring!r}")
        if name not in HEADER_WORDS:
            raise ValueError(f"unknown header word {name!r}; known: {', '.join(HEADER_WORDS)}")
        buf = self.rx_raw if ring == "rx" else self.ring[:len(self.rx_raw)]
        off = HEADER_WORDS[name]
        if (value is None) == (add is None):
            raise ValueError("give either value or add")
        value = int(value) if value is not None else (load32(buf, off) + int(add or 0)) & 0xFFFFFFFF
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"header words are u32: {value} is out of range")
        store32(buf, off, value)
        fence()
        self.host.kernel.log(f"host: {self.instance} relid {self.relid}: fault: {ring} {name} = {value:#x}")

    def write_descriptor(self, type_: int, offset8: int, len8: int, flags: int, tid: int,
                         publish: int) -> None:
        """Fault "descriptor": a packet of ``publish`` bytes (a multiple of 8, at least 24)
        at the RX write index whose descriptor says ``type_``/``offset8``/``len8``/...;
        the rest is zeros and a trailer. Published whatever the fields say."""
        buf = self.rx_raw
        header = mmap.PAGESIZE
        dsize = len(buf) - header
        w, r = load32(buf, 0), load32(buf, 4)
        free = dsize - (w - r) if w >= r else r - w
        if publish < 24 or publish % 8 or w % 8 or w >= dsize or free <= publish:
            raise ValueError(f"cannot publish {publish} bytes at write_index {w} ({free} free)")
        raw = struct.pack("<HHHHQ", type_ & 0xFFFF, offset8 & 0xFFFF, len8 & 0xFFFF, flags & 0xFFFF,
                          tid & 0xFFFFFFFFFFFFFFFF) + bytes(publish - 24) + struct.pack("<Q", w << 32)
        for i in range(0, len(raw), 8):
            off = header + (w + i) % dsize
            buf[off:off + 8] = np.frombuffer(raw[i:i + 8], dtype=np.uint8)
        fence()
        store32(buf, 0, (w + publish) % dsize)
        fence()
        self._count("corrupt_sent")
        self.host.kernel.log(f"host: {self.instance} relid {self.relid}: fault: descriptor type={type_} "
                             f"offset8={offset8} len8={len8} ({publish} bytes published) at {w}")

    def _write_corrupt(self, type_: int, flags: int, tid: int) -> bool:
        """Publish a descriptor whose len8 runs past the bytes published (fault "corrupt")."""
        buf = self.rx_raw
        header = mmap.PAGESIZE
        dsize = len(buf) - header
        w = load32(buf, 0)
        r = load32(buf, 4)
        free = dsize - (w - r) if w >= r else r - w
        if w % 8 or w >= dsize or free <= 24:
            return False
        desc = struct.pack("<HHHHQ", type_, 2, 0x200, flags, tid)  # len8 0x200: 4 KiB, 24 published
        trailer = struct.pack("<Q", w << 32)
        raw = desc + trailer
        for i in range(0, len(raw), 8):
            off = header + (w + i) % dsize
            buf[off:off + 8] = np.frombuffer(raw[i:i + 8], dtype=np.uint8)
        fence()
        store32(buf, 0, (w + len(raw)) % dsize)
        fence()
        self._count("corrupt_sent")
        self.host.kernel.log(f"host: {self.instance} relid {self.relid}: fault: wrote a corrupt "
                             f"descriptor (len8=0x200, 24 bytes published) at write_index {w}")
        if not load32(buf, 8) and w == r:
            self.host.interrupt(self)
        return True


class MockHost:
    """All offers and open channels of the mock host, driven by the kernel's loop."""

    def __init__(self, kernel: KernelSide, int_page: npt.NDArray[np.uint8],
                 monitor_page: npt.NDArray[np.uint8]) -> None:
        self.kernel = kernel
        self.int_page = int_page
        self.monitor_page = monitor_page
        self.devices: dict[Guid, _Device] = {}
        self.channels: dict[int, _Chan] = {}
        self._monitored: list[_Chan] = []
        self._used_relids: set[int] = set()
        self._used_monitor_ids: set[int] = set()
        self._next_tick = 0.0
        self._last_monitor_signal = 0.0
        self.more_to_drain: set[_Chan] = set()
        """Channels whose drain used up its budget: continued at the next scan."""
        self._storming = False
        """Some device may have storm_left: scan walks the devices for it (else it need not)."""

    # -- allocation -------------------------------------------------------------------------
    def _alloc_relid(self) -> int:
        relid = 1
        while relid in self._used_relids:
            relid += 1
        self._used_relids.add(relid)
        return relid

    def _alloc_monitor_id(self) -> int:
        for mid in range(MAX_MONITOR_ID):
            if mid not in self._used_monitor_ids:
                self._used_monitor_ids.add(mid)
                return mid
        raise RuntimeError(f"all {MAX_MONITOR_ID} monitor ids are in use")

    def _free(self, offer: Offer) -> None:
        self._used_relids.discard(offer.relid)
        if offer.monitor_id is not None:
            self._used_monitor_ids.discard(offer.monitor_id)

    def device(self, guid: str) -> _Device:
        g = parse_guid(guid)
        dev = self.devices.get(g)
        if dev is None:
            raise DeviceNotFound(g, tuple(self.devices), where="the mock host's offers")
        return dev

    # -- offers (MockVmbus commands) --------------------------------------------------------
    def add_device(self, what: str, instance: str | None, monitored: bool | None,
                   model: str | None) -> Offer:
        """Offer a device: ``what`` is a model name, a class short name or a class GUID."""
        table = registered_models()
        if model is None and what in table:
            model = what
            mcls = table[what]
            cls = lookup_class(mcls.class_name)
        else:
            cls = lookup_class(what)
            mcls = model_class(model) if model else model_for_class(cls.name, cls.guid)
            model = mcls.name
        if cls.guid is None:
            raise ValueError(f"class {what!r} has no class GUID")
        if instance:
            guid = parse_guid(instance)
        else:  # Hyper-V's fixed IC instance GUID while it is free (tools open it by name)
            fixed = HYPERV_INSTANCE_GUIDS.get(cls.name)
            taken = fixed is not None and fixed in self.devices and not self.devices[fixed].offer.rescinded
            guid = fixed if fixed is not None and not taken else Guid(str(uuid.uuid4()))
        if guid in self.devices and not self.devices[guid].offer.rescinded:
            raise ValueError(f"a device with instance {guid} is already offered")
        if monitored is None:
            monitored = mcls.monitored if mcls.monitored is not None else default_monitored(cls)
        offer = Offer(guid, cls, model, self._alloc_relid(),
                      self._alloc_monitor_id() if monitored else None)
        self.devices[guid] = _Device(offer)
        self.kernel.log(f"host: offer {guid} class {cls.name} ({cls.guid}) relid {offer.relid} "
                        f"monitor_id {offer.monitor_id if monitored else 'none'} model {model}")
        self.kernel.offered(offer)
        return offer

    def rescind(self, guid: str, remove: bool = False) -> None:
        dev = self.device(guid)
        offer = dev.offer
        if offer.rescinded:
            if remove:  # an old kernel may still hold the rescinded device: now it goes
                self.kernel.rescinded(offer, True)
                del self.devices[offer.instance]
            return
        self.kernel.log(f"host: rescind {offer.instance} relid {offer.relid}")
        for sub in list(offer.subchannels):
            self._close(sub.relid, "rescinded")
            sub.rescinded = True
        self._close(offer.relid, "rescinded")
        offer.rescinded = True
        self.kernel.rescinded(offer, remove)
        for sub in offer.subchannels:
            self._free(sub)
        offer.subchannels.clear()
        self._free(offer)
        if remove:
            del self.devices[offer.instance]

    def reoffer(self, guid: str) -> Offer:
        dev = self.device(guid)
        old = dev.offer
        if not old.rescinded:
            raise ValueError(f"{old.instance} is still offered; rescind it first")
        offer = Offer(old.instance, old.device_class, old.model, self._alloc_relid(),
                      self._alloc_monitor_id() if old.monitored else None)
        dev.offer = offer
        dev.stalled = False
        dev.corrupt_pending = 0
        dev.storm_left = 0
        self.kernel.log(f"host: re-offer {offer.instance} relid {offer.relid}")
        self.kernel.offered(offer)
        return offer

    def offer_subchannels(self, guid: str, count: int, monitored: bool | None = None) -> list[int]:
        dev = self.device(guid)
        if monitored is None:
            monitored = dev.offer.monitored
        primary = dev.offer
        if primary.relid not in self.channels:
            raise ChannelClosed(primary.instance, "subchannels are offered only for an opened device")
        if not 0 < count <= 64:
            raise ValueError(f"count must be 1..64, not {count}")
        relids = []
        for _ in range(count):
            sub = Offer(primary.instance, primary.device_class, primary.model, self._alloc_relid(),
                        self._alloc_monitor_id() if monitored else None,
                        subchannel_index=len(primary.subchannels) + 1, primary=primary)
            primary.subchannels.append(sub)
            relids.append(sub.relid)
            self.kernel.subchannel_offered(sub)
        self.kernel.log(f"host: {primary.instance}: offered {count} subchannels {relids}")
        return relids

    def drop_subchannel(self, sub: Offer) -> None:
        """The guest closed the primary: its subchannels are gone (relids released)."""
        if sub.primary is not None and sub in sub.primary.subchannels:
            sub.primary.subchannels.remove(sub)
        self._close(sub.relid, "primary closed")
        self._free(sub)

    def fault(self, guid: str, kind: str, args: dict[str, Any]) -> None:
        dev = self.device(guid)
        if kind == "stall":
            dev.stalled = True
        elif kind == "resume":
            dev.stalled = False
            for ch in self._device_channels(dev):
                ch.drain()
        elif kind == "corrupt":
            dev.corrupt_pending += int(args.get("count", 1))
        elif kind == "storm":
            dev.storm_left += int(args.get("count", _STORM_DEFAULT))
            self._storming = True
        elif kind in ("header", "descriptor"):
            index = int(args.get("subchannel", 0))
            chans = [c for c in self._device_channels(dev) if c.subchannel_index == index]
            if not chans:
                raise ChannelClosed(dev.offer.instance, "the channel is not open: nothing to write into")
            ch = chans[0]
            if kind == "header":
                ch.write_header(str(args.get("ring", "rx")), str(args["field"]), args.get("value"),
                                args.get("add"))
            else:
                ch.write_descriptor(int(args.get("type", PacketType.DATA_INBAND)), int(args["offset8"]),
                                    int(args["len8"]), int(args.get("flags", 0)),
                                    int(args.get("transaction_id", 0)), int(args.get("publish", 32)))
            if args.get("interrupt", True):
                self.interrupt(ch)
        else:
            raise ValueError(f"unknown fault {kind!r}; known: corrupt, stall, resume, storm, crash, "
                             "header, descriptor")
        self.kernel.log(f"host: fault {kind} on {dev.offer.instance}")

    def command(self, guid: str, name: str, args: dict[str, Any], subchannel: int = 0) -> Any:
        dev = self.device(guid)
        for ch in self._device_channels(dev):
            if ch.subchannel_index == subchannel:
                return ch.model.command(ch, name, args)
        raise ChannelClosed(dev.offer.instance, f"channel {subchannel} is not open (the guest must "
                            "open the device before its model can take commands)")

    def stats(self, guid: str) -> dict[str, Any]:
        dev = self.device(guid)
        out: dict[str, Any] = dict(dev.totals)
        chans = self._device_channels(dev)
        out.update(
            relid=dev.offer.relid,
            monitor_id=dev.offer.monitor_id,
            model=dev.offer.model,
            open=dev.offer.relid in self.channels,
            rescinded=dev.offer.rescinded,
            stalled=dev.stalled,
            queued=sum(len(c.queue) for c in chans),
            subchannels=[s.relid for s in dev.offer.subchannels],
            last_error=dev.last_error,
            channels={relid: dict(c) for relid, c in dev.per_channel.items()},
        )
        return out

    def _device_channels(self, dev: _Device) -> list[_Chan]:
        offers = [dev.offer, *dev.offer.subchannels]
        return [self.channels[o.relid] for o in offers if o.relid in self.channels]

    # -- kernel -> host ---------------------------------------------------------------------
    def open_channel(self, offer: Offer, ring: npt.NDArray[np.uint8], ring_size: int) -> None:
        """The guest opened ``offer``'s channel; its rings are initialised and empty."""
        dev = self.devices[offer.instance]
        ch = _Chan(self, dev, offer, ring, ring_size)
        self.channels[offer.relid] = ch
        if ch.monitored:
            self._monitored.append(ch)
        self.call_model(ch, ch.model.opened, ch)

    def close_channel(self, relid: int) -> None:
        """The guest closed the channel (last close of the node)."""
        self._close(relid, "closed")

    def _close(self, relid: int, why: str) -> None:
        ch = self.channels.pop(relid, None)
        if ch is None:
            return
        ch.open = False
        if ch in self._monitored:
            self._monitored.remove(ch)
        self.call_model(ch, ch.model.closed, ch)
        ch.release()

    def signal(self, relid: int) -> None:
        """The guest signalled channel ``relid`` (vmbus_setevent through the kernel)."""
        ch = self.channels.get(relid)
        if ch is None:
            return
        ch.stats["signals"] += 1
        if ch.queue:
            ch.flush()
        else:  # flush() with nothing queued: clear_pending_send_size, the same store
            store32(ch.rx_raw, _PENDING_OFF, 0)
        ch.drain()

    def interrupt(self, ch: _Chan) -> None:
        ch._count("interrupts")
        self.kernel.interrupt(ch.relid)

    def call_model(self, ch: _Chan, fn: Callable[..., None], *args: Any) -> None:
        """Run a model callback; an exception is logged and counted, never fatal."""
        try:
            fn(*args)
        except Exception as exc:
            self.model_failed(ch, exc)

    def model_failed(self, ch: _Chan, exc: Exception) -> None:
        """A model callback raised ``exc`` (being handled): log and count it."""
        ch._count("model_errors")
        ch.dev.last_error = f"model {ch.offer.model}: {exc!r}"
        tb = traceback.format_exc().strip().splitlines()
        self.kernel.log(f"host: {ch.instance} relid {ch.relid}: model {ch.offer.model} "
                        f"raised {exc!r} at {tb[-3].strip() if len(tb) >= 3 else ''}")

    # -- the loop's scan hook ---------------------------------------------------------------
    def scan(self, now: float) -> float | None:
        """Scan monitor bits, run ticks and storms; how long the loop may sleep.

        Runs at every turn of the loop (every wake-up of the mock): what is not there
        (monitored channels, leftovers of a drain, storms) costs one test each."""
        monitored = self._monitored
        if monitored:
            page, ints = self.monitor_page, self.int_page
            for ch in monitored:
                if load32(page, ch.mon_off) & ch.mon_bit:
                    clear_bits(page, ch.mon_off, ch.mon_bit)
                    if load32(ints, ch.int_off) & ch.int_bit:
                        clear_bits(ints, ch.int_off, ch.int_bit)
                    self._last_monitor_signal = now
                    self.signal(ch.relid)
        wait: float | None = None
        if self.more_to_drain:
            pending, self.more_to_drain = self.more_to_drain, set()
            for ch in pending:
                ch.drain()
            if self.more_to_drain:
                wait = 0.0
        if self.channels:
            if now >= self._next_tick:
                self._next_tick = now + TICK_PERIOD
                for ch in list(self.channels.values()):
                    if ch.open:
                        self.call_model(ch, ch.model.tick, ch, now)
            until_tick = self._next_tick - now
            if until_tick < 0.0:
                until_tick = 0.0
            wait = until_tick if wait is None or until_tick < wait else wait
        if self._storming:
            storming = False
            for dev in self.devices.values():
                if dev.storm_left:
                    chans = self._device_channels(dev)
                    if not chans:
                        dev.storm_left = 0
                        continue
                    dev.storm_left -= 1
                    storming = storming or dev.storm_left != 0
                    self.interrupt(chans[0])
                    wait = STORM_PERIOD if wait is None else min(wait, STORM_PERIOD)
            self._storming = storming
        if self._monitored:
            period = SCAN_PERIOD if now - self._last_monitor_signal < ACTIVE_WINDOW else IDLE_SCAN_PERIOD
            wait = period if wait is None else min(wait, period)
        return wait

    def close_all(self) -> None:
        for relid in list(self.channels):
            self._close(relid, "shutdown")


