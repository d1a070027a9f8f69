"""HeaderCheck on both engines: the compiled checks (pyvmbus._ring.Check) against ring.py.

ring.py's HeaderCheck is the reference and words every violation. The differential
test runs random sequences of our writes and reads, the host's reads and writes, flow
control, mask stores, hostile rewrites of every header word (before the check exists and
between any two calls) and every HeaderCheck call on three ring pairs over byte-identical
images: the reference (Python rings, Python check), the compiled check on C rings, and
the Python check on C rings (the hop the "python" engine takes when the extension is
built). After every step the results, the exceptions (class, message, fields) and the
state (tx_write, tx_pending, rx_read, tx_read) must be equal, and so must the ring bytes.
"""

from __future__ import annotations

import gc
import os
import struct
from collections.abc import Callable
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from pyvmbus.errors import RingCorrupt
from pyvmbus.ring import ENGINES, HeaderCheck, RingBuffer

HEADER = 4096
U32 = 0xFFFFFFFF
EXAMPLES = int(os.environ.get("PYVMBUS_HEADER_CHECK_EXAMPLES", "400"))
"""Hypothesis examples of the differential test (each a sequence of up to 60 steps)."""

needs_c = pytest.mark.skipif("c" not in ENGINES, reason="the C ring engine is not built")

# (ring engine, check engine) of each pair; the first is the reference.
VARIANTS = (("python", "python"), ("c", "c"), ("c", "python"))
STATE = ("tx_write", "tx_pending", "rx_read", "tx_read")


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("raise", what must agree about the exception)."""
    try:
        return "ok", fn()
    except RingCorrupt as exc:
        return "raise", ("RingCorrupt", str(exc), exc.field, exc.value, exc.reason, exc.where)
    except Exception as exc:
        return "raise", (type(exc).__name__, str(exc))


class Spy(HeaderCheck):
    """A HeaderCheck that counts the compiled checks' hand-overs that did not raise: the C
    code must hand its words to the reference only for a violation (a hand-over that
    passes would be a check C gets wrong the safe way, invisible in the results)."""

    __slots__ = ()
    false_alarms: ClassVar[list[tuple[str, Any]]] = []

    def _check_tx_py(self, words: tuple[int, int, int, int] | None = None) -> int:
        res = super()._check_tx_py(words)
        if words is not None:
            self.false_alarms.append(("tx", words))
        return res

    def _check_rx_py(self, words: tuple[int, int, int, int] | None = None) -> int:
        res = super()._check_rx_py(words)
        if words is not None:
            self.false_alarms.append(("rx", words))
        return res


class Pairs:
    """The same TX + RX ring pair once per variant, each with its HeaderCheck."""

    def __init__(self, dsize: int, pokes: list[tuple[str, int, int]]) -> None:
        self.dsize = dsize
        self.bufs: dict[tuple[str, str], dict[str, bytearray]] = {}
        self.rings: dict[tuple[str, str], dict[str, RingBuffer]] = {}
        self.checks: dict[tuple[str, str], HeaderCheck] = {}
        for v in VARIANTS:
            self.bufs[v] = {side: bytearray(HEADER + dsize) for side in ("tx", "rx")}
            self.rings[v] = {side: RingBuffer.init(self.bufs[v][side], engine=v[0]) for side in ("tx", "rx")}
        for side, offset, value in pokes:  # whatever the host left there before the check
            self.poke(side, offset, value)
        self.steps = 0
        got = self.each("construct", lambda v: self.construct(v))
        assert got[0] == "ok", got

    def construct(self, v: tuple[str, str]) -> None:
        check = Spy(self.rings[v]["tx"], self.rings[v]["rx"], engine=v[1])
        assert check.engine == v[1]
        self.checks[v] = check

    def poke(self, side: str, offset: int, value: int) -> None:
        for bufs in self.bufs.values():
            struct.pack_into("<I", bufs[side], offset, value)

    def each(self, name: str, op: Callable[[tuple[str, str]], Any]) -> tuple[str, Any]:
        got = {v: outcome(lambda v=v: op(v)) for v in VARIANTS}  # type: ignore[misc]
        self.steps += 1
        where = f"step {self.steps} ({name})"
        ref = got[VARIANTS[0]]
        for v in VARIANTS[1:]:
            assert got[v] == ref, f"{where}: {v} differs from the reference: {got[v]!r} != {ref!r}"
            for side in ("tx", "rx"):
                assert self.bufs[v][side] == self.bufs[VARIANTS[0]][side], f"{where}: {side} bytes differ"
        if self.checks:
            states = {v: tuple(getattr(self.checks[v], a) for a in STATE) for v in VARIANTS}
            for v in VARIANTS[1:]:
                assert states[v] == states[VARIANTS[0]], f"{where}: state differs: {states}"
        return ref


def edges(dsize: int) -> list[int]:
    return [0, 1, 2, 7, 8, 16, dsize - 8, dsize - 1, dsize, dsize + 8, 2**31, U32 - 7, U32]


def words(dsize: int) -> st.SearchStrategy[int]:
    """Header word values near every edge the rules have, and anything."""
    return st.one_of(
        st.sampled_from(edges(dsize)),
        st.integers(0, dsize // 8 - 1).map(lambda k: k * 8),
        st.integers(0, U32),
    )


def poke_op(dsize: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.just("poke"), st.sampled_from(["tx", "rx"]), st.sampled_from([0, 4, 8, 12, 64]), words(dsize)
    )


def ops(dsize: int) -> st.SearchStrategy[tuple[Any, ...]]:
    sizes = st.one_of(st.sampled_from([0, 1, 8, 40, 64]), st.integers(0, dsize))
    simple = st.sampled_from(
        ["check_tx", "check_rx", "note_tx", "note_rx", "violations", "host_read_tx", "read_rx",
         "clear_pending", "check_tx", "check_rx", "check_rings"]
    ).map(lambda name: (name,))
    return st.one_of(
        simple,
        simple,
        st.tuples(st.just("write_tx"), sizes),
        st.tuples(st.just("host_write_rx"), sizes),
        st.tuples(st.just("read_batch_rx"), st.integers(1, 4)),
        st.tuples(st.just("set_pending"), st.integers(1, dsize)),
        st.tuples(st.just("mask"), st.sampled_from(["tx", "rx"]), st.sampled_from([0, 1, 2, 3, U32])),
        poke_op(dsize),
    )


def apply(pairs: Pairs, op: tuple[Any, ...]) -> None:
    name = op[0]
    if name == "poke":
        pairs.poke(op[1], op[2], op[3])
        return
    checks, rings = pairs.checks, pairs.rings

    def run(fn: Callable[[tuple[str, str]], Any]) -> None:
        pairs.each(name, fn)

    if name in ("check_tx", "check_rx", "check_rings", "note_tx", "note_rx"):
        run(lambda v: getattr(checks[v], name)())
    elif name == "violations":
        run(lambda v: [str(e) for e in checks[v].violations()])
    elif name == "write_tx":  # our send: check, write, note (channel.write_packet's order)
        payload = b"w" * op[1]

        def send(v: tuple[str, str]) -> Any:
            checks[v].check_tx()
            signal = rings[v]["tx"].write(payload, 6, 0, 1)
            checks[v].note_tx()
            return signal

        run(send)
    elif name == "host_read_tx":
        run(lambda v: rings[v]["tx"].read())
    elif name == "host_write_rx":
        run(lambda v: rings[v]["rx"].write(b"h" * op[1], 6, 0, 2))
    elif name == "read_rx":  # our drain: check, read, note
        def drain(v: tuple[str, str]) -> Any:
            ready = checks[v].check_rx()
            pkt = rings[v]["rx"].read()
            checks[v].note_rx()
            return ready, pkt

        run(drain)
    elif name == "read_batch_rx":
        def drain_batch(v: tuple[str, str]) -> Any:
            got = rings[v]["rx"].read_batch(op[1])
            checks[v].note_rx()
            return got

        run(drain_batch)
    elif name == "set_pending":
        def block(v: tuple[str, str]) -> Any:
            rings[v]["tx"].set_pending_send_size(op[1])
            checks[v].note_tx()

        run(block)
    elif name == "clear_pending":
        run(lambda v: (rings[v]["tx"].clear_pending_send_size(), checks[v].note_tx()))
    elif name == "mask":
        run(lambda v: setattr(rings[v][op[1]], "interrupt_mask", op[2]))
    else:  # pragma: no cover
        raise AssertionError(name)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, int]], list[tuple[Any, ...]]]:
    dsize = draw(st.sampled_from([64, 256, 1000, 4096, 12288]))  # and sizes that do not divide 2**32
    pokes = draw(st.lists(poke_op(dsize).map(lambda p: p[1:]), max_size=3))
    return dsize, pokes, draw(st.lists(ops(dsize), min_size=1, max_size=60))


@needs_c
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_both_engines_agree(scenario: tuple[int, list[tuple[str, int, int]], list[tuple[Any, ...]]]) -> None:
    dsize, pokes, steps = scenario
    Spy.false_alarms.clear()
    pairs = Pairs(dsize, pokes)
    for op in steps:
        apply(pairs, op)
    assert not Spy.false_alarms, f"the C check handed over words that break no rule: {Spy.false_alarms}"
    # And once the rings are closed (a channel's teardown): the same error on each.
    for v in VARIANTS:
        pairs.rings[v]["tx"].close()
        pairs.rings[v]["rx"].close()
    for name in ("check_tx", "check_rx", "check_rings", "note_tx", "note_rx"):
        pairs.each(f"{name} after close", lambda v, n=name: getattr(pairs.checks[v], n)())


@needs_c
@pytest.mark.parametrize("dsize", [64, 1000, 4096])
def test_every_word_and_edge_value_agrees(dsize: int) -> None:
    """Every header word of each ring set to every edge value (and each index to every
    aligned value: the TX read index is compared with our write index modulo the ring),
    after traffic that left the indices mid-ring and the TX read index behind our write
    index, then every call; deterministic, beside the random sequences above."""
    half = max(8, dsize // 2 - 24)  # a packet of about half the ring
    traffic = [("write_tx", half), ("host_read_tx",), ("write_tx", 8), ("host_write_rx", half), ("read_rx",),
               ("host_write_rx", 8)]  # fmt: skip
    calls = [("check_rings",), ("check_tx",), ("check_rx",), ("violations",), ("note_tx",), ("check_tx",),
             ("note_rx",), ("check_rx",), ("write_tx", 8), ("read_rx",)]  # fmt: skip
    for side in ("tx", "rx"):
        for offset in (0, 4, 8, 12):
            sweep = (side, offset) == ("tx", 4) or (offset in (0, 4) and dsize <= 1000)
            for value in edges(dsize) + (list(range(0, dsize, 8)) if sweep else []):
                pairs = Pairs(dsize, [])
                for op in [*traffic, ("poke", side, offset, value), *calls]:
                    apply(pairs, op)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_rules_on_each_engine(engine: str) -> None:
    """The rules of the one validation point, on plain memory (no mock)."""
    tx = RingBuffer.init(bytearray(HEADER + 2048), engine=engine)
    rx = RingBuffer.init(bytearray(HEADER + 2048), engine=engine)
    check = HeaderCheck(tx, rx)
    assert check.engine == engine
    assert check.check_tx() == 2048 and check.check_rx() == 0 and check.check_rings() == 0
    tx.write(b"abc")
    check.note_tx()
    assert check.check_tx() == 2048 - 32
    tx.read()  # the other end consumes what we wrote: fine
    assert check.check_tx() == 2048 and check.tx_read == 32
    tx.write(b"abc")
    check.note_tx()
    assert (check.tx_write, check.tx_pending) == (64, 0)
    tx._mv[4:8] = (96).to_bytes(4, "little")  # the host claims it read up to 96; we wrote up to 64
    with pytest.raises(RingCorrupt, match=r"consumed past our write index 64 \(it was at 32\)") as caught:
        check.check_tx()
    assert (caught.value.field, caught.value.value, caught.value.where) == ("read_index", 96, "tx ring")
    assert check.tx_read == 32  # not moved by a check that failed there
    tx._mv[4:8] = (64).to_bytes(4, "little")
    tx.interrupt_mask = 5  # the read index passes (and is remembered), then the mask fails
    with pytest.raises(RingCorrupt, match="interrupt_mask=0x5"):
        check.check_tx()
    assert check.tx_read == 64
    tx.interrupt_mask = 0
    rx.write(b"x" * 8)
    assert check.check_rx() == 32
    rx.read()
    with pytest.raises(RingCorrupt, match=r"read_index=0x20 .*ours, and we stored 0"):
        check.check_rx()
    check.note_rx()
    assert check.check_rx() == 0 and check.rx_read == 32
    rx.pending_send_size = 2048
    with pytest.raises(RingCorrupt, match="pending_send_sz=0x800"):
        check.check_rx()
    rx.pending_send_size = 0
    rx.interrupt_mask = 2
    assert [str(v) for v in check.violations()] == [
        "ring corrupt: interrupt_mask=0x2 (2): only 0 or 1 is ever stored (rx ring)"]


def test_the_check_follows_its_rings_engine() -> None:
    def pair(engine: str) -> tuple[RingBuffer, RingBuffer]:
        return (RingBuffer.init(bytearray(HEADER + 64), engine=engine),
                RingBuffer.init(bytearray(HEADER + 64), engine=engine))  # fmt: skip

    assert HeaderCheck(*pair("python")).engine == "python"
    with pytest.raises(ValueError, match="not available"):
        HeaderCheck(*pair("python"), engine="rust")
    if "c" not in ENGINES:
        return
    assert HeaderCheck(*pair("c")).engine == "c"
    assert HeaderCheck(*pair("c"), engine="python").engine == "python"
    mixed = (pair("c")[0], pair("python")[1])
    assert HeaderCheck(*mixed).engine == "python"
    with pytest.raises(ValueError, match=r"run 'c' \(tx\) and 'python' \(rx\)"):
        HeaderCheck(*mixed, engine="c")


@needs_c
def test_the_state_is_attributes_the_reference_shares() -> None:
    """tx_write, tx_pending, rx_read, tx_read: C storage, read and written from Python
    (ring.py's reference methods write them on the error path), and they keep the rings."""
    tx = RingBuffer.init(bytearray(HEADER + 256), engine="c")
    rx = RingBuffer.init(bytearray(HEADER + 256), engine="c")
    check = HeaderCheck(tx, rx)
    assert (check.tx, check.rx) == (tx, rx)
    with pytest.raises(AttributeError):
        check.tx = rx  # type: ignore[misc]
    with pytest.raises(ValueError, match="already bound"):
        check._bind(tx, rx, True)
    check.tx_write = 8  # as if we had stored 8: the C check now sees the host's 0 as a fault
    with pytest.raises(RingCorrupt, match=r"write_index=0x0 .*ours, and we stored 8"):
        check.check_tx()
    check.note_tx()
    assert check.tx_write == 0 and check.check_tx() == 256
    del tx, rx
    gc.collect()
    assert check.check_tx() == 256  # the check keeps its rings alive


def test_the_channel_checks_with_its_rings_engine(ring_engine: str) -> None:
    """Through the mock: the channel's HeaderCheck runs the engine of its rings (so
    PYVMBUS_RING=python runs the whole reference), and a request passes its checks."""
    from pyvmbus.bus import Vmbus
    from pyvmbus.mock import MockVmbus

    with MockVmbus(kernel="6.18") as mock:
        guid = mock.add_device("echo", monitored=False)
        Vmbus(mock.root).bind(guid)
        ch = Vmbus(mock.root).channel(guid, dispatch="caller", request_timeout=10)
        ch.enable()
        try:
            assert ch.tx_ring is not None and ch.tx_ring.engine == ring_engine
            assert ch._check is not None and ch._check.engine == ring_engine
            assert ch.send_request(b"ping").startswith(b"ping")
            assert ch.check_rings("in a test") == 0
        finally:
            ch.disable()


@pytest.mark.timeout(60)
def test_without_the_extension_the_reference_is_the_class() -> None:
    """Where pyvmbus._ring is not built, HeaderCheck is plain ring.py (its own slots and
    methods) and keeps the rules: the same unit run in a process without the extension."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pyvmbus._ring'] = None\n"  # the import fails: not built
        "import pyvmbus.ring as ring\n"
        "assert ring.ENGINES == ('python',) and ring.HeaderCheck.__mro__[1] is object\n"
        "import test_header_check as t\n"
        "t.test_the_rules_on_each_engine('python')\n"
        "t.test_the_check_follows_its_rings_engine()\n"
        "print('ok')\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    env.pop("PYVMBUS_RING", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
