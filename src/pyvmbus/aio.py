"""The asyncio face of :class:`~pyvmbus.channel.Channel`, with no extra threads.

The event loop itself is the dispatcher: ``loop.add_reader`` on the uio fd runs one
non-blocking dispatch cycle whenever the kernel (or the mock kernel) reports an event,
and completions, packets and "room in the ring" reach coroutines through futures::

    async with channel.enabled():                 # enable(dispatch="asyncio") ... disable()
        reply = await channel.request(b"ping")    # send + await the completion
        async for packet in channel.packets():    # every packet on_packet would get
            ...

Pipelined requests cost little per request: the requests of a loop turn are queued and
written together at its end (one header check, one index update, one signal decision:
:meth:`Channel.begin_request` / :meth:`Channel.write_deferred`), in the order they were
made and before any other packet of the channel; their timeouts share one loop timer
(:class:`_Deadlines`); a completion settles its future through one bound method.

The same lifecycle callbacks run, on the loop's thread. A synchronous call that waits
(``send_request`` in on_post_started) still works: it drives the dispatch on the loop's
thread while it blocks. Use the channel from the loop's thread only.

Imports: errors, lifecycle, packet, and (for types) ring and dispatch; never
:mod:`pyvmbus.channel`, which imports this module for its async methods. What this module
needs of a channel is :class:`AsyncChannel`, names without a leading underscore that
:class:`pyvmbus.Channel` keeps for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ChannelClosed, Timeout, VmbusError
from .lifecycle import ChannelState
from .packet import Packet, PacketType

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .ring import RingBuffer

__all__ = ["AsyncChannel", "AsyncRequest", "disable", "enable", "packets", "request", "send"]


class AsyncRequest(Protocol):
    """An outstanding request as the channel keeps it (:class:`pyvmbus.channel.Request`)."""

    txid: int
    done: bool
    payload: bytes
    error: BaseException | None
    waiter: Any
    """The future its completion settles (this module's, set at registration)."""


class AsyncChannel(Protocol):
    """What the asyncio driver needs of a channel (:class:`pyvmbus.Channel` is one)."""

    name: str
    send_timeout: float
    request_timeout: float
    tx_ring: RingBuffer | None
    signal_due: bool
    """A deferred write owes the host a signal (sent by :meth:`flush_signal`)."""
    flush_scheduled: bool
    """An end-of-turn flush is already scheduled on the loop."""
    aio_state: Any
    """This module's :class:`_LoopState` for the channel (None until its first request)."""

    @property
    def state(self) -> ChannelState: ...
    @property
    def close_reason(self) -> str | None: ...
    @property
    def dispatcher(self) -> Dispatcher | None: ...
    @property
    def may_send(self) -> bool: ...
    @property
    def may_wait(self) -> bool: ...

    def enable(self, *, dispatch: str | None = None, timeout: float = 10.0) -> None: ...
    def disable(self, timeout: float = 10.0) -> None: ...
    def not_open(self, action: str) -> VmbusError: ...
    def new_txid(self) -> int: ...
    def write_packet(self, tx: RingBuffer, payload: Any, packet_type: int, flags: int, txid: int,
                     pending: int, defer: bool = False) -> int: ...
    def flush_signal(self) -> None: ...
    def write_deferred(self) -> None: ...
    def waiting_for_room(self, tx: RingBuffer) -> contextlib.AbstractContextManager[None]: ...
    def begin_request(self, payload: Any, callback: Callable[[Any], None],
                      waiter: Any) -> tuple[AsyncRequest, int]: ...
    def forget_request(self, req: Any) -> None: ...
    def count_request(self) -> None: ...
    def cancel_request(self, req: Any) -> bool: ...
    def add_sink(self, sink: Callable[[Packet | None], None]) -> None: ...
    def remove_sink(self, sink: Callable[[Packet | None], None]) -> None: ...


async def enable(channel: AsyncChannel, dispatch: str = "asyncio") -> None:
    """Enable ``channel`` with the running loop as its dispatcher (see :meth:`Channel.enable`)."""
    channel.enable(dispatch=dispatch)


async def disable(channel: AsyncChannel) -> None:
    """Disable ``channel`` (the teardown runs on the loop's thread, on_closed included)."""
    channel.disable()


def _resolver(loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[], None]], None]:
    """Run a future-completing callable on ``loop``: inline on its thread, else thread-safe."""
    loop_thread = threading.get_ident()

    def run(fn: Callable[[], None]) -> None:
        if threading.get_ident() == loop_thread:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    return run


def _schedule_signal(channel: AsyncChannel, loop: asyncio.AbstractEventLoop) -> None:
    """Signal once per loop turn, for every packet written in it.

    Without this, a host that drains as soon as it is signalled makes every send of a
    pipelined workload find the ring empty and signal (measured: one signal per request
    64 deep, ~5k requests/s; with it one signal per turn and ~10x the rate). Signalling
    the first write at once and deferring only the rest was measured too: the early
    wakeup lets the host preempt the turn and halves the rate. A lone request pays one
    pass of the loop's ready queue (a few us). Deferring is safe: the host reads
    everything published when it is signalled.
    """
    if channel.signal_due and not channel.flush_scheduled:
        channel.flush_scheduled = True
        loop.call_soon(_loop_state(channel, loop).end_of_turn)


def _settle(fut: asyncio.Future[Any], value: Any = None) -> None:
    if not fut.done():
        fut.set_result(value)


_Queue = collections.deque[tuple[float, "asyncio.Future[None]"]]


class _Deadlines:
    """The request timeouts of a channel's requests on one loop: one timer for all, not a
    ``call_later`` each.

    A timer per request (a TimerHandle, a heap push, a cancel and the heap's clean-up) was
    a quarter of a pipelined request's own CPU. Requests with the same timeout end in the
    order they started, so each timeout value keeps a FIFO of (deadline, future); a
    request's future is settled when its deadline passes, exactly as its own timer did,
    and the request then finds itself not done and times out. Futures already done are
    dropped from the front as new ones come, so the FIFOs hold about the requests in
    flight. One loop timer is armed at the earliest deadline still queued.

    Kept on the channel's per-loop state, not in a table keyed by loop: the futures
    queued here hold their loop, so a weak-keyed table would never let a loop go.
    """

    __slots__ = ("armed_at", "last", "monotonic", "queues")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queues: dict[float, _Queue] = {}
        self.last: tuple[float, _Queue | None] = (math.nan, None)
        """The queue of the last timeout added (most programs use one): no dict look-up."""
        self.armed_at = math.inf
        # The loop's clock: asyncio's own loops read time.monotonic() through a Python
        # method (loop.time); calling it directly is the same clock, one frame less.
        self.monotonic = type(loop).time is asyncio.BaseEventLoop.time

    def add(self, loop: asyncio.AbstractEventLoop, timeout: float, fut: asyncio.Future[None]) -> None:
        last_timeout, queue = self.last
        if timeout != last_timeout or queue is None:
            queue = self.queues.get(timeout)
            if queue is None:
                queue = self.queues[timeout] = collections.deque()
            self.last = (timeout, queue)
        while queue and queue[0][1].done():
            queue.popleft()
        deadline = (time.monotonic() if self.monotonic else loop.time()) + timeout
        queue.append((deadline, fut))
        if deadline < self.armed_at:
            self.armed_at = deadline
            loop.call_at(deadline, self.fire, loop, deadline)

    def fire(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if at != self.armed_at:
            return  # an earlier deadline re-armed the timer meanwhile: that one runs
        now = loop.time()
        nxt = math.inf
        for timeout, queue in list(self.queues.items()):
            while queue and (queue[0][0] <= now or queue[0][1].done()):
                _settle(queue.popleft()[1])
            if queue:
                nxt = min(nxt, queue[0][0])
            else:
                del self.queues[timeout]
                if self.last[1] is queue:
                    self.last = (math.nan, None)  # add() must not append to a dropped queue
        self.armed_at = nxt
        if nxt != math.inf:
            loop.call_at(nxt, self.fire, loop, nxt)


_get_ident = threading.get_ident

class _LoopState:
    """What a channel's requests need of the running loop, found once per loop, not per
    request: the loop, its thread, the deadlines, a future factory, the completion
    callback (one bound method: the request keeps its future in ``waiter``) and the
    end-of-turn signal flush (one bound method, no closure per turn)."""

    __slots__ = ("channel", "deadlines", "loop", "new_future", "thread")

    def __init__(self, channel: AsyncChannel, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.loop = loop
        self.thread = threading.get_ident()
        self.deadlines = _Deadlines(loop)
        # asyncio's loops make a future with Future(loop=loop), through a Python method.
        self.new_future: Callable[[], asyncio.Future[None]] = (
            functools.partial(asyncio.Future, loop=loop)
            if type(loop).create_future is asyncio.BaseEventLoop.create_future else loop.create_future)

    def complete(self, req: AsyncRequest) -> None:
        """A request is done (completed, or failed by a close): wake its awaiting task
        (None). Not done: its deferred packet was not written at the end of the turn
        (True: the task writes it itself, waiting for room)."""
        fut = req.waiter
        if _get_ident() == self.thread:
            if not fut.done():
                fut.set_result(None if req.done else True)
        else:
            self.loop.call_soon_threadsafe(_settle, fut, None if req.done else True)

    def end_of_turn(self) -> None:
        """The turn's requests go out together, then the one signal they owe."""
        channel = self.channel
        channel.flush_scheduled = False
        channel.write_deferred()
        channel.flush_signal()


def _loop_state(channel: AsyncChannel, loop: asyncio.AbstractEventLoop) -> _LoopState:
    st: _LoopState | None = channel.aio_state
    if st is None or st.loop is not loop:
        st = channel.aio_state = _LoopState(channel, loop)
        # An end-of-turn flush scheduled on another loop that stopped before running it
        # must not keep this loop's requests from scheduling their own.
        channel.flush_scheduled = False
    return st


async def send(channel: AsyncChannel, payload: Any, completion_requested: bool = False, *,
               packet_type: int = PacketType.DATA_INBAND, transaction_id: int | None = None,
               timeout: float | None = None) -> int:
    """``await`` form of :meth:`Channel.send`: a full ring is waited for without blocking the loop.

    Sets pending_send_size and awaits the dispatcher's next cycle (the host's interrupt
    when it has read enough) until the packet fits or ``timeout`` (default
    ``channel.send_timeout``): :class:`Timeout`. :class:`ChannelClosed` if it closes.
    """
    tx = channel.tx_ring
    if tx is None or not channel.may_send:
        raise channel.not_open("send")
    txid = channel.new_txid() if transaction_id is None else transaction_id
    flags = 1 if completion_requested else 0
    loop = asyncio.get_running_loop()
    needed = channel.write_packet(tx, payload, packet_type, flags, txid, 0, defer=True)
    if not needed:
        _schedule_signal(channel, loop)
        return txid
    disp = channel.dispatcher
    if disp is None:
        raise channel.not_open("send")
    channel.flush_signal()  # a full ring the host was never told about stays full
    t = channel.send_timeout if timeout is None else timeout
    deadline = time.monotonic() + t
    resolve = _resolver(loop)
    with channel.waiting_for_room(tx):
        while True:
            needed = channel.write_packet(tx, payload, packet_type, flags, txid, needed)
            if not needed:
                return txid
            if disp.stopping:
                raise channel.not_open("send")
            fut: asyncio.Future[None] = loop.create_future()

            def hook(fut: asyncio.Future[None] = fut) -> None:
                resolve(lambda: _settle(fut))

            disp.add_cycle_hook(hook)
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"room for {needed} bytes in the TX ring of {channel.name}", t)
                try:
                    await asyncio.wait_for(fut, remaining)
                except asyncio.TimeoutError:
                    raise Timeout(f"room for {needed} bytes in the TX ring of {channel.name} "
                                  "(the host is not reading it)", t) from None
            finally:
                disp.remove_cycle_hook(hook)


async def request(channel: AsyncChannel, payload: Any, timeout: float | None = None) -> bytes:
    """``await`` form of :meth:`Channel.send_request`: the completion's payload.

    On timeout (default ``channel.request_timeout``) the request is cancelled, a late
    completion is dropped and counted, and :class:`Timeout` is raised;
    :class:`ChannelClosed` if the channel closes first.
    """
    loop = asyncio.get_running_loop()
    st = channel.aio_state
    if st is None or st.loop is not loop:
        st = _loop_state(channel, loop)
    t = channel.request_timeout if timeout is None else timeout
    fut = st.new_future()
    # Register and queue the packet in one call: the packets of a loop turn are written
    # together at its end (Channel.write_deferred), then signalled once. A channel not
    # open for sending goes through send(), which raises as it always did.
    req, needed = channel.begin_request(payload, st.complete, fut)
    if needed:
        await _send_request(channel, req, payload, t)
    elif not channel.flush_scheduled:
        channel.flush_scheduled = True
        loop.call_soon(st.end_of_turn)
    if not req.done:
        # The loop's shared deadline timer instead of asyncio.wait_for (no extra task) or
        # a call_later each (see _Deadlines).
        st.deadlines.add(loop, t, fut)
        try:
            unsent = await fut
        except asyncio.CancelledError:
            channel.cancel_request(req)
            raise
        if unsent and not req.done:
            # The end of the turn found no room for it: wait for room as send() does,
            # then for the completion with a deadline of its own, as before the queue.
            fut = req.waiter = st.new_future()
            await _send_request(channel, req, payload, t)
            if not req.done:
                st.deadlines.add(loop, t, fut)
                try:
                    await fut
                except asyncio.CancelledError:
                    channel.cancel_request(req)
                    raise
    if not req.done and channel.cancel_request(req):
        raise Timeout(f"the completion of request {req.txid} on channel {channel.name}", t)
    if req.error is not None:
        raise req.error
    return req.payload


async def _send_request(channel: AsyncChannel, req: AsyncRequest, payload: Any, t: float) -> None:
    """Write a registered request's packet through send() (waiting for room); count it.
    A send that raised forgets the request."""
    try:
        await send(channel, payload, True, transaction_id=req.txid, timeout=t)
    except BaseException:
        channel.forget_request(req)
        raise
    channel.count_request()


async def packets(channel: AsyncChannel) -> AsyncIterator[Packet]:
    """Every packet on_packet would get, in order, until the channel closes.

    Ends when the channel is disabled; raises :class:`ChannelClosed` when it closes for
    another reason (a rescind, a dead host, a corrupt ring).
    """
    loop = asyncio.get_running_loop()
    loop_thread = _get_ident()
    queue: asyncio.Queue[Packet | None] = asyncio.Queue()
    put = queue.put_nowait

    def sink(pkt: Packet | None) -> None:
        # (_resolver's rule, inlined: no closure per packet)
        if _get_ident() == loop_thread:
            put(pkt)
        else:
            loop.call_soon_threadsafe(put, pkt)

    if channel.state in (ChannelState.DISABLED, ChannelState.CLOSING):
        return
    channel.add_sink(sink)
    try:
        while True:
            pkt = await queue.get()
            if pkt is None:
                reason = channel.close_reason or "closed"
                if reason != "disabled":
                    raise ChannelClosed(channel.name, reason)
                return
            yield pkt
    finally:
        channel.remove_sink(sink)
