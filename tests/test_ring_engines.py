"""Differential fuzz of the two ring engines: pyvmbus._ring (C) against ring.py (Python).

ring.py is the reference. Every operation runs on two rings over two byte-identical
buffers, one per engine, and everything must agree after every step: the ring bytes
(header and data), the result (packets, counts, read_into's arrays), the signal
decisions (write's return, read_signal, read_batch's flag) and the exception (class and
message). Operations: write (payloads of every kind, gather lists, extra headers, bad
fields), write_batch, read, read_batch, read_into, the flow-control and masking calls,
and hostile rewrites of the header words, the descriptor at the read index and random
bytes, as a malicious or buggy host could do between two calls. Hostile images come
from test_ring_hypothesis; the DPDK vectors replay on both engines in
test_ring_vectors. The other ring test modules run whole on both engines as well.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from pyvmbus.errors import RingFull
from pyvmbus.packet import encode_gpa_direct, encode_transfer_pages
from pyvmbus.ring import ENGINES, READ_RECORD, RingBuffer
from test_ring_hypothesis import hostile_rings

pytestmark = pytest.mark.skipif("c" not in ENGINES, reason="the C ring engine is not built")


HEADER = 4096
DESC = struct.Struct("<HHHHQ")
FUZZ_STEPS = int(os.environ.get("PYVMBUS_RING_FUZZ_STEPS", "2500"))
"""Operations per seeded run (36 runs); PYVMBUS_RING_FUZZ_STEPS=100000 for a long soak."""


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("raise", (class name, message)): what must agree."""
    try:
        return "ok", fn()
    except Exception as exc:
        return "raise", (type(exc).__name__, str(exc))


class Pair:
    """The same ring twice, one per engine; ``run`` applies an operation to both."""

    def __init__(self, image: bytes | bytearray, header: int = HEADER) -> None:
        self.bufs = {e: bytearray(image) for e in ("python", "c")}
        self.rings = {e: RingBuffer(self.bufs[e], header, engine=e) for e in ("python", "c")}
        self.header = header
        self.steps = 0

    def run(self, name: str, op: Callable[[RingBuffer, bytearray], Any]) -> tuple[str, Any]:
        got = {e: outcome(lambda e=e: op(self.rings[e], self.bufs[e])) for e in ("python", "c")}  # type: ignore[misc]
        self.steps += 1
        where = f"step {self.steps} ({name})"
        assert got["c"] == got["python"], f"{where}: results differ: {str(got)[:600]}"
        assert self.bufs["c"] == self.bufs["python"], f"{where}: ring bytes differ"
        signals = {e: r.read_signal for e, r in self.rings.items()}
        assert signals["c"] == signals["python"], f"{where}: read_signal differs: {signals}"
        return got["python"]

    def poke(self, offset: int, data: bytes) -> None:
        """A hostile (or buggy) host rewrites shared memory: both buffers alike."""
        for buf in self.bufs.values():
            buf[offset : offset + len(data)] = data

    @property
    def dsize(self) -> int:
        return self.rings["python"].data_size


def payload_kinds(raw: bytes, kind: int) -> Any:
    """The same bytes as each kind of payload write() takes (and two it refuses)."""
    if kind == 0:
        return raw
    if kind == 1:
        return bytearray(raw)
    if kind == 2:
        return memoryview(raw)
    if kind == 3:
        return np.frombuffer(raw, dtype=np.uint8).copy()
    if kind == 4:
        cut = len(raw) // 3
        return [raw[:cut], bytearray(raw[cut : 2 * cut]), memoryview(raw[2 * cut :])]
    if kind == 5:
        return (raw, b"")
    if kind == 6 and len(raw) % 4 == 0:
        return np.frombuffer(raw, dtype=np.uint32).copy()  # a non-byte format: cast to bytes
    if kind == 7:
        return raw.decode("latin-1")  # a str: TypeError on both
    if kind == 8 and len(raw) >= 2:
        return np.frombuffer(raw, dtype=np.uint8)[::2]  # not contiguous: TypeError
    return raw


def read_into_op(out_size: int, cap: int) -> Callable[[RingBuffer, bytearray], Any]:
    def op(rb: RingBuffer, _buf: bytearray) -> Any:
        out = np.full(out_size, 0xEE, dtype=np.uint8)
        recs = np.zeros(cap, dtype=READ_RECORD)
        count, signal = rb.read_into(out, recs)
        return count, signal, out.tobytes(), recs.tobytes()

    return op


def repair(pair: Pair, rng: random.Random) -> None:
    """Make the indices sane again (a hostile step left them anywhere): empty, or the
    write index kept and the read index moved to an aligned point."""
    dsize = pair.dsize
    w = struct.unpack_from("<I", pair.bufs["python"], 0)[0]
    if w >= dsize or w % 8:
        w = rng.randrange(0, dsize, 8)
    r = w if rng.random() < 0.5 else rng.randrange(0, dsize, 8)
    pair.poke(0, struct.pack("<II", w, r))


def hostile(pair: Pair, rng: random.Random) -> None:
    """One rewrite of shared memory as a malicious or buggy host could do it."""
    dsize = pair.dsize
    k = rng.randrange(3)
    if k == 0:
        # A header word: an index (plausible, wild or misaligned), mask, pending, features.
        word = rng.choice([0, 4, 8, 12, 64])
        value = rng.choice(
            [rng.randrange(0, dsize, 8), rng.randrange(0, dsize), dsize, 2**32 - 8, 0, 1, 0xFFFFFFFF]
        )
        pair.poke(word, struct.pack("<I", value))
    elif k == 1:
        # The descriptor at the read index, fields near the edges that matter.
        r = struct.unpack_from("<I", pair.bufs["python"], 4)[0]
        if r < dsize and r % 8 == 0:
            desc = DESC.pack(
                rng.choice([6, 7, 9, 11, 0xFFFF]), rng.choice([0, 1, 2, 2, 3, 0xFFFF]),
                rng.choice([0, 1, 2, 3, 8, 0xFFFF, rng.randrange(0x10000)]), rng.randrange(0x10000),
                rng.getrandbits(64),
            )  # fmt: skip
            for i, b in enumerate(desc):
                pair.poke(HEADER + (r + i) % dsize, bytes([b]))
    else:
        pos = rng.randrange(dsize)
        pair.poke(HEADER + pos, rng.randbytes(min(16, dsize - pos)))


def write_from_op(rng: random.Random, dsize: int) -> Callable[[RingBuffer, bytearray], Any]:
    """write_from with random records over random data, now and then a bad record."""
    data = rng.randbytes(rng.choice([16, 64, 300, dsize]))
    records = np.zeros(rng.randrange(0, 6), dtype=READ_RECORD)
    for rec in records:
        extra = rng.choice([0, 0, 0, 8, 16]) if rng.random() < 0.97 else rng.choice([3, 12])
        length = rng.randrange(0, min(80, len(data) - extra) + 1)
        rec["type"], rec["flags"] = rng.choice([6, 11, 7]), rng.randrange(0x10000)
        rec["transaction_id"] = rng.getrandbits(64)
        rec["extra_len"], rec["length"] = extra, length
        rec["offset"] = rng.randrange(0, max(1, len(data) - extra - length + 1))
        if rng.random() < 0.03:
            rec["offset"] = rng.choice([len(data), 2**64 - 1, 2**40])
        if rng.random() < 0.02:
            rec["length"] = rng.choice([600_000, 2**63])
    as_bytes = rng.random() < 0.5
    return lambda rb, _b: rb.write_from(data if as_bytes else np.frombuffer(data, np.uint8), records)


def random_ops(pair: Pair, rng: random.Random, steps: int, hostility: float = 0.05) -> None:
    """``steps`` random operations on both engines; a ``hostility`` share of them rewrite
    shared memory, and a broken ring is repaired now and then so the healthy paths get
    their share."""
    dsize = pair.dsize
    sizes = [0, 1, 7, 8, 9, 48, 64, 100, rng.randrange(0, dsize), rng.randrange(0, 300)]
    for _ in range(steps):
        if rng.random() < hostility:
            hostile(pair, rng)
            continue
        if rng.random() < 0.04:
            repair(pair, rng)
            continue
        k = rng.randrange(100)
        if k < 30:
            raw = rng.randbytes(rng.choice(sizes))
            kind = rng.randrange(10) if rng.random() < 0.3 else 0
            typ = rng.choice([6, 6, 6, 11, 8, 0xFFFF, 0x10000, -1])
            flags = rng.choice([0, 1, 0xFFFF, 0x10000])
            tid = rng.choice([0, 1, 2**64 - 1, 2**64, rng.getrandbits(64)])
            if rng.random() < 0.97:
                typ, flags = typ & 0xFFFF, flags & 0xFFFF
                tid = tid % 2**64
            extra = b""
            if rng.random() < 0.1:
                extra = rng.choice([bytes(8), encode_transfer_pages(1, [(4, 8)]), bytes(5)])
                if extra[:1] == b"\x01":
                    typ = 7
            payload = payload_kinds(raw, kind)
            pair.run(
                "write",
                lambda rb, _b, p=payload, t=typ, f=flags, i=tid, x=extra: rb.write(
                    p, t, f, i, extra_header=x
                ),
            )
        elif k < 45:
            specs = []
            for _ in range(rng.randrange(0, 6)):
                raw = rng.randbytes(rng.choice(sizes) // 2)
                kind = rng.choice([0, 0, 0, 1, 2, 3, 4])
                tid = rng.getrandbits(64) if rng.random() < 0.98 else 2**64
                specs.append((payload_kinds(raw, kind), rng.choice([6, 6, 11]), rng.randrange(2), tid))
            as_list = rng.random() < 0.5
            pair.run(
                "write_batch", lambda rb, _b, s=specs, al=as_list: rb.write_batch(list(s) if al else iter(s))
            )
        elif k < 62:
            pair.run("read", lambda rb, _b: rb.read())
        elif k < 74:
            count = rng.randrange(1, 9)
            pair.run("read_batch", lambda rb, _b, n=count: rb.read_batch(n))
        elif k < 80:
            pair.run("write_from", write_from_op(rng, dsize))
        elif k < 86:
            out_size = rng.choice([0, 8, 64, 200, dsize])
            pair.run("read_into", read_into_op(out_size, rng.randrange(1, 6)))
        elif k < 91:
            n = rng.randrange(1, dsize)
            pair.run("set_pending", lambda rb, _b, n=n: rb.set_pending_send_size(n))
        elif k < 94:
            pair.run("clear_pending", lambda rb, _b: rb.clear_pending_send_size())
        elif k < 97:
            pair.run("begin_read", lambda rb, _b: rb.begin_read())
        else:
            pair.run("end_read", lambda rb, _b: rb.end_read())


@pytest.mark.parametrize("dsize", [64, 256, 1024, 4096])
@pytest.mark.parametrize("hostility", [0.0, 0.02, 0.1])
@pytest.mark.parametrize("seed", range(3))
def test_random_operations_agree(dsize: int, hostility: float, seed: int) -> None:
    rng = random.Random(seed * 7919 + dsize + int(hostility * 1000))
    pair = Pair(RingBuffer.init(bytearray(HEADER + dsize), engine="python")._mv.tobytes())
    random_ops(pair, rng, FUZZ_STEPS, hostility)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_rings(), st.integers(0, 2**32 - 1))
def test_hostile_images_agree(image: tuple[bytearray, int], seed: int) -> None:
    """A hostile image, then a random run of every operation on it."""
    buf, _dsize = image
    pair = Pair(buf)
    rng = random.Random(seed)
    count = rng.randrange(1, 9)  # drawn once: both engines must get the same arguments
    payload = rng.randbytes(rng.randrange(0, 100))
    pair.run("read", lambda rb, _b: rb.read())
    pair.run("read_batch", lambda rb, _b: rb.read_batch(count))
    pair.run("read_into", read_into_op(rng.choice([8, 64, 2048]), rng.randrange(1, 9)))
    pair.run("write", lambda rb, _b: rb.write(payload))
    random_ops(pair, rng, 40, 0.1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(max_size=300), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                  st.integers(0, 2**64 - 1)),
        max_size=12,
    ),
    st.integers(0, 127),
    st.sampled_from([256, 1000, 4096]),
)  # fmt: skip
def test_batches_agree_at_every_start(
    specs: list[tuple[bytes, int, int, int]], start8: int, dsize: int
) -> None:
    """write_batch then read_batch / read_into from a start anywhere (wraps included)."""
    start = (start8 * 8) % dsize
    image = bytearray(RingBuffer.init(bytearray(HEADER + dsize), engine="python")._mv.tobytes())
    struct.pack_into("<II", image, 0, start, start)
    pair = Pair(image)
    pair.run("write_batch", lambda rb, _b: rb.write_batch(specs))
    pair.run("read_into", read_into_op(dsize, 4))
    pair.run("read_batch", lambda rb, _b: rb.read_batch(64))


def test_range_list_packets_go_through_the_reference_parser() -> None:
    """Types 7 and 9 (and a bad range list after good packets) in every read API."""
    dsize = 4096
    pair = Pair(RingBuffer.init(bytearray(HEADER + dsize), engine="python")._mv.tobytes())
    xfer = encode_transfer_pages(3, [(100, 0), (200, 4096)])
    gpa = encode_gpa_direct([(4096, 0, [1])])
    for reader in ("read", "read_batch", "read_into"):
        pair.run("w", lambda rb, _b: rb.write(b"a" * 40, 6, 0, 1))
        pair.run("w7", lambda rb, _b: rb.write(b"b" * 24, 7, 1, 2, extra_header=xfer))
        pair.run("w9", lambda rb, _b: rb.write(b"c" * 8, 9, 0, 3, extra_header=gpa))
        pair.run("w", lambda rb, _b: rb.write(b"d" * 16, 6, 0, 4))
        if reader == "read":
            for _ in range(5):
                pair.run("read", lambda rb, _b: rb.read())
        elif reader == "read_batch":
            pair.run("read_batch", lambda rb, _b: rb.read_batch(10))
        else:
            pair.run("read_into", read_into_op(4096, 10))
    # A type 7 whose range count overruns its header, after a good packet.
    pair.run("w", lambda rb, _b: rb.write(b"e" * 8))
    bad = struct.pack("<HBBI", 0, 1, 0, 99)
    pair.run("w7bad", lambda rb, _b: rb.write(b"f" * 8, 7, 0, 5, extra_header=bad))
    pair.run("read_into", read_into_op(4096, 10))  # the good one; the batch ends before the bad
    pair.run("read_into", read_into_op(4096, 10))  # RingCorrupt, nothing consumed
    pair.run("read_batch", lambda rb, _b: rb.read_batch(4))


def test_read_into_fills_the_callers_arrays() -> None:
    """What read_into delivers, on each engine: payloads back to back and their records."""
    for engine in ENGINES:
        rb = RingBuffer.init(bytearray(HEADER + 4096), engine=engine)
        rb.write(b"x" * 5, 6, 1, 10)
        rb.write(b"y" * 16, 11, 0, 11)
        rb.write(b"z" * 8, 7, 0, 12, extra_header=encode_transfer_pages(1, [(8, 0)]))
        out = np.zeros(256, dtype=np.uint8)
        recs = np.zeros(8, dtype=READ_RECORD)
        assert rb.read_into(out, recs) == (3, False)
        assert recs["type"][:3].tolist() == [6, 11, 7]
        assert recs["transaction_id"][:3].tolist() == [10, 11, 12]
        assert recs["extra_len"][:3].tolist() == [0, 0, 16]
        assert recs["offset"][:3].tolist() == [0, 8, 24]
        assert recs["length"][:3].tolist() == [8, 16, 8]
        assert out[:8].tobytes() == b"x" * 5 + bytes(3)
        assert out[40:48].tobytes() == b"z" * 8
        assert rb.read() is None


def test_read_into_refuses_bad_arrays_and_a_first_packet_too_big() -> None:
    for engine in ENGINES:
        rb = RingBuffer.init(bytearray(HEADER + 4096), engine=engine)
        rb.write(b"q" * 100)
        recs = np.zeros(4, dtype=READ_RECORD)
        with pytest.raises(ValueError, match="records must be"):
            rb.read_into(bytearray(200), np.zeros(4, dtype=np.uint64))
        with pytest.raises(ValueError, match="records has room for no packet"):
            rb.read_into(bytearray(200), recs[:0])
        with pytest.raises(ValueError, match="writable contiguous"):
            rb.read_into(bytes(200), recs)
        with pytest.raises(ValueError, match="needs 104 bytes of out, which has 50"):
            rb.read_into(bytearray(50), recs)
        assert rb.available_to_read() == 128  # nothing consumed
        assert rb.read_into(bytearray(200), recs) == (1, False)


def test_engine_choice() -> None:
    rb = RingBuffer.init(bytearray(HEADER + 64), engine="c")
    assert rb.engine == "c"
    assert RingBuffer(bytearray(HEADER + 64), engine="python").engine == "python"
    with pytest.raises(ValueError, match="not available"):
        RingBuffer(bytearray(HEADER + 64), engine="rust")
    rb.close()
    rb.close()


def test_the_mock_hosts_rings_take_the_default_engine(ring_engine: str) -> None:
    """The mock host's channel builds its two rings with RingBuffer's default engine, so
    the host process (which picks it from PYVMBUS_RING like any other) gets the fast path."""
    from types import SimpleNamespace

    from pyvmbus.mock.host import _Chan
    from pyvmbus.mock.models import models

    offer = SimpleNamespace(
        relid=1, subchannel_index=0, instance="x", class_guid="y", monitored=False,
        model=sorted(models())[0], monitor_id=None,
    )  # fmt: skip
    dev = SimpleNamespace(counters=lambda relid: None)
    ring_size = 2 * 4096 * 2
    chan = _Chan(None, dev, offer, np.zeros(2 * ring_size, dtype=np.uint8), ring_size)  # type: ignore[arg-type]
    assert chan.tx.engine == chan.rx.engine == ring_engine


@pytest.mark.timeout(60)
def test_the_mock_host_process_has_the_compiled_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """With PYVMBUS_RING unset (the default: "c" where built), the mock host process has
    pyvmbus._ring loaded."""
    from pyvmbus.mock import MockVmbus

    monkeypatch.delenv("PYVMBUS_RING", raising=False)
    with MockVmbus(kernel="6.18") as mock, open(f"/proc/{mock.pid}/maps") as maps:
        assert "pyvmbus/_ring." in maps.read()


def test_closing_during_a_c_read_is_refused() -> None:
    """A close from Python code the C walk calls (another thread, in real life) must not
    free the memory under the walk: BufferError, and the ring stays usable."""

    class Closing(RingBuffer):
        __slots__ = ()

        def _take(self, pos: int, avail: int, w: int) -> Any:
            self.close()
            return super()._take(pos, avail, w)

    rb = Closing.init(bytearray(HEADER + 4096), engine="c")
    rb.write(b"x" * 8, 11, 0, 1, extra_header=bytes(8))  # an extra header: the walk calls _take
    with pytest.raises(BufferError, match="in use"):
        rb.read_batch(4)
    assert rb.available_to_read() == 40  # nothing consumed
    rb.close()


def test_read_into_then_write_from_relays_the_packets() -> None:
    """What read_into delivers, write_from writes on byte for byte (a relay), on each engine."""
    for engine in ENGINES:
        src = RingBuffer.init(bytearray(HEADER + 4096), engine=engine)
        ref = RingBuffer.init(bytearray(HEADER + 4096), engine="python")
        dst_buf = bytearray(HEADER + 4096)
        dst = RingBuffer.init(dst_buf, engine=engine)
        writes: list[tuple[bytes, int, int, int, bytes]] = [
            (b"a" * 13, 6, 1, 7, b""),
            (b"b" * 64, 11, 0, 8, b""),
            (b"c" * 8, 7, 0, 9, encode_transfer_pages(2, [(8, 0)])),
        ]
        for payload, typ, flags, tid, extra in writes:
            src.write(payload, typ, flags, tid, extra_header=extra)
            ref.write(payload, typ, flags, tid, extra_header=extra)
        out = np.zeros(1024, dtype=np.uint8)
        recs = np.zeros(8, dtype=READ_RECORD)
        count, _ = src.read_into(out, recs)
        assert count == 3
        assert dst.write_from(out, recs[:count]) is True  # empty -> non-empty: signal
        assert dst_buf == ref._mv.tobytes()
        assert dst.write_from(out, recs[:0]) is False  # nothing to write


def test_write_from_refuses_bad_records_and_writes_nothing() -> None:
    for engine in ENGINES:
        buf = bytearray(HEADER + 256)
        rb = RingBuffer.init(buf, engine=engine)
        recs = np.zeros(2, dtype=READ_RECORD)
        recs["length"] = [8, 8]
        recs["offset"] = [0, 100]
        before = bytes(buf)
        with pytest.raises(ValueError, match=r"record 1 .* outside the 64 bytes of data"):
            rb.write_from(bytes(64), recs)
        recs["offset"][1] = 0
        recs["extra_len"][1] = 4
        with pytest.raises(ValueError, match="record 1: extra_len 4 is not a multiple of 8"):
            rb.write_from(bytes(64), recs)
        recs["extra_len"][1] = 0
        recs["length"][1] = 600
        recs["offset"][1] = 0
        with pytest.raises(ValueError, match="outside"):
            rb.write_from(bytes(64), recs)
        with pytest.raises(ValueError, match="records must be"):
            rb.write_from(bytes(64), np.zeros(2, dtype=np.uint64))
        recs["length"] = [200, 200]
        with pytest.raises(RingFull):
            rb.write_from(bytes(400), recs)
        assert bytes(buf) == before
