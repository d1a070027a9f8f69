"""Channel against the mock's echo device, on every kernel generation the mock has.

One MockVmbus per generation (module scope); each test offers its own echo device. On
5.15 and 6.6-lts only monitored devices bind, so the echo device is monitored there (and
by default everywhere); non-monitored variants run where the kernel allows them.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import until
from pyvmbus import ChannelClosed, InvalidState, RingFull, Timeout, UnsupportedKernel
from pyvmbus.bus import Vmbus
from pyvmbus.channel import Channel
from pyvmbus.lifecycle import ChannelState
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS, generation
from pyvmbus.packet import Packet, PacketType
from pyvmbus.signal import Mechanism

GENS = list(GENERATIONS)
S = ChannelState


@pytest.fixture(scope="module", params=GENS)
def mock(request: pytest.FixtureRequest) -> Iterator[MockVmbus]:
    with MockVmbus(kernel=request.param) as m:
        yield m


@dataclass
class Echo:
    mock: MockVmbus
    guid: str
    bus: Vmbus
    ch: Channel

    def host(self, key: str) -> int:
        return int(self.mock.host_stats(self.guid)[key])

    def host_send(self, payload: bytes, count: int = 1) -> None:
        """The host posts ``count`` in-band packets (synchronously: they are in the ring after)."""
        self.mock.command(self.guid, "send", payload=payload, count=count)


def make_echo(mock: MockVmbus, monitored: bool = True, **options: object) -> Echo:
    guid = mock.add_device("echo", monitored=monitored)
    bus = Vmbus(mock.root)
    bus.bind(guid)
    return Echo(mock, guid, bus, bus.channel(guid, **options))


def drop(e: Echo) -> None:
    if e.ch.state is not S.DISABLED:
        e.ch.disable()
    e.mock.remove_device(e.guid)


@pytest.fixture
def echo(mock: MockVmbus) -> Iterator[Echo]:
    e = make_echo(mock)
    yield e
    drop(e)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


# -- lifecycle -------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_callback_order_and_states(echo: Echo) -> None:
    ch = echo.ch
    log: list[tuple[str, object]] = []
    ch.on_opened(lambda c: log.append(("opened", c.state)))
    ch.on_started(lambda c: log.append(("started", c.state)))
    ch.on_post_started(lambda c: log.append(("post_started", c.state)))
    ch.on_packet(lambda c, p: log.append(("packet", p.payload)))
    ch.on_processing_complete(lambda c, n: log.append(("complete", n)))
    ch.on_closed(lambda c, reason: log.append(("closed", reason)))
    assert ch.state is S.DISABLED
    ch.enable()
    assert ch.state is S.RUNNING
    assert log == [("opened", S.OPENING), ("started", S.OPENED), ("post_started", S.STARTED)]
    ch.send(b"ping")
    wait_until(lambda: ("packet", pad8(b"ping")) in log, what="the echo")
    wait_until(lambda: log[-1][0] == "complete")
    assert log[3:] == [("packet", pad8(b"ping")), ("complete", 1)]
    ch.disable()
    assert ch.state is S.DISABLED and ch.close_reason == "disabled"
    assert log[-1] == ("closed", "disabled")
    # after closed, enable works again, and the host sees a fresh open
    ch.enable()
    assert ch.send_request(b"again", timeout=5) == pad8(b"again")
    ch.disable()
    assert [x for x in log if x[0] == "closed"] == [("closed", "disabled")] * 2
    ch.disable()  # idempotent


@pytest.mark.timeout(30)
def test_on_opened_raising_fails_enable_and_closes_node(echo: Echo) -> None:
    ch = echo.ch
    closed: list[str] = []
    ch.on_closed(lambda c, r: closed.append(r))

    def boom(c: Channel) -> None:
        raise ValueError("refuse")

    ch.on_opened(boom)
    with pytest.raises(ValueError, match="refuse"):
        ch.enable()
    assert ch.state is S.DISABLED
    assert closed == []  # it never opened
    wait_until(lambda: echo.mock.kernel_state(echo.guid)["opencount"] == 0, what="the node to close")
    ch.on_opened(lambda c: None)
    ch.enable()
    assert ch.send_request(b"ok", timeout=5) == pad8(b"ok")


@pytest.mark.timeout(30)
def test_on_started_may_send_but_not_wait(echo: Echo) -> None:
    ch = echo.ch
    got: list[Packet] = []
    ch.on_packet(lambda c, p: got.append(p))
    ch.on_started(lambda c: c.send(b"queued-early"))
    ch.enable()
    wait_until(lambda: len(got) == 1, what="the early packet's echo")
    assert got[0].payload == pad8(b"queued-early")
    ch.disable()

    closed: list[str] = []
    ch.on_closed(lambda c, r: closed.append(r))
    ch.on_started(lambda c: c.send_request(b"x", timeout=1))
    with pytest.raises(InvalidState, match="on_started must not wait"):
        ch.enable()
    assert ch.state is S.DISABLED
    assert closed and closed[0].startswith("error: on_started raised")


@pytest.mark.timeout(30)
def test_send_request_inside_post_started(echo: Echo) -> None:
    ch = echo.ch
    answers: list[bytes] = []
    ch.on_post_started(lambda c: answers.append(c.send_request(b"hello", timeout=5)))
    ch.enable()
    assert answers == [pad8(b"hello")]


@pytest.mark.timeout(30)
def test_host_packets_during_post_started_are_held_then_delivered_in_order(echo: Echo) -> None:
    ch = echo.ch
    log: list[object] = []

    def post_started(c: Channel) -> None:
        log.append("post-begin")
        for i in range(5):
            echo.host_send(b"early%d" % i)  # in the ring before post-started returns
        # completions still flow while other packets are held
        log.append(("reply", c.send_request(b"req", timeout=5)))
        time.sleep(0.05)  # let the dispatcher see (and hold) the early packets
        log.append("post-end")

    ch.on_post_started(post_started)
    ch.on_packet(lambda c, p: log.append(p.payload))
    ch.enable()
    wait_until(lambda: len(log) == 8, what="the held packets")
    assert log == ["post-begin", ("reply", pad8(b"req")), "post-end",
                   *[pad8(b"early%d" % i) for i in range(5)]]


@pytest.mark.timeout(30)
def test_enable_twice_and_subchannel_guards(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    with pytest.raises(InvalidState, match="disable"):
        ch.enable()
    ch.disable()
    with pytest.raises(ChannelClosed):
        ch.send(b"x")
    with pytest.raises(ChannelClosed):
        ch.send_request(b"x")


# -- dispatch --------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_no_lost_wakeup_between_drain_and_unmask(echo: Echo) -> None:
    """Packets written while the ring is masked, after the drain, before the unmask.

    The hook runs exactly there; it masks the ring as the kernel's ISR does on 5.15-6.17
    (on the other generations nobody would, so this makes the window exist everywhere)
    and has the host write three packets: the host sees the mask and does not interrupt.
    Only the unmask -> fence -> re-check finds them.
    """
    ch = echo.ch
    got: list[bytes] = []
    ch.on_packet(lambda c, p: got.append(p.payload))
    ch.enable()
    disp = ch._disp
    assert disp is not None
    counts: dict[str, int] = {}
    fired = threading.Event()

    def hook() -> None:
        if fired.is_set():
            return
        fired.set()
        rx = ch.rx_ring
        assert rx is not None
        rx.interrupt_mask = 1
        counts["before"] = echo.host("interrupts")
        echo.host_send(b"late", count=3)
        counts["after"] = echo.host("interrupts")

    disp._before_unmask = hook
    ch.send(b"first")  # its echo starts a cycle; the hook runs after that drain
    wait_until(lambda: len(got) == 4, timeout=2, what="the packets written in the window")
    assert got == [pad8(b"first"), *[pad8(b"late")] * 3]
    assert counts["after"] == counts["before"]  # the host did not interrupt for them


@pytest.mark.timeout(60)
def test_request_response_checksums(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    n = 300
    for i in range(n):
        body = i.to_bytes(4, "little") * (1 + i % 37)
        msg = zlib.crc32(body).to_bytes(4, "little") + body
        reply = ch.send_request(msg, timeout=5)
        assert zlib.crc32(reply[4:4 + len(body)]).to_bytes(4, "little") == reply[:4]
        assert reply == pad8(msg)
    c = ch.counters
    assert c.requests == n and c.cancelled == 0 and c.late_completions == 0
    assert c.packets_out == n and c.packets_in == n


@pytest.mark.timeout(60)
def test_many_threads_lead_and_follow(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(60):
                msg = b"%d:%d" % (k, i)
                assert ch.send_request(msg, timeout=10) == pad8(msg)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert ch.counters.requests == 240


@pytest.mark.timeout(30)
def test_send_request_from_on_packet_is_nested_and_keeps_order(echo: Echo) -> None:
    ch = echo.ch
    log: list[bytes] = []

    def on_packet(c: Channel, p: Packet) -> None:
        log.append(p.payload)
        if p.payload == pad8(b"ask"):
            log.append(c.send_request(b"inner", timeout=5))

    ch.on_packet(on_packet)
    ch.enable()
    ch.send(b"ask")
    ch.send(b"after")
    wait_until(lambda: len(log) == 3)
    assert log == [pad8(b"ask"), pad8(b"inner"), pad8(b"after")]


@pytest.mark.timeout(30)
def test_caller_dispatch_poll_and_run(mock: MockVmbus) -> None:
    e = make_echo(mock, dispatch="caller")
    try:
        ch = e.ch
        got: list[bytes] = []
        ch.on_packet(lambda c, p: got.append(p.payload))
        ch.enable()
        assert ch.send_request(b"lead", timeout=5) == pad8(b"lead")  # the caller drives it
        ch.send(b"one")
        time.sleep(0.05)
        assert got == []  # nobody dispatches in caller mode
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            ch.poll(0.1)
        assert got == [pad8(b"one")]
        # run() returns when the channel closes
        threading.Timer(0.2, ch.disable).start()
        assert ch.run(timeout=5) == "disabled"
    finally:
        drop(e)


@pytest.mark.timeout(30)
def test_storm_of_empty_interrupts_is_harmless(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    echo.mock.fault(echo.guid, "storm", count=300)
    for i in range(20):
        assert ch.send_request(b"s%d" % i, timeout=5) == pad8(b"s%d" % i)
    assert ch.state is S.RUNNING


# -- sends and flow control ------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_full_ring_blocks_then_resumes(echo: Echo) -> None:
    ch = echo.ch
    got: list[bytes] = []
    ch.on_packet(lambda c, p: got.append(p.payload))
    ch.enable()
    tx = ch.tx_ring
    assert tx is not None
    echo.mock.fault(echo.guid, "stall")
    body = b"z" * 3000
    n = tx.data_size // 3024 + 8  # more than fits: the last ones must wait
    done = threading.Event()
    sent: list[int] = []

    def sender() -> None:
        for i in range(n):
            ch.send(body[:-4] + i.to_bytes(4, "little"), timeout=10)
            sent.append(i)
        done.set()

    t = threading.Thread(target=sender)
    t.start()
    wait_until(lambda: ch.counters.ring_full_waits == 1, what="the sender to block")
    time.sleep(0.1)
    assert not done.is_set() and len(sent) < n
    assert tx.pending_send_size > 0  # the host was asked to signal when there is room
    echo.mock.fault(echo.guid, "resume")
    assert done.wait(10)
    t.join(5)
    wait_until(lambda: len(got) == n, timeout=10, what="every echo")
    assert [int.from_bytes(p[2996:3000], "little") for p in got] == list(range(n))
    assert tx.pending_send_size == 0
    assert ch.counters.ring_full_waits == 1


@pytest.mark.timeout(30)
def test_full_ring_send_times_out(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    tx = ch.tx_ring
    assert tx is not None
    echo.mock.fault(echo.guid, "stall")
    with pytest.raises(Timeout, match="TX ring"):
        for _ in range(tx.data_size // 1024 + 2):
            ch.send(b"q" * 1000, timeout=0.2)
    assert tx.pending_send_size == 0
    echo.mock.fault(echo.guid, "resume")


@pytest.mark.timeout(30)
def test_cancelled_request_and_late_completion(echo: Echo) -> None:
    ch = echo.ch
    got: list[Packet] = []
    ch.on_packet(lambda c, p: got.append(p))
    ch.enable()
    echo.mock.fault(echo.guid, "stall")
    with pytest.raises(Timeout):
        ch.send_request(b"slow", timeout=0.2)
    assert ch.counters.cancelled == 1
    echo.mock.fault(echo.guid, "resume")
    wait_until(lambda: ch.counters.late_completions == 1, what="the late completion to be dropped")
    assert got == []  # dropped, not handed to on_packet
    assert ch.send_request(b"fresh", timeout=5) == pad8(b"fresh")


@pytest.mark.timeout(30)
def test_transaction_ids_unique_while_outstanding(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    ch._txids = iter([5, 5, 6, 0, 7, 5, 8])  # type: ignore[assignment]
    ch._pending[5] = object()  # type: ignore[assignment]
    ch._cancelled[6] = None
    assert [ch.new_txid(), ch.new_txid()] == [7, 8]  # 5, 6 in use; 0 never
    del ch._pending[5]


@pytest.mark.timeout(30)
def test_complete_sends_a_completion_with_the_transaction_id(echo: Echo) -> None:
    ch = echo.ch
    seen: list[Packet] = []
    ch.on_packet(lambda c, p: seen.append(p))
    ch.enable()
    tid = ch.send(b"echo-me")
    wait_until(lambda: len(seen) == 1)
    assert seen[0].transaction_id == tid and seen[0].type == PacketType.DATA_INBAND
    before = echo.host("packets_in")
    ch.complete(seen[0], b"done")
    wait_until(lambda: echo.host("packets_in") == before + 1, what="the host to read the completion")


# -- signalling ------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_monitored_channel_signals_through_the_pages(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    assert ch.send_request(b"m", timeout=5) == pad8(b"m")
    info = ch.info()
    assert info["signal"]["mechanism"] == Mechanism.MONITOR.value
    assert info["counters"]["signals"] >= 1
    assert "monitor_id" in ch.describe() and echo.host("signals") >= 1


@pytest.mark.timeout(30)
def test_unmonitored_channel_signals_by_fd_write(mock: MockVmbus) -> None:
    if generation(mock.generation.name).refuses_unmonitored:
        pytest.skip(f"{mock.generation.name} refuses channels without a monitor id")
    e = make_echo(mock, monitored=False)
    try:
        ch = e.ch
        ch.enable()
        for i in range(20):
            assert ch.send_request(b"u%d" % i, timeout=5) == pad8(b"u%d" % i)
        assert ch.info()["signal"]["mechanism"] == Mechanism.FD_WRITE.value
        assert "6.10" in ch.describe()
        assert e.host("signals") >= 20
    finally:
        drop(e)


# -- closing ---------------------------------------------------------------------------------

def _stream(ch: Channel, errors: list[BaseException], stop: threading.Event) -> None:
    i = 0
    try:
        while not stop.is_set():
            ch.send_request(b"r%d" % i, timeout=5)
            i += 1
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.timeout(30)
def test_rescind_mid_stream_then_reoffer(mock: MockVmbus) -> None:
    e = make_echo(mock)
    try:
        ch = e.ch
        closed: list[tuple[str, float]] = []
        ch.on_closed(lambda c, r: closed.append((r, time.monotonic())))
        ch.enable()
        errors: list[BaseException] = []
        stop = threading.Event()
        t = threading.Thread(target=_stream, args=(ch, errors, stop))
        t.start()
        wait_until(lambda: ch.counters.requests > 20, what="the stream to run")
        t0 = time.monotonic()
        mock.rescind(e.guid)
        wait_until(lambda: bool(closed), timeout=1.0, what="on_closed within 1 s")
        assert closed[0][0] == "rescinded" and closed[0][1] - t0 < 1.0
        t.join(5)
        assert len(errors) == 1 and isinstance(errors[0], ChannelClosed)
        assert errors[0].reason == "rescinded"
        assert ch.state is S.DISABLED and ch._dev is None and ch.rx_ring is None
        # the host offers it again: find it, bind if needed, enable the same channel
        mock.reoffer(e.guid)
        wait_until(lambda: e.bus.sysfs.device(e.guid) is not None and _exists(e), what="the re-offer")
        if e.bus.device(e.guid).uio_name is None:
            e.bus.bind(e.guid)
        ch.enable()
        assert ch.send_request(b"back", timeout=5) == pad8(b"back")
    finally:
        drop(e)


def _exists(e: Echo) -> bool:
    try:
        dev = e.bus.device(e.guid)
        return dev.exists() and dev.relid > 0
    except Exception:
        return False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("gen", GENS)
def test_host_crash_mid_stream(gen: str) -> None:
    with MockVmbus(kernel=gen) as m:
        e = make_echo(m)
        ch = e.ch
        closed: list[str] = []
        ch.on_closed(lambda c, r: closed.append(r))
        ch.enable()
        errors: list[BaseException] = []
        stop = threading.Event()
        t = threading.Thread(target=_stream, args=(ch, errors, stop))
        t.start()
        wait_until(lambda: ch.counters.requests > 10, what="the stream to run")
        m.fault(e.guid, "crash")
        wait_until(lambda: bool(closed), timeout=2.0, what="on_closed after the crash")
        t.join(5)
        assert closed[0].startswith("host crashed")
        assert errors and isinstance(errors[0], ChannelClosed)
        assert ch.state is S.DISABLED


@pytest.mark.timeout(30)
def test_corrupt_ring_closes_the_channel(echo: Echo) -> None:
    ch = echo.ch
    closed: list[str] = []
    ch.on_closed(lambda c, r: closed.append(r))
    ch.enable()
    echo.mock.fault(echo.guid, "corrupt")
    ch.send(b"provoke")  # its echo is the corrupt descriptor
    wait_until(lambda: bool(closed), what="the close")
    assert closed[0].startswith("corrupt:") and "len8" in closed[0]
    assert ch.state is S.DISABLED


@pytest.mark.timeout(30)
def test_disable_fails_outstanding_requests(echo: Echo) -> None:
    ch = echo.ch
    ch.enable()
    echo.mock.fault(echo.guid, "stall")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            ch.send_request(b"never", timeout=10)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: ch.counters.requests == 1)
    ch.disable()
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosed) and errors[0].reason == "disabled"


@pytest.mark.timeout(30)
def test_disable_from_inside_a_callback(echo: Echo) -> None:
    ch = echo.ch
    closed: list[str] = []
    ch.on_closed(lambda c, r: closed.append(r))
    ch.on_packet(lambda c, p: c.disable())
    ch.enable()
    ch.send(b"bye")
    wait_until(lambda: closed == ["disabled"], what="the close")
    assert ch.state is S.DISABLED


@pytest.mark.timeout(30)
def test_raising_on_packet_closes_with_the_error(echo: Echo) -> None:
    ch = echo.ch
    closed: list[str] = []
    ch.on_closed(lambda c, r: closed.append(r))

    def bad(c: Channel, p: Packet) -> None:
        raise KeyError("handler bug")

    ch.on_packet(bad)
    ch.enable()
    ch.send(b"x")
    wait_until(lambda: bool(closed))
    assert closed[0].startswith("error:") and isinstance(ch.last_error, KeyError)


# -- subchannels -----------------------------------------------------------------------------

AUTO_POLLED = {"5.15", "6.10", "6.12-debian", "openhcl"}
"""Where the default (poll_subchannels=None) keeps subchannels masked and polled: every kernel
whose hv_uio_channel_cb lacks the primary lookup (before d062463 and the Dec 2025 5.4-6.6
backport), where a subchannel interrupt oopses the guest. SPEC.md rule 6's probe (a write
of 1 must clear a subchannel's mask) finds them; "the kernel masked the primary on open"
(5.15, 6.10) does not make them safe."""


def expect_polled(gen: str, option: bool | None) -> bool:
    return gen in AUTO_POLLED if option is None else option


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option", [None, True, False], ids=["auto", "poll", "interrupts"])
def test_subchannels(echo: Echo, option: bool | None) -> None:
    gen = echo.mock.generation
    if option is False and gen.subchannel_interrupt_crash:
        pytest.skip(f"{gen.name}: forced subchannel interrupts oops the kernel (test_forced_"
                    "subchannel_interrupts_crash_the_window_kernel)")
    polled = expect_polled(gen.name, option)
    ch = echo.ch
    ch.poll_subchannels = option
    got: dict[int | None, list[bytes]] = {}
    ch.on_packet(lambda c, p: got.setdefault(c.relid, []).append(p.payload))
    closed: list[int | None] = []
    ch.on_closed(lambda c, r: closed.append(c.relid))
    ch.enable()
    echo.mock.offer_subchannels(echo.guid, 2)
    subs = ch.open_subchannels(2, timeout=5)
    assert len(subs) == 2 and ch.subchannels == tuple(subs)
    assert all(s.state is S.RUNNING and s.is_subchannel for s in subs)
    for s in subs:
        assert s.send_request(b"sub%d" % s.relid, timeout=5) == pad8(b"sub%d" % s.relid)
        s.send(b"in-band")
    ch.send(b"primary")
    wait_until(lambda: sum(len(v) for v in got.values()) == 3, what="echoes on every channel")
    assert got[ch.relid] == [pad8(b"primary")]
    for s in subs:
        assert got[s.relid] == [pad8(b"in-band")]
        assert s.polled is polled
        rx = s.rx_ring
        assert rx is not None and (rx.interrupt_mask == 1) is polled
    assert ("polled" in ch.describe()) is polled
    assert ch.info()["subchannel_interrupts"]["mode"] == ("polled" if polled else "interrupts")
    assert echo.mock.alive
    with pytest.raises(InvalidState):
        subs[0].disable()
    ch.disable()
    assert sorted(closed, key=lambda r: r or 0) == sorted([ch.relid, *(s.relid for s in subs)],
                                                          key=lambda r: r or 0)
    assert closed[-1] == ch.relid  # the primary closes last
    assert all(s.state is S.DISABLED for s in subs)


@pytest.mark.timeout(30)
def test_subchannel_mode_is_detected_from_the_kernels_behaviour(
        echo: Echo, caplog: pytest.LogCaptureFixture) -> None:
    """Default: the channel decides per kernel, says why in describe() / info(), and on the
    crash window (6.12-debian) keeps subchannels masked and polled, so host traffic on
    them never raises the interrupt that would oops the kernel."""
    gen = echo.mock.generation
    polled = expect_polled(gen.name, None)
    ch = echo.ch
    assert ch.poll_subchannels is None
    got: dict[int | None, list[bytes]] = {}
    ch.on_packet(lambda c, p: got.setdefault(c.relid, []).append(p.payload))
    caplog.set_level("WARNING", logger="pyvmbus.channel")
    ch.enable()
    assert ch._disp is not None and ch._disp.masked_on_open is gen.masks_on_open
    before = ch.info()["subchannel_interrupts"]
    assert before["mode"] == "undecided"  # the primary's mask on open says nothing
    echo.mock.offer_subchannels(echo.guid, 2)
    subs = ch.open_subchannels(2, timeout=5)
    assert [s.polled for s in subs] == [polled, polled]
    summary = ch.info()["subchannel_interrupts"]
    text = ch.describe()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "oops" in r.getMessage()]
    if polled:
        assert "left the subchannel's mask alone" in summary["reason"]
        assert "polled every 1 ms" in summary["reason"]
        assert f"subchannels: polled ({summary['reason']})" in text
        assert warned
        if gen.masks_on_open:  # 5.15, 6.10: masked at creation, but the callback still oopses
            assert "before d062463" in summary["reason"]
        else:  # 6.12-debian, openhcl: subchannels start unmasked, and the user is told the risk
            assert "start UNMASKED" in summary["reason"] and "b15b7 without d062463" in summary["reason"]
            risk = [m for m in warned if "was UNMASKED when pyvmbus mapped it" in m]
            assert risk and "risks the VM" in risk[0] and "d062463" in risk[0]
    else:
        assert "cleared the subchannel's mask" in summary["reason"]
        assert "subchannels: interrupts" in text
        assert not warned
    for s in subs:
        assert (s.info()["polled_reason"] == summary["reason"])
        rx = s.rx_ring
        assert rx is not None and (rx.interrupt_mask == 1) is polled
    # traffic the host starts on every subchannel (empty -> non-empty transitions), twice
    for round_ in range(2):
        for index in (1, 2):
            echo.mock.command(echo.guid, "send", subchannel=index, payload=b"h%d" % round_, count=20)
        wait_until(lambda r=round_: all(len(got.get(s.relid, [])) == 20 * (r + 1) for s in subs),
                   what="host packets on every subchannel")
        time.sleep(0.01)  # the ring is empty again: the next round is a new transition
    for s in subs:
        assert s.send_request(b"q%d" % s.relid, timeout=5) == pad8(b"q%d" % s.relid)
    assert echo.mock.alive
    assert not [line for line in echo.mock.kernel_log() if "BUG:" in line]
    stats = echo.mock.host_stats(echo.guid)
    sub_interrupts = sum(stats["channels"][s.relid]["interrupts"] for s in subs)
    assert (sub_interrupts == 0) if polled else (sub_interrupts > 0)


@pytest.mark.timeout(30)
def test_polled_subchannel_waits_for_room_without_asking_for_an_interrupt() -> None:
    """A full TX ring on a polled subchannel: no pending_send_size (the host's "room now"
    interrupt would oops the crash-window kernel); the dispatcher's polling finds the room."""
    with MockVmbus(kernel="6.12-debian") as m:
        e = make_echo(m)
        ch = e.ch
        ch.enable()
        m.offer_subchannels(e.guid, 1)
        (sub,) = ch.open_subchannels(1, timeout=5)
        assert sub.polled
        tx = sub.tx_ring
        assert tx is not None
        m.fault(e.guid, "stall")
        errors: list[BaseException] = []

        def fill() -> None:
            try:
                for _ in range(tx.data_size // 4000 + 8):  # more than fits
                    sub.send(b"f" * 4000, timeout=10)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=fill)
        t.start()
        wait_until(lambda: sub.counters.ring_full_waits > 0, what="a full subchannel ring")
        assert tx.pending_send_size == 0
        m.fault(e.guid, "resume")
        t.join(10)
        assert not t.is_alive() and not errors
        assert m.alive and not [line for line in m.kernel_log() if "BUG:" in line]
        ch.disable()


@pytest.mark.timeout(30)
def test_forced_subchannel_interrupts_crash_the_window_kernel() -> None:
    """poll_subchannels=False on 6.12-debian: the first subchannel interrupt is the kernel's
    NULL dereference; the mock dies like a crashed host and its kernel log has the BUG."""
    with MockVmbus(kernel="6.12-debian") as m:
        e = make_echo(m, poll_subchannels=False)
        ch = e.ch
        closed: list[str] = []
        ch.on_closed(lambda c, r: closed.append(r))
        ch.enable()
        m.offer_subchannels(e.guid, 1)
        (sub,) = ch.open_subchannels(1, timeout=5)
        assert not sub.polled and "expect a kernel oops" in sub.info()["polled_reason"]
        with pytest.raises(ChannelClosed, match="host crashed"):
            sub.send_request(b"boom", timeout=5)
        wait_until(lambda: bool(closed), what="on_closed after the oops")
        assert closed[0].startswith("host crashed")
        wait_until(lambda: not m.alive, what="the mock process to die")
        bug = [line for line in m.kernel_log() if "BUG: kernel NULL pointer dereference" in line]
        assert bug and f"hv_uio_channel_cb (subchannel relid {sub.relid}" in bug[0]


@pytest.mark.timeout(30)
def test_open_subchannels_times_out_when_none_come(echo: Echo) -> None:
    echo.ch.enable()
    with pytest.raises(Timeout, match="subchannel"):
        echo.ch.open_subchannels(1, timeout=0.3)


@pytest.mark.timeout(30)
def test_full_tx_in_on_started_raises_ring_full(echo: Echo) -> None:
    ch = echo.ch
    echo.mock.fault(echo.guid, "stall")

    def fill(c: Channel) -> None:
        while True:
            c.send(b"f" * 2000)

    ch.on_started(fill)
    with pytest.raises(RingFull):
        ch.enable()
    echo.mock.fault(echo.guid, "resume")


@pytest.mark.timeout(30)
def test_counters_survive_close_and_accumulate(echo: Echo) -> None:
    ch = echo.ch
    for _ in range(2):
        ch.enable()
        for i in range(5):
            ch.send_request(b"c%d" % i, timeout=5)
        ch.disable()
    c = ch.counters.as_dict()
    assert c["requests"] == 10 and c["packets_out"] == 10 and c["packets_in"] == 10
    assert c["bytes_out"] == 20 and c["bytes_in"] == 80  # replies come back padded to 8
    assert c["signals"] >= 2 and c["interrupts"] >= 2  # kept after the close
    assert c["signals"] == ch.counters.signals and set(c) >= {"late_completions", "ring_full_waits"}


@pytest.mark.timeout(30)
def test_background_thread_does_not_linger_after_its_own_cycles(echo: Echo) -> None:
    """Only a caller's release makes the dispatcher thread step aside for LINGER.

    If its own releases counted, every packet after one it dispatched would wait LINGER
    (5 ms) for the next poll: a send from on_packet answered by the host, for example.
    """
    ch = echo.ch
    threads: list[threading.Thread] = []
    ch.on_packet(lambda c, p: threads.append(threading.current_thread()))
    ch.enable()
    disp = ch._disp
    assert disp is not None
    time.sleep(0.02)  # past LINGER: the background thread polls the fd
    before = disp._last_release
    for i in range(3):
        echo.host_send(b"h%d" % i)
        wait_until(lambda i=i: len(threads) == i + 1, what="the background thread's delivery")
    assert all(t is disp._thread for t in threads)
    assert disp._last_release == before


# -- concurrency review: wakeups, closing under load, counters ---------------------------------

@pytest.mark.timeout(30)
def test_no_lost_wakeup_on_a_subchannel(echo: Echo) -> None:
    """The drain -> unmask -> fence -> re-check window of a subchannel, on every generation.

    As for the primary: the hook masks the subchannel's ring after the drain and has the
    host write into it; the host does not interrupt a masked ring, so only our re-check
    of every ring (the subchannels share the device's one event counter) finds them.
    """
    ch = echo.ch
    got: list[bytes] = []
    ch.on_packet(lambda c, p: got.append(p.payload) if c.is_subchannel else None)
    ch.enable()
    echo.mock.offer_subchannels(echo.guid, 1)
    (sub,) = ch.open_subchannels(1, timeout=5)
    disp = ch._disp
    assert disp is not None
    counts: dict[str, int] = {}
    fired = threading.Event()

    def sub_interrupts() -> int:
        return int(echo.mock.host_stats(echo.guid)["channels"][sub.relid]["interrupts"])

    def hook() -> None:
        if fired.is_set() or not got:
            return
        fired.set()
        rx = sub.rx_ring
        assert rx is not None
        rx.interrupt_mask = 1
        counts["before"] = sub_interrupts()
        echo.mock.command(echo.guid, "send", subchannel=sub.subchannel_index, payload=b"late", count=3)
        counts["after"] = sub_interrupts()

    disp._before_unmask = hook
    sub.send(b"first")
    wait_until(lambda: len(got) == 4, timeout=2, what="the subchannel packets written in the window")
    assert got == [pad8(b"first"), *[pad8(b"late")] * 3]
    assert counts["after"] == counts["before"]


@pytest.mark.timeout(30)
def test_waiters_on_many_threads_fail_at_once_on_rescind(mock: MockVmbus) -> None:
    """Requests outstanding on several threads (leader and followers) all end with
    ChannelClosed("rescinded") well inside their timeout; on_closed runs once; no
    dispatcher thread is left behind."""
    e = make_echo(mock)
    try:
        ch = e.ch
        closed: list[str] = []
        ch.on_closed(lambda c, r: closed.append(r))
        ch.enable()
        disp = ch._disp
        assert disp is not None and disp._thread is not None
        mock.fault(e.guid, "stall")  # the host stops reading: nothing is ever answered
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            try:
                ch.send_request(b"q%d" % i, timeout=20)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(ch._pending) == 4, what="four outstanding requests")
        t0 = time.monotonic()
        mock.rescind(e.guid)
        for t in threads:
            t.join(5)
        assert time.monotonic() - t0 < 2.0
        assert len(errors) == 4 and all(isinstance(x, ChannelClosed) for x in errors), errors
        assert {x.reason for x in errors if isinstance(x, ChannelClosed)} == {"rescinded"}
        wait_until(lambda: bool(closed), timeout=1.0, what="on_closed")
        assert closed == ["rescinded"]
        disp._thread.join(2)
        assert not disp._thread.is_alive()
        assert not any(t.name == f"vmbus-dispatch-{ch.name}" for t in threading.enumerate())
    finally:
        drop(e)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("monitored", [True, False], ids=["monitored", "fd-write"])
def test_disable_while_other_threads_send(mock: MockVmbus, monitored: bool) -> None:
    """Senders racing disable() see their packets go out or ChannelClosed, nothing else
    (no OSError from a closed fd, no write to a reused fd, no crash)."""
    if not monitored and mock.generation.refuses_unmonitored:
        pytest.skip(f"{mock.generation.name} refuses channels without a monitor id")
    e = make_echo(mock, monitored=monitored)
    try:
        ch = e.ch
        for _round in range(3):
            ch.enable()
            outcome: list[BaseException | None] = []
            started = threading.Barrier(4)

            def spam(started: threading.Barrier = started, outcome: list[BaseException | None] = outcome
                     ) -> None:
                started.wait()
                try:
                    while True:
                        ch.send(b"s" * 64, timeout=5)
                except BaseException as exc:
                    outcome.append(exc)

            threads = [threading.Thread(target=spam) for _ in range(3)]
            for t in threads:
                t.start()
            started.wait()
            time.sleep(0.02)
            ch.disable()
            for t in threads:
                t.join(5)
            assert len(outcome) == 3
            assert all(isinstance(x, ChannelClosed) for x in outcome), outcome
            assert ch.state is S.DISABLED and ch._dev is None
    finally:
        drop(e)


@pytest.mark.timeout(60)
def test_counters_exact_with_concurrent_senders(echo: Echo) -> None:
    """packets/bytes out, requests and ring-full waits are counted under the locks that
    serialise them, so threads switching as often as possible lose no increment."""
    import sys

    ch = echo.ch
    ch.enable()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def work() -> None:
            for i in range(300):
                ch.send(b"c" * 24)
                if i % 10 == 0:
                    ch.send_request(b"r", timeout=10)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(old)
    c = ch.counters
    assert c.requests == 4 * 30
    assert c.packets_out == 4 * (300 + 30)
    assert c.bytes_out == 4 * (300 * 24 + 30)
    wait_until(lambda: echo.host("packets_in") == c.packets_out, what="the host to read everything")
    assert c.signals == echo.host("signals") or c.signals >= 1


SIGNALS_SUBCHANNELS = {"6.15", "6.18"}
"""d062463's set_event(): a write of 1 signals every non-monitored channel of the device."""


@pytest.mark.timeout(30)
def test_non_monitored_subchannel_is_refused_where_nothing_can_signal_it(mock: MockVmbus) -> None:
    """SPEC rule 7: userspace cannot make HvSignalEvent; only a d062463 kernel's write of 1
    signals a non-monitored subchannel. Elsewhere opening one is a clear error naming the
    kernels where it works, not requests that time out."""
    gen = mock.generation.name
    e = make_echo(mock)  # a monitored primary (every generation binds it)
    try:
        e.ch.enable()
        (relid,) = mock.offer_subchannels(e.guid, 1, monitored=False)
        if gen in SIGNALS_SUBCHANNELS:
            (sub,) = e.ch.open_subchannels(1, timeout=5)
            assert sub.monitor_id is None and sub.relid == relid
            assert sub.send_request(b"told", timeout=5) == pad8(b"told")
        else:
            with pytest.raises(UnsupportedKernel) as info:
                e.ch.open_subchannels(1, timeout=5)
            msg = str(info.value)
            assert f"non-monitored subchannel relid {relid}" in msg and "d062463" in msg
            assert "6.15" in msg and "HvSignalEvent" in msg
            assert e.ch.subchannels == ()
        assert mock.alive
    finally:
        drop(e)


@pytest.mark.timeout(30)
def test_subchannel_ring_is_mapped_at_the_channels_size_not_st_size(mock: MockVmbus) -> None:
    """The ring file claims a fixed 4 MiB before 65995e97a1ca; the client takes the size from
    the channel (write_avail + the header page of an untouched TX ring), never from st_size."""
    e = make_echo(mock)
    try:
        e.ch.enable()
        mock.offer_subchannels(e.guid, 1)
        (sub,) = e.ch.open_subchannels(1, timeout=5)
        assert sub.tx_ring is not None and sub.rx_ring is not None
        assert sub.tx_ring.data_size == sub.rx_ring.data_size == (2 << 20) - 4096
        assert sub.send_request(b"sized", timeout=5) == pad8(b"sized")
    finally:
        drop(e)


def test_subchannel_ring_size_comes_from_the_channel(tmp_path: Path) -> None:
    """A ring pair of 2 x 0x11000 behind a ring file that claims 4 MiB (old kernels, OpenHCL):
    the size the client maps is the channel's (sysfs write_avail + one header page)."""
    import os

    from pyvmbus.channel import _subchannel_ring_bytes
    from pyvmbus.mock.sysfs_tree import FIXED_RING_FILE_SIZE, SysfsTree
    from pyvmbus.sysfs import Sysfs

    tree = SysfsTree(tmp_path, "6.10")
    guid = tree.add_device("network")
    tree.add_channel(guid, 40, 1)
    tree.set_ring_allocated(guid, 40, 0x11000)
    backing = tmp_path / "backing"
    backing.write_bytes(b"\0" * 4096)
    os.truncate(backing, tree.ring_file_size(2 * 0x11000))
    tree.set_ring_file(guid, 40, backing)
    chan = Sysfs(tmp_path).device(guid).channel(40)
    assert chan.ring_file_size == FIXED_RING_FILE_SIZE == 4 << 20
    assert _subchannel_ring_bytes(chan) == 2 * 0x11000
    tree.set_ring_allocated(guid, 40, None)
    assert _subchannel_ring_bytes(chan) is None  # not set up yet: wait, do not guess


@pytest.mark.timeout(60)
def test_a_rescind_during_post_started_is_closed_when_enable_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """enable() raises ChannelClosed only after on_closed ran (the CLI prints its closed
    event from it): a rescind that lands while post-started runs used to be left to the
    dispatcher thread's teardown, still running when enable() raised."""
    release = Channel.release

    def slow_release(self: Channel) -> None:
        time.sleep(0.3)  # widen the window between "closing" and "closed"
        release(self)

    monkeypatch.setattr(Channel, "release", slow_release)
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bus = Vmbus(mock.root)
        bus.bind(guid)
        ch = bus.channel(guid, dispatch="thread")
        closed: list[str] = []
        ch.on_closed(lambda c, reason: closed.append(reason))

        def rescind_now(c: Channel) -> None:
            mock.rescind(str(guid))
            assert until(lambda: c.state is ChannelState.CLOSING, 10)

        ch.on_post_started(rescind_now)
        with pytest.raises(ChannelClosed, match="rescinded"):
            ch.enable()
        assert closed == ["rescinded"] and ch.state is ChannelState.DISABLED
