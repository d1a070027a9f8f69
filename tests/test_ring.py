"""ring.py / packet.py: every formula and edge of the VMBus ring, one test each.

The reference for each expectation is named in the test: hv_ringbuffer_write,
hv_signal_on_write, hv_pkt_iter_first / hv_pkt_iter_close (drivers/hv/ring_buffer.c),
hv_ringbuffer_init, struct vmpacket_descriptor and friends (include/linux/hyperv.h).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import struct

import numpy as np
import pytest

from pyvmbus.errors import RingCorrupt, RingFull
from pyvmbus.packet import (
    MAX_PACKET_SIZE,
    GpaRange,
    Packet,
    PacketType,
    TransferPageRange,
    TransferPages,
    encode_gpa_direct,
    encode_transfer_pages,
    make_packet,
    packet_size,
    parse_gpa_direct,
    parse_transfer_pages,
)
from pyvmbus.ring import Descriptor, RingBuffer

pytestmark = pytest.mark.usefixtures("ring_engine")  # every test on each ring engine

H = 4096
DESC = struct.Struct("<HHHHQ")


def make(data_size: int = 1024, header_size: int = H) -> tuple[bytearray, RingBuffer]:
    buf = bytearray(header_size + data_size)
    return buf, RingBuffer.init(buf, header_size)


def set_indices(buf: bytearray, w: int, r: int) -> None:
    struct.pack_into("<II", buf, 0, w, r)


def digest(buf: bytearray | mmap.mmap) -> str:
    return hashlib.sha256(buf).hexdigest()


def ring_bytes(buf: bytearray, pos: int, n: int, header: int = H) -> bytes:
    """n bytes of the data area from pos on, wrapping (a model of the ring's own copy)."""
    data = buf[header:]
    return bytes(data[(pos + i) % len(data)] for i in range(n))


def pad8(n: int) -> int:
    return (n + 7) & ~7


# -- construction and header ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make_buf",
    [
        lambda n: bytearray(n),
        lambda n: mmap.mmap(-1, n),
        lambda n: np.zeros(n, dtype=np.uint8),
        lambda n: np.zeros(n // 4, dtype=np.uint32),
        lambda n: memoryview(bytearray(n)),
    ],
    ids=["bytearray", "mmap", "numpy-u8", "numpy-u32", "memoryview"],
)
def test_works_over_every_buffer_kind(make_buf: object) -> None:
    buf = make_buf(H + 512)  # type: ignore[operator]
    rb = RingBuffer.init(buf)
    assert rb.data_size == 512 and rb.header_size == H
    assert rb.write(b"hello", PacketType.DATA_INBAND, 1, 7) is True
    pkt = rb.read()
    assert pkt == Packet(6, 1, 7, b"hello\0\0\0")
    raw = bytes(memoryview(buf).cast("B"))
    assert struct.unpack_from("<IIII", raw, 0) == (32, 32, 0, 0)
    assert struct.unpack_from("<I", raw, 64) == (1,)
    rb.close()


def test_header_offsets_and_accessors() -> None:
    buf, rb = make()
    rb.interrupt_mask = 1
    rb.pending_send_size = 0x1234
    rb.feature_bits = 0
    assert struct.unpack_from("<IIII", buf, 0) == (0, 0, 1, 0x1234)
    assert struct.unpack_from("<I", buf, 64) == (0,)
    assert (rb.interrupt_mask, rb.pending_send_size, rb.feature_bits) == (1, 0x1234, 0)
    set_indices(buf, 24, 16)
    assert (rb.write_index, rb.read_index) == (24, 16)
    assert "write_index=24 read_index=16" in repr(rb)


@pytest.mark.parametrize(
    ("size", "header", "why"),
    [
        (H, H, "positive"),  # no data area
        (H + 12, H, "multiple of 8"),
        (H + 64, 60, "header_size"),
        (H + 64, 4100, "header_size"),  # not a multiple of 8
    ],
)
def test_rejects_bad_geometry(size: int, header: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RingBuffer(bytearray(size), header)


def test_rejects_read_only_non_contiguous_and_misaligned() -> None:
    with pytest.raises(ValueError, match="writable"):
        RingBuffer(bytes(H + 64))
    with pytest.raises(ValueError, match="contiguous"):
        RingBuffer(np.zeros(2 * (H + 64), dtype=np.uint8)[::2])
    with pytest.raises(ValueError, match="aligned"):
        RingBuffer(memoryview(bytearray(H + 64 + 1))[1:])


def test_init_is_hv_ringbuffer_init() -> None:
    buf = bytearray(b"\xaa" * (H + 256))
    RingBuffer.init(buf)
    assert buf[:64] == bytes(64)
    assert struct.unpack_from("<I", buf, 64) == (1,)  # feature_bits.value = 1
    assert buf[68:H] == bytes(H - 68)
    assert buf[H:] == b"\xaa" * 256  # the data area is not cleared (the kernel does not either)


def test_plain_constructor_does_not_touch_the_ring() -> None:
    buf = bytearray(b"\x55" * (H + 256))
    struct.pack_into("<II", buf, 0, 0, 0)
    before = bytes(buf)
    RingBuffer(buf)
    assert bytes(buf) == before


def test_64k_header_pages() -> None:
    """arm64 64K kernels: the header is a 64 KiB page, the data follows it."""
    hsize = 65536
    buf = bytearray(b"\x77" * (hsize + 4096))
    rb = RingBuffer.init(buf, header_size=hsize)
    assert buf[:4096] == b"\0" * 64 + b"\1\0\0\0" + bytes(4096 - 68)
    assert buf[4096:hsize] == b"\x77" * (hsize - 4096)  # memset(.., HV_HYP_PAGE_SIZE) only
    assert rb.data_size == 4096
    rb.write(b"x" * 20, transaction_id=3)
    assert DESC.unpack_from(buf, hsize) == (6, 2, 5, 0, 3)
    assert buf[hsize + 16 : hsize + 36] == b"x" * 20
    assert rb.read() == Packet(6, 0, 3, b"x" * 20 + bytes(4))
    assert struct.unpack_from("<II", buf, 0) == (48, 48)


def test_close_lets_an_mmap_close() -> None:
    m = mmap.mmap(-1, H + 64)
    rb = RingBuffer.init(m)
    with pytest.raises(BufferError):
        m.close()
    with rb:
        pass
    rb.close()  # idempotent
    assert repr(rb) == "<RingBuffer closed>"
    m.close()


# -- the bytes a write produces ---------------------------------------------------------------


@pytest.mark.parametrize("n", range(18))
def test_write_bytes_are_the_kernels(n: int) -> None:
    """hv_ringbuffer_write: descriptor, payload, zero padding to 8, trailer old_write << 32."""
    buf, rb = make()
    set_indices(buf, 40, 40)
    payload = bytes(range(1, n + 1))
    rb.write(payload, PacketType.COMP, 1, 0x1122334455667788)
    size = pad8(16 + n)
    assert DESC.unpack_from(buf, H + 40) == (0xB, 2, size // 8, 1, 0x1122334455667788)
    assert buf[H + 56 : H + 56 + n] == payload
    assert buf[H + 56 + n : H + 40 + size] == bytes(size - 16 - n)
    assert struct.unpack_from("<Q", buf, H + 40 + size) == (40 << 32,)
    assert rb.write_index == 40 + size + 8
    assert rb.read_index == 40


def test_zero_byte_payload() -> None:
    buf, rb = make()
    assert rb.write(b"") is True
    assert DESC.unpack_from(buf, H) == (6, 2, 2, 0, 0)
    assert rb.write_index == 24
    assert rb.read() == Packet(6, 0, 0, b"")
    assert rb.read() is None


def test_packet_size() -> None:
    assert packet_size(0) == 24
    assert packet_size(1) == 32
    assert packet_size(8) == 32
    assert packet_size(9, 8) == 48


def test_gather_writes_the_same_bytes_as_one_buffer() -> None:
    parts = [b"ab", bytearray(b"cde"), memoryview(b"fghij"), np.arange(3, dtype=np.uint32), b""]
    joined = b"abcdefghij" + np.arange(3, dtype=np.uint32).tobytes()
    for start in (0, 1024 - 8, 1024 - 16, 1024 - 24, 1024 - 32):  # across the wrap
        buf1, rb1 = make()
        buf2, rb2 = make()
        set_indices(buf1, start, start)
        set_indices(buf2, start, start)
        assert rb1.write(parts, 6, 0, 5) == rb2.write(joined, 6, 0, 5)
        assert buf1 == buf2
        assert rb1.read() == Packet(6, 0, 5, joined + bytes(2))


def test_gather_tuple_and_non_bytes_single_buffer() -> None:
    _buf, rb = make()
    rb.write((b"a", b"b"))
    rb.write(np.array([1, 2], dtype=np.uint16))
    rb.write(memoryview(b"xyz"))
    assert [p.payload for p in rb.read_batch(3)[0]] == [
        b"ab" + bytes(6),
        b"\1\0\2\0" + bytes(4),
        b"xyz" + bytes(5),
    ]


def test_payload_of_other_types_is_refused() -> None:
    _, rb = make()
    with pytest.raises(TypeError):
        rb.write("text")
    with pytest.raises(TypeError):
        rb.write(np.zeros((4, 4), dtype=np.uint8)[:, 1])  # not contiguous


def test_bad_descriptor_values_are_refused() -> None:
    _buf, rb = make()
    for kwargs in ({"type": 0x10000}, {"flags": -1}, {"transaction_id": 1 << 64}):
        with pytest.raises(ValueError, match="descriptor field out of range"):
            rb.write(b"x", **kwargs)
        with pytest.raises(ValueError, match="descriptor field out of range"):
            rb.write([b"x"], **kwargs)
    assert rb.write_index == 0  # nothing published


def test_extra_header() -> None:
    buf, rb = make()
    rb.write(b"pay", PacketType.DATA_USING_GPADL, 0, 9, extra_header=b"E" * 8)
    assert DESC.unpack_from(buf, H) == (8, 3, 4, 0, 9)
    assert buf[H + 16 : H + 24] == b"E" * 8
    assert buf[H + 24 : H + 32] == b"pay" + bytes(5)
    pkt = rb.read()
    assert pkt == Packet(8, 0, 9, b"pay" + bytes(5), extra_header=b"E" * 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        rb.write(b"", extra_header=b"123")


def test_packet_longer_than_len8_allows_is_refused() -> None:
    buf = bytearray(H + (1 << 20))
    rb = RingBuffer.init(buf)
    with pytest.raises(ValueError, match="maximum"):
        rb.write(bytes(MAX_PACKET_SIZE - 15))
    rb.write(bytes(MAX_PACKET_SIZE - 16))  # exactly len8 = 0xffff
    assert DESC.unpack_from(buf, H)[2] == 0xFFFF
    pkt = rb.read()
    assert pkt is not None and len(pkt.payload) == MAX_PACKET_SIZE - 16


# -- the wrap -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 8, 20, 100])
@pytest.mark.parametrize("back", [8, 16, 24, 32, 40, 64, 200])
def test_wrap_anywhere_in_the_packet(n: int, back: int) -> None:
    """A packet starting ``back`` bytes before the end: the copy is split at the end."""
    buf, rb = make(1024)
    start = 1024 - back
    set_indices(buf, start, start)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(n))
    rb.write(payload, 6, 1, 0xABCDEF)
    size = pad8(16 + n)
    expected = DESC.pack(6, 2, size // 8, 1, 0xABCDEF) + payload + bytes(size - 16 - n)
    expected += struct.pack("<Q", start << 32)
    assert ring_bytes(buf, start, size + 8) == expected
    assert rb.write_index == (start + size + 8) % 1024
    assert rb.read() == Packet(6, 1, 0xABCDEF, payload + bytes(size - 16 - n))
    assert rb.read_index == rb.write_index


def test_packet_ending_exactly_at_the_end_wraps_the_index_to_zero() -> None:
    buf, rb = make(1024)
    set_indices(buf, 1024 - 48, 1024 - 48)
    rb.write(bytes(24))  # 16 + 24 + 8 = 48
    assert rb.write_index == 0
    assert rb.read() == Packet(6, 0, 0, bytes(24))
    assert rb.read_index == 0
    rb.write(b"next")
    assert DESC.unpack_from(buf, H) == (6, 2, 3, 0, 0)  # the next one starts at 0
    assert struct.unpack_from("<Q", buf, H + 24) == (0,)  # its trailer: old write_index 0


def test_extra_header_across_the_wrap() -> None:
    buf, rb = make(1024)
    set_indices(buf, 1016, 1016)  # descriptor split 8/8, extra header at 8..24
    ext = bytes(range(16))
    rb.write(b"p", 8, 0, 1, extra_header=ext)
    assert rb.read() == Packet(8, 0, 1, b"p" + bytes(7), extra_header=ext)


# -- full and not quite full ----------------------------------------------------------------


def test_largest_packet_that_fits_and_one_byte_more() -> None:
    """hv_ringbuffer_write fails if bytes_avail_towrite <= total: one byte always stays free."""
    buf, rb = make(1024)
    largest = 1024 - 32  # 16 + 992 + 8 = 1016 < 1024
    before = digest(buf)
    with pytest.raises(RingFull) as exc:
        rb.write(bytes(largest + 1))  # padded: 16 + 1000 + 8 = 1024 = avail -> full
    assert (exc.value.needed, exc.value.available) == (1024, 1024)
    assert digest(buf) == before
    assert rb.write(bytes(largest)) is True
    assert rb.write_index == 1016
    assert rb.available_to_write() == 8
    assert rb.available_to_read() == 1016
    pkt = rb.read()
    assert pkt is not None and len(pkt.payload) == largest


@pytest.mark.parametrize("used", [0, 24, 512, 1000])
def test_full_boundary_in_a_partly_used_ring(used: int) -> None:
    buf, rb = make(1024)
    set_indices(buf, (296 + used) % 1024, 296)
    avail = rb.available_to_write()
    assert avail == 1024 - used
    n_fit = avail - 8 - 24  # needs 16 + n + 8 < avail with n a multiple of 8
    if n_fit >= 0:
        before = digest(buf)
        with pytest.raises(RingFull):
            rb.write(bytes(n_fit + 1))
        assert digest(buf) == before
        rb.write(bytes(n_fit))
        assert rb.available_to_write() == 8


def test_ring_full_changes_nothing_in_batch() -> None:
    buf, rb = make(1024)
    rb.write(bytes(100))
    before = digest(buf)
    batch = [(bytes(300), 6, 0, i) for i in range(3)]  # 3 * 328 = 984 > 1024 - 128 - 1
    with pytest.raises(RingFull) as exc:
        rb.write_batch(batch)
    assert exc.value.needed == 984
    assert digest(buf) == before


# -- signalling -----------------------------------------------------------------------------


def test_write_signals_only_on_empty_to_non_empty() -> None:
    """hv_signal_on_write: mask clear and old write index == read index."""
    _, rb = make()
    assert rb.write(b"a") is True
    assert rb.write(b"b") is False  # not empty before
    rb.read()
    assert rb.write(b"c") is False  # still one unread
    rb.read()
    rb.read()
    assert rb.write(b"d") is True  # empty again
    rb.read()
    rb.interrupt_mask = 1
    assert rb.write(b"e") is False  # the reader is draining
    rb.interrupt_mask = 0
    rb.read()
    assert rb.write_batch([(b"f", 6, 0, 0), (b"g", 6, 0, 0)]) is True  # one decision for the batch
    assert rb.write_batch([(b"h", 6, 0, 0)]) is False
    assert rb.write_batch([]) is False


def _reader_ring(data_size: int = 1024) -> tuple[bytearray, RingBuffer]:
    return make(data_size)


def test_read_signal_needs_the_feature_bit_of_this_ring() -> None:
    """hv_pkt_iter_close: no pending_send_sz handling unless feat_pending_send_sz is set."""
    _buf, rb = make(1024)
    for _ in range(30):
        rb.write(bytes(8))  # 30 * 32 = 960 used, 64 free
    rb.pending_send_size = 64
    rb.feature_bits = 0
    assert rb.read() is not None and rb.read_signal is False
    rb.write(bytes(8))  # back to 64 free
    rb.feature_bits = 1
    assert rb.read() is not None and rb.read_signal is True  # 64 -> 96 free, > 64


@pytest.mark.parametrize(
    ("used_before", "pending", "expect"),
    [
        (960, 64, True),  # 64 free (not > 64) -> 96 free: transition
        (960, 0, False),  # nobody waits
        (960, 100, False),  # 96 free is still not enough
        (960, 96, False),  # exactly filling is "not enough" (curr_write_sz > pending)
        (960, 95, True),
        (928, 64, False),  # 96 free before the read: the writer was not blocked
        (928, 96, True),  # 96 -> 128 free, pending 96
    ],
)
def test_read_signal_formula(used_before: int, pending: int, expect: bool) -> None:
    """Signal iff curr_write_sz - bytes_read <= pending and curr_write_sz > pending."""
    _buf, rb = make(1024)
    for _ in range(used_before // 32):
        rb.write(bytes(8))
    rb.pending_send_size = pending
    assert rb.read() is not None
    assert rb.read_signal is expect
    assert rb.read_batch(1)[1] is rb.read_signal  # same rule in the batch API


def test_read_batch_signal_counts_all_bytes_read() -> None:
    _buf, rb = make(1024)
    for _ in range(31):
        rb.write(bytes(8))  # 992 used, 32 free
    rb.pending_send_size = 100
    pkts, signal = rb.read_batch(3)  # 32 -> 128 free in one go: a transition
    assert len(pkts) == 3 and signal is True and rb.read_signal is True
    pkts, signal = rb.read_batch(3)  # 128 -> 224, was already enough
    assert signal is False


def test_read_signal_u32_arithmetic_when_the_writer_raced_ahead() -> None:
    """curr_write_sz - bytes_read is u32 in the kernel: a huge value means "do not signal"."""
    buf, rb = make(1024)
    for _ in range(3):
        rb.write(bytes(8))
    rb.pending_send_size = 4
    # Pretend the writer filled the ring right after our read index store: curr_write_sz
    # (8) < bytes_read (32), so the u32 difference wraps and no signal is due.
    assert rb._pending_signal(32, 32, 4) is False  # the state after one read, w = 96
    struct.pack_into("<I", buf, 0, 24)  # write index 24, read index 32: 8 bytes free
    assert rb._pending_signal(32, 32, 4) is False


def test_pending_send_size_round_trip() -> None:
    _buf, rb = make(1024)
    assert rb.set_pending_send_size(500) is True  # 1024 free already: do not wait
    assert rb.pending_send_size == 500
    rb.write(bytes(700))
    assert rb.set_pending_send_size(500) is False  # 296 free: wait for the reader
    rb.clear_pending_send_size()
    assert rb.pending_send_size == 0
    for bad in (0, 1024, -1):
        with pytest.raises(ValueError):
            rb.set_pending_send_size(bad)


def test_ring_full_needed_is_the_pending_send_size_to_ask_for() -> None:
    _buf, rb = make(1024)
    rb.write(bytes(800))
    try:
        rb.write(bytes(300))
    except RingFull as exc:
        assert rb.set_pending_send_size(exc.needed) is False
    else:  # pragma: no cover
        pytest.fail("expected RingFull")
    rb.read()
    assert rb.read_signal is True  # the writer can now write its packet
    rb.write(bytes(300))


def test_begin_and_end_read() -> None:
    """hv_begin_read / hv_end_read: mask while draining, unmask and re-check."""
    _, rb = make()
    rb.begin_read()
    assert rb.interrupt_mask == 1
    assert rb.write(b"x") is False
    assert rb.end_read() == 32  # a packet arrived while masked: drain again
    assert rb.interrupt_mask == 0
    rb.read()
    assert rb.end_read() == 0


# -- reading --------------------------------------------------------------------------------


def test_read_empty_and_peek() -> None:
    _buf, rb = make()
    assert rb.read() is None and rb.read_signal is False
    assert rb.read_batch(5) == ([], False)
    assert rb.peek_descriptor() is None
    rb.write(b"abc", 11, 1, 77)
    assert rb.peek_descriptor() == Descriptor(11, 2, 3, 1, 77)
    assert rb.read_index == 0  # peeking consumes nothing


def test_read_batch_reads_up_to_max_count() -> None:
    _buf, rb = make(1024)
    for i in range(5):
        rb.write(bytes([i]) * (i + 1), 6, 0, i)
    pkts, _ = rb.read_batch(3)
    assert [p.transaction_id for p in pkts] == [0, 1, 2]
    assert rb.read_index == 3 * 32
    pkts, _ = rb.read_batch(10)
    assert [p.transaction_id for p in pkts] == [3, 4]
    with pytest.raises(ValueError):
        rb.read_batch(0)


def test_packet_is_a_copy() -> None:
    """The host may rewrite the ring at any time: a Packet must not change with it."""
    buf, rb = make()
    rb.write(b"original")
    pkt = rb.read()
    buf[H + 16 : H + 24] = b"changed!"
    assert pkt is not None and pkt.payload == b"original"
    assert isinstance(pkt.payload, bytes)


def test_packet_dataclass() -> None:
    fast = make_packet(6, 1, 5, b"p", b"", None, None)
    slow = Packet(6, 1, 5, b"p")
    assert fast == slow and hash(fast) == hash(slow) and type(fast) is Packet
    assert fast.completion_requested and not Packet(6, 0, 0, b"").completion_requested
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.flags = 0  # type: ignore[misc]
    assert dataclasses.replace(fast, flags=0) == Packet(6, 0, 5, b"p")
    assert repr(fast) == repr(slow)
    _, rb = make()
    rb.write(b"q", 6, 0, 1)
    read = rb.read()
    assert type(read) is Packet and dataclasses.asdict(read)["payload"] == b"q" + bytes(7)


# -- malformed rings: RingCorrupt, nothing consumed ------------------------------------------


def corrupt_case(buf: bytearray, rb: RingBuffer, field: str) -> None:
    before = digest(buf)
    with pytest.raises(RingCorrupt) as exc:
        rb.read()
    assert exc.value.field == field
    assert digest(buf) == before  # nothing consumed, no byte changed
    with pytest.raises(RingCorrupt):
        rb.read_batch(4)
    assert digest(buf) == before


@pytest.mark.parametrize(
    ("w", "r", "field"),
    [
        (1024, 0, "write_index"),  # == data_size: out of range
        (0xFFFFFFF8, 0, "write_index"),
        (12, 0, "write_index"),  # unaligned
        (0, 1024, "read_index"),
        (32, 4, "read_index"),
    ],
)
def test_indices_out_of_range_or_unaligned(w: int, r: int, field: str) -> None:
    buf, rb = make(1024)
    set_indices(buf, w, r)
    corrupt_case(buf, rb, field)
    for call in (rb.available_to_read, rb.available_to_write, rb.peek_descriptor):
        with pytest.raises(RingCorrupt):
            call()
    before = digest(buf)
    with pytest.raises(RingCorrupt):
        rb.write(b"x")  # the writer checks them too before writing anything
    with pytest.raises(RingCorrupt):
        rb.write_batch([(b"x", 6, 0, 0)])
    assert digest(buf) == before


def put_desc(buf: bytearray, pos: int, type: int, off8: int, len8: int, flags: int = 0, tid: int = 0) -> None:
    buf[H + pos : H + pos + 16] = DESC.pack(type, off8, len8, flags, tid)


@pytest.mark.parametrize(
    ("off8", "len8", "published", "field"),
    [
        (2, 0, 64, "len8"),  # zero-length packet
        (0, 4, 64, "offset8"),  # header shorter than the descriptor
        (1, 4, 64, "offset8"),
        (5, 4, 64, "offset8"),  # header longer than the packet
        (2, 8, 64, "len8"),  # 64 + 8 trailer > 64 published
        (2, 7, 64, "len8"),  # 56 + 8 = 64: fits exactly (control: not corrupt)
        (2, 0xFFFF, 64, "len8"),
    ],
)
def test_each_corrupt_descriptor_field(off8: int, len8: int, published: int, field: str) -> None:
    buf, rb = make(1024)
    put_desc(buf, 0, 6, off8, len8)
    set_indices(buf, published, 0)
    if (off8, len8) == (2, 7):
        assert rb.read() is not None and rb.read_index == 64
        return
    corrupt_case(buf, rb, field)


def test_less_than_a_descriptor_and_trailer_published() -> None:
    buf, rb = make(1024)
    put_desc(buf, 0, 6, 2, 2)
    set_indices(buf, 16, 0)
    corrupt_case(buf, rb, "write_index")


def test_corrupt_descriptor_across_the_wrap() -> None:
    buf, rb = make(1024)
    raw = DESC.pack(6, 1, 4, 0, 0)  # offset8 = 1
    buf[H + 1016 : H + 1024] = raw[:8]
    buf[H : H + 8] = raw[8:]
    set_indices(buf, 64, 1016)
    corrupt_case(buf, rb, "offset8")


def test_read_batch_stops_before_a_bad_packet() -> None:
    buf, rb = make(1024)
    rb.write(b"good1", 6, 0, 1)
    rb.write(b"good2", 6, 0, 2)
    put_desc(buf, 64, 6, 9, 2)  # offset8 > len8
    set_indices(buf, 64 + 32, 0)
    pkts, _ = rb.read_batch(10)
    assert [p.transaction_id for p in pkts] == [1, 2]
    assert rb.read_index == 64
    corrupt_case(buf, rb, "offset8")


# -- transfer-page (7) and GPA-direct (9) packets --------------------------------------------


def test_transfer_pages_round_trip() -> None:
    _, rb = make()
    ext = encode_transfer_pages(0x1234, [(100, 0), (200, 4096)], sender_owns_set=1)
    assert len(ext) == 24
    rb.write(b"rndis", PacketType.DATA_USING_XFER_PAGES, 1, 42, extra_header=ext)
    pkt = rb.read()
    assert pkt is not None
    assert pkt.transfer_pages == TransferPages(
        0x1234, 1, (TransferPageRange(100, 0), TransferPageRange(200, 4096))
    )
    assert pkt.gpa_ranges is None and pkt.extra_header == ext
    assert pkt.payload == b"rndis" + bytes(3)


def test_gpa_direct_round_trip() -> None:
    _, rb = make()
    ranges = [(100, 4000, [7, 8]), (4096, 0, [9]), (1, 4095, [10]), (8192, 1, [11, 12, 13])]
    ext = encode_gpa_direct(ranges)
    assert len(ext) == 8 + 4 * 8 + 7 * 8
    rb.write(b"", PacketType.DATA_USING_GPA_DIRECT, 1, 5, extra_header=ext)
    pkt = rb.read()
    assert pkt is not None and pkt.transfer_pages is None
    assert pkt.gpa_ranges == tuple(GpaRange(n, o, tuple(p)) for n, o, p in ranges)
    with pytest.raises(ValueError):
        encode_gpa_direct([(100, 4000, [7])])  # crosses a page: needs two pfns


def write_raw_packet(buf: bytearray, rb: RingBuffer, type: int, ext: bytes, payload: bytes = b"") -> None:
    """A packet with any extra header bytes (no encoder checks), as a hostile host would."""
    rb.write(payload, type, 0, 0, extra_header=ext)


@pytest.mark.parametrize(
    ("type", "ext", "field"),
    [
        (7, b"", "offset8"),  # no transfer-page header at all
        (7, struct.pack("<HBBI", 1, 0, 0, 1), "range_cnt"),  # one range, no room for it
        (7, struct.pack("<HBBI", 1, 0, 0, 3) + bytes(16), "range_cnt"),
        (7, struct.pack("<HBBI", 1, 0, 0, 0xFFFFFFFF) + bytes(8), "range_cnt"),
        (9, b"", "offset8"),
        (9, struct.pack("<II", 0, 0) + bytes(16), "rangecount"),  # no ranges
        (9, struct.pack("<II", 0, 2) + struct.pack("<IIQ", 10, 0, 1), "rangecount"),  # 2nd missing
        (9, struct.pack("<II", 0, 0xFFFFFFFF) + bytes(16), "rangecount"),
        (9, struct.pack("<II", 0, 1) + struct.pack("<IIQ", 0, 0, 1), "gpa_ranges[0].len"),
        (9, struct.pack("<II", 0, 1) + struct.pack("<IIQ", 1, 4096, 1), "gpa_ranges[0].offset"),
        (9, struct.pack("<II", 0, 1) + struct.pack("<IIQ", 4097, 0, 1), "gpa_ranges[0].len"),  # 2 pfns
        (
            9,
            struct.pack("<II", 0, 2) + struct.pack("<IIQ", 1, 0, 1) + struct.pack("<IIQ", 5000, 0, 1),
            "gpa_ranges[1].len",
        ),
        (9, struct.pack("<II", 0, 1) + struct.pack("<IIQ", 0xFFFFFFFF, 4095, 1), "gpa_ranges[0].len"),
    ],
)
def test_range_counts_that_overrun_the_header(type: int, ext: bytes, field: str) -> None:
    buf, rb = make()
    write_raw_packet(buf, rb, type, ext, b"payload!")
    corrupt_case(buf, rb, field)


def test_range_parsers_directly() -> None:
    assert parse_transfer_pages(struct.pack("<HBBI", 3, 0, 0, 0)) == TransferPages(3, 0, ())
    assert parse_gpa_direct(encode_gpa_direct([(1, 0, [5])])) == (GpaRange(1, 0, (5,)),)
    # Slack after the ranges is allowed (the header is 8-byte padded by its writer).
    assert parse_gpa_direct(encode_gpa_direct([(1, 0, [5])]) + bytes(8)) == (GpaRange(1, 0, (5,)),)


def test_extra_header_as_any_buffer() -> None:
    _, rb = make()
    rb.write(b"p", 8, 0, 1, extra_header=np.arange(2, dtype=np.uint32))
    rb.write(b"q", 8, 0, 2, extra_header=bytearray(8))
    rb.write(b"r", 6, 0, 3, extra_header=memoryview(b""))
    pkts, _ = rb.read_batch(3)
    assert [p.extra_header for p in pkts] == [b"\0\0\0\0\1\0\0\0", bytes(8), b""]


def test_without_the_class_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a Python refused the __class__ swap, packets come from the slot setters."""
    from pyvmbus import packet, ring

    monkeypatch.setattr(packet, "BUILDER_OK", False)
    monkeypatch.setattr(ring, "BUILDER_OK", False)
    assert make_packet(6, 1, 2, b"x", b"", None, None) == Packet(6, 1, 2, b"x")
    _, rb = make()
    rb.write(b"abc", 11, 1, 9)
    rb.write(b"def", 6, 0, 10)
    assert rb.read() == Packet(11, 1, 9, b"abc" + bytes(5))
    assert rb.read_batch(2)[0] == [Packet(6, 0, 10, b"def" + bytes(5))]
