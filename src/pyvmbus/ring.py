"""The VMBus ring buffer protocol over any writable buffer (no I/O, no OS).

A VMBus channel has two rings, one per direction; each is a header page and a data
area. The same :class:`RingBuffer` serves both ends: the guest writes its TX ring and
reads its RX ring, the (mock) host does the opposite. The rules follow the Linux
guest, drivers/hv/ring_buffer.c and include/linux/hyperv.h; each rule below names the
kernel function it comes from. docs/ring.md has the whole story.

Header (struct hv_ring_buffer, one page: 4 KiB, or 64 KiB on arm64 64K kernels)::

    0 write_index   4 read_index   8 interrupt_mask   12 pending_send_sz   64 feature_bits

Data area (``data_size`` bytes, a multiple of 8), indices are byte offsets into it::

    0            r                                w                     data_size
    |   free     |####### packets to read ########|        free         |
                 ^ reader's read_index            ^ writer's write_index

    bytes_to_read  = w - r               (w >= r)   or  data_size - r + w   (w < r)
    bytes_to_write = data_size - to_read; a write needs MORE than it uses, so the ring
                     is never completely full (full would look empty: r == w).

A packet (all 8-byte aligned)::

    | type u16 | offset8 u16 | len8 u16 | flags u16 | trans_id u64 | extra header ...
    | payload ... | zero padding to 8 | trailer u64 = old write_index << 32 |
    |<---- offset8 * 8 ----------------------------------------->|
    |<---- len8 * 8 (the trailer is not counted) ------------------------------>|

Nothing read from shared memory is trusted: indices and descriptor fields are checked
before use, packets are copied out before they are parsed, and anything malformed raises
:class:`RingCorrupt` with the ring left exactly as it was.

Memory ordering uses :mod:`pyvmbus.shm` (sequentially consistent loads and stores and a
full fence), never x86's implicit ordering: Hyper-V guests run on arm64 as well.

Thread safety: one writer and one reader (threads, processes or the host) may work on a
ring at the same time, as the protocol intends. Two writers, or two readers, need a lock.

Engines: this module is the reference and the one source of the rules. The optional C
extension :mod:`pyvmbus._ring` (built by setup.py where there is a compiler) does the
common case of the per-packet loops (in-band packets in and out, single and batched)
with the same checks in the same order, and hands everything else back to the code
here before it touches anything, so every error and rare packet is handled (and every
message worded) in this file. ``PYVMBUS_RING=c|python`` chooses the default engine,
:data:`ENGINE` says which it is, ``RingBuffer(..., engine=...)`` picks one per ring.
:class:`HeaderCheck` has the same two engines (its per-request calls in C, every
violation worded here) and follows its rings'.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import shm
from .errors import RingCorrupt, RingFull
from .packet import (
    BUILDER_OK,
    DESCRIPTOR_SIZE,
    MAX_PACKET_SIZE,
    TRAILER_SIZE,
    Packet,
    PacketBuilder,
    PacketType,
    make_packet,
    parse_gpa_direct,
    parse_transfer_pages,
)

__all__ = [
    "ENGINE",
    "ENGINES",
    "FEAT_PENDING_SEND_SZ",
    "HEADER_SIZE",
    "READ_RECORD",
    "Descriptor",
    "HeaderCheck",
    "PacketSpec",
    "Payload",
    "RingBuffer",
    "RingCorrupt",
    "RingFull",
]

Buffer = Any
"""Anything exposing the buffer protocol (bytes, bytearray, mmap, numpy array, memoryview)."""
Payload = Any
"""A packet payload: one buffer, or a list or tuple of buffers (gathered in order)."""
PacketSpec = tuple[Any, int, int, int]
"""What :meth:`RingBuffer.write_batch` takes per packet: (payload, type, flags, transaction_id)."""

HEADER_SIZE = 4096
"""sizeof(struct hv_ring_buffer) on 4 KiB-page kernels (it is PAGE_SIZE: 64 KiB on arm64 64K)."""
FEAT_PENDING_SEND_SZ = 1
"""feature_bits bit 0, feat_pending_send_sz: the reader honours pending_send_sz."""

_HV_HYP_PAGE_SIZE = 4096  # hv_ringbuffer_init zeroes this much of the header
_OFF_WRITE = 0
_OFF_READ = 4
_OFF_MASK = 8
_OFF_PENDING = 12
_OFF_FEATURES = 64
_W_WRITE, _W_READ, _W_MASK, _W_PENDING, _W_FEATURES = 0, 1, 2, 3, 16  # as u32 word numbers
_MIN_PACKET = DESCRIPTOR_SIZE + TRAILER_SIZE
_U32 = 0xFFFFFFFF

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("VMBus rings are little-endian and so are all Hyper-V guests; this CPU is not")

try:
    from . import _ring as _cring
except ImportError:  # built without a C compiler: the pure-Python engine only
    _cring = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ._ring import Check as _CheckBase
    from ._ring import Ring as _RingBase
elif _cring is not None:
    _RingBase = _cring.Ring  # write() and read() run in C, straight from the caller
    _CheckBase = _cring.Check  # so do HeaderCheck's per-request checks and notes
else:
    _RingBase = object
    _CheckBase = object

ENGINES: tuple[str, ...] = ("c", "python") if _cring is not None else ("python",)
"""The ring engines this installation has, fastest first."""


def _default_engine() -> str:
    forced = os.environ.get("PYVMBUS_RING")
    if not forced:
        return ENGINES[0]
    if forced not in ("c", "python"):
        raise ValueError(f"PYVMBUS_RING={forced!r}: the ring engines are 'c' and 'python'")
    if forced not in ENGINES:
        raise ImportError(
            "PYVMBUS_RING=c but the compiled ring engine pyvmbus._ring is not built: reinstall "
            "pyvmbus with a C compiler (apt-get install gcc python3-dev) or unset PYVMBUS_RING"
        )
    return forced


ENGINE: str = _default_engine()
"""The engine new rings use unless told otherwise: "c" (pyvmbus._ring) or "python"."""

READ_RECORD = np.dtype(
    [
        ("type", "<u2"),
        ("flags", "<u2"),
        ("extra_len", "<u4"),
        ("transaction_id", "<u8"),
        ("offset", "<u8"),
        ("length", "<u8"),
    ]
)
"""One packet of :meth:`RingBuffer.read_into` (32 bytes): its extra header (``extra_len``
bytes, 0 for in-band packets) starts at ``offset`` in the caller's buffer, and its
payload (``length`` bytes, padding included, as ``Packet.payload``) follows it."""
_RECORD = struct.Struct("<HHIQQQ")

_load32 = shm.load32
_store32 = shm.store32
_fence = shm.fence

_DESC = struct.Struct("<HHHHQ")
_DESC_PACK = _DESC.pack
_DESC_UNPACK = _DESC.unpack
_DESC_UNPACK_FROM = _DESC.unpack_from
_DESC_PACK_INTO = _DESC.pack_into
# Zero padding (0..7 bytes) and the trailer, as one pack.
_PAD_TRAILER = tuple(struct.Struct(f"<{pad}xQ").pack for pad in range(8))
_PAD_TRAILER_INTO = tuple(struct.Struct(f"<{pad}xQ").pack_into for pad in range(8))

# Fast path: one struct pack_into writes descriptor, payload, padding and trailer of an
# in-band packet with a bytes payload that does not wrap (~90 ns for 64 B, against ~220 ns
# for three separate copies). One compiled Struct per payload length, shared by all rings.
_FAST_MAX = 2048
_MAX_PAYLOAD = MAX_PACKET_SIZE - DESCRIPTOR_SIZE  # an in-band payload with len8 <= 0xFFFF
_PACKERS: dict[int, Callable[..., None]] = {}


def _packer(n: int) -> Callable[..., None]:
    pad = -(DESCRIPTOR_SIZE + n) & 7
    pack = struct.Struct(f"<HHHHQ{n}s{pad}xQ").pack_into
    _PACKERS[n] = pack
    return pack


# Read fast path: one struct unpack_from copies descriptor AND payload of an in-band
# packet out of the ring (~75 ns for 64 B, against ~160 ns for unpack_from of the
# descriptor and then a slice + tobytes of the payload). The format needs the length
# before the descriptor has been read, so the reader guesses it: the same len8 as the
# last in-band packet it read (streams are mostly one size). The guess is checked
# against the len8 in the very copy it produced, so descriptor and payload still come
# from ONE read of shared memory; a wrong guess throws the payload part away (and
# uses only the descriptor part of that copy). Packets up to _SPEC_MAX bytes are
# guessed at once (a wrong guess copies little); larger ones once two in a row had the
# same length (64 KiB: ~160 ns saved a read, a wrong guess wastes one large copy).
# One Struct per len8, shared by all rings, at most _UNPACKERS_MAX of them.
_SPEC_MAX = 4096
_UNPACKERS_MAX = 1024
_UNPACKERS: dict[int, Callable[..., tuple[Any, ...]]] = {}


def _unpacker(len8: int) -> Callable[..., tuple[Any, ...]]:
    unpack = struct.Struct(f"<HHHHQ{(len8 << 3) - DESCRIPTOR_SIZE}s").unpack_from
    _UNPACKERS[len8] = unpack
    return unpack


class Descriptor(NamedTuple):
    """The next packet's descriptor as it sits in the ring (see :meth:`RingBuffer.peek_descriptor`)."""

    type: int
    offset8: int
    len8: int
    flags: int
    transaction_id: int


def _byte_view(part: Buffer) -> Buffer:
    """``part`` as something whose len() is its size in bytes and that slices into the ring."""
    cls = part.__class__
    if cls is bytes or cls is bytearray:
        return part
    view = memoryview(part)
    if view.format != "B" or view.ndim != 1 or not view.c_contiguous:
        view = view.cast("B")  # TypeError for a non-contiguous buffer: nothing to gather
    return view


def _payload_parts(payload: Payload) -> tuple[list[Buffer], int]:
    """One buffer, or a list/tuple of buffers (gathered in order, never concatenated)."""
    if isinstance(payload, (list, tuple)):
        parts = [_byte_view(p) for p in payload]
        return parts, sum(len(p) for p in parts)
    part = _byte_view(payload)
    return [part], len(part)


def _bad_descriptor(off8: int, len8: int, avail: int) -> RingCorrupt:
    if len8 == 0:
        return RingCorrupt("len8", 0, "zero-length packet")
    if off8 < 2:
        return RingCorrupt("offset8", off8, "shorter than the 16-byte descriptor")
    if off8 > len8:
        return RingCorrupt("offset8", off8, f"header longer than the packet (len8={len8})")
    return RingCorrupt(
        "len8", len8, f"packet of {len8 * 8} bytes + trailer exceeds the {avail} bytes published"
    )


def _bad_field(exc: struct.error, type: int, flags: int, transaction_id: int) -> ValueError:
    return ValueError(
        f"descriptor field out of range: type={type!r} (u16), flags={flags!r} (u16), "
        f"transaction_id={transaction_id!r} (u64): {exc}"
    )


def _batch_buffer(buf: Any, what: str, writable: bool) -> memoryview:
    """``buf`` as a flat byte view for the batch APIs; ValueError naming ``what`` otherwise."""
    view = memoryview(buf)
    if (writable and view.readonly) or not view.c_contiguous:
        raise ValueError(f"{what} must be a {'writable ' if writable else ''}contiguous buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _check_records(records: Any, what: str, writable: bool) -> None:
    """ValueError naming ``what`` unless ``records`` is a flat array of READ_RECORD."""
    if (
        not isinstance(records, np.ndarray)
        or records.dtype != READ_RECORD
        or records.ndim != 1
        or not records.flags.c_contiguous
        or (writable and not records.flags.writeable)
    ):
        raise ValueError(f"{what} must be a {'writable ' if writable else ''}1-D C-contiguous numpy "
                         "array of ring.READ_RECORD")

class RingBuffer(_RingBase):
    """One direction of a VMBus channel: struct hv_ring_buffer + data (include/linux/hyperv.h).

    ``buf`` is the header followed by the data area, in any writable buffer (bytearray,
    mmap, numpy array, memoryview); ``header_size`` is the page size of the kernel that
    set the ring up (4096, or 65536 on arm64 64K kernels). The constructor only looks at
    the buffer; :meth:`init` also sets a fresh ring up the way hv_ringbuffer_init does.

    Writers call :meth:`write` / :meth:`write_batch`, which return True when the reader
    must be signalled. Readers call :meth:`read` / :meth:`read_batch`; afterwards
    :attr:`read_signal` says whether the writer must be signalled. This class never
    signals anybody itself (that is the channel layer's job).
    """

    __slots__ = (
        "_data",
        "_dsize",
        "_engine",
        "_guess",
        "_h32",
        "_hsize",
        "_mv",
        "_seen",
        "_unpack",
        "read_signal",
    )  # fmt: skip

    read_signal: bool
    """After :meth:`read` / :meth:`read_batch`: the writer is waiting for the space just
    freed and must be signalled (hv_pkt_iter_close's pending_send_sz rule)."""

    def __init__(self, buf: Buffer, header_size: int = HEADER_SIZE, *, engine: str | None = None) -> None:
        if engine is None:
            engine = ENGINE
        elif engine not in ENGINES:
            raise ValueError(f"ring engine {engine!r} is not available; this installation has {ENGINES}")
        if header_size < _OFF_FEATURES + 8 or header_size % 8:
            raise ValueError(f"header_size {header_size} must be a multiple of 8 and at least 72")
        view = memoryview(buf)
        if view.readonly:
            raise ValueError("ring buffer must be writable (map it PROT_READ|PROT_WRITE)")
        if not view.c_contiguous:
            raise ValueError("ring buffer must be one contiguous block of memory")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        data_size = view.nbytes - header_size
        if data_size <= 0 or data_size % 8:
            raise ValueError(
                f"ring buffer of {view.nbytes} bytes: the data area after the {header_size}-byte "
                f"header must be a positive multiple of 8 bytes, not {data_size}"
            )
        if data_size > _U32:
            raise ValueError(f"data area of {data_size} bytes does not fit 32-bit ring indices")
        try:
            _load32(view, 0)  # the atomics check the alignment of the header words
        except ValueError as exc:
            raise ValueError(f"ring buffer must start 4-byte aligned: {exc}") from exc
        self._mv = view
        self._h32 = view[:header_size].cast("I")
        self._data = view[header_size:]
        self._hsize = header_size
        self._dsize = data_size
        self.read_signal = False
        # The read fast path's guess (see _unpacker): the len8 * 8 of the last in-band
        # packet read, and the unpack that copies such a packet out in one call.
        self._guess = 0
        self._seen = 0  # len8 * 8 of the last packet read without a right guess
        self._unpack: Callable[..., tuple[Any, ...]] = _DESC_UNPACK_FROM
        self._engine = engine
        if engine == "c":
            # The compiled fast path, pinning the same memory (unattached, the base
            # class hands every call to the methods of this file).
            self._attach(view, header_size)

    @classmethod
    def init(cls, buf: Buffer, header_size: int = HEADER_SIZE, *, engine: str | None = None) -> RingBuffer:
        """A ring over ``buf`` set up as new, as hv_ringbuffer_init does (see :meth:`reset`)."""
        ring = cls(buf, header_size, engine=engine)
        ring.reset()
        return ring

    @property
    def engine(self) -> str:
        """The engine of this ring: "c" (pyvmbus._ring) or "python"."""
        return self._engine

    def reset(self) -> None:
        """Set the ring up as hv_ringbuffer_init does: header zeroed, feature_bits = 1.

        Only for a ring nobody else uses yet: the kernel does this before the host opens
        the channel. The data area is left as it is (the kernel does not clear it either).
        """
        zero = min(self._hsize, _HV_HYP_PAGE_SIZE)  # memset(ring_buffer, 0, HV_HYP_PAGE_SIZE)
        self._mv[:zero] = bytes(zero)
        _store32(self._mv, _OFF_FEATURES, FEAT_PENDING_SEND_SZ)  # "enabling flow control"

    def close(self) -> None:
        """Let go of the buffer (so an mmap under it can be closed). Idempotent."""
        if self._engine == "c":
            self._detach()  # its pin first: a view with an export cannot be released
        for view in (self._h32, self._data, self._mv):
            view.release()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- header fields -------------------------------------------------------------------

    @property
    def header_size(self) -> int:
        """Bytes before the data area (the kernel's PAGE_SIZE)."""
        return self._hsize

    @property
    def data_size(self) -> int:
        """Bytes in the data area (ring_datasize)."""
        return self._dsize

    @property
    def write_index(self) -> int:
        """The writer's byte offset into the data area (raw, unchecked)."""
        return _load32(self._mv, _OFF_WRITE)

    @property
    def read_index(self) -> int:
        """The reader's byte offset into the data area (raw, unchecked)."""
        return _load32(self._mv, _OFF_READ)

    @property
    def interrupt_mask(self) -> int:
        """Set by the reader while it drains: the writer then does not signal."""
        return _load32(self._mv, _OFF_MASK)

    @interrupt_mask.setter
    def interrupt_mask(self, value: int) -> None:
        _store32(self._mv, _OFF_MASK, value)

    @property
    def pending_send_size(self) -> int:
        """Set by a blocked writer: bytes it needs free; 0 when not blocked."""
        return _load32(self._mv, _OFF_PENDING)

    @pending_send_size.setter
    def pending_send_size(self, value: int) -> None:
        _store32(self._mv, _OFF_PENDING, value)

    @property
    def feature_bits(self) -> int:
        """Bit 0 (feat_pending_send_sz): the reader of this ring honours pending_send_sz."""
        return _load32(self._mv, _OFF_FEATURES)

    @feature_bits.setter
    def feature_bits(self, value: int) -> None:
        _store32(self._mv, _OFF_FEATURES, value)

    def _checked_indices(self) -> tuple[int, int]:
        w = _load32(self._mv, _OFF_WRITE)
        r = _load32(self._mv, _OFF_READ)
        if w >= self._dsize or r >= self._dsize or (w | r) & 7:
            raise self._bad_indices(w, r)
        return w, r

    def available_to_read(self) -> int:
        """Bytes published and not yet consumed (hv_get_bytes_to_read); RingCorrupt on bad indices."""
        w, r = self._checked_indices()
        return w - r if w >= r else self._dsize - r + w

    def available_to_write(self) -> int:
        """Free bytes (hv_get_bytes_to_write); a packet needs strictly more than its size."""
        w, r = self._checked_indices()
        return self._dsize - (w - r) if w >= r else r - w

    def _reserve(self, total: int) -> int:
        """Our write index, once both indices are checked and ``total`` bytes (a batch's
        packets and trailers) fit; :class:`RingFull` otherwise. For the batch writers."""
        dsize = self._dsize
        w = self._h32[_W_WRITE]  # our own index (see write())
        r = _load32(self._mv, _OFF_READ)  # acquire (see write())
        if w >= dsize or r >= dsize or (w | r) & 7:  # shared memory: check before use
            raise self._bad_indices(w, r)
        avail = dsize - w + r if w >= r else r - w
        # Packet k fits after packets 0..k-1 iff avail > their total: the last is the test.
        if avail <= total:
            raise RingFull(total, avail)
        return w

    def _readable(self) -> tuple[int, int, int]:
        """(write index, our read index, bytes published) for a batch read, both indices checked: the
        write index is loaded once for the whole batch. The mirror of :meth:`_reserve`."""
        dsize = self._dsize
        w = _load32(self._mv, _OFF_WRITE)  # acquire, read once for the whole batch (see read())
        r = self._h32[_W_READ]
        if w >= dsize or r >= dsize or (w | r) & 7:  # shared memory: check before use
            raise self._bad_indices(w, r)
        return w, r, (w - r if w >= r else dsize - r + w)

    def _bad_indices(self, w: int, r: int) -> RingCorrupt:
        for name, value in (("write_index", w), ("read_index", r)):
            if value >= self._dsize:
                return RingCorrupt(name, value, f"outside the {self._dsize}-byte data area")
            if value & 7:
                return RingCorrupt(name, value, "not a multiple of 8 (packets are 8-byte aligned)")
        raise AssertionError("indices are valid")  # pragma: no cover

    def __repr__(self) -> str:
        h = self._h32
        try:
            h.nbytes  # noqa: B018 - raises once close() released the views
        except ValueError:
            return "<RingBuffer closed>"
        return (
            f"<RingBuffer data_size={self._dsize} write_index={h[_W_WRITE]} read_index={h[_W_READ]} "
            f"interrupt_mask={h[_W_MASK]} pending_send_sz={h[_W_PENDING]} "
            f"feature_bits={h[_W_FEATURES]:#x}>"
        )

    # -- copying with the wrap (the only place that splits at the end of the data) --------

    def _put(self, pos: int, parts: Iterable[Buffer]) -> None:
        """Copy ``parts`` into the data area from ``pos`` on, wrapping at the end.

        The kernel maps the data pages twice in a row so one memcpy never wraps
        (hv_ringbuffer_init); a userspace mapping is single, so a copy that crosses the
        end is split in two here. Callers have checked that the total fits.
        """
        data = self._data
        dsize = self._dsize
        for part in parts:
            end = pos + len(part)
            if end < dsize:
                data[pos:end] = part
                pos = end
            elif end == dsize:
                data[pos:end] = part
                pos = 0
            else:
                first = dsize - pos
                view = memoryview(part)
                data[pos:] = view[:first]
                pos = end - dsize
                data[:pos] = view[first:]

    def _get(self, pos: int, n: int) -> bytes:
        """A private copy of ``n`` bytes of the data area from ``pos`` on, wrapping at the end."""
        end = pos + n
        data = self._data
        if end <= self._dsize:
            return data[pos:end].tobytes()
        return b"".join((data[pos:], data[: end - self._dsize]))

    # -- writer --------------------------------------------------------------------------

    def _write_py(
        self,
        payload: Payload,
        type: int = PacketType.DATA_INBAND,
        flags: int = 0,
        transaction_id: int = 0,
        *,
        extra_header: Buffer = b"",
    ) -> bool:
        """Write one packet (hv_ringbuffer_write); True when the reader must be signalled.

        ``payload`` is one buffer or a list/tuple of buffers, copied into the ring in order
        (gather, no concatenation). ``extra_header`` goes between the descriptor and the
        payload (offset8 counts it); its length must be a multiple of 8. The bytes are the
        kernel's: descriptor, header, payload, zero padding to 8, trailer. RingFull if the
        packet does not fit, and then nothing was written.
        """
        cls = payload.__class__
        if (cls is bytes or cls is bytearray) and extra_header.__class__ is bytes and not extra_header:
            n = len(payload)
            parts = None
            hlen = DESCRIPTOR_SIZE
        else:
            parts, n = _payload_parts(payload)
            extra = _byte_view(extra_header)
            if len(extra) % 8:
                raise ValueError(f"extra_header is {len(extra)} bytes, not a multiple of 8")
            if len(extra):
                parts.insert(0, extra)
            hlen = DESCRIPTOR_SIZE + len(extra)
        size = (hlen + n + 7) & ~7  # len8 * 8: padded to 8, trailer not counted
        if size > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {size} bytes exceeds the VMBus maximum of {MAX_PACKET_SIZE}")
        need = size + TRAILER_SIZE
        mv = self._mv
        dsize = self._dsize
        # Our own index: only this writer stores it, a plain load sees our last store.
        w = self._h32[_W_WRITE]
        # hv_get_bytes_to_write: READ_ONCE(read_index). seq_cst includes acquire: the
        # reader's copies out of the space it frees happen before our copies into it.
        r = _load32(mv, _OFF_READ)
        # Both indices live in shared memory: never write outside the data area on a
        # value the other side (or a bug) put there.
        if w >= dsize or r >= dsize or (w | r) & 7:
            raise self._bad_indices(w, r)
        avail = dsize - w + r if w >= r else r - w
        # hv_ringbuffer_write: "If there is only room for the packet, assume it is full":
        # fail on avail <= need, so that read_index == write_index only ever means empty.
        if avail <= need:
            raise RingFull(need, avail)
        end = w + need
        try:
            if parts is None and end <= dsize:
                # The packet does not wrap: write it in place.
                data = self._data
                if n <= _FAST_MAX:
                    pack = _PACKERS.get(n) or _packer(n)
                    pack(data, w, type, 2, size >> 3, flags, transaction_id, payload, w << 32)
                else:
                    body = w + DESCRIPTOR_SIZE
                    _DESC_PACK_INTO(data, w, type, 2, size >> 3, flags, transaction_id)
                    data[body : body + n] = payload
                    # Trailer: hv_get_ring_bufferindices, the packet's start index << 32.
                    _PAD_TRAILER_INTO[size - DESCRIPTOR_SIZE - n](data, body + n, w << 32)
            else:
                desc = _DESC_PACK(type, hlen >> 3, size >> 3, flags, transaction_id)
                tail = _PAD_TRAILER[size - hlen - n](w << 32)
                self._put(w, (desc, payload, tail) if parts is None else (desc, *parts, tail))
        except struct.error as exc:
            raise _bad_field(exc, type, flags, transaction_id) from exc
        if end >= dsize:
            end -= dsize
        # _publish(w, end), inlined on this hot path (keep the two in step). The
        # kernel's virt_mb() before the index store is implied by the release store
        # itself: see _publish.
        _store32(mv, _OFF_WRITE, end)
        _fence()  # hv_signal_on_write: virt_mb(), our index store -> the reader's fields
        if _load32(mv, _OFF_MASK):
            return False  # the reader is draining and will see the packet
        return _load32(mv, _OFF_READ) == w  # empty -> non-empty only

    def write_batch(self, packets: Iterable[PacketSpec]) -> bool:
        """Write several packets with one index update and one signal decision.

        ``packets`` holds (payload, type, flags, transaction_id) tuples, payloads as for
        :meth:`write`. All or nothing: RingFull (nothing written) unless every packet
        fits. True when the reader must be signalled: the ring was empty before the batch
        and the reader's interrupt_mask is clear (hv_signal_on_write, once per batch).
        """
        specs = tuple(packets)  # one snapshot, walked twice: sized, then written
        if self._engine == "c":
            signal = self._write_batch(specs)
            if signal is not NotImplemented:
                return signal  # type: ignore[no-any-return]
        # The common batch: every payload is bytes (immutable, so its length cannot
        # change between the two passes). Sized first, all or nothing, then written
        # as write() writes: one pack_into per small packet.
        sizes = []
        total = 0
        for payload, _type, _flags, _tid in specs:
            if payload.__class__ is not bytes:
                return self._write_batch_planned(specs)
            n = len(payload)
            if n > _MAX_PAYLOAD:
                size = (DESCRIPTOR_SIZE + n + 7) & ~7
                raise ValueError(f"packet of {size} bytes exceeds the VMBus maximum of {MAX_PACKET_SIZE}")
            total += (DESCRIPTOR_SIZE + TRAILER_SIZE + 7 + n) & ~7  # packet_size(n)
            sizes.append(n)
        if not sizes:
            return False
        dsize = self._dsize
        w = self._reserve(total)
        data = self._data
        pos = w
        last = -1
        pack = None
        # zip with the sizes of pass 1: a payload swapped meanwhile (a spec that is a
        # list, changed by another thread) is packed to the size that was checked, or
        # fails; it can never write past the space checked above.
        for (payload, type, flags, transaction_id), n in zip(specs, sizes, strict=True):
            size = (DESCRIPTOR_SIZE + 7 + n) & ~7
            end = pos + size + TRAILER_SIZE
            try:
                if end <= dsize:  # no wrap: in place, as in write()
                    if n <= _FAST_MAX:
                        if n != last:
                            pack = _PACKERS.get(n) or _packer(n)
                            last = n
                        pack(data, pos, type, 2, size >> 3, flags, transaction_id, payload, pos << 32)  # type: ignore[misc]
                    else:
                        body = pos + DESCRIPTOR_SIZE
                        _DESC_PACK_INTO(data, pos, type, 2, size >> 3, flags, transaction_id)
                        data[body : body + n] = payload
                        _PAD_TRAILER_INTO[size - DESCRIPTOR_SIZE - n](data, body + n, pos << 32)
                else:
                    desc = _DESC_PACK(type, 2, size >> 3, flags, transaction_id)
                    tail = _PAD_TRAILER[size - DESCRIPTOR_SIZE - n](pos << 32)
                    self._put(pos, (desc, payload[:n], tail))
            except struct.error as exc:  # nothing published: the bytes are in free space
                raise _bad_field(exc, type, flags, transaction_id) from exc
            pos = end - dsize if end >= dsize else end
        return self._publish(w, pos)

    def _write_batch_planned(self, specs: tuple[PacketSpec, ...]) -> bool:
        """write_batch() for any payloads (buffers of any kind, gather lists)."""
        plan = []
        total = 0
        for payload, type, flags, transaction_id in specs:
            cls = payload.__class__
            if cls is bytes or cls is bytearray:
                n = len(payload)
                parts = None
            else:
                parts, n = _payload_parts(payload)
            size = (DESCRIPTOR_SIZE + n + 7) & ~7
            if size > MAX_PACKET_SIZE:
                raise ValueError(f"packet of {size} bytes exceeds the VMBus maximum of {MAX_PACKET_SIZE}")
            total += size + TRAILER_SIZE
            plan.append((payload, parts, n, size, type, flags, transaction_id))
        if not plan:
            return False
        dsize = self._dsize
        w = self._reserve(total)
        data = self._data
        pos = w
        for payload, parts, n, size, type, flags, transaction_id in plan:
            end = pos + size + TRAILER_SIZE
            try:
                if parts is None and end <= dsize:  # no wrap: in place, as in write()
                    if n <= _FAST_MAX:
                        pack = _PACKERS.get(n) or _packer(n)
                        pack(data, pos, type, 2, size >> 3, flags, transaction_id, payload, pos << 32)
                    else:
                        body = pos + DESCRIPTOR_SIZE
                        _DESC_PACK_INTO(data, pos, type, 2, size >> 3, flags, transaction_id)
                        data[body : body + n] = payload
                        _PAD_TRAILER_INTO[size - DESCRIPTOR_SIZE - n](data, body + n, pos << 32)
                else:
                    desc = _DESC_PACK(type, 2, size >> 3, flags, transaction_id)
                    tail = _PAD_TRAILER[size - DESCRIPTOR_SIZE - n](pos << 32)
                    self._put(pos, (desc, payload, tail) if parts is None else (desc, *parts, tail))
            except struct.error as exc:  # nothing published: the bytes are in free space
                raise _bad_field(exc, type, flags, transaction_id) from exc
            pos = end - dsize if end >= dsize else end
        return self._publish(w, pos)

    def write_from(self, data: Buffer, records: np.ndarray[Any, np.dtype[Any]]) -> bool:
        """Write one packet per record of ``records`` out of ``data``; no Python object per packet.

        The mirror of :meth:`read_into`, with the same layout: record i (a
        :data:`READ_RECORD`) describes a packet whose extra header is ``extra_len`` bytes
        of ``data`` at ``offset`` and whose payload is the ``length`` bytes after it, and
        gives its type, flags and transaction_id. So what read_into filled can be written
        on as it is (a relay). Like :meth:`write_batch`: all or nothing (RingFull with the
        batch total), one write-index update, one signal decision (the return value).
        ValueError, naming the record, for a record outside ``data``, an extra header not
        a multiple of 8 or a packet over 524,280 bytes; nothing is written then.
        """
        view = _batch_buffer(data, "write_from: data", writable=False)
        _check_records(records, "write_from: records", writable=False)
        if self._engine == "c":
            signal = self._write_from(view, records)
            if signal is not NotImplemented:
                return signal  # type: ignore[no-any-return]
        # The reference. Pass 1 checks and sizes every record (all or nothing).
        rec = records.data.cast("B")
        plan = []
        total = 0
        for i in range(len(records)):
            typ, flags, extra_len, tid, offset, length = _RECORD.unpack_from(rec, i * _RECORD.size)
            if offset + extra_len + length > len(view):
                raise ValueError(
                    f"write_from: record {i} (offset {offset}, extra_len {extra_len}, length {length}) "
                    f"is outside the {len(view)} bytes of data"
                )
            if extra_len % 8:
                raise ValueError(f"write_from: record {i}: extra_len {extra_len} is not a multiple of 8")
            hlen = DESCRIPTOR_SIZE + extra_len
            size = (hlen + length + 7) & ~7
            if size > MAX_PACKET_SIZE:
                raise ValueError(
                    f"write_from: record {i}: packet of {size} bytes exceeds the VMBus maximum of "
                    f"{MAX_PACKET_SIZE}"
                )
            total += size + TRAILER_SIZE
            plan.append((typ, flags, tid, offset, hlen, length, size))
        if not plan:
            return False
        dsize = self._dsize
        w = self._reserve(total)
        pos = w
        for typ, flags, tid, offset, hlen, length, size in plan:
            desc = _DESC_PACK(typ, hlen >> 3, size >> 3, flags, tid)
            body = view[offset : offset + hlen - DESCRIPTOR_SIZE + length]
            tail = _PAD_TRAILER[size - hlen - length](pos << 32)
            self._put(pos, (desc, body, tail))
            pos += size + TRAILER_SIZE
            if pos >= dsize:
                pos -= dsize
        return self._publish(w, pos)

    def _publish(self, old: int, new: int) -> bool:
        """Store the new write index, then decide on the signal (hv_signal_on_write)."""
        mv = self._mv
        # hv_ringbuffer_write: virt_mb() "before updating the write index": the packet
        # and trailer must be visible before the index that hands them to the reader.
        # That is prior stores -> this store, which a release store already gives, and
        # _store32 is __atomic_store_n(SEQ_CST), at least release on every target
        # (x86-64: xchg, a full barrier; arm64: stlr, which orders every earlier load
        # and store of this thread before it, plain memcpy stores included; the
        # libatomic fallback is the same builtin out of line). The copies ran in
        # earlier C calls of this thread, so they are earlier in program order and
        # the compiler cannot sink them past the atomic either. A separate fence
        # here would order nothing more, so there is none (it cost ~30 ns a write).
        # The fence AFTER the store stays: store -> load needs a full barrier.
        _store32(mv, _OFF_WRITE, new)
        # hv_signal_on_write: virt_mb(). Store -> load: the reader stores its mask / read
        # index and then loads our write index; without a full fence between our store
        # and our loads both sides could miss each other and the reader would sleep on
        # a non-empty ring.
        _fence()
        if _load32(mv, _OFF_MASK):
            return False  # the reader is draining and will see the packet
        # virt_rmb() "check interrupt_mask before read_index": both loads are seq_cst,
        # so they happen in program order. Signal only on empty -> non-empty (Hyper-V
        # throttles guests that signal when it does not expect it).
        return _load32(mv, _OFF_READ) == old

    def set_pending_send_size(self, nbytes: int) -> bool:
        """Ask the reader to signal once more than ``nbytes`` are free (a blocked writer).

        ``nbytes`` is what the packet needs (``RingFull.needed``, or
        :func:`~pyvmbus.packet.packet_size`). Returns True if that space is already free
        now: the reader may have freed it before it could see the request, so check this
        and write instead of waiting. Clear it with :meth:`clear_pending_send_size`.
        (set_channel_pending_send_size in include/linux/hyperv.h.)
        """
        if not 0 < nbytes < self._dsize:
            raise ValueError(f"pending send size {nbytes} must be between 1 and {self._dsize - 1}")
        _store32(self._mv, _OFF_PENDING, nbytes)
        # Store -> load against the reader's hv_pkt_iter_close (store read_index, fence,
        # load pending_send_sz): one of us sees the other's store.
        _fence()
        return self.available_to_write() > nbytes

    def clear_pending_send_size(self) -> None:
        """The writer is no longer blocked (set_channel_pending_send_size(c, 0))."""
        _store32(self._mv, _OFF_PENDING, 0)

    # -- reader --------------------------------------------------------------------------

    def begin_read(self) -> None:
        """Mask the writer's signals while draining (hv_begin_read)."""
        _store32(self._mv, _OFF_MASK, 1)
        _fence()  # hv_begin_read: virt_mb() after the mask store

    def end_read(self) -> int:
        """Unmask, then return the bytes still to read (hv_end_read).

        If this is not 0 a packet arrived while masked, and its writer did not signal:
        drain again instead of waiting for an interrupt.
        """
        _store32(self._mv, _OFF_MASK, 0)
        # hv_end_read: virt_mb() "make sure mask update is not reordered" with the load
        # of the write index below (store -> load against hv_signal_on_write).
        _fence()
        return self.available_to_read()

    def peek_descriptor(self) -> Descriptor | None:
        """The next packet's descriptor, unchecked and not consumed (diagnostics); None if empty."""
        w, r = self._checked_indices()
        if w == r:
            return None
        avail = w - r if w > r else self._dsize - r + w
        if avail < DESCRIPTOR_SIZE:
            raise RingCorrupt("write_index", w, f"publishes {avail} bytes, less than a descriptor")
        return Descriptor(*_DESC_UNPACK(self._get(r, DESCRIPTOR_SIZE)))

    def _take(self, pos: int, avail: int, w: int) -> tuple[Packet, int]:
        """Copy out and check the packet at ``pos``; (packet, bytes it takes with its trailer).

        The general parser: read() and read_batch() handle the common packet inline and
        come here for everything else (a wrap, an extra header, a range list, an error).

        Raises RingCorrupt before anything is consumed. Each byte of shared memory is
        read once: the descriptor into local ints, the rest into private bytes, and only
        those copies are parsed (the host may rewrite the ring at any time; the kernel's
        hv_pkt_iter_first copies the packet for the same reason).
        """
        # The writer publishes whole packets with their trailers (hv_ringbuffer_write).
        if avail < _MIN_PACKET:
            raise RingCorrupt(
                "write_index", w, f"publishes {avail} bytes, less than a descriptor and its trailer"
            )
        data = self._data
        dsize = self._dsize
        if pos + DESCRIPTOR_SIZE <= dsize:
            typ, off8, len8, flags, tid = _DESC_UNPACK_FROM(data, pos)
        else:
            typ, off8, len8, flags, tid = _DESC_UNPACK(self._get(pos, DESCRIPTOR_SIZE))
        size = len8 << 3
        # hv_pkt_iter_first clamps bad lengths; a userspace client rejects them instead
        # (rte_vmbus_chan_recv_raw: -EIO if hlen < 2 or hlen > tlen). 2 <= offset8 <=
        # len8 also rules out len8 == 0. And "pkt_len > bytes_avail" (hv_pkt_iter_first)
        # means the writer did not publish it all.
        if not 2 <= off8 <= len8 or size + TRAILER_SIZE > avail:
            raise _bad_descriptor(off8, len8, avail)
        hlen = off8 << 3
        start = pos + hlen
        if start >= dsize:
            start -= dsize
        end = start + size - hlen
        payload = data[start:end].tobytes() if end <= dsize else self._get(start, size - hlen)
        if off8 == 2 and typ != 7 and typ != 9:
            return make_packet(typ, flags, tid, payload, b"", None, None), size + TRAILER_SIZE
        ext_pos = pos + DESCRIPTOR_SIZE
        extra = self._get(ext_pos - dsize if ext_pos >= dsize else ext_pos, hlen - DESCRIPTOR_SIZE)
        transfer = parse_transfer_pages(extra) if typ == PacketType.DATA_USING_XFER_PAGES else None
        gpa = parse_gpa_direct(extra) if typ == PacketType.DATA_USING_GPA_DIRECT else None
        return make_packet(typ, flags, tid, payload, extra, transfer, gpa), size + TRAILER_SIZE

    def _read_py(self) -> Packet | None:
        """Copy out the next packet and consume it; None if the ring is empty.

        Then :attr:`read_signal` says whether the writer must be signalled. RingCorrupt
        (nothing consumed, no byte changed) if the indices or the packet are malformed.
        """
        mv = self._mv
        # hv_pkt_iter_avail: virt_load_acquire(write_index), read ONCE; the writer's
        # packet bytes are visible once its index is. Loads of them come after this.
        w = _load32(mv, _OFF_WRITE)
        r = self._h32[_W_READ]  # our own index, but in shared memory: checked below
        dsize = self._dsize
        # Indices from shared memory: in range and 8-aligned, or we could read outside
        # the data area or parse a descriptor from the middle of a packet.
        if w >= dsize or r >= dsize or (w | r) & 7:
            raise self._bad_indices(w, r)
        if w == r:
            self.read_signal = False
            return None
        avail = w - r if w > r else dsize - r + w
        data = self._data
        # Fast path for the common packet: in-band (offset8 == 2), not wrapping, framed
        # right. It accepts only what _take accepts and builds the same Packet; anything
        # else (a wrap, an extra header, a range list, any error) goes to _take.
        if avail >= _MIN_PACKET and r + DESCRIPTOR_SIZE <= dsize and BUILDER_OK:
            guess = self._guess
            if guess and r + guess <= dsize:
                # One copy of descriptor + payload, if the length guess is right (see
                # _unpacker); the payload part is used only if len8 says it is.
                typ, off8, len8, flags, tid, payload = self._unpack(data, r)
                if len8 << 3 != guess:
                    payload = None
            else:
                typ, off8, len8, flags, tid = _DESC_UNPACK_FROM(data, r)  # one copy of the descriptor
                payload = None
            end = r + (len8 << 3)
            used = (len8 << 3) + TRAILER_SIZE
            if off8 == 2 and len8 >= 2 and used <= avail and end <= dsize and typ != 7 and typ != 9:
                if payload is None:
                    payload = data[r + DESCRIPTOR_SIZE : end].tobytes()
                    self._learn(len8)
                fresh = PacketBuilder()  # make_packet, inlined
                fresh.type = typ
                fresh.flags = flags
                fresh.transaction_id = tid
                fresh.payload = payload
                fresh.extra_header = b""
                fresh.transfer_pages = None
                fresh.gpa_ranges = None
                fresh.__class__ = Packet  # type: ignore[assignment]
                pkt: Packet = fresh  # type: ignore[assignment]
            else:
                pkt, used = self._take(r, avail, w)
        else:
            pkt, used = self._take(r, avail, w)
        new = r + used
        if new >= dsize:
            new -= dsize
        # _commit(new, used), inlined on this hot path (keep the two in step). The
        # kernel's virt_rmb() before the index store is implied by the release store
        # itself: see _commit.
        _store32(mv, _OFF_READ, new)
        if self._h32[_W_FEATURES] & FEAT_PENDING_SEND_SZ:
            _fence()  # virt_mb(): store read_index -> load pending_send_sz
            pending = _load32(mv, _OFF_PENDING)
            if pending:
                self.read_signal = self._pending_signal(new, used, pending)
                return pkt
        self.read_signal = False
        return pkt

    if TYPE_CHECKING or _cring is None:
        # The public names. With the C engine built, the base class's write() and read()
        # take the call and come to _write_py / _read_py for all but the common case.
        write = _write_py
        read = _read_py

    def _learn(self, len8: int) -> None:
        """After a read without a (right) guess: the guess for the next (see _unpacker).

        A small packet is guessed at once. A large one only once two in a row had its
        length, so mixed sizes never waste a large copy per packet.
        """
        size = len8 << 3
        if size <= _SPEC_MAX or size == self._seen:
            unpack = _UNPACKERS.get(len8)
            if unpack is None:
                if len(_UNPACKERS) >= _UNPACKERS_MAX:
                    _UNPACKERS.clear()  # a host cycling through lengths: stay bounded
                unpack = _unpacker(len8)
            self._unpack = unpack
            self._guess = size
        else:
            self._guess = 0
        self._seen = size

    def read_batch(self, max_count: int) -> tuple[list[Packet], bool]:
        """Read up to ``max_count`` packets with one read-index update and one signal decision.

        Returns (packets, signal the writer). A malformed packet after good ones ends the
        batch (the good ones are consumed and returned; the next call raises); a
        malformed first packet raises RingCorrupt with nothing consumed.
        """
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, not {max_count}")
        if self._engine == "c":
            # The same walk; packets it does not parse itself go through _take, as here.
            res = self._read_batch(max_count)
            if res is not NotImplemented:
                return res  # type: ignore[no-any-return]
        dsize = self._dsize
        w, r, avail = self._readable()
        packets: list[Packet] = []
        append = packets.append
        data = self._data
        guess = self._guess  # the one-copy guess of read(), in locals
        unpack = self._unpack
        glen8 = guess >> 3
        gused = guess + TRAILER_SIZE
        pos = r
        for _ in range(max_count):
            if avail < _MIN_PACKET:
                if not avail:
                    break
            elif pos + DESCRIPTOR_SIZE <= dsize and BUILDER_OK:
                # The fast path of read(), for the same common packet (see there).
                if guess and pos + guess <= dsize:
                    typ, off8, len8, flags, tid, payload = unpack(data, pos)  # one copy
                    # The guess held (len8 == guess / 8 >= 2, and pos + guess <= dsize
                    # above: no wrap), and the packet is framed right and published.
                    if len8 == glen8 and off8 == 2 and gused <= avail and typ != 7 and typ != 9:
                        fresh = PacketBuilder()  # make_packet, inlined
                        fresh.type = typ
                        fresh.flags = flags
                        fresh.transaction_id = tid
                        fresh.payload = payload
                        fresh.extra_header = b""
                        fresh.transfer_pages = None
                        fresh.gpa_ranges = None
                        fresh.__class__ = Packet  # type: ignore[assignment]
                        append(fresh)  # type: ignore[arg-type]
                        pos += gused
                        if pos >= dsize:
                            pos -= dsize
                        avail -= gused
                        continue
                else:
                    typ, off8, len8, flags, tid = _DESC_UNPACK_FROM(data, pos)
                # The guess failed (only the descriptor part of that copy is used) or
                # there was none: the same checks for any length.
                end = pos + (len8 << 3)
                used = (len8 << 3) + TRAILER_SIZE
                if off8 == 2 and len8 >= 2 and used <= avail and end <= dsize and typ != 7 and typ != 9:
                    fresh = PacketBuilder()
                    fresh.type = typ
                    fresh.flags = flags
                    fresh.transaction_id = tid
                    fresh.payload = data[pos + DESCRIPTOR_SIZE : end].tobytes()
                    fresh.extra_header = b""
                    fresh.transfer_pages = None
                    fresh.gpa_ranges = None
                    fresh.__class__ = Packet  # type: ignore[assignment]
                    append(fresh)  # type: ignore[arg-type]
                    self._learn(len8)
                    guess = self._guess
                    unpack = self._unpack
                    glen8 = guess >> 3
                    gused = guess + TRAILER_SIZE
                    pos = end + TRAILER_SIZE
                    if pos >= dsize:
                        pos -= dsize
                    avail -= used
                    continue
            try:
                pkt, used = self._take(pos, avail, w)
            except RingCorrupt:
                if packets:
                    break  # deliver the good ones; the bad one raises on the next call
                raise
            append(pkt)
            pos += used
            if pos >= dsize:
                pos -= dsize
            avail -= used
        if not packets:
            self.read_signal = False
            return packets, False
        total = w - r if w >= r else dsize - r + w
        signal = self._commit(pos, total - avail)
        self.read_signal = signal
        return packets, signal

    def read_into(self, out: Buffer, records: np.ndarray[Any, np.dtype[Any]]) -> tuple[int, bool]:
        """Read up to ``len(records)`` packets into caller memory; no Python object per packet.

        ``out`` is a writable contiguous buffer (a numpy ``uint8`` array, a bytearray, an
        mmap): each packet's extra header and payload are copied into it back to back,
        from offset 0. ``records`` is a 1-D :data:`READ_RECORD` array that gets one record
        per packet (type, flags, extra_len, transaction_id, offset, length). Returns
        (packets read, signal the writer), like :meth:`read_batch`: the same walk, checks,
        one read-index update and one signal decision. The batch also ends before a packet
        that does not fit in what is left of ``out`` (the next call gets it); a first
        packet that does not fit at all raises ValueError with nothing consumed.

        The bytes are copies: ``out`` is the caller's, so views of it
        (``out[o : o + n]``) are safe to keep; nothing here is a view of the ring, which
        the other side may rewrite as soon as the read index moves.
        """
        view = _batch_buffer(out, "read_into: out", writable=True)
        _check_records(records, "read_into: records", writable=True)
        if not len(records):
            raise ValueError("read_into: records has room for no packet")
        if self._engine == "c":
            res = self._read_into(view, records)
            if res is not NotImplemented:
                return res  # type: ignore[no-any-return]
        # The reference: the general parser for every packet (the C engine inlines the
        # in-band packet and calls _take for the rest, as read_batch does).
        dsize = self._dsize
        w, r, avail = self._readable()
        rec = records.data.cast("B")
        room = len(view)
        filled = count = 0
        pos = r
        while count < len(records):
            if not avail:
                break
            try:
                pkt, used = self._take(pos, avail, w)
            except RingCorrupt:
                if count:
                    break  # deliver the good ones; the bad one raises on the next call
                raise
            extra, payload = pkt.extra_header, pkt.payload
            n = len(extra) + len(payload)
            if n > room - filled:
                if count:
                    break  # the next call delivers it
                raise ValueError(
                    f"read_into: the next packet needs {n} bytes of out, which has {room}"
                )
            view[filled : filled + len(extra)] = extra
            view[filled + len(extra) : filled + n] = payload
            _RECORD.pack_into(
                rec, count * _RECORD.size, pkt.type, pkt.flags, len(extra), pkt.transaction_id,
                filled, len(payload),
            )  # fmt: skip
            filled += n
            count += 1
            pos += used
            if pos >= dsize:
                pos -= dsize
            avail -= used
        if not count:
            self.read_signal = False
            return 0, False
        total = w - r if w >= r else dsize - r + w
        signal = self._commit(pos, total - avail)
        self.read_signal = signal
        return count, signal

    def _commit(self, new: int, bytes_read: int) -> bool:
        """Store the read index, then decide on the signal (hv_pkt_iter_close, newest)."""
        mv = self._mv
        # hv_pkt_iter_close: virt_rmb() "all reads are done before we update the read
        # index since the writer may start writing to the read area once it is updated".
        # That is prior loads (our copies out) -> this store, which a release store
        # already gives: _store32 is __atomic_store_n(SEQ_CST), at least release on
        # every target (x86-64: xchg; arm64: stlr, which orders every earlier load and
        # store of this thread before it, the plain memcpy loads of the copy-out
        # included). The copies ran in earlier C calls, earlier in program order. So
        # no separate fence (it cost ~30 ns a read). The fence AFTER the store stays:
        # store -> load needs a full barrier.
        _store32(mv, _OFF_READ, new)
        # "Older versions of Hyper-V ... do not implement pending_send_sz": the feature
        # bit of THIS ring's header (rbi->ring_buffer->feature_bits of the inbound ring).
        if not self._h32[_W_FEATURES] & FEAT_PENDING_SEND_SZ:
            return False
        # virt_mb(): store read_index -> load pending_send_sz. Reordered, a writer that
        # sets pending_send_sz after our load and blocks before our store is never woken.
        _fence()
        pending = _load32(mv, _OFF_PENDING)
        if not pending:
            return False  # the common case: the writer is not blocked
        return self._pending_signal(new, bytes_read, pending)

    def _pending_signal(self, new: int, bytes_read: int, pending: int) -> bool:
        """The end of hv_pkt_iter_close, for a non-zero pending_send_sz: did we free enough?"""
        mv = self._mv
        # virt_rmb() "read of write_index after the read of pending_send_sz": both loads
        # are seq_cst, so they happen in program order.
        w = _load32(mv, _OFF_WRITE)
        dsize = self._dsize
        # hv_get_bytes_to_write with the read index we just stored; u32 arithmetic as
        # in the kernel (a garbage write index gives a harmless wrong answer, no error:
        # the packet is already consumed).
        curr_write_sz = (dsize - (w - new)) & _U32 if w >= new else (new - w) & _U32
        # Signal only on the transition "not enough" -> "enough" free space: before this
        # read there was not more than pending free, now there is.
        if (curr_write_sz - bytes_read) & _U32 > pending:
            return False
        return curr_write_sz > pending


if _cring is not None:
    # Tell the C engine where Packet's fields and RingBuffer.read_signal live (slot
    # offsets), so it builds genuine Packets and sets read_signal as this file does.
    _cring.bind(Packet, RingBuffer, RingCorrupt)


# -- the validation point for a channel's header words ------------------------------------

_HEAD4 = struct.Struct("<4I").unpack_from  # write_index, read_index, interrupt_mask, pending_send_sz


class HeaderCheck(_CheckBase):
    """The one place that checks every header word of a channel's TX + RX ring pair.

    The ring engine checks what it uses as it uses it (indices in range and 8-aligned,
    descriptors framed right: :class:`RingCorrupt`); this class adds the rules about *who
    may write which word*, which need memory of what we stored. The channel, its
    dispatcher (before a drain and in the re-check), its send and flow-control paths and
    ``vmbus ring --map`` all ask here. Each header word, by writer::

        ring  word              writer          rule
        TX    write_index       us              equal to what we last stored
        TX    read_index        host            < data_size, multiple of 8, and moved forward
                                                at most up to our write index
        TX    interrupt_mask    host            0 or 1
        TX    pending_send_sz   us              equal to what we last stored (0: not blocked)
        RX    write_index       host            < data_size, multiple of 8
        RX    read_index        us              equal to what we last stored
        RX    interrupt_mask    us / kernel     0 or 1 (kernels up to 6.17 store 1 on interrupt)
        RX    pending_send_sz   host            < data_size (more could never be free)
        both  feature_bits      kernel (init)   not checked: a hint (bit 0) read per use;
                                                no value of it can make us read or write
                                                out of bounds, or wait without a timeout

    Descriptor fields (offset8, len8, the extra headers) are checked by the ring engine's
    read as each packet is copied out. A violation raises :class:`RingCorrupt` naming the
    ring, the word and its value; the caller closes the channel (``corrupt: ...``).

    Threads: :meth:`check_rx` / :meth:`note_rx` only on the RX ring's reader (the thread
    holding the dispatch lead); :meth:`check_tx` / :meth:`note_tx` only under the lock the
    channel's TX writers hold (a writer between its store and its note would look like a
    host that wrote our word). A host that writes one of our words between our check and
    our store is seen at the next check, not before: the check costs one load of each
    header word, not a check per load.

    Engines, as for :class:`RingBuffer`: the methods here (``_check_tx_py`` ...) are the
    reference and word every violation. With the C engine built, the base class
    ``pyvmbus._ring.Check`` runs check_tx / check_rx / check_rings / note_tx / note_rx in C (the same
    rules in the same order; a violation hands the words it loaded to ``_check_tx_py`` /
    ``_check_rx_py``, which raise) and keeps the state (tx_write, tx_pending, rx_read,
    tx_read) that both read and write. ``engine`` defaults to the rings': "c" when both
    run the C engine (it loads through their pinned memory), else "python".
    """

    # With the C engine the state lives in the base class (pyvmbus._ring.Check).
    __slots__ = () if _cring is not None else ("rx", "rx_read", "tx", "tx_pending", "tx_read", "tx_write")

    tx: RingBuffer
    rx: RingBuffer
    tx_write: int
    """Our TX write index as we last stored it (note_tx)."""
    tx_pending: int
    """Our TX pending_send_sz as we last stored it (note_tx)."""
    rx_read: int
    """Our RX read index as we last stored it (note_rx)."""
    tx_read: int
    """The host's TX read index at the last check that passed it."""

    def __init__(self, tx: RingBuffer, rx: RingBuffer, *, engine: str | None = None) -> None:
        rings = "c" if tx.engine == rx.engine == "c" else "python"
        if engine is None:
            engine = rings
        elif engine not in ENGINES:
            raise ValueError(
                f"header check engine {engine!r} is not available; this installation has {ENGINES}"
            )
        elif engine == "c" and rings != "c":
            raise ValueError(
                f"the C header check loads through the rings' C engine; these run {tx.engine!r} (tx) "
                f"and {rx.engine!r} (rx)"
            )
        if _cring is not None:
            self._bind(tx, rx, engine == "c")
        else:
            self.tx = tx
            self.rx = rx
        self.tx_write = 0
        self.tx_pending = 0
        self.rx_read = 0
        self.tx_read = _HEAD4(tx._mv, 0)[1]
        self.note_tx()
        self.note_rx()

    @property
    def engine(self) -> str:
        """The engine of these checks: "c" (pyvmbus._ring) or "python"."""
        return "c" if _cring is not None and self._fast else "python"

    def _note_tx_py(self) -> None:
        """Remember our TX words as they are now (after our own store of them)."""
        w, _, _, pending = _HEAD4(self.tx._mv, 0)
        self.tx_write = w
        self.tx_pending = pending

    def _note_rx_py(self) -> None:
        """Remember our RX read index as it is now (after a read stored it)."""
        self.rx_read = _HEAD4(self.rx._mv, 0)[1]

    def _check_rx_py(self, words: tuple[int, int, int, int] | None = None) -> int:
        """Check the RX header; the bytes ready to read. RingCorrupt on a violation.

        ``words``: the four header words as the C engine loaded them (it calls here on a
        violation, so the message is worded here); else they are loaded now.
        """
        rx = self.rx
        w: int
        r: int
        w, r, mask, pending = _HEAD4(rx._mv, 0) if words is None else words
        dsize = rx._dsize
        if w >= dsize or w & 7:
            raise _index_fault("rx", "write_index", w, dsize)
        if r != self.rx_read:
            raise RingCorrupt("read_index", r, f"ours, and we stored {self.rx_read}: the host "
                              "wrote it", "rx ring")
        if mask > 1:
            raise RingCorrupt("interrupt_mask", mask, "only 0 or 1 is ever stored (by us or the kernel)",
                              "rx ring")
        if pending >= dsize:
            raise RingCorrupt("pending_send_sz", pending, f"the host asks for more room than the "
                              f"{dsize}-byte ring can ever have", "rx ring")
        return w - r if w >= r else dsize - r + w

    def _check_tx_py(self, words: tuple[int, int, int, int] | None = None) -> int:
        """Check the TX header; the bytes free (as :meth:`RingBuffer.available_to_write`).

        ``words``: as for :meth:`_check_rx_py`.
        """
        tx = self.tx
        w: int
        r: int
        w, r, mask, pending = _HEAD4(tx._mv, 0) if words is None else words
        dsize = tx._dsize
        if w != self.tx_write:
            raise RingCorrupt("write_index", w, f"ours, and we stored {self.tx_write}: the host "
                              "wrote it", "tx ring")
        if r >= dsize or r & 7:
            raise _index_fault("tx", "read_index", r, dsize)
        last = self.tx_read
        if (r - last) % dsize > (w - last) % dsize:
            raise RingCorrupt("read_index", r, f"the host consumed past our write index {w} (it was "
                              f"at {last})", "tx ring")
        self.tx_read = r
        if mask > 1:
            raise RingCorrupt("interrupt_mask", mask, "the host stores only 0 or 1 there", "tx ring")
        if pending != self.tx_pending:
            raise RingCorrupt("pending_send_sz", pending, f"ours, and we stored {self.tx_pending}: "
                              "the host wrote it", "tx ring")
        return dsize - (w - r) if w >= r else r - w

    def _check_rings_py(self) -> int:
        """:meth:`check_tx` then :meth:`check_rx` in one call (the dispatcher's check, under
        the TX writers' lock); the bytes ready to read."""
        self.check_tx()
        return self.check_rx()

    if TYPE_CHECKING or _cring is None:
        # The public names. With the C engine built, the base class's methods take the
        # call and come here for a violation or the "python" engine.
        check_tx = _check_tx_py
        check_rx = _check_rx_py
        check_rings = _check_rings_py
        note_tx = _note_tx_py
        note_rx = _note_rx_py

    def violations(self) -> list[RingCorrupt]:
        """Every rule above broken now that needs no memory of our stores, for an observer
        that is not the channel's user (``vmbus ring --map``): indices, masks, pending."""
        out = []
        for side, ring in (("tx", self.tx), ("rx", self.rx)):
            w, r, mask, pending = _HEAD4(ring._mv, 0)
            dsize = ring._dsize
            for name, value in (("write_index", w), ("read_index", r)):
                if value >= dsize or value & 7:
                    out.append(_index_fault(side, name, value, dsize))
            if mask > 1:
                out.append(RingCorrupt("interrupt_mask", mask, "only 0 or 1 is ever stored",
                                       f"{side} ring"))
            if pending >= dsize:
                out.append(RingCorrupt("pending_send_sz", pending, f"more room than the {dsize}-byte "
                                       "ring can ever have", f"{side} ring"))
        return out


def _index_fault(side: str, name: str, value: int, dsize: int) -> RingCorrupt:
    if value >= dsize:
        return RingCorrupt(name, value, f"outside the {dsize}-byte data area", f"{side} ring")
    return RingCorrupt(name, value, "not a multiple of 8 (packets are 8-byte aligned)", f"{side} ring")
