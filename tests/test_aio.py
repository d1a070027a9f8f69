"""The asyncio face of Channel against the mock's echo device, on every kernel generation."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmbus import ChannelClosed, Timeout
from pyvmbus.aio import send
from pyvmbus.bus import Vmbus
from pyvmbus.capture import Direction, read_capture
from pyvmbus.channel import Channel
from pyvmbus.lifecycle import ChannelState
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS
from pyvmbus.packet import Packet
from pyvmbus.ring import MAX_PACKET_SIZE

GENS = list(GENERATIONS)
S = ChannelState


@pytest.fixture(scope="module", params=GENS)
def mock(request: pytest.FixtureRequest) -> Iterator[MockVmbus]:
    with MockVmbus(kernel=request.param) as m:
        yield m


def echo_channel(mock: MockVmbus, monitored: bool = True) -> tuple[str, Channel]:
    guid = mock.add_device("echo", monitored=monitored)
    bus = Vmbus(mock.root)
    bus.bind(guid)
    return guid, bus.channel(guid)


Echo = tuple[MockVmbus, str, Channel]


@pytest.fixture
def echo(mock: MockVmbus) -> Iterator[Echo]:
    guid, ch = echo_channel(mock)
    yield mock, guid, ch
    if ch.state is not S.DISABLED:
        ch.disable()
    mock.remove_device(guid)


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


@pytest.mark.timeout(30)
def test_enabled_request_and_packets_without_threads(echo: Echo) -> None:
    _, _, ch = echo
    log: list[object] = []
    ch.on_post_started(lambda c: log.append(("post", c.send_request(b"sync-in-post", timeout=5))))

    async def main() -> None:
        threads = threading.active_count()
        async with ch.enabled() as c:
            assert c is ch and ch.state is S.RUNNING
            assert threading.active_count() == threads  # the loop dispatches: no thread
            assert ch._disp is not None and ch._disp.mode == "asyncio"
            assert await ch.request(b"hello", timeout=5) == pad8(b"hello")
            replies = await asyncio.gather(*(ch.request(b"r%d" % i, timeout=5) for i in range(20)))
            assert replies == [pad8(b"r%d" % i) for i in range(20)]
            for i in range(5):
                ch.send(b"p%d" % i)
            got = []
            async for pkt in ch.packets():
                got.append(pkt.payload)
                if len(got) == 5:
                    break
            assert got == [pad8(b"p%d" % i) for i in range(5)]
        assert ch.state is S.DISABLED

    asyncio.run(main())
    assert log == [("post", pad8(b"sync-in-post"))]


@pytest.mark.timeout(30)
def test_packets_ends_on_disable_and_raises_on_rescind(mock: MockVmbus) -> None:
    guid, ch = echo_channel(mock)

    async def consume(out: list[bytes]) -> None:
        async for pkt in ch.packets():
            out.append(pkt.payload)

    async def main() -> None:
        async with ch.enabled():
            out: list[bytes] = []
            task = asyncio.create_task(consume(out))
            await asyncio.sleep(0)
            ch.send(b"a")
            while not out:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(task, 2)  # ends quietly on disable
        assert out == [pad8(b"a")]

        ch.enable(dispatch="asyncio")
        closed: list[str] = []
        ch.on_closed(lambda c, r: closed.append(r))
        out2: list[bytes] = []
        task = asyncio.create_task(consume(out2))
        await asyncio.to_thread(mock.fault, guid, "stall")  # keep the request outstanding
        pending = asyncio.create_task(ch.request(b"x", timeout=10))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await asyncio.to_thread(mock.rescind, guid)
        with pytest.raises(ChannelClosed, match="rescinded"):
            await asyncio.wait_for(task, 1)
        assert time.monotonic() - t0 < 1.0 and closed == ["rescinded"]
        with pytest.raises(ChannelClosed, match="rescinded"):  # outstanding requests fail
            await asyncio.wait_for(pending, 1)

    try:
        asyncio.run(main())
    finally:
        if ch.state is not S.DISABLED:
            ch.disable()
        mock.remove_device(guid)


@pytest.mark.timeout(30)
def test_request_timeout_cancels_and_drops_late_completion(echo: Echo) -> None:
    m, guid, ch = echo

    async def main() -> None:
        async with ch.enabled():
            await asyncio.to_thread(m.fault, guid, "stall")
            with pytest.raises(Timeout):
                await ch.request(b"slow", timeout=0.2)
            assert ch.counters.cancelled == 1
            await asyncio.to_thread(m.fault, guid, "resume")
            deadline = time.monotonic() + 5
            while ch.counters.late_completions == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert ch.counters.late_completions == 1
            assert await ch.request(b"fresh", timeout=5) == pad8(b"fresh")

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_request_timeouts_share_one_timer_and_keep_their_own_deadlines(echo: Echo) -> None:
    """The loop's shared deadline timer: a short timeout started after a long one still
    ends at its own deadline, and the long one is not ended by it."""
    m, guid, ch = echo

    async def main() -> None:
        async with ch.enabled():
            assert await ch.request(b"warm", timeout=30) == pad8(b"warm")  # a long, done deadline
            await asyncio.to_thread(m.fault, guid, "stall")
            long = asyncio.create_task(ch.request(b"long", timeout=3.0))
            await asyncio.sleep(0)
            with pytest.raises(Timeout):
                await ch.request(b"short", timeout=0.2)
            assert not long.done()  # the short deadline fired first, and ended only its request
            await asyncio.to_thread(m.fault, guid, "resume")
            assert await long == pad8(b"long")

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_async_send_waits_for_room_without_blocking_the_loop(echo: Echo) -> None:
    m, guid, ch = echo

    async def main() -> None:
        got: list[Packet] = []
        ch.on_packet(lambda c, p: got.append(p))
        async with ch.enabled():
            tx = ch.tx_ring
            assert tx is not None
            await asyncio.to_thread(m.fault, guid, "stall")
            n = tx.data_size // 2024 + 6
            sender = asyncio.create_task(_send_all(ch, n))
            ticks = 0
            while ch.counters.ring_full_waits == 0:
                await asyncio.sleep(0.002)
                ticks += 1
            for _ in range(10):  # the loop keeps running while the sender waits
                await asyncio.sleep(0.005)
                ticks += 1
            assert not sender.done() and tx.pending_send_size > 0
            await asyncio.to_thread(m.fault, guid, "resume")
            await asyncio.wait_for(sender, 10)
            while len(got) < n:
                await asyncio.sleep(0.005)
            assert [int.from_bytes(p.payload[:4], "little") for p in got] == list(range(n))
            assert tx.pending_send_size == 0 and ticks > 10

    asyncio.run(main())


async def _send_all(ch: Channel, n: int) -> None:
    for i in range(n):
        await send(ch, i.to_bytes(4, "little") + b"w" * 1996, timeout=10)


def _checksummed(i: int) -> bytes:
    body = os.urandom(8 + i % 200)
    return zlib.crc32(body).to_bytes(4, "little") + i.to_bytes(4, "little") + body


async def _pipelined(ch: Channel, n: int, window: int) -> int:
    """n requests, ``window`` outstanding at a time; every reply checked by its checksum."""
    bad = 0
    nxt = 0

    async def one(i: int) -> None:
        nonlocal bad
        msg = _checksummed(i)
        reply = await ch.request(msg, timeout=20)
        body = reply[8:len(msg)]
        if (reply[:len(msg)] != msg or zlib.crc32(body).to_bytes(4, "little") != reply[:4]
                or int.from_bytes(reply[4:8], "little") != i):
            bad += 1

    async def lane() -> None:
        nonlocal nxt
        while nxt < n:
            i = nxt
            nxt += 1
            await one(i)

    await asyncio.gather(*(lane() for _ in range(window)))
    return bad


@pytest.mark.timeout(60)
def test_pipelined_requests_with_checksums_every_generation(echo: Echo) -> None:
    _, _, ch = echo

    async def main() -> None:
        async with ch.enabled():
            assert await _pipelined(ch, 2000, 32) == 0
        assert ch.counters.requests == 2000 and ch.counters.cancelled == 0

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_100k_request_response_pairs_with_checksums() -> None:
    """10^5 request/response pairs, pipelined 64 deep, every reply checksummed (6.18)."""
    with MockVmbus(kernel="6.18") as m:
        guid, ch = echo_channel(m, monitored=False)

        async def main() -> None:
            async with ch.enabled():
                assert await _pipelined(ch, 100_000, 64) == 0
            c = ch.counters
            assert c.requests == 100_000 and c.packets_in == 100_000 and c.cancelled == 0

        asyncio.run(main())
        stats = m.host_stats(guid)
        assert stats["packets_in"] == 100_000 and stats["packets_out"] == 100_000


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option", [None, True, False], ids=["auto", "poll", "interrupts"])
def test_subchannels_under_asyncio(echo: Echo, option: bool | None) -> None:
    """Subchannels are dispatched by the loop too; polled ones by a loop timer. The default
    polls wherever a subchannel interrupt would oops the kernel (5.15, 6.10, 6.12-debian,
    openhcl: no primary lookup in hv_uio_channel_cb)."""
    m, guid, ch = echo
    if option is False and m.generation.subchannel_interrupt_crash:
        pytest.skip(f"{m.generation.name}: forced subchannel interrupts oops the kernel")
    polled = m.generation.name in {"5.15", "6.10", "6.12-debian", "openhcl"} if option is None else option
    ch.poll_subchannels = option

    async def main() -> None:
        async with ch.enabled():
            await asyncio.to_thread(m.offer_subchannels, guid, 2)
            subs = await asyncio.to_thread(ch.open_subchannels, 2, 5.0)
            replies = await asyncio.gather(*(s.request(b"s%d" % s.relid, timeout=5) for s in subs))
            assert replies == [pad8(b"s%d" % s.relid) for s in subs]
            assert all(s.polled is polled for s in subs)

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_asyncio_dispatch_needs_a_running_loop(echo: Echo) -> None:
    from pyvmbus import InvalidState

    _, _, ch = echo
    with pytest.raises(InvalidState, match="event loop"):
        ch.enable(dispatch="asyncio")
    assert ch.state is S.DISABLED
    ch.enable()  # nothing was left open
    assert ch.send_request(b"ok", timeout=5) == pad8(b"ok")


@pytest.mark.timeout(30)
def test_async_send_waiting_for_room_fails_at_once_on_rescind(mock: MockVmbus) -> None:
    """A coroutine waiting for room in a full ring gets ChannelClosed when the channel
    closes, not when its send_timeout runs out (nothing else would wake it)."""
    guid, ch = echo_channel(mock)

    async def main() -> tuple[BaseException | None, float]:
        async with ch.enabled():
            await asyncio.to_thread(mock.fault, guid, "stall")
            tx = ch.tx_ring
            assert tx is not None
            sender = asyncio.create_task(_send_all(ch, tx.data_size // 2024 + 6))
            while ch.counters.ring_full_waits == 0:
                await asyncio.sleep(0.002)
            t0 = time.monotonic()
            await asyncio.to_thread(mock.rescind, guid)
            try:
                await asyncio.wait_for(sender, 5)
            except BaseException as exc:
                return exc, time.monotonic() - t0
            return None, time.monotonic() - t0

    try:
        exc, dt = asyncio.run(main())
        assert isinstance(exc, ChannelClosed) and exc.reason == "rescinded", exc
        assert dt < 2.0
    finally:
        with contextlib.suppress(Exception):
            mock.remove_device(guid)


@pytest.mark.timeout(30)
def test_a_timeout_queue_dropped_by_the_timer_is_made_again(echo: Echo) -> None:
    """The deadlines keep the last timeout's queue at hand; once the timer has emptied and
    dropped that queue, the next request with the same timeout still gets its deadline."""
    m, guid, ch = echo

    async def main() -> None:
        async with ch.enabled():
            await asyncio.to_thread(m.fault, guid, "stall")
            for _ in range(2):  # the second one reuses the timeout after its queue was dropped
                with pytest.raises(Timeout):
                    await ch.request(b"slow", timeout=0.1)
            assert ch.counters.cancelled == 2
            await asyncio.to_thread(m.fault, guid, "resume")
            assert await ch.request(b"again", timeout=0.1 + 5) == pad8(b"again")

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_request_is_a_coroutine_and_the_channel_serves_a_second_loop(echo: Echo) -> None:
    """Channel.request returns the request's coroutine (a task, gather, or a plain await),
    and the per-loop state is made again when the channel is enabled under another loop."""
    _, _, ch = echo

    states: list[object] = []

    async def main(tag: bytes) -> None:
        async with ch.enabled():
            coro = ch.request(tag + b"-await", timeout=5)
            assert asyncio.iscoroutine(coro)
            assert await coro == pad8(tag + b"-await")
            task = asyncio.create_task(ch.request(tag + b"-task", timeout=5))
            both = await asyncio.gather(task, ch.request(tag + b"-gather", timeout=5))
            assert both == [pad8(tag + b"-task"), pad8(tag + b"-gather")]
            states.append(ch.aio_state)

    asyncio.run(main(b"one"))
    assert ch.aio_state is None  # dropped with the rings: no closed loop kept alive
    asyncio.run(main(b"two"))
    assert states[0] is not states[1]
    assert ch.counters.requests == 6  # the counters run on across enables


@pytest.mark.timeout(30)
def test_a_finished_loop_is_not_kept_alive(mock: MockVmbus) -> None:
    """The shared deadlines (a weak-keyed table) and the per-loop state keep no loop
    alive: once its channel is gone, a loop that ran requests and closed is freed."""
    guid, ch = echo_channel(mock)
    held = [ch]
    del ch
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with held[0].enabled():
            assert await held[0].request(b"x", timeout=5) == pad8(b"x")

    asyncio.run(main())
    held.clear()
    gc.collect()
    assert loops[0]() is None
    mock.remove_device(guid)


@pytest.mark.timeout(30)
def test_a_closed_channel_still_held_keeps_no_loop(mock: MockVmbus) -> None:
    """A channel the caller keeps after its loop ended (to read its reason, its counters,
    or enable it again) holds its last dispatcher, and that must not hold the loop."""
    guid, ch = echo_channel(mock)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with ch.enabled():
            assert await ch.request(b"x", timeout=5) == pad8(b"x")

    asyncio.run(main())
    gc.collect()
    assert ch.dispatcher is not None and ch.counters.requests == 1
    assert loops[0]() is None
    asyncio.run(main())  # and it runs on a new loop as before
    assert ch.counters.requests == 2
    mock.remove_device(guid)


@pytest.mark.timeout(30)
def test_requests_in_flight_fail_when_another_thread_disables(echo: Echo) -> None:
    """A close from another thread completes the requests there: their futures are settled
    through the loop (call_soon_threadsafe), every awaiting task raises ChannelClosed."""
    m, guid, ch = echo

    async def main() -> None:
        async with ch.enabled():
            await asyncio.to_thread(m.fault, guid, "stall")
            tasks = [asyncio.create_task(ch.request(b"%d" % i, timeout=20)) for i in range(16)]
            await asyncio.sleep(0.05)
            disp = ch.dispatcher
            assert disp is not None
            # What a sender thread that found the device gone does (Channel._device_lost).
            closer = threading.Thread(target=disp.request_close, args=("rescinded",))
            closer.start()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            closer.join(5)
            assert all(isinstance(r, ChannelClosed) and "rescinded" in str(r) for r in results), results
            await asyncio.to_thread(m.fault, guid, "resume")
        assert ch.state is S.DISABLED

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_requests_of_a_turn_go_out_in_order_before_a_later_send(echo: Echo, tmp_path: Path) -> None:
    """The packets of a loop turn's requests are written together at its end, but in the
    order the requests were made and before any packet a later send writes."""
    _, _, ch = echo
    path = tmp_path / "order.pcapng"

    async def main() -> None:
        got: list[Packet] = []
        ch.on_packet(lambda c, p: got.append(p))
        async with ch.enabled():
            tasks = [asyncio.create_task(ch.request(b"req-%d" % i, timeout=5)) for i in range(3)]
            await asyncio.sleep(0)  # the three ran their first step; the turn has not ended
            assert len(ch.deferred) == 3
            ch.send(b"after")  # writes the queued requests first
            assert not ch.deferred
            await ch.request(b"last", timeout=5)
            assert await asyncio.gather(*tasks) == [pad8(b"req-%d" % i) for i in range(3)]
            while not got:
                await asyncio.sleep(0.005)

    ch.capture(path)
    asyncio.run(main())
    ch.stop_capture()
    tx = [r.packet.payload for r in read_capture(path).packets() if r.direction is Direction.GUEST_TO_HOST]
    assert tx == [pad8(b"req-0"), pad8(b"req-1"), pad8(b"req-2"), pad8(b"after"), pad8(b"last")]
    assert ch.counters.requests == 4


@pytest.mark.timeout(30)
def test_requests_a_full_ring_cannot_take_wait_for_room(echo: Echo) -> None:
    """A turn's requests that do not fit the TX ring (the host stalled) go out one by one
    as far as they fit; the rest wait for room as a send does, and all complete."""
    m, guid, ch = echo

    async def main() -> None:
        async with ch.enabled():
            tx = ch.tx_ring
            assert tx is not None
            await asyncio.to_thread(m.fault, guid, "stall")
            n = tx.data_size // 2024 + 6
            msgs = [i.to_bytes(4, "little") + b"r" * 1996 for i in range(n)]
            tasks = [asyncio.create_task(ch.request(msg, timeout=20)) for msg in msgs]
            while ch.counters.ring_full_waits == 0:
                await asyncio.sleep(0.002)
            assert not any(t.done() for t in tasks) and tx.pending_send_size > 0
            await asyncio.to_thread(m.fault, guid, "resume")
            assert await asyncio.gather(*tasks) == [pad8(msg) for msg in msgs]
            assert tx.pending_send_size == 0
        assert ch.counters.requests == n and ch.counters.cancelled == 0

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_payload_the_ring_refuses_fails_only_its_own_request(echo: Echo) -> None:
    """One request of a turn with a payload no packet can carry raises ValueError, as a
    write of it would; the requests queued with it still go out and complete."""
    _, _, ch = echo

    async def main() -> None:
        async with ch.enabled():
            big = b"x" * (MAX_PACKET_SIZE + 8)
            tasks = [asyncio.create_task(ch.request(p, timeout=5)) for p in (b"one", big, b"two")]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert results[0] == pad8(b"one") and results[2] == pad8(b"two")
            assert isinstance(results[1], ValueError) and "VMBus maximum" in str(results[1])
            assert await ch.request(b"after", timeout=5) == pad8(b"after")
        assert ch.counters.requests == 3

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_flush_left_scheduled_by_a_stopped_loop_does_not_hold_the_next(echo: Echo) -> None:
    """A loop that stopped before its end-of-turn flush ran leaves the flag set; the
    channel's requests under the next loop still get written and signalled."""
    _, _, ch = echo

    async def main(tag: bytes) -> None:
        async with ch.enabled():
            assert await ch.request(tag, timeout=5) == pad8(tag)

    asyncio.run(main(b"first"))
    ch.flush_scheduled = True  # as a loop stopped between a request and its turn's end
    asyncio.run(main(b"second"))
