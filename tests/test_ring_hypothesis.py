"""Property tests: random interleavings against a byte-level model, and hostile ring images.

The model is the kernel's arithmetic written as plainly as possible: a bytearray, the
indices as ints, and every byte copied one at a time modulo the data size. After every
step the whole ring (header + data) must equal the model's, byte for byte.

Hostile images (random headers, indices and descriptors, as a malicious or buggy host
could leave them) must give only a Packet, None or RingCorrupt; RingCorrupt and None
must leave every byte as it was, and a Packet may only have moved the read index.
"""

from __future__ import annotations

import struct
from collections import deque

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pyvmbus.errors import RingCorrupt, RingFull
from pyvmbus.packet import Packet
from pyvmbus.ring import ENGINES, Descriptor, RingBuffer

DESC = struct.Struct("<HHHHQ")
HEADER = 4096
# Types the writer may use freely: 7 and 9 need a well-formed range header (tested apart).
TYPES = st.integers(0, 0xFFFF).filter(lambda t: t not in (7, 9))


class Model:
    """hv_ringbuffer_write / hv_pkt_iter_* in the plainest form, on its own bytearray."""

    def __init__(self, data_size: int) -> None:
        self.dsize = data_size
        self.buf = bytearray(HEADER + data_size)
        self.set(64, 1)  # feature_bits: hv_ringbuffer_init
        self.queue: deque[tuple[int, int, int, bytes, int]] = deque()

    def get(self, off: int) -> int:
        return int.from_bytes(self.buf[off : off + 4], "little")

    def set(self, off: int, value: int) -> None:
        self.buf[off : off + 4] = value.to_bytes(4, "little")

    def free(self) -> int:
        w, r = self.get(0), self.get(4)
        return self.dsize - (w - r) if w >= r else r - w

    def put(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.buf[HEADER + (pos + i) % self.dsize] = b

    def frame(self, payload: bytes, type: int, flags: int, tid: int, pos: int) -> bytes:
        size = (16 + len(payload) + 7) // 8 * 8
        body = DESC.pack(type, 2, size // 8, flags, tid) + payload
        return body + bytes(size - len(body)) + struct.pack("<Q", pos << 32)

    def write_batch(self, packets: list[tuple[bytes, int, int, int]]) -> bool | None:
        """None if the batch does not fit (nothing changes)."""
        total = sum((16 + len(p) + 7) // 8 * 8 + 8 for p, *_ in packets)
        if self.free() <= total:
            return None
        old = pos = self.get(0)
        for payload, type, flags, tid in packets:
            frame = self.frame(payload, type, flags, tid, pos)
            self.put(pos, frame)
            size = len(frame) - 8
            self.queue.append((type, flags, tid, frame[16:size], len(frame)))
            pos = (pos + len(frame)) % self.dsize
        self.set(0, pos)
        return self.get(8) == 0 and self.get(4) == old

    def read_batch(self, count: int) -> tuple[list[Packet], bool]:
        got: list[Packet] = []
        used = 0
        while self.queue and len(got) < count:
            type, flags, tid, payload, length = self.queue.popleft()
            got.append(Packet(type, flags, tid, payload))
            used += length
        if not got:
            return got, False
        new = (self.get(4) + used) % self.dsize
        self.set(4, new)
        pending = self.get(12)
        if not self.get(64) & 1 or not pending:
            return got, False
        curr = self.free()
        return got, curr - used <= pending and curr > pending


payloads = st.binary(max_size=300)


class RingMachine(RuleBasedStateMachine):
    engine = "python"  # the machine runs once per engine (classes below)

    @initialize(data_size=st.sampled_from([64, 128, 256, 1000, 4096]))
    def setup(self, data_size: int) -> None:
        self.model = Model(data_size)
        self.buf = bytearray(HEADER + data_size)
        self.ring = RingBuffer.init(self.buf, engine=self.engine)

    @rule(
        payload=payloads,
        type=TYPES,
        flags=st.integers(0, 0xFFFF),
        tid=st.integers(0, 2**64 - 1),
        split=st.integers(0, 300),
    )
    def write(self, payload: bytes, type: int, flags: int, tid: int, split: int) -> None:
        expect = self.model.write_batch([(payload, type, flags, tid)])
        # Sometimes as a gather of two pieces: the ring must not care.
        data: object = payload if split >= len(payload) else [payload[:split], memoryview(payload)[split:]]
        try:
            got: bool | None = self.ring.write(data, type, flags, tid)
        except RingFull:
            got = None
        assert got == expect

    @rule(batch=st.lists(st.tuples(payloads, TYPES, st.integers(0, 3), st.integers(0, 9)), max_size=6))
    def write_batch(self, batch: list[tuple[bytes, int, int, int]]) -> None:
        expect = self.model.write_batch(batch) if batch else False
        try:
            got: bool | None = self.ring.write_batch(batch)
        except RingFull:
            got = None
        assert got == expect

    @rule()
    def read(self) -> None:
        pkts, signal = self.model.read_batch(1)
        assert self.ring.read() == (pkts[0] if pkts else None)
        assert self.ring.read_signal == signal

    @rule(count=st.integers(1, 5))
    def read_batch(self, count: int) -> None:
        assert self.ring.read_batch(count) == self.model.read_batch(count)

    @rule(value=st.sampled_from([0, 1]))
    def set_mask(self, value: int) -> None:
        self.ring.interrupt_mask = value
        self.model.set(8, value)

    @precondition(lambda self: hasattr(self, "model"))
    @rule(data=st.data())
    def set_pending(self, data: st.DataObject) -> None:
        value = data.draw(st.integers(0, self.model.dsize - 1))
        if value:
            self.ring.set_pending_send_size(value)
        else:
            self.ring.clear_pending_send_size()
        self.model.set(12, value)

    @rule(value=st.sampled_from([0, 1]))
    def set_feature(self, value: int) -> None:
        self.ring.feature_bits = value
        self.model.set(64, value)

    @invariant()
    def same_bytes(self) -> None:
        if hasattr(self, "model"):
            assert self.buf == self.model.buf
            assert self.ring.available_to_write() == self.model.free()


RingMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRingAgainstModel = RingMachine.TestCase


class RingMachineC(RingMachine):
    engine = "c"


RingMachineC.TestCase.settings = RingMachine.TestCase.settings
TestRingAgainstModelC = pytest.mark.skipif(
    "c" not in ENGINES, reason="the C ring engine is not built"
)(RingMachineC.TestCase)


# -- hostile ring images ------------------------------------------------------------------------


@st.composite
def hostile_rings(draw: st.DrawFn) -> tuple[bytearray, int]:
    """A ring image as a hostile host could leave it: often nearly right, never trusted."""
    dsize = draw(st.sampled_from([64, 256, 512, 1024]))
    buf = bytearray(HEADER + dsize)
    buf[HEADER:] = draw(st.binary(min_size=dsize, max_size=dsize))
    aligned = st.integers(0, dsize // 8 - 1).map(lambda i: i * 8)
    anything = st.integers(0, 2**32 - 1)
    wild = st.one_of(anything, st.integers(0, dsize + 16))

    r = draw(wild if draw(st.integers(0, 9)) == 9 else aligned)  # mostly plausible
    if draw(st.integers(0, 9)) == 9:
        w = draw(wild)
    else:  # some published bytes after the read index, wrapping or not; sometimes none
        w = ((r if r < dsize else 0) + 8 * draw(st.integers(0, dsize // 8 - 1).map(lambda k: -k))) % dsize
    struct.pack_into(
        "<IIII", buf, 0, w, r, draw(st.sampled_from([0, 1])), draw(st.one_of(st.just(0), anything))
    )
    struct.pack_into("<I", buf, 64, draw(st.sampled_from([0, 1, 0xFFFFFFFF])))
    if r < dsize and draw(st.integers(0, 9)):
        # A descriptor at the read index, its fields mostly near the edges that matter.
        avail8 = ((w - r) % dsize) // 8 if w < dsize else 0
        type = draw(st.sampled_from([6, 7, 9, 11, 0, 0xFFFF]))
        len8 = draw(
            st.one_of(
                st.integers(2, max(2, avail8 - 1)), st.integers(2, max(2, avail8 - 1)), st.integers(0, 0xFFFF)
            )
        )
        off8 = draw(st.one_of(st.integers(2, max(2, len8)), st.integers(2, 4), st.integers(0, 0xFFFF)))
        desc = DESC.pack(type, off8, len8, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 2**64 - 1)))
        count = draw(st.integers(0, 4))
        if type == 7:
            ext = struct.pack("<HBBI", draw(st.integers(0, 0xFFFF)), 1, 0, count)
            for _ in range(count):
                ext += struct.pack("<II", draw(st.integers(0, 9000)), draw(st.integers(0, 9000)))
        elif type == 9:
            ext = struct.pack("<II", 0, count)
            for _ in range(count):
                length, offset = draw(st.integers(0, 9000)), draw(st.integers(0, 4200))
                npfn = draw(st.integers(0, 4))
                ext += struct.pack(f"<II{npfn}Q", length, offset, *range(npfn))
        else:
            ext = draw(st.binary(max_size=48))
        for i, b in enumerate(desc + ext):
            buf[HEADER + (r + i) % dsize] = b
    return buf, dsize


def only_read_index_moved(before: bytes, after: bytearray) -> bool:
    return before[:4] == after[:4] and before[8:] == after[8:]


@pytest.mark.usefixtures("ring_engine")
@settings(max_examples=600, deadline=None)
@given(hostile_rings())
def test_hostile_read(image: tuple[bytearray, int]) -> None:
    buf, dsize = image
    before = bytes(buf)
    ring = RingBuffer(buf)
    try:
        pkt = ring.read()
    except RingCorrupt as exc:
        assert bytes(buf) == before, f"RingCorrupt({exc.field}) changed the ring"
        return
    if pkt is None:
        assert bytes(buf) == before
        return
    assert type(pkt) is Packet
    assert only_read_index_moved(before, buf)
    assert 0 <= ring.read_index < dsize and ring.read_index % 8 == 0


@pytest.mark.usefixtures("ring_engine")
@settings(max_examples=400, deadline=None)
@given(hostile_rings(), st.integers(1, 8))
def test_hostile_read_batch_and_peek(image: tuple[bytearray, int], count: int) -> None:
    buf, _ = image
    before = bytes(buf)
    ring = RingBuffer(buf)
    try:
        peeked = ring.peek_descriptor()
        assert peeked is None or type(peeked) is Descriptor
    except RingCorrupt:
        pass
    assert bytes(buf) == before  # peeking never writes
    try:
        pkts, signal = ring.read_batch(count)
    except RingCorrupt:
        assert bytes(buf) == before
        return
    assert isinstance(signal, bool) and len(pkts) <= count
    assert all(type(p) is Packet for p in pkts)
    if not pkts:
        assert bytes(buf) == before
    else:
        assert only_read_index_moved(before, buf)


@pytest.mark.usefixtures("ring_engine")
@settings(max_examples=300, deadline=None)
@given(hostile_rings(), st.binary(max_size=200))
def test_hostile_header_on_the_write_side(image: tuple[bytearray, int], payload: bytes) -> None:
    """The writer reads the host's read index: a bad one is RingCorrupt, never a stray write."""
    buf, dsize = image
    before = bytes(buf)
    ring = RingBuffer(buf)
    try:
        signal = ring.write(payload)
    except (RingCorrupt, RingFull):
        assert bytes(buf) == before
        return
    assert isinstance(signal, bool)
    assert before[4:HEADER] == buf[4:HEADER]  # only the write index and the data area change
    assert len(buf) == HEADER + dsize


@pytest.mark.usefixtures("ring_engine")
@pytest.mark.parametrize("count", [1, 3])
def test_model_agrees_on_a_known_sequence(count: int) -> None:
    """A fixed walk through wrap and full, as a smoke test of the model itself."""
    model = Model(128)
    buf = bytearray(HEADER + 128)
    ring = RingBuffer.init(buf)
    for i in range(40):
        payload = bytes([i]) * (i % 30)
        expect = model.write_batch([(payload, 6, 0, i)])
        try:
            got: bool | None = ring.write(payload, 6, 0, i)
        except RingFull:
            got = None
        assert got == expect
        if i % 2:
            assert ring.read_batch(count) == model.read_batch(count)
        assert buf == model.buf
