"""ring.py's read fast path: the per-ring guess of the next in-band packet's length.

read() and read_batch() copy descriptor + payload with ONE struct.unpack_from whose
format assumes the next packet has the length of the last one (see ring._unpacker).
The guess must never change what is read: a right guess with hostile other fields, a
guess that would run past the end of the data area or past what is published, a miss,
and a host that rewrites the ring between two reads must all give the packet a plain
reader gives, or RingCorrupt with nothing consumed. The plain reader here is ref_read:
struct on a bytes snapshot of the whole ring, wrap by doubling the data area.

Also: write_batch's all-bytes fast path against writes one by one (whole ring images),
and the bound on the module's cache of compiled formats.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import pyvmbus.ring as ring_mod
from pyvmbus.errors import RingCorrupt, RingFull
from pyvmbus.packet import (
    MAX_PACKET_SIZE,
    Packet,
    parse_gpa_direct,
    parse_transfer_pages,
)
from pyvmbus.ring import RingBuffer

pytestmark = pytest.mark.usefixtures("ring_engine")  # every test on each ring engine

H = 4096
DESC = struct.Struct("<HHHHQ")
CORRUPT = "corrupt"


def make(data_size: int) -> tuple[bytearray, RingBuffer]:
    buf = bytearray(H + data_size)
    return buf, RingBuffer.init(buf)


def indices(buf: bytearray) -> tuple[int, int]:
    w, r = struct.unpack_from("<II", buf, 0)
    return w, r


def place(buf: bytearray, pos: int) -> None:
    """Make the ring empty at ``pos`` (both indices), as after reading up to there."""
    struct.pack_into("<II", buf, 0, pos, pos)


def payload_of(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def prime(buf: bytearray, rb: RingBuffer, n: int, *, times: int = 2) -> None:
    """Read ``times`` in-band packets of an n-byte payload from offset 0: the guess is now n."""
    for i in range(times):
        place(buf, 0)
        rb.write(payload_of(n, 1000 + i))
        assert rb.read() == Packet(6, 0, 0, payload_of(n, 1000 + i) + bytes(-n & 7))


# -- the reference reader --------------------------------------------------------------------


def ref_read(img: bytes, dsize: int) -> tuple[Packet, int] | str | None:
    """The next packet of a ring image and the read index after it; None; or CORRUPT.

    hv_pkt_iter_first's framing, rejecting instead of clamping (docs/ring.md, Reading).
    """
    w, r = struct.unpack_from("<II", img, 0)
    if w >= dsize or r >= dsize or (w | r) & 7:
        return CORRUPT
    if w == r:
        return None
    avail = (w - r) % dsize
    if avail < 24:
        return CORRUPT
    data = img[H : H + dsize] * 2  # a doubled mapping, as the kernel's: no wrap to handle
    typ, off8, len8, flags, tid = DESC.unpack_from(data, r)
    if not 2 <= off8 <= len8 or len8 * 8 + 8 > avail:
        return CORRUPT
    extra = data[r + 16 : r + off8 * 8]
    body = data[r + off8 * 8 : r + len8 * 8]
    try:
        transfer = parse_transfer_pages(extra) if typ == 7 else None
        gpa = parse_gpa_direct(extra) if typ == 9 else None
    except RingCorrupt:
        return CORRUPT
    return Packet(typ, flags, tid, body, extra, transfer, gpa), (r + len8 * 8 + 8) % dsize


def ref_read_batch(img: bytes, dsize: int, count: int) -> tuple[list[Packet], int] | str:
    """read_batch by ref_read: the write index loaded once; stop at a bad packet after good ones."""
    cur = bytearray(img)
    got: list[Packet] = []
    r = indices(cur)[1]
    while len(got) < count:
        out = ref_read(bytes(cur), dsize)
        if out is None:
            break
        if out == CORRUPT:
            if not got:
                return CORRUPT
            break
        assert isinstance(out, tuple)
        got.append(out[0])
        r = out[1]
        struct.pack_into("<I", cur, 4, r)
    return got, r


def check_read(buf: bytearray, rb: RingBuffer, dsize: int) -> Packet | str | None:
    """rb.read() against ref_read on the same image: same packet, same index, or both corrupt."""
    before = bytes(buf)
    expect = ref_read(before, dsize)
    try:
        got = rb.read()
    except RingCorrupt:
        assert expect == CORRUPT, f"RingCorrupt where the reference reads {expect!r}"
        assert bytes(buf) == before, "RingCorrupt changed the ring"
        return CORRUPT
    if expect is None:
        assert got is None and bytes(buf) == before
        return None
    assert isinstance(expect, tuple), f"read {got!r} where the reference says {expect!r}"
    assert got == expect[0]
    assert indices(buf)[1] == expect[1]
    assert buf[:4] == before[:4] and buf[8:] == before[8:], "a read may only move the read index"
    return got


def check_read_batch(buf: bytearray, rb: RingBuffer, dsize: int, count: int) -> list[Packet] | str:
    before = bytes(buf)
    expect = ref_read_batch(before, dsize, count)
    try:
        got, _signal = rb.read_batch(count)
    except RingCorrupt:
        assert expect == CORRUPT, f"RingCorrupt where the reference reads {expect!r}"
        assert bytes(buf) == before, "RingCorrupt changed the ring"
        return CORRUPT
    assert isinstance(expect, tuple), f"read {got!r} where the reference says {expect!r}"
    assert got == expect[0]
    assert indices(buf)[1] == expect[1]
    assert buf[:4] == before[:4] and buf[8:] == before[8:]
    return got


Reader = Callable[[bytearray, RingBuffer, int], Any]
READERS: dict[str, Reader] = {
    "read": check_read,
    "read_batch": lambda buf, rb, dsize: check_read_batch(buf, rb, dsize, 4),
}


@pytest.fixture(params=sorted(READERS))
def reader(request: pytest.FixtureRequest) -> Reader:
    return READERS[request.param]


# -- a right length, hostile other fields ----------------------------------------------------

GUESS_N = 48  # payload bytes: len8 = 8, the guess is 64
GUESS_LEN8 = (16 + GUESS_N) // 8


def set_desc(buf: bytearray, pos: int, **fields: int) -> None:
    typ, off8, len8, flags, tid = DESC.unpack_from(buf, H + pos)
    new = {"type": typ, "offset8": off8, "len8": len8, "flags": flags, "tid": tid, **fields}
    DESC.pack_into(buf, H + pos, new["type"], new["offset8"], new["len8"], new["flags"], new["tid"])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"offset8": 0}, "offset8"),
        ({"offset8": 1}, "offset8"),
        ({"offset8": GUESS_LEN8 + 1}, "offset8"),
        ({"offset8": 0xFFFF}, "offset8"),
        ({"type": 7}, "offset8"),  # a transfer-page packet needs a header offset8 = 2 lacks
        ({"type": 9}, "offset8"),  # so does GPA direct
    ],
    ids=["off8=0", "off8=1", "off8>len8", "off8=max", "type7", "type9"],
)
def test_right_guess_hostile_fields(reader: Reader, fields: dict[str, int], field: str) -> None:
    buf, rb = make(1024)
    prime(buf, rb, GUESS_N)
    place(buf, 128)
    rb.write(payload_of(GUESS_N, 1), transaction_id=5)
    set_desc(buf, 128, **fields)
    assert DESC.unpack_from(buf, H + 128)[2] == GUESS_LEN8  # the guess matches len8
    before = bytes(buf)
    with pytest.raises(RingCorrupt) as info:
        rb.read() if reader is check_read else rb.read_batch(4)
    assert info.value.field == field
    assert bytes(buf) == before and rb.read_index == 128
    assert reader(buf, rb, 1024) == CORRUPT  # and the reference agrees
    # The ring is usable again once the descriptor is right: nothing was cached.
    set_desc(buf, 128, type=6, offset8=2)
    assert rb.read() == Packet(6, 0, 5, payload_of(GUESS_N, 1))


@pytest.mark.parametrize("published", [24, 32, 64, GUESS_N + 16])
def test_right_guess_len8_beyond_published(reader: Reader, published: int) -> None:
    """len8 == the guess, but the writer published less than packet + trailer."""
    buf, rb = make(1024)
    prime(buf, rb, GUESS_N)
    place(buf, 256)
    rb.write(payload_of(GUESS_N, 2))
    struct.pack_into("<I", buf, 0, 256 + published)
    before = bytes(buf)
    with pytest.raises(RingCorrupt) as info:
        rb.read() if reader is check_read else rb.read_batch(4)
    assert info.value.field == "len8"
    assert bytes(buf) == before and rb.read_index == 256
    assert reader(buf, rb, 1024) == CORRUPT


def test_right_guess_legal_extra_header(reader: Reader) -> None:
    """len8 == the guess and offset8 = 3: legal, read by the general parser, not the fast path."""
    buf, rb = make(1024)
    prime(buf, rb, GUESS_N)
    place(buf, 64)
    rb.write(payload_of(GUESS_N - 8, 3), extra_header=b"EXTRAHDR")
    assert DESC.unpack_from(buf, H + 64)[1:3] == (3, GUESS_LEN8)
    got = reader(buf, rb, 1024)
    pkt = got if reader is check_read else got[0]
    assert pkt == Packet(6, 0, 0, payload_of(GUESS_N - 8, 3), b"EXTRAHDR")


def test_bad_packet_after_good_ones_in_a_batch() -> None:
    """read_batch: good guessed packets are delivered, the bad one raises on the next call."""
    buf, rb = make(1024)
    prime(buf, rb, GUESS_N)
    place(buf, 0)
    for i in range(3):
        rb.write(payload_of(GUESS_N, i), transaction_id=i)
    set_desc(buf, 2 * 72, offset8=1)
    pkts = check_read_batch(buf, rb, 1024, 8)
    assert isinstance(pkts, list)
    assert [p.transaction_id for p in pkts] == [0, 1]
    assert rb.read_index == 2 * 72
    with pytest.raises(RingCorrupt):
        rb.read_batch(8)
    assert rb.read_index == 2 * 72


# -- the guess near the wrap and past what is published ----------------------------------------


@pytest.mark.parametrize("dsize", [128, 256])
@pytest.mark.parametrize("guess_n", [0, 8, 48, 96])
def test_guess_at_every_position(reader: Reader, dsize: int, guess_n: int) -> None:
    """Every start position of a small ring, every next size, right and hostile len8.

    A guessed copy that does not fit before the end of the data area must not be tried;
    one that fits but reaches past what is published must not be believed. The memoryview
    over the data area bounds every copy, so a read outside the ring would be a
    struct.error or ValueError here, not silence.
    """
    buf, rb = make(dsize)
    guess_len8 = (16 + guess_n + 7) // 8
    for pos in range(0, dsize, 8):
        for n in (0, 8, 40, guess_n, guess_n + 8, dsize - 40):
            if n < 0 or ((16 + n + 7) & ~7) + 8 >= dsize:
                continue
            for hostile in (None, guess_len8, guess_len8 + 1, 0xFFFF):
                prime(buf, rb, guess_n, times=1)
                place(buf, pos)
                rb.write(payload_of(n, pos + n))
                if hostile is not None:
                    # Only the len8 bytes, which may straddle the end of the data area.
                    for i, b in enumerate(struct.pack("<H", hostile)):
                        buf[H + (pos + 4 + i) % dsize] = b
                reader(buf, rb, dsize)


@pytest.mark.parametrize("dsize", [128, 256, 1024])
def test_guess_longer_than_what_remains(reader: Reader, dsize: int) -> None:
    """The guess is the biggest packet the ring holds; then small packets all the way round."""
    buf, rb = make(dsize)
    big = dsize - 40  # packet dsize - 24 + trailer: the most a ring of dsize takes
    prime(buf, rb, big, times=1)
    place(buf, 0)
    for i in range(3 * dsize // 32):
        rb.write(payload_of(8, i), transaction_id=i)
        got = reader(buf, rb, dsize)
        pkt = got if reader is check_read else got[0]
        assert pkt == Packet(6, 0, i, payload_of(8, i))


# -- misses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        [48, 200],
        [48, 48, 200],
        [0, 8],
        [4080, 4072],
        [5000, 6000],
        [5000, 5000, 100],
        [9000, 9000, 4096, 9000],
    ],
)
def test_miss_gives_the_right_payloads(sizes: list[int]) -> None:
    buf, rb = make(64 * 1024)
    for batch in (1, 3):
        sent: deque[Packet] = deque()
        for i in range(24):
            n = sizes[i % len(sizes)]
            p = payload_of(n, i)
            rb.write(p, transaction_id=i)
            sent.append(Packet(6, 0, i, p + bytes(-n & 7)))
            if i % 3 == 2:
                while sent:
                    if batch == 1:
                        assert check_read(buf, rb, 64 * 1024) == sent.popleft()
                    else:
                        for pkt in check_read_batch(buf, rb, 64 * 1024, batch):
                            assert pkt == sent.popleft()


# -- when the guess is tried: small at once, large after two in a row ---------------------------


@pytest.fixture
def guessed_copies(monkeypatch: pytest.MonkeyPatch, ring_engine: str) -> Counter[int]:
    """How many reads took the one-copy path, per len8.

    The guess is the Python engine's (the C engine reads the descriptor, then the payload,
    each once): on the C engine the tests using this are skipped.

    Whether a read used the guess cannot be seen from its result (that is the point of
    the guess), nor from the ring: the two paths read the same bytes. So this counts
    calls of the compiled unpackers, by wrapping ring._unpacker (the factory) in an empty
    cache. It depends on that private hook; the alternative, timing, is not a test.
    """
    if ring_engine != "python":
        pytest.skip("the length guess is the Python engine's")
    calls: Counter[int] = Counter()
    cache: dict[int, Callable[..., tuple[Any, ...]]] = {}
    real = ring_mod._unpacker

    def counting(len8: int) -> Callable[..., tuple[Any, ...]]:
        inner = real(len8)

        def unpack(buffer: Any, offset: int = 0) -> tuple[Any, ...]:
            calls[len8] += 1
            return inner(buffer, offset)

        cache[len8] = unpack
        return unpack

    monkeypatch.setattr(ring_mod, "_UNPACKERS", cache)
    monkeypatch.setattr(ring_mod, "_unpacker", counting)
    return calls


def len8_of(n: int) -> int:
    return (16 + n + 7) // 8


@pytest.mark.parametrize("batch", [False, True])
def test_small_packets_guessed_at_once(guessed_copies: Counter[int], batch: bool) -> None:
    _buf, rb = make(64 * 1024)
    n = 4096 - 16  # the largest packet guessed at once: len8 * 8 == 4096
    for i in range(3):
        rb.write(payload_of(n, i))
    pkts = rb.read_batch(3)[0] if batch else [rb.read() for _ in range(3)]
    assert [p.payload for p in pkts if p] == [payload_of(n, i) for i in range(3)]
    assert guessed_copies[len8_of(n)] == 2  # packets 2 and 3


@pytest.mark.parametrize("batch", [False, True])
def test_large_packets_guessed_after_two_in_a_row(guessed_copies: Counter[int], batch: bool) -> None:
    _buf, rb = make(64 * 1024)
    n = 4096 - 16 + 8  # the smallest packet that waits: len8 * 8 == 4104
    for i in range(4):
        rb.write(payload_of(n, i))
    if batch:
        pkts = rb.read_batch(4)[0]
    else:
        pkts = []
        for k in range(4):
            pkt = rb.read()
            assert pkt is not None
            pkts.append(pkt)
            # After the first, nothing for this length was even compiled: not guessed.
            assert guessed_copies[len8_of(n)] == max(0, k - 1)
            assert (len8_of(n) in ring_mod._UNPACKERS) == (k >= 1)
    assert [p.payload for p in pkts] == [payload_of(n, i) for i in range(4)]
    assert guessed_copies[len8_of(n)] == 2  # packets 3 and 4: two in a row first


def test_alternating_large_packets_never_guessed(guessed_copies: Counter[int]) -> None:
    """Mixed large sizes would waste a large copy per packet: they are never guessed."""
    _buf, rb = make(64 * 1024)
    sizes = [5000, 6000, 5000, 100, 5000, 6000]
    for _round in range(3):
        for i, n in enumerate(sizes):
            rb.write(payload_of(n, i))
        for i, n in enumerate(sizes):
            pkt = rb.read()
            assert pkt is not None and pkt.payload == payload_of(n, i) + bytes(-n & 7)
    assert guessed_copies[len8_of(5000)] == 0 and guessed_copies[len8_of(6000)] == 0
    assert len8_of(5000) not in ring_mod._UNPACKERS  # not even compiled


# -- the host rewrites the ring between two reads -----------------------------------------------


@pytest.mark.parametrize(
    "len8",
    [GUESS_LEN8, GUESS_LEN8 - 1, 2, 3, GUESS_LEN8 + 1, 2 * GUESS_LEN8 + 1, 0, 1, 0xFFFF],
)
def test_host_rewrites_len8_between_reads(reader: Reader, len8: int) -> None:
    buf, rb = make(1024)
    place(buf, 0)
    for i in range(4):
        rb.write(payload_of(GUESS_N, i), transaction_id=i)
    assert check_read(buf, rb, 1024) == Packet(6, 0, 0, payload_of(GUESS_N, 0))
    assert check_read(buf, rb, 1024) == Packet(6, 0, 1, payload_of(GUESS_N, 1))  # guessed
    set_desc(buf, rb.read_index, len8=len8)  # the guess is stale now
    for _ in range(4):
        if reader(buf, rb, 1024) in (CORRUPT, None, []):
            break


def test_host_rewrites_payload_between_reads(reader: Reader) -> None:
    """A right guess copies the ring's bytes as they are now: nothing is remembered."""
    buf, rb = make(1024)
    place(buf, 0)
    for i in range(3):
        rb.write(payload_of(GUESS_N, i), transaction_id=i)
    check_read(buf, rb, 1024)
    check_read(buf, rb, 1024)
    r = rb.read_index
    buf[H + r + 16 : H + r + 16 + GUESS_N] = b"\xaa" * GUESS_N
    set_desc(buf, r, flags=9, tid=77)
    got = reader(buf, rb, 1024)
    pkt = got if reader is check_read else got[0]
    assert pkt == Packet(6, 9, 77, b"\xaa" * GUESS_N)


# -- write_batch: the bytes fast path and the general path against write() -------------------------


def np_u32(b: bytes) -> Any:
    return np.frombuffer(b, dtype=np.uint32).copy()


PAYLOAD_KINDS: dict[str, Callable[[bytes], Any]] = {
    "bytes": lambda b: b,
    "bytearray": bytearray,
    "memoryview": memoryview,
    "memoryview-slice": lambda b: memoryview(b"xx" + b + b"yy")[2:-2],
    "numpy-u8": lambda b: np.frombuffer(b, dtype=np.uint8),
    "numpy-u32": lambda b: np_u32(b[: len(b) & ~3]),
    "list": lambda b: [b[:3], memoryview(b)[3:]],
    "tuple": lambda b: (bytearray(b[:5]), np.frombuffer(b[5:], dtype=np.uint8)),
    "empty-list": lambda b: [],
}


def same_as_one_by_one(dsize: int, start: int, specs: list[tuple[Any, int, int, int]]) -> None:
    buf_b, rb_b = make(dsize)
    buf_s, rb_s = make(dsize)
    place(buf_b, start)
    place(buf_s, start)
    try:
        signal = rb_b.write_batch(specs)
    except RingFull:
        with pytest.raises(RingFull):
            for spec in specs:
                rb_s.write(*spec)
        assert indices(buf_b) == (start, start)  # all or nothing
        return
    signals = [rb_s.write(*spec) for spec in specs]
    assert buf_b == buf_s, "write_batch wrote other bytes than writes one by one"
    assert signal == (signals[0] if specs else False)


@pytest.mark.parametrize("kind", sorted(PAYLOAD_KINDS))
@pytest.mark.parametrize("start", [0, 128, 1024 - 64, 1024 - 8])
def test_write_batch_mixed_payloads(kind: str, start: int) -> None:
    specs: list[tuple[Any, int, int, int]] = []
    for i, n in enumerate([0, 20, 64, 3, 100]):
        specs.append((payload_of(n, i), 6, i & 1, i))
        specs.append((PAYLOAD_KINDS[kind](payload_of(n, 50 + i)), 11, 1, 100 + i))
    same_as_one_by_one(1024, start, specs)


@pytest.mark.parametrize("start", range(0, 1024, 40))
def test_write_batch_all_bytes(start: int) -> None:
    start &= ~7
    specs = [(payload_of(n, n), 6 + (n & 1), n & 3, n) for n in (0, 1, 7, 8, 9, 63, 200, 2047, 2049)]
    same_as_one_by_one(8192, start, specs)  # 2048 / 2049: either side of the pack_into cutoff
    same_as_one_by_one(1024, start, specs[:6])
    same_as_one_by_one(1024, start, [(b"", 6, 0, 0)])
    same_as_one_by_one(1024, start, [])
    same_as_one_by_one(256, start & 255, specs)  # RingFull: nothing written


@given(
    st.lists(
        st.tuples(
            st.integers(0, 300),
            st.sampled_from(sorted(PAYLOAD_KINDS)),
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFF),
            st.integers(0, 2**64 - 1),
        ),
        max_size=8,
    ),
    st.integers(0, 1024 // 8 - 1),
)
@settings(max_examples=150, deadline=None)
def test_write_batch_random(packets: list[tuple[int, str, int, int, int]], start8: int) -> None:
    specs = [
        (PAYLOAD_KINDS[kind](payload_of(n, i)), t, f, tid) for i, (n, kind, t, f, tid) in enumerate(packets)
    ]
    same_as_one_by_one(1024, start8 * 8, specs)


@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
@pytest.mark.parametrize("start", [0, 512, 1016])
def test_write_batch_exactly_full(kind: str, start: int) -> None:
    """hv_ringbuffer_write's "only room for the packet: assume full", on both batch paths."""
    conv = PAYLOAD_KINDS[kind]
    full = [(conv(payload_of(480, 1)), 6, 0, 1), (conv(payload_of(496, 2)), 6, 0, 2)]  # 504 + 520
    fits = [(conv(payload_of(480, 1)), 6, 0, 1), (conv(payload_of(488, 2)), 6, 0, 2)]  # 504 + 512
    buf, rb = make(1024)
    place(buf, start)
    with pytest.raises(RingFull) as info:
        rb.write_batch(full)
    assert (info.value.needed, info.value.available) == (1024, 1024)
    assert indices(buf) == (start, start)
    same_as_one_by_one(1024, start, fits)


def test_write_batch_bad_packet_writes_nothing_visible() -> None:
    """All bytes: a packet over the maximum is ValueError before anything is published."""
    for specs in (
        [(b"a", 6, 0, 0), (bytes(MAX_PACKET_SIZE), 6, 0, 0)],
        [(b"a", 6, 0, 0), (b"b", 0x10000, 0, 0)],
    ):
        buf, rb = make(1024)
        with pytest.raises(ValueError):
            rb.write_batch(specs)
        assert indices(buf) == (0, 0) and rb.read() is None


# -- the cache of compiled formats ------------------------------------------------------------------


def test_format_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """More than 1,024 distinct lengths: every packet right, the cache never over its bound.

    The bound is on a module-private dict; it is checked directly because memory use is
    the only other way to see it, and that is no test either.
    """
    if ring_mod.ENGINE != "python":
        pytest.skip("the format cache is the Python engine's")
    cache: dict[int, Any] = {}
    monkeypatch.setattr(ring_mod, "_UNPACKERS", cache)
    bound = ring_mod._UNPACKERS_MAX
    dsize = 64 * 1024
    buf_a, rb_a = make(1024)  # a ring whose guess is compiled before the cache is cleared
    prime(buf_a, rb_a, GUESS_N)
    _buf, rb = make(dsize)
    most = 0
    for len8 in range(2, bound + 300):
        n = len8 * 8 - 16
        for k in range(1 if len8 * 8 <= 4096 else 2):  # large ones: two in a row to be guessed
            rb.write(payload_of(n, len8), transaction_id=k)
            rb.write(payload_of(n, len8 + 1), transaction_id=k)
            assert rb.read() == Packet(6, 0, k, payload_of(n, len8))
            assert rb.read() == Packet(6, 0, k, payload_of(n, len8 + 1))
            most = max(most, len(cache))
            assert len(cache) <= bound
    assert most == bound  # it did fill up, and was cleared
    place(buf_a, 0)
    rb_a.write(payload_of(GUESS_N, 5))
    assert rb_a.read() == Packet(6, 0, 0, payload_of(GUESS_N, 5))  # its old unpacker still works


# -- differential: random traffic and a meddling host against ref_read ----------------------------

SIZE_POOL = [0, 8, 40, 100, 4072, 4080, 4088, 5000, 9000]
HOST_VALUES: list[int | str] = ["guess", "guess-1", "guess+1", 0, 1, 2, 7, 9, 0xFFFF]


@given(
    st.sampled_from([256, 1024, 24 * 1024]),
    st.lists(st.sampled_from(SIZE_POOL), min_size=1, max_size=3),
    st.integers(0, 3),
    st.integers(0, 2**32),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_differential_against_reference(dsize: int, pool: list[int], hostility: int, seed: int) -> None:
    """Random traffic (and a meddling host) read by the ring and by ref_read, step by step.

    Hypothesis picks the ring, the few lengths the traffic mostly repeats (so the guess
    is often right, and large lengths repeat too) and how hostile the host is; the steps
    come from a seeded random.Random, so each example is long enough to wrap the ring
    many times and is replayed exactly.
    """
    rnd = random.Random(seed)
    cap = dsize - 40  # the largest payload the empty ring takes
    pool = [min(n, cap) for n in pool]

    def size() -> int:
        return rnd.choice(pool) if rnd.random() < 0.8 else rnd.randint(0, min(cap, 9000))

    buf, rb = make(dsize)
    sent: deque[Packet] = deque()  # what was written, while the host has not meddled
    clean = True
    last_len8 = 0
    for _ in range(120):
        op = rnd.random()
        if op < 0.3:
            n = size()
            p = rnd.randbytes(n)
            typ = rnd.choice([6, 6, 11, 8])
            tid = rnd.getrandbits(64)
            try:
                rb.write([p[: n // 2], memoryview(p)[n // 2 :]] if rnd.random() < 0.3 else p, typ, 1, tid)
            except (RingFull, RingCorrupt):
                continue
            sent.append(Packet(typ, 1, tid, p + bytes(-n & 7)))
        elif op < 0.4:
            raw = [rnd.randbytes(size()) for _ in range(rnd.randint(1, 4))]
            specs = [(bytearray(p) if rnd.random() < 0.2 else p, 6, 0, i) for i, p in enumerate(raw)]
            try:
                rb.write_batch(specs)
            except (RingFull, RingCorrupt):
                continue
            sent.extend(Packet(6, 0, i, p + bytes(-len(p) & 7)) for i, p in enumerate(raw))
        elif op < 0.8:
            got: Packet | list[Packet] | str | None
            if op < 0.65:
                got = check_read(buf, rb, dsize)
                pkts = [got] if isinstance(got, Packet) else []
            else:
                got = check_read_batch(buf, rb, dsize, rnd.randint(1, 5))
                pkts = got if isinstance(got, list) else []
            if got == CORRUPT:  # checked against the reference; start afresh, traffic goes on
                rb.reset()  # (the ring object keeps its guess)
                sent.clear()
                clean = True
            if pkts:
                last = pkts[-1]
                last_len8 = (16 + len(last.extra_header) + len(last.payload)) // 8
            if clean:
                for pkt in pkts:
                    assert pkt == sent.popleft()
                if got is None:
                    assert not sent
        elif op < 0.8 + 0.05 * hostility:
            w, r = indices(buf)
            if w == r:
                continue
            clean = False
            if rnd.random() < 0.2:  # the write index moved back: less published
                struct.pack_into("<I", buf, 0, (w - 8 * rnd.randint(1, (w - r) % dsize // 8)) % dsize)
                continue
            off = rnd.choice([0, 2, 4, 4, 4, 6, 16])  # type, offset8, len8, flags, payload
            value: int | str = rnd.choice(HOST_VALUES)
            if isinstance(value, str):  # aimed at the guess: the len8 of the last packet read
                value = max(0, last_len8 + {"guess": 0, "guess-1": -1, "guess+1": 1}[value])
            for i, b in enumerate(struct.pack("<H", value & 0xFFFF)):
                buf[H + (r + off + i) % dsize] = b
        elif op > 0.99:  # the ring set up afresh; the ring object keeps its guess
            rb.reset()
            sent.clear()
            clean = True
