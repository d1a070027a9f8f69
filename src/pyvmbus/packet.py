"""VMBus packets as they travel through a ring (include/linux/hyperv.h).

A packet in a ring is a 16-byte ``struct vmpacket_descriptor`` (type, offset8, len8,
flags, trans_id), then ``offset8 * 8 - 16`` bytes of type-specific header (the
"extra header": ranges of a transfer-page or GPA-direct packet), then the payload up to
``len8 * 8``, then the 8-byte trailer. :class:`Packet` is what a reader gets back: a
private copy, never a view of shared memory, because the host may rewrite the ring at
any time.

The range lists of types 7 and 9 come from the host, so :func:`parse_transfer_pages` and
:func:`parse_gpa_direct` check every count and length against the header that holds
them and raise :class:`~pyvmbus.errors.RingCorrupt` instead of reading past it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import RingCorrupt

__all__ = [
    "COMPLETION_REQUESTED",
    "DESCRIPTOR_SIZE",
    "GPA_PAGE_SIZE",
    "GpaRange",
    "MAX_PACKET_SIZE",
    "Packet",
    "PacketType",
    "TRAILER_SIZE",
    "TransferPageRange",
    "TransferPages",
    "encode_gpa_direct",
    "encode_transfer_pages",
    "packet_size",
    "parse_gpa_direct",
    "parse_transfer_pages",
]

DESCRIPTOR_SIZE = 16
"""sizeof(struct vmpacket_descriptor): u16 type, u16 offset8, u16 len8, u16 flags, u64 trans_id."""
TRAILER_SIZE = 8
"""VMBUS_PKT_TRAILER (ring_buffer.c): the u64 ``old_write_index << 32`` after each packet."""
MAX_PACKET_SIZE = 0xFFFF * 8
"""len8 is 16 bits: no packet (descriptor + header + payload + padding) is longer."""
GPA_PAGE_SIZE = 4096
"""Hyper-V page (HV_HYP_PAGE_SIZE): GPA-direct offsets and pfns count in these, on any guest."""
COMPLETION_REQUESTED = 1
"""VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED: the sender wants a VM_PKT_COMP back."""


class PacketType(enum.IntEnum):
    """enum vmbus_packet_type (include/linux/hyperv.h), without the VM_PKT_ prefix."""

    INVALID = 0x0
    SYNCH = 0x1
    ADD_XFER_PAGESET = 0x2
    RM_XFER_PAGESET = 0x3
    ESTABLISH_GPADL = 0x4
    TEARDOWN_GPADL = 0x5
    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPADL = 0x8
    DATA_USING_GPA_DIRECT = 0x9
    CANCEL_REQUEST = 0xA
    COMP = 0xB
    DATA_USING_ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


@dataclass(frozen=True, slots=True)
class TransferPageRange:
    """struct vmtransfer_page_range: a slice of the receive buffer (netvsc's recv GPADL)."""

    byte_count: int
    byte_offset: int


@dataclass(frozen=True, slots=True)
class TransferPages:
    """The header of a DATA_USING_XFER_PAGES packet (struct vmtransfer_page_packet_header)."""

    pageset_id: int
    sender_owns_set: int
    ranges: tuple[TransferPageRange, ...]


@dataclass(frozen=True, slots=True)
class GpaRange:
    """One range of a DATA_USING_GPA_DIRECT packet (struct hv_mpb_array / hv_page_buffer).

    ``pfns`` has ``ceil((byte_offset + byte_count) / 4096)`` Hyper-V page numbers;
    ``byte_offset`` is the offset into the first of them.
    """

    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet, copied out of a ring.

    ``payload`` is the bytes from ``offset8 * 8`` to ``len8 * 8``, so it includes the
    sender's zero padding up to a multiple of 8 (the ring does not record the unpadded
    length; protocols carry their own). ``extra_header`` is descriptor bytes 16 to
    ``offset8 * 8``; for transfer-page (7) and GPA-direct (9) packets it is also parsed
    into ``transfer_pages`` / ``gpa_ranges`` (None for every other type).
    """

    type: int
    flags: int
    transaction_id: int
    payload: bytes
    extra_header: bytes = b""
    transfer_pages: TransferPages | None = None
    gpa_ranges: tuple[GpaRange, ...] | None = None

    @property
    def completion_requested(self) -> bool:
        """The sender asked for a VM_PKT_COMP with this transaction id (flags bit 0)."""
        return bool(self.flags & COMPLETION_REQUESTED)


class PacketBuilder:
    """Packet's twin with the same slots, but mutable: the ring's read path fills one in
    and then turns it into a Packet by assigning ``__class__`` (allowed between classes
    with identical slot layouts). The generated ``__init__`` of a frozen dataclass sets
    each field through ``object.__setattr__`` (~770 ns for a Packet); this is ~200 ns,
    and the ring builds one Packet per packet read.
    """

    __slots__ = Packet.__slots__  # same names, same order: same layout

    type: int
    flags: int
    transaction_id: int
    payload: bytes
    extra_header: bytes
    transfer_pages: TransferPages | None
    gpa_ranges: tuple[GpaRange, ...] | None


_new = object.__new__


def _builder_works() -> bool:
    """True where ``__class__`` may move between the twins (CPython 3.10+ does allow it)."""
    try:
        probe = _new(PacketBuilder)
        probe.__class__ = Packet  # type: ignore[assignment]
    except TypeError:  # pragma: no cover - a Python that refuses: use the slot setters
        return False
    return True


BUILDER_OK = _builder_works()
_SETTERS = tuple(Packet.__dict__[name].__set__ for name in Packet.__slots__)


def make_packet(
    type: int,
    flags: int,
    transaction_id: int,
    payload: bytes,
    extra_header: bytes,
    transfer_pages: TransferPages | None,
    gpa_ranges: tuple[GpaRange, ...] | None,
) -> Packet:
    """Packet(...) without the frozen-dataclass __init__ cost (same result)."""
    if not BUILDER_OK:
        fallback = _new(Packet)
        values = (type, flags, transaction_id, payload, extra_header, transfer_pages, gpa_ranges)
        for setter, value in zip(_SETTERS, values, strict=True):
            setter(fallback, value)
        return fallback
    pkt = PacketBuilder()  # (a type call is ~20 ns cheaper than object.__new__(PacketBuilder))
    pkt.type = type
    pkt.flags = flags
    pkt.transaction_id = transaction_id
    pkt.payload = payload
    pkt.extra_header = extra_header
    pkt.transfer_pages = transfer_pages
    pkt.gpa_ranges = gpa_ranges
    pkt.__class__ = Packet  # type: ignore[assignment]
    return pkt  # type: ignore[return-value]


def packet_size(payload_len: int, extra_header_len: int = 0) -> int:
    """Bytes a packet takes in a ring: descriptor + header + payload, padded to 8, + trailer.

    This is what a write needs free (plus one byte, the ring is never filled), and the
    value to put in ``pending_send_size`` when a write does not fit.
    """
    return ((DESCRIPTOR_SIZE + extra_header_len + payload_len + 7) & ~7) + TRAILER_SIZE


_XFER_HDR = struct.Struct("<HBBI")  # xfer_pageset_id, sender_owns_set, reserved, range_cnt
_GPA_HDR = struct.Struct("<II")  # reserved, rangecount
_RANGE = struct.Struct("<II")  # {byte_count, byte_offset} and {len, offset} alike
_RANGE_HDR_SIZE = 8


def _room(extra_header: bytes, fixed: int, kind: str) -> int:
    """len(extra_header), after checking it holds the ``fixed`` part of the type's header:
    offset8 comes from the host, and a short one must not let the parser read past it."""
    room = len(extra_header)
    if room < fixed:
        offset8 = (DESCRIPTOR_SIZE + room) // 8
        raise RingCorrupt("offset8", offset8, f"{kind} packet needs a {DESCRIPTOR_SIZE + fixed}-byte header")
    return room


def parse_transfer_pages(extra_header: bytes) -> TransferPages:
    """Parse the header of a DATA_USING_XFER_PAGES packet (bytes 16.. of the descriptor).

    RingCorrupt if the header is shorter than its fixed part or range_cnt ranges do not
    fit in it (netvsc_receive's NETVSC_XFER_HEADER_SIZE check).
    """
    room = _room(extra_header, _XFER_HDR.size, "a transfer-page")
    pageset_id, owns, _reserved, count = _XFER_HDR.unpack_from(extra_header)
    if count * _RANGE.size > room - _XFER_HDR.size:
        raise RingCorrupt(
            "range_cnt",
            count,
            f"{count} ranges need {count * _RANGE.size} bytes, the header has "
            f"{room - _XFER_HDR.size} after its fixed part",
        )
    flat = struct.unpack_from(f"<{2 * count}I", extra_header, _XFER_HDR.size)
    ranges = tuple(TransferPageRange(flat[i], flat[i + 1]) for i in range(0, 2 * count, 2))
    return TransferPages(pageset_id, owns, ranges)


def parse_gpa_direct(extra_header: bytes) -> tuple[GpaRange, ...]:
    """Parse the ranges of a DATA_USING_GPA_DIRECT packet (bytes 16.. of the descriptor).

    Layout (struct vmbus_channel_packet_page_buffer / vmbus_packet_mpb_array): u32
    reserved, u32 rangecount, then per range u32 len, u32 offset and
    ``ceil((offset + len) / 4096)`` u64 pfns. RingCorrupt if there are no ranges, a range
    is empty, its offset is not inside the first page, or the ranges overrun the header
    (the checks OpenVMM's gparange.rs makes).
    """
    room = _room(extra_header, _GPA_HDR.size, "a GPA-direct")
    _reserved, count = _GPA_HDR.unpack_from(extra_header)
    if count == 0:
        raise RingCorrupt("rangecount", 0, "a GPA-direct packet must describe at least one range")
    # Each range takes at least 16 bytes (len, offset, one pfn): this bounds the loop
    # below by the header size before any range is looked at.
    if count * 16 > room - _GPA_HDR.size:
        raise RingCorrupt(
            "rangecount",
            count,
            f"{count} ranges need at least {count * 16} bytes, the header has "
            f"{room - _GPA_HDR.size} after its fixed part",
        )
    pos = _GPA_HDR.size
    ranges = []
    for i in range(count):
        if pos + _RANGE_HDR_SIZE > room:
            raise RingCorrupt("rangecount", count, f"range {i} starts past the end of the header")
        length, offset = _RANGE.unpack_from(extra_header, pos)
        if length == 0:
            raise RingCorrupt(f"gpa_ranges[{i}].len", 0, "empty GPA range")
        if offset >= GPA_PAGE_SIZE:
            raise RingCorrupt(f"gpa_ranges[{i}].offset", offset, "offset must lie in the first 4 KiB page")
        npfn = (offset + length + GPA_PAGE_SIZE - 1) // GPA_PAGE_SIZE
        pos += _RANGE_HDR_SIZE
        if pos + npfn * 8 > room:
            raise RingCorrupt(
                f"gpa_ranges[{i}].len",
                length,
                f"needs {npfn} pfns ({npfn * 8} bytes), only {room - pos} bytes left in the header",
            )
        pfns = struct.unpack_from(f"<{npfn}Q", extra_header, pos)
        pos += npfn * 8
        ranges.append(GpaRange(length, offset, pfns))
    return tuple(ranges)


def encode_transfer_pages(
    pageset_id: int, ranges: Sequence[tuple[int, int]], sender_owns_set: int = 0
) -> bytes:
    """The extra header of a transfer-page packet: ranges are (byte_count, byte_offset)."""
    out = bytearray(_XFER_HDR.pack(pageset_id, sender_owns_set, 0, len(ranges)))
    for count, offset in ranges:
        out += _RANGE.pack(count, offset)
    return bytes(out)


def encode_gpa_direct(ranges: Sequence[tuple[int, int, Sequence[int]]]) -> bytes:
    """The extra header of a GPA-direct packet: ranges are (len, offset, pfns).

    ValueError if a range's pfn count is not ``ceil((offset + len) / 4096)``.
    """
    out = bytearray(_GPA_HDR.pack(0, len(ranges)))
    for length, offset, pfns in ranges:
        want = (offset + length + GPA_PAGE_SIZE - 1) // GPA_PAGE_SIZE
        if len(pfns) != want or length == 0 or offset >= GPA_PAGE_SIZE:
            raise ValueError(
                f"GPA range (len={length}, offset={offset}) needs 0 < len, offset < 4096 "
                f"and {want} pfns, got {len(pfns)}"
            )
        out += _RANGE.pack(length, offset)
        out += struct.pack(f"<{len(pfns)}Q", *pfns)
    return bytes(out)
