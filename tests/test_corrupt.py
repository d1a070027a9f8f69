"""A host that writes garbage into a ring header or a descriptor (issue 10, section 1).

Every host-written value is checked in one place (:class:`pyvmbus.ring.HeaderCheck` plus
the ring engine's descriptor checks), and a violation seen anywhere -- before a drain, in
the re-check, in a send, in flow control -- closes the channel once with ``corrupt: ...``,
fails every outstanding request with that reason, kills no thread and leaves the device
restorable. The regression tests first (each failed before the fix), then the property:
every header word and descriptor field, random and boundary values, every dispatch mode
and kernel generation, at idle and under traffic.

``PYVMBUS_CORRUPT_EXAMPLES=n`` sets the examples per (generation, mode, load) case
(default 3: the whole property stays within a few tens of seconds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import bound_monitored_echo, mock_of_generation
from pyvmbus import ChannelClosed
from pyvmbus.bus import Vmbus
from pyvmbus.channel import Channel
from pyvmbus.lifecycle import ChannelState
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS
from pyvmbus.ring import HeaderCheck, RingBuffer

S = ChannelState
GENS = list(GENERATIONS)
MODES = ("thread", "caller", "asyncio")
EXAMPLES = int(os.environ.get("PYVMBUS_CORRUPT_EXAMPLES", "3"))
U32 = 0xFFFFFFFF
ATTEMPTS = 60
"""Tries of a volatile fault under traffic (see :attr:`Fault.volatile`). The odds of one
try are the host's and the guest's timing: with a host that answers inside the guest's
signalling write, an RX mask fault that does not interrupt (<= 6.17) is seen only when it
lands between the guest's last signal and its next look, about one try in four under
pipelined asyncio (measured: 2 runs in ~40 missed 20 tries in a row). 60 makes a miss
~1e-7 per case; a try that misses costs 0.3 s."""


mock = pytest.fixture(scope="module", params=GENS, name="mock")(mock_of_generation)
device = pytest.fixture(name="device")(bound_monitored_echo)


@pytest.fixture
def thread_errors() -> Iterator[list[str]]:
    """Every exception that ends a thread (the dispatcher's must never)."""
    seen: list[str] = []
    old = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        seen.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")

    threading.excepthook = hook
    yield seen
    threading.excepthook = old


def closed_reasons(ch: Channel) -> list[str]:
    reasons: list[str] = []
    ch.on_closed(lambda c, why: reasons.append(why))
    return reasons


def wait_state(ch: Channel, state: ChannelState, timeout: float = 5.0, reasons: list[str] | None = None
               ) -> bool:
    """Until ``ch`` is in ``state`` (and, given ``reasons``, on_closed has run)."""
    deadline = time.monotonic() + timeout
    while ch.state is not state or (reasons is not None and not reasons):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# -- the failures named in the issue ---------------------------------------------------------

@pytest.mark.timeout(60)
def test_bad_rx_write_index_at_idle_closes_in_thread_mode(mock: MockVmbus, device: str,
                                                          thread_errors: list[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Was: the dispatcher thread died with a traceback, reason "dispatcher thread failed"."""
    ch = Vmbus(mock.root).channel(device, dispatch="thread")
    reasons = closed_reasons(ch)
    ch.enable()
    assert ch.send_request(b"warm", timeout=10) == b"warm\0\0\0\0"
    mock.fault(device, "header", ring="rx", field="write_index", value=7)
    assert wait_state(ch, S.DISABLED, reasons=reasons), ch.state
    assert reasons and reasons[0].startswith("corrupt: write_index=0x7 (7): not a multiple of 8"), reasons
    assert "rx ring of channel" in reasons[0] and "relid" in reasons[0]
    assert len(reasons) == 1
    assert not thread_errors
    assert not [r for r in caplog.records if "dispatcher thread" in r.getMessage()]
    with pytest.raises(ChannelClosed, match="corrupt: write_index"):
        ch.send_request(b"after", timeout=5)
    ch.enable()  # restorable, at once
    assert ch.send_request(b"again", timeout=10) == b"again\0\0\0"
    ch.disable()


@pytest.mark.timeout(60)
def test_bad_rx_write_index_at_idle_closes_in_caller_mode(mock: MockVmbus, device: str) -> None:
    """Was: RingCorrupt reached send_request, the channel stayed running and each call left
    one more request pending forever."""
    ch = Vmbus(mock.root).channel(device, dispatch="caller")
    reasons = closed_reasons(ch)
    ch.enable()
    assert ch.send_request(b"warm", timeout=10) == b"warm\0\0\0\0"
    mock.fault(device, "header", ring="rx", field="write_index", value=7)
    for _ in range(3):
        with pytest.raises(ChannelClosed, match="corrupt: write_index=0x7"):
            ch.send_request(b"x", timeout=5)
    assert ch.state is S.DISABLED
    assert ch.info()["outstanding_requests"] == 0
    assert reasons == [reasons[0]] and reasons[0].startswith("corrupt:")
    ch.enable()
    assert ch.send_request(b"again", timeout=10) == b"again\0\0\0"
    ch.disable()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["thread", "caller"])
def test_garbage_tx_header_closes_the_channel(mock: MockVmbus, device: str, mode: str) -> None:
    """Was: every send raised RingCorrupt (or timed out) while the channel stayed open."""
    ch = Vmbus(mock.root).channel(device, dispatch=mode)
    reasons = closed_reasons(ch)
    ch.enable()
    assert ch.send_request(b"warm", timeout=10)
    mock.fault(device, "header", ring="tx", field="read_index", value=0xFFFFFFF0, interrupt=False)
    with pytest.raises(ChannelClosed, match=r"corrupt: read_index=0xfffffff0 .*tx ring of channel"):
        ch.send(b"x")
    assert wait_state(ch, S.DISABLED, reasons=reasons)
    assert len(reasons) == 1 and "in a send" in reasons[0]
    ch.enable()
    assert ch.send_request(b"ok", timeout=10)
    ch.disable()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("word", "args"), [
    ("write_index", {"add": 8}),
    ("pending_send_sz", {"value": 64}),
])
def test_host_writing_our_tx_words_closes_the_channel(mock: MockVmbus, device: str, word: str,
                                                      args: dict[str, int]) -> None:
    """Was: a host that moved our TX write index made us write where it said (the host
    then found garbage, every request timed out); one that set our pending_send_sz went
    unnoticed."""
    ch = Vmbus(mock.root).channel(device, dispatch="caller")
    reasons = closed_reasons(ch)
    ch.enable()
    assert ch.send_request(b"warm", timeout=10)
    mock.fault(device, "header", ring="tx", field=word, interrupt=False, **args)
    with pytest.raises(ChannelClosed, match=f"corrupt: {word}=.*ours, and we stored"):
        ch.send_request(b"x", timeout=5)
    assert wait_state(ch, S.DISABLED, reasons=reasons)
    assert "tx ring" in reasons[0]
    ch.enable()
    assert ch.send_request(b"ok", timeout=10)
    ch.disable()


@pytest.mark.timeout(60)
def test_host_consuming_past_our_tx_write_index_closes_the_channel(mock: MockVmbus, device: str) -> None:
    """Was: a host that moved the TX read index past what we wrote (aligned, in range) went
    unnoticed; the host then read garbage and stopped, and every request timed out."""
    ch = Vmbus(mock.root).channel(device, dispatch="thread")
    reasons = closed_reasons(ch)
    ch.enable()
    assert ch.send_request(b"warm", timeout=10)
    mock.fault(device, "header", ring="tx", field="read_index", add=4096, interrupt=False)
    with pytest.raises(ChannelClosed, match=r"corrupt: read_index=.*consumed past our write index"):
        ch.send_request(b"x", timeout=5)
    assert wait_state(ch, S.DISABLED, reasons=reasons)


@pytest.mark.timeout(60)
def test_host_writing_our_rx_read_index_closes_the_channel(mock: MockVmbus, device: str) -> None:
    """Was: a host that moved our RX read index made us read (and deliver) from there."""
    ch = Vmbus(mock.root).channel(device, dispatch="thread")
    reasons = closed_reasons(ch)
    ch.enable()
    assert ch.send_request(b"warm", timeout=10)
    mock.fault(device, "header", ring="rx", field="read_index", add=8)
    assert wait_state(ch, S.DISABLED, reasons=reasons)
    assert reasons[0].startswith("corrupt: read_index=") and "ours, and we stored" in reasons[0]


@pytest.mark.timeout(60)
def test_outstanding_requests_fail_with_the_reason(mock: MockVmbus, device: str) -> None:
    """A stalled host holds requests; a corrupt header then fails all of them at once."""
    ch = Vmbus(mock.root).channel(device, dispatch="thread")
    ch.enable()
    mock.fault(device, "stall")
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            ch.send_request(b"q", timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while ch.info()["outstanding_requests"] < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    # (Not a word the host itself rewrites on a signal, as it does its pending_send_sz.)
    mock.fault(device, "header", ring="rx", field="write_index", value=U32)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    mock.fault(device, "resume")
    assert len(errors) == 4
    for exc in errors:
        assert isinstance(exc, ChannelClosed), exc
        assert exc.reason.startswith("corrupt: write_index=0xffffffff"), exc
    assert ch.state is S.DISABLED and ch.info()["outstanding_requests"] == 0


def test_header_check_rules_unit() -> None:
    """The rules of the one validation point, on plain memory (no mock)."""
    tx = RingBuffer.init(bytearray(4096 + 2048))
    rx = RingBuffer.init(bytearray(4096 + 2048))
    check = HeaderCheck(tx, rx)
    assert check.check_tx() == 2048 and check.check_rx() == 0
    tx.write(b"abc")
    check.note_tx()
    assert check.check_tx() == 2048 - 32
    tx.read()  # the other end consumes what we wrote: fine
    assert check.check_tx() == 2048
    tx.write(b"abc")
    check.note_tx()
    buf = tx._mv  # the host claims it read up to 96 while we wrote up to 64
    buf[4:8] = (96).to_bytes(4, "little")
    with pytest.raises(Exception, match="consumed past our write index 64"):
        check.check_tx()
    rx.pending_send_size = 2048
    with pytest.raises(Exception, match="pending_send_sz=0x800"):
        check.check_rx()
    rx.pending_send_size = 0
    rx.interrupt_mask = 2
    assert [str(v) for v in check.violations()] == [
        "ring corrupt: interrupt_mask=0x2 (2): only 0 or 1 is ever stored (rx ring)"]


# -- the property ----------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    args: dict[str, Any]
    word: str  # what the close reason must name
    volatile: bool = False
    """Normal operation stores this word too (ours, a mask the kernel sets, the host's
    pending_send_sz it clears after each flush; on kernels up to 6.17 every unmask write
    makes the kernel store 0 in the RX mask): under traffic that store can overwrite the
    garbage before anyone looks, and then there is nothing left to see -- so under traffic
    the fault is applied again until one is seen (at most ATTEMPTS times)."""


def faults(dsize: int, masks_on_interrupt: bool) -> st.SearchStrategy[Fault]:
    """Every header word and descriptor field, with values that break its rule."""
    def bad_index() -> st.SearchStrategy[int]:
        edges = st.sampled_from([dsize, dsize + 8, dsize - 1, dsize - 4, 1, 7, 0xFFFFFFF8, U32])
        return st.one_of(edges, st.integers(0, U32).filter(lambda v: v >= dsize or v % 8 != 0))

    def host_index(ring: str, word: str) -> st.SearchStrategy[Fault]:
        return bad_index().map(lambda v: Fault("header", {"ring": ring, "field": word, "value": v}, word))

    # The host's TX read index moved past everything we wrote (aligned, in range: only the
    # memory of our write index tells); the host's own read can store over it: volatile.
    tx_read_past = st.integers(64, dsize // 16).map(lambda k: Fault(
        "header", {"ring": "tx", "field": "read_index", "add": k * 8}, "read_index", volatile=True))

    def own_index(ring: str, word: str) -> st.SearchStrategy[Fault]:
        moved = st.integers(1, dsize // 8 - 1).map(lambda k: ("add", k * 8))
        return st.one_of(moved, bad_index().map(lambda v: ("value", v))).map(
            lambda kv: Fault("header", {"ring": ring, "field": word, kv[0]: kv[1]}, word, volatile=True))

    bad_mask = st.one_of(st.sampled_from([2, 3, 0x80000000, U32]), st.integers(2, U32))

    def mask(ring: str) -> st.SearchStrategy[Fault]:
        # Up to 6.17 the kernel stores 1 in the RX mask on every interrupt: there the
        # host's garbage is only seen if it does not interrupt (the next request finds it).
        irq = not (ring == "rx" and masks_on_interrupt)
        return bad_mask.map(lambda v: Fault("header", {"ring": ring, "field": "interrupt_mask", "value": v,
                                                       "interrupt": irq}, "interrupt_mask",
                                            volatile=ring == "rx"))

    rx_pending = st.one_of(st.sampled_from([dsize, dsize + 1, U32]), st.integers(dsize, U32)).map(
        lambda v: Fault("header", {"ring": "rx", "field": "pending_send_sz", "value": v}, "pending_send_sz",
                        volatile=True))
    tx_pending = st.one_of(st.sampled_from([1, 8, dsize - 1, dsize, U32]), st.integers(1, U32)).map(
        lambda v: Fault("header", {"ring": "tx", "field": "pending_send_sz", "value": v}, "pending_send_sz",
                        volatile=True))
    u16 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 0xFFFF]), st.integers(0, 0xFFFF))
    # 32 bytes published: a good packet there is offset8 2..len8, len8 <= 3.
    desc = st.tuples(u16, u16, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1)) \
        .filter(lambda t: not 2 <= t[0] <= t[1] <= 3).map(
            lambda t: Fault("descriptor", {"offset8": t[0], "len8": t[1], "type": t[2], "flags": t[3],
                                           "transaction_id": t[4], "publish": 32},
                            "len8" if not t[1] or 2 <= t[0] <= t[1] else "offset8"))
    return st.one_of(
        host_index("rx", "write_index"), own_index("rx", "read_index"), mask("rx"), rx_pending,
        own_index("tx", "write_index"), host_index("tx", "read_index"), tx_read_past, mask("tx"), tx_pending,
        desc,
    )


def _check_closed(ch: Channel, reasons: list[str], fault: Fault, errors: list[BaseException],
                  traffic: bool) -> None:
    assert wait_state(ch, S.DISABLED, reasons=reasons), ch.state
    assert len(reasons) == 1, reasons
    reason = reasons[0]
    assert reason.startswith("corrupt: "), (fault, reason)
    # A volatile word can also be caught by what it caused: a read index moved between the
    # check and the drain's load makes the engine parse from there (e.g. "len8=0x0").
    if fault.kind == "header" and not (fault.volatile and traffic):
        # Named by the header check, or (a host that stores between that check and the
        # engine's load of the word) by the ring engine: either way the word and the ring.
        assert reason.startswith(f"corrupt: {fault.word}="), (fault, reason)
        assert f"{fault.args['ring']} ring of channel" in reason, (fault, reason)
    if fault.kind == "descriptor" and not traffic:
        assert "(rx ring of channel" in reason, (fault, reason)  # the engine's finding, located
    assert ch.info()["outstanding_requests"] == 0
    for exc in errors:
        assert isinstance(exc, ChannelClosed) and exc.reason == reason, (fault, exc)


def _sync_case(mock: MockVmbus, guid: str, mode: str, traffic: bool, fault: Fault) -> None:
    ch = Vmbus(mock.root).channel(guid, dispatch=mode, request_timeout=20)
    reasons = closed_reasons(ch)
    ch.enable()
    errors: list[BaseException] = []
    stop = threading.Event()
    answered = [0]

    def load() -> None:
        while not stop.is_set():
            try:
                ch.send_request(b"traffic!")
                answered[0] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    worker = threading.Thread(target=load, daemon=True) if traffic else None
    try:
        assert ch.send_request(b"warm", timeout=10)
        if worker is not None:
            worker.start()
            deadline = time.monotonic() + 5
            while not answered[0] and not errors and time.monotonic() < deadline:
                time.sleep(0.001)
        attempts = ATTEMPTS if traffic and fault.volatile else 1
        for _ in range(attempts):
            mock.fault(guid, fault.kind, **fault.args)
            if mode != "caller" or traffic:
                wait_state(ch, S.DISABLED, 0.3 if attempts > 1 else 2.0)
            if ch.state is not S.DISABLED:
                try:
                    ch.send_request(b"probe", timeout=5)
                except ChannelClosed as exc:
                    errors.append(exc)
            if ch.state is S.DISABLED:
                break
        stop.set()
        if worker is not None:
            worker.join(25)
            assert not worker.is_alive(), "a request hung"
        _check_closed(ch, reasons, fault, errors, traffic)
        with pytest.raises(ChannelClosed):
            ch.send_request(b"after", timeout=2)
        # Restorable, at once.
        ch.enable()
        assert ch.send_request(b"restored", timeout=10) == b"restored"
    finally:
        stop.set()
        if ch.state is not S.DISABLED:
            ch.disable()


async def _async_case(mock: MockVmbus, guid: str, traffic: bool, fault: Fault) -> None:
    ch = Vmbus(mock.root).channel(guid, dispatch="asyncio", request_timeout=20)
    reasons = closed_reasons(ch)
    errors: list[BaseException] = []
    answered = [0]

    async def load() -> None:
        while True:
            try:
                await ch.request(b"traffic!")
                answered[0] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    async with ch.enabled():
        assert await ch.request(b"warm", timeout=10)
        task = asyncio.ensure_future(load()) if traffic else None
        if task is not None:
            while not answered[0] and not errors:
                await asyncio.sleep(0.001)
        attempts = ATTEMPTS if traffic and fault.volatile else 1
        for _ in range(attempts):
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: mock.fault(guid, fault.kind, **fault.args))
            for _ in range(60 if attempts > 1 else 400):
                if ch.state is S.DISABLED:
                    break
                await asyncio.sleep(0.005)
            if ch.state is not S.DISABLED:
                try:
                    await ch.request(b"probe", timeout=5)
                except ChannelClosed as exc:
                    errors.append(exc)
            if ch.state is S.DISABLED:
                break
        if task is not None:
            await asyncio.wait_for(task, 25)
        _check_closed(ch, reasons, fault, errors, traffic)
    async with ch.enabled():  # restorable, at once
        assert await ch.request(b"restored", timeout=10) == b"restored"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("traffic", [False, True], ids=["idle", "traffic"])
@pytest.mark.parametrize("mode", MODES)
def test_every_violation_closes_the_channel(mock: MockVmbus, device: str, mode: str, traffic: bool,
                                            thread_errors: list[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    gen = mock.generation
    probe = Vmbus(mock.root).channel(device)
    probe.enable()
    assert probe.tx_ring is not None
    dsize = probe.tx_ring.data_size
    probe.disable()
    caplog.set_level(logging.INFO, logger="pyvmbus")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fault=faults(dsize, gen.masks_on_interrupt))
    def prop(fault: Fault) -> None:
        if mode == "asyncio":
            asyncio.run(asyncio.wait_for(_async_case(mock, device, traffic, fault), 60))
        else:
            _sync_case(mock, device, mode, traffic, fault)
        assert not thread_errors, thread_errors
        assert not [r for r in caplog.records if "dispatcher thread" in r.getMessage()]

    prop()


@pytest.mark.timeout(60)
def test_ring_map_shows_and_reports_violations(mock: MockVmbus, device: str) -> None:
    """Was: a corrupt index made 'vmbus ring --map' fail before showing anything, and
    words of the wrong range (a mask of 5, a huge pending_send_sz) went unremarked."""
    import json as _json

    from click.testing import CliRunner

    from pyvmbus.cli import main

    ch = Vmbus(mock.root).channel(device, dispatch="caller")  # open, but nobody looks
    ch.enable()
    try:
        mock.fault(device, "header", ring="rx", field="write_index", value=12, interrupt=False)
        mock.fault(device, "header", ring="tx", field="interrupt_mask", value=5, interrupt=False)
        r = CliRunner().invoke(main, ["--root", mock.root, "--json", "ring", device, "--map"],
                               prog_name="vmbus")
        assert r.exit_code == 9, r.output
        data = _json.loads(r.stdout)
        assert data["rx"]["write_index"] == 12 and data["rx"]["bytes_used"] is None
        assert data["tx"]["interrupt_mask"] == 5
        assert [v.split("=")[0] for v in data["violations"]] == ["interrupt_mask", "write_index"]
        assert "ring corrupt: interrupt_mask=0x5" in r.stderr and r.stderr.count("\n") == 1
        r = CliRunner().invoke(main, ["--root", mock.root, "ring", device, "--map"], prog_name="vmbus")
        assert r.exit_code == 9 and "CORRUPT: write_index=0xc (12)" in r.stdout
    finally:
        ch.disable()
