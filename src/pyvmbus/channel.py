"""A VMBus channel in userspace: lifecycle, dispatch, sends, requests (issue 4).

:class:`Channel` gives a device bound to uio_hv_generic the lifecycle of Microsoft's
kernel-mode client library (the table is in :mod:`pyvmbus.lifecycle`); this module does
the I/O that table asks for.

Dispatch
    One :class:`Dispatcher` per open uio device: the kernel has one event counter for the
    primary channel and all its subchannels, so one wakeup means "scan every ring". A
    cycle is: wait on the fd -> drain every ring that has data and deliver -> unmask
    every owned ring found masked (store 0, then one write of 1 to the fd) -> full fence
    -> re-check every ring, and drain again if anything arrived (nobody would interrupt
    us for it) -> wait. The client owns every mask on every kernel generation (SPEC.md
    section 8): it stores mask=1 right after open and when a subchannel appears, unmasks
    when dispatch starts, and reads the mask word after each drain instead of assuming
    what the kernel did (5.15-6.17 mask on every interrupt, 6.18 / 6.6-lts / OpenHCL
    never do). It does not mask itself while draining: a read that finds the ring empty
    after the read-index store is the re-check the protocol needs, and on 6.18 this
    saves an fd write (and, for a non-monitored channel, a host wakeup) per interrupt.
    Nothing blocks until a cycle has completed that sequence (``_armed``).

Subchannels and the crash window
    Kernels with b15b7 ("Let userspace take care of interrupt mask") but without d062463
    ("Set event for all channels on the device"), e.g. Debian 6.12.57, oops on a
    subchannel interrupt (SPEC.md section 8). The channel tells them apart by behaviour,
    never by uname: (1) right after open, before storing its own mask, it reads the
    primary's RX mask: 1 means the kernel masks on open (before b15b7), where subchannel
    interrupts are safe. (2) Otherwise, when the first subchannel is mapped (its mask
    stored at 1 at once, and kept out of dispatch until the verdict), it does the normal
    unmask (store 0 on the primary + a write of 1) and reads the subchannel's mask again:
    only a kernel whose writes cover subchannels (d062463, the Dec 2025 LTS backport)
    clears it. Still 1 means the crash window (or OpenHCL, where writes touch no mask;
    polling there is merely cautious): every subchannel stays masked and is polled every
    ``poll_interval``, it never asks the host for a "room now" interrupt
    (pending_send_size), and a warning says why. ``poll_subchannels=True`` / ``False``
    force either mode.

Leader / follower
    Whoever holds the dispatch lead polls the fd and drains; every callback runs on that
    thread. A thread that waits for a completion (or for room in a full ring) takes the
    lead itself when nobody holds it, so its completion needs no hand-off between threads;
    otherwise it sleeps until the leader delivers it. With ``dispatch="thread"`` a
    background thread leads while no caller does (it polls the fd without the lead, and
    steps aside for ``LINGER`` after a caller -- never itself -- let go, so back-to-back
    requests keep leading themselves); with ``dispatch="caller"`` nothing runs unless a caller waits, calls
    :meth:`Channel.poll` / :meth:`Channel.run`, or :mod:`pyvmbus.aio` drives it
    (``dispatch="asyncio"``: ``loop.add_reader`` on the fd, no threads).
    A callback that waits (send_request in on_packet) runs a nested cycle on the same
    thread: completions reach their waiters, other packets are held and delivered in
    order when the callback returns.

Closing
    disable(), a rescind (EIO), a dead host, a corrupt ring or a raising on_packet all go
    through :meth:`Dispatcher.request_close`: every channel of the device moves to
    ``closing``, outstanding requests fail with :class:`ChannelClosed` at once, and the
    thread that holds (or next takes) the lead releases the device and then calls
    on_closed(channel, reason) for each subchannel and the primary.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from . import shm
from .errors import (
    ChannelClosed,
    DeviceRescinded,
    HostCrashed,
    InvalidState,
    RingCorrupt,
    RingFull,
    Timeout,
    VmbusError,
)
from .guid import Guid, parse_guid
from .lifecycle import ChannelState, Event, Lifecycle
from .packet import Packet, PacketType
from .ring import RingBuffer
from .signal import HostSignal
from .uio import PAGE_SIZE, UioDevice

if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncIterator

    import numpy as np
    import numpy.typing as npt

    from .sysfs import ChannelInfo

__all__ = [
    "DISPATCH_MODES",
    "Channel",
    "ChannelCounters",
    "ChannelState",
    "Dispatcher",
    "split_rings",
]

_log = logging.getLogger(__name__)

DISPATCH_MODES: Final = ("thread", "caller", "asyncio")
"""Who drives dispatch: a background thread (plus leading waiters), only callers, or asyncio."""
LINGER: Final = 0.005
"""After a caller lets go of the lead, the background thread waits this long before it
polls again, so a caller doing back-to-back requests keeps leading (no hand-offs)."""
READ_BATCH: Final = 64
"""Packets read per ring pass (one read-index store and one signal decision each)."""
CANCELLED_MEMORY: Final = 4096
"""Transaction ids of cancelled requests remembered, so their late completions are dropped."""
_TXID_MASK: Final = 0xFFFF_FFFF_FFFF_FFFF

Payload = Any
"""A bytes-like object, or a list/tuple of them (gathered into one packet)."""
StateCallback = Callable[["Channel"], object]
PacketCallback = Callable[["Channel", Packet], object]
CompleteCallback = Callable[["Channel", int], object]
ClosedCallback = Callable[["Channel", str], object]
SubchannelCallback = Callable[["Channel", "Channel"], object]
_F = TypeVar("_F", bound=Callable[..., object])


class ChannelCounters:
    """Per-channel counters; read them any time (``channel.counters``), never reset.

    ``signals`` and ``interrupts`` are kept by the signal mechanism and the dispatcher
    while the channel is open and folded in when it closes. ``interrupts`` counts the uio
    events the device's dispatcher consumed while this channel was open: the kernel has
    one event counter for the primary and its subchannels, so they see the same events.
    """

    __slots__ = ("_events_at_open", "_interrupts", "_owner", "_signals", "bytes_in", "bytes_out",
                 "cancelled", "drains", "late_completions", "packets_in", "packets_out", "requests",
                 "ring_full_waits", "unhandled")

    _NAMES = ("bytes_in", "bytes_out", "cancelled", "drains", "interrupts", "late_completions",
              "packets_in", "packets_out", "requests", "ring_full_waits", "signals", "unhandled")

    def __init__(self, owner: Channel | None = None) -> None:
        self._owner = owner
        self._signals = 0
        self._interrupts = 0
        self._events_at_open = 0
        self.packets_in = 0
        """Packets read from the RX ring (completions included)."""
        self.bytes_in = 0
        """Payload bytes of those packets."""
        self.packets_out = 0
        """Packets written to the TX ring."""
        self.bytes_out = 0
        """Payload bytes of those packets."""
        self.drains = 0
        """Ring passes that found data in this channel's RX ring."""
        self.ring_full_waits = 0
        """Sends that found the TX ring full and waited for the host (pending_send_size)."""
        self.requests = 0
        """send_request() / request() calls that reached the ring."""
        self.cancelled = 0
        """Requests that timed out (cancelled)."""
        self.late_completions = 0
        """Completions that arrived after their request was cancelled (dropped)."""
        self.unhandled = 0
        """Packets delivered while no on_packet handler or packets() reader was set."""

    @property
    def signals(self) -> int:
        """Signals sent to the host (after writes and after reads that freed awaited room)."""
        sig = self._owner._signal if self._owner is not None else None
        return self._signals + (sig.signals if sig is not None else 0)

    @property
    def interrupts(self) -> int:
        """uio events consumed while this channel was open (shared with its device's channels)."""
        disp = self._owner._disp if self._owner is not None else None
        live = disp.events - self._events_at_open if disp is not None and not disp.closed else 0
        return self._interrupts + live

    def _opened(self, disp: Dispatcher) -> None:
        self._events_at_open = disp.events

    def _fold(self) -> None:
        """The channel closes: keep what its signal object and dispatcher counted."""
        owner = self._owner
        if owner is None:
            return
        sig = owner._signal
        if sig is not None:
            self._signals += sig.signals
            sig.signals = 0
        disp = owner._disp
        if disp is not None:
            self._interrupts += disp.events - self._events_at_open
            self._events_at_open = disp.events

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self._NAMES}


class _Request:
    """One outstanding send_request: filled in by the dispatcher, or failed on close."""

    __slots__ = ("callback", "done", "error", "payload", "txid")

    def __init__(self, txid: int, callback: Callable[[_Request], None] | None = None) -> None:
        self.txid = txid
        self.done = False
        self.payload = b""
        self.error: BaseException | None = None
        self.callback = callback

    def is_done(self) -> bool:
        return self.done


class _DeviceGuard:
    """Serialises the fd writes of threads that do not hold the lead with the device's close.

    A sender signals the host with a write of 1 to the uio fd from any thread, while the
    teardown (on another thread) closes that fd: unguarded, the write could land on
    whatever the fd number was reused for, or fail with a raw EBADF. Under this lock a
    write either runs before the close or finds the device closed (:class:`ChannelClosed`).
    The dispatcher's own irqcontrol writes need no guard: the teardown holds the lead.
    """

    __slots__ = ("dev", "lock")

    def __init__(self, dev: UioDevice) -> None:
        self.dev = dev
        self.lock = threading.Lock()

    def write_one(self) -> None:
        with self.lock:
            dev = self.dev
            if dev.closed:
                raise ChannelClosed(dev.device, "closed while signalling the host")
            dev.irqcontrol(True)

    def close(self) -> None:
        with self.lock:
            self.dev.close()


def split_rings(buf: npt.NDArray[np.uint8], what: str, page_size: int = PAGE_SIZE
                ) -> tuple[RingBuffer, RingBuffer]:
    """(TX, RX) rings of a TX+RX ring pair: TX first, each half the buffer, header = page.

    The size comes from the map (never hard-coded: it differs per class and kernel, PEERS
    top-10 #4). The indices the kernel and host set up are checked here once, so a bad
    map fails the enable rather than the first read.
    """
    size = len(buf)
    half = size // 2
    if size % 2 or half % page_size or half <= page_size:
        raise RingCorrupt(f"{what} size", size, f"not two rings of a {page_size}-byte header page "
                          "plus a data area each")
    tx = RingBuffer(buf[:half], header_size=page_size)
    rx = RingBuffer(buf[half:], header_size=page_size)
    tx.available_to_write()  # RingCorrupt on indices outside the data area
    rx.available_to_read()
    return tx, rx


def _nbytes(payload: Payload) -> int:
    cls = payload.__class__
    if cls is bytes or cls is bytearray:
        return len(payload)
    if isinstance(payload, (list, tuple)):
        return sum(memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


class Dispatcher:
    """Waits on one uio device's fd and drains the rings of all its channels.

    Built by :meth:`Channel.enable`; one per enable. See the module docstring for the
    cycle and the leader/follower rules. ``events`` counts uio events consumed,
    ``event_count`` is the kernel's cumulative count from the last one.
    """

    def __init__(self, dev: UioDevice, name: str, mode: str, poll_interval: float,
                 guard: _DeviceGuard | None = None) -> None:
        self.dev = dev
        self.guard = guard if guard is not None else _DeviceGuard(dev)
        self.name = name
        self.mode = mode
        self.poll_interval = poll_interval
        self.channels: tuple[Channel, ...] = ()
        self.events = 0
        self.event_count = 0
        self.cycles = 0
        self.delivered = 0
        """Packets handed to on_packet / packets() readers."""
        self.stopping = False
        self.closed = False
        self.reason = ""
        self.polled = False
        """True when some channel is kept masked and polled (the subchannel crash window)."""
        self.masked_on_open: bool | None = None
        """The primary's RX mask read right after open, before the client stored its own:
        True means the kernel masks on open (before b15b7; subchannel interrupts are safe)."""
        self.subchannel_irqs_safe: bool | None = None
        """Verdict on subchannel interrupts (None until a subchannel was probed)."""
        self.subchannel_reason = ""
        """Why subchannels are polled or interrupt-driven (describe(), info())."""
        self._lead = threading.Lock()
        self._leader = 0
        self._cond = threading.Condition(threading.Lock())
        self._followers = 0
        self._depth = 0
        self._rescan = False
        self._armed = False
        """The last drain ended with unmask -> fence -> re-check: blocking is safe."""
        self._last_release = 0.0
        self._close_lock = threading.Lock()
        self._uio_fd = dev.fileno()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._uio_fd, select.POLLIN)
        self._poller.register(self._wake_fd, select.POLLIN)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._cycle_hooks: list[Callable[[], None]] = []
        self._before_unmask: Callable[[], None] | None = None
        """Test hook: runs after the drain, before the unmask step (no-lost-wakeup tests)."""

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Unmask every channel (store 0 + write 1), then start the mode's driver and rescan."""
        for ch in self.channels:
            rx = ch._rx
            if rx is not None and not ch._polled:
                rx.interrupt_mask = 0
        self.dev.irqcontrol(True)
        shm.fence()
        if self.mode == "thread":
            self._thread = threading.Thread(target=self._thread_main, name=f"vmbus-dispatch-{self.name}",
                                            daemon=True)
            self._thread.start()
        elif self.mode == "asyncio":
            import asyncio

            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._loop.add_reader(self._uio_fd, self._on_readable)
            if self.polled:
                self._aio_poll_tick()
        self.kick()

    def add(self, ch: Channel) -> None:
        """Dispatch ``ch`` too (a subchannel that appeared); unmasked unless it is polled."""
        self.channels = (*self.channels, ch)
        if ch._polled:
            if not self.polled and self._loop is not None:
                self._loop.call_soon_threadsafe(self._aio_poll_tick)
            self.polled = True
        elif ch._rx is not None:
            ch._rx.interrupt_mask = 0  # unmask: store 0 and write 1, as for the primary
            self.guard.write_one()  # not the leader: a teardown may be closing the fd
            shm.fence()
        self.kick()

    def subchannel_interrupts_safe(self, primary: Channel, sub: Channel) -> bool:
        """Whether this kernel survives a subchannel interrupt; probed once, on ``sub``.

        ``sub`` is mapped with its RX mask stored at 1 and is not dispatched yet, so
        nothing unmasks it behind this probe. See the module docstring for the rule.
        """
        if self.subchannel_irqs_safe is not None:
            return self.subchannel_irqs_safe
        if self.masked_on_open:
            safe = True
            why = ("the kernel masked the primary on open (before b15b7): subchannel interrupts "
                   "are safe")
        else:
            prx, srx = primary._rx, sub._rx
            if prx is None or srx is None:
                raise ChannelClosed(self.name, self.reason or "closed while opening a subchannel")
            # The channel's normal unmask: store 0 on the primary, then a 4-byte write of 1
            # (synchronous: the kernel's irqcontrol has run when it returns).
            prx.interrupt_mask = 0
            self.guard.write_one()
            shm.fence()
            safe = srx.interrupt_mask == 0
            if safe:
                why = ("a write of 1 cleared the subchannel's mask (d062463, or the Dec 2025 LTS "
                       "backport): subchannel interrupts are safe")
            else:
                why = ("kernel looks like b15b7 without d062463 (e.g. Debian 6.12.57): subchannel "
                       "interrupts would crash it; polling subchannels every "
                       f"{self.poll_interval * 1000:g} ms")
        self.subchannel_irqs_safe = safe
        self.subchannel_reason = why
        return safe

    # -- leadership --------------------------------------------------------------------------

    def _try_lead(self) -> bool:
        if self._lead.acquire(False):
            self._leader = threading.get_ident()
            return True
        return False

    def _unlead(self) -> None:
        while True:
            closed_now = False
            if self.stopping and not self.closed:
                try:
                    self._teardown()
                finally:
                    closed_now = True
            self._leader = 0
            if threading.current_thread() is not self._thread:
                # Only a caller's release makes the background thread step aside for
                # LINGER (so back-to-back requests keep leading themselves). Its own
                # release must not: it would sleep LINGER after every cycle it ran, and an
                # answer to a packet sent from on_packet would wait for it (measured: 5.3
                # ms vs 0.27 ms per exchange on a monitored echo; docs/performance.md).
                self._last_release = time.monotonic()
            self._lead.release()
            if self._followers:
                with self._cond:
                    self._cond.notify_all()
            if closed_now:
                self._report_closed()
                return
            # A close requested after the check above by a thread that could not lead
            # then (a sender whose signal found the device gone) is ours to finish.
            if not self.stopping or self.closed or not self._try_lead():
                return

    @property
    def leading(self) -> bool:
        """True when the calling thread holds the lead (it is inside a dispatch callback)."""
        return self._leader == threading.get_ident()

    def _notify(self) -> None:
        if self._followers:
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Until ``done()`` (True), the deadline or a close (False); lead when nobody does."""
        me = threading.get_ident()
        while not done():
            if self.stopping:
                return done()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._leader == me:
                self._cycle(remaining)  # nested: a callback on the dispatching thread waits
            elif self._try_lead():
                try:
                    self._cycle(remaining)
                finally:
                    self._unlead()
            else:
                with self._cond:
                    self._followers += 1
                    try:
                        if not done() and not self.stopping and self._lead.locked():
                            self._cond.wait(remaining)
                    finally:
                        self._followers -= 1
        return True

    def next_cycle(self) -> Callable[[], bool]:
        """A predicate for :meth:`wait_for`: True once a cycle ended after now (or closing)."""
        seen = self.cycles

        def done() -> bool:
            return self.cycles != seen or self.stopping

        return done

    def run_once(self, timeout: float | None) -> int:
        """One cycle on this thread if it can lead (else wait up to ``timeout`` for the leader)."""
        if self.stopping:
            self.finish_close(0.0)
            return 0
        if self._leader == threading.get_ident():
            return self._cycle(timeout)
        if self._try_lead():
            try:
                return self._cycle(timeout)
            finally:
                self._unlead()
        self.wait_for(self.next_cycle(), None if timeout is None else time.monotonic() + timeout)
        return 0

    def kick(self) -> None:
        """Look at every ring now: held packets became deliverable, or a channel was added."""
        if self.stopping:
            return
        self._rescan = True
        me = threading.get_ident()
        if self._leader == me:
            return  # the running cycle re-checks before it blocks
        if self._loop is not None and me != self._loop_thread:
            self._loop.call_soon_threadsafe(self.kick)  # asyncio: callbacks on the loop only
            return
        if self._try_lead():
            try:
                self._cycle(0)
            finally:
                self._unlead()
        else:
            self._wake()

    def _wake(self) -> None:
        """Interrupt a blocked leader's poll (close, kick). Never after the fd is closed:
        its number may belong to someone else by then."""
        with self._close_lock:
            if not self.closed:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake_fd, 1)

    # -- the cycle ---------------------------------------------------------------------------

    def _cycle(self, timeout: float | None, ready: bool = False) -> int:
        """Holding the lead: wait (<= ``timeout``) for an event, then drain every ring.

        ``ready``: the caller knows the fd is readable (asyncio), so no poll is needed.
        Returns the packets delivered to on_packet.
        """
        if self.stopping:
            return 0
        event = False
        try:
            if ready:
                event = self._consume_event()
            elif self._armed and not self._rescan and self._data_waiting():
                # The packet we would wait for is already there (a host that answered
                # before we got here): drain without the poll + read. The event stays
                # pending and is consumed by the next cycle that does poll (harmless: a
                # cycle that finds nothing); a ring the kernel masked meanwhile has that
                # event pending too, so nothing can be missed.
                pass
            else:
                if self._rescan or not self._armed:
                    # Block only after a complete drain -> unmask -> fence -> re-check. A
                    # nested cycle (a callback that waits) starts in the middle of one, so
                    # this cycle only polls and then finishes that sequence.
                    timeout = 0.0
                elif self.polled:
                    timeout = self.poll_interval if timeout is None else min(timeout, self.poll_interval)
                ms = -1 if timeout is None else (0 if timeout <= 0 else math.ceil(timeout * 1000))
                for fd, _ in self._poller.poll(ms):
                    if fd == self._uio_fd:
                        event = self._consume_event() or event
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake_fd)
            self._rescan = False
            if self.stopping:
                return 0
            delivered = self._drain_all(event)
        except HostCrashed as exc:
            self.request_close(f"host crashed: {exc.detail}" if exc.detail else "host crashed")
            return 0
        except DeviceRescinded:
            self.request_close("rescinded")
            return 0
        self.cycles += 1
        for hook in self._cycle_hooks:
            hook()
        if self._followers:
            with self._cond:
                self._cond.notify_all()
        return delivered

    def _data_waiting(self) -> bool:
        for ch in self.channels:
            rx = ch._rx
            if rx is not None and rx.available_to_read():
                return True
        return False

    def _consume_event(self) -> bool:
        count = self.dev.read_event()
        if count is None:
            return False
        self.events += 1
        self.event_count = count
        return True

    def _drain_all(self, event: bool) -> int:
        """Drain every ring; unmask what is masked (store 0 + write 1); fence; re-check.

        The client does not mask while it drains: a read that finds the ring empty after
        our read-index store is itself the re-check the protocol needs, and an unmasked
        host interrupts for what comes later. What is masked at the end of a drain (the
        kernel masks on each interrupt up to ~6.17; we mask at open) is unmasked here,
        with the fd write SPEC.md section 8 asks for, then fenced and re-checked. The mask
        word is read, never assumed, on every generation. Returns packets delivered.
        """
        start = self.delivered
        self._armed = False
        while True:
            busy = False
            for ch in self.channels:
                rx = ch._rx
                if rx is None:
                    continue
                if ch._drain(rx):
                    busy = True
                    if self.stopping:
                        return self.delivered - start
                elif ch._inbox and not self._depth and ch._lc.policy.packets:
                    ch._deliver()
            hook = self._before_unmask
            if hook is not None:
                hook()
            masked = False
            for ch in self.channels:
                rx = ch._rx
                if rx is not None and not ch._polled and rx.interrupt_mask:
                    rx.interrupt_mask = 0
                    masked = True
            if masked:
                # Also write 1: on <= 6.9 that is how the kernel unmasks the primary, on
                # 6.10+ how a non-monitored channel's host is told (SPEC.md section 8).
                self.dev.irqcontrol(True)
                if self.polled:  # 6.15+ writes cover subchannels: keep polled ones masked
                    for ch in self.channels:
                        if ch._polled and ch._rx is not None:
                            ch._rx.interrupt_mask = 1
            elif not busy:
                self._armed = True
                return self.delivered - start  # nothing read, nothing masked: armed and empty
            # Full fence between the mask stores (and our read-index stores) and the
            # re-check's load of the write index: the host stores its write index, then
            # loads our mask and read index, so one of us sees the other's store. Without
            # it a packet written just before we unmasked would wait for an interrupt
            # that never comes (a lost wakeup).
            shm.fence()
            again = False
            for ch in self.channels:
                rx = ch._rx
                if rx is not None and rx.available_to_read():
                    again = True
                    break
            if not again:
                self._armed = True
                return self.delivered - start

    # -- the drivers -------------------------------------------------------------------------

    def _thread_main(self) -> None:
        """Background driver: poll without the lead; lead only when no caller does."""
        poller = select.poll()
        poller.register(self._uio_fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        idle_ms = 1000
        try:
            while not self.stopping:
                with self._cond:
                    while not self.stopping and (
                            self._lead.locked() or time.monotonic() - self._last_release < LINGER):
                        self._cond.wait(LINGER)
                if self.stopping:
                    break
                ms = math.ceil(self.poll_interval * 1000) if self.polled else idle_ms
                ready = poller.poll(ms)
                if self.stopping:
                    break
                if (ready or self.polled) and self._try_lead():
                    try:
                        self._cycle(0)
                    finally:
                        self._unlead()
        except Exception:  # pragma: no cover - a bug; do not die silently
            _log.exception("dispatcher thread of %s failed", self.name)
            self.request_close("error: dispatcher thread failed")
            if self._try_lead():
                self._unlead()

    def _aio_poll_tick(self) -> None:
        """asyncio: look at the polled (masked) channels every ``poll_interval``."""
        if self.stopping or self._loop is None:
            return
        if self._try_lead():
            try:
                self._cycle(0)
            finally:
                self._unlead()
        self._loop.call_later(self.poll_interval, self._aio_poll_tick)

    def _on_readable(self) -> None:
        """asyncio reader callback: one non-blocking cycle when the fd is readable."""
        if self._try_lead():
            try:
                self._cycle(0, ready=True)
            finally:
                self._unlead()

    # -- closing -----------------------------------------------------------------------------

    def request_close(self, reason: str) -> bool:
        """Start closing every channel of the device; False if it was already closing.

        Outstanding requests fail at once; the teardown runs when the lead is free (see
        :meth:`finish_close`).
        """
        with self._close_lock:
            if self.stopping:
                return False
            self.stopping = True
            self.reason = reason
        for ch in self.channels:
            ch._begin_close(reason)
        if reason != "disabled":
            _log.info("channel %s closing: %s", self.name, reason)
        for hook in list(self._cycle_hooks):  # asyncio senders waiting for room: look again
            hook()
        self._wake()
        with self._cond:
            self._cond.notify_all()
        return True

    def finish_close(self, timeout: float) -> bool:
        """Run (or wait for) the teardown; False if it cannot finish now.

        From inside a dispatch callback it cannot: the teardown then runs when the
        callback returns (the lead is let go).
        """
        if self.closed:
            return True
        if self._leader == threading.get_ident():
            return False
        deadline = time.monotonic() + timeout
        while not self.closed:
            if self._try_lead():
                self._unlead()  # runs the teardown
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wake()
            with self._cond:
                self._followers += 1
                try:
                    if not self.closed and self._lead.locked():
                        self._cond.wait(min(remaining, 0.05))
                finally:
                    self._followers -= 1
        return True

    def _teardown(self) -> None:
        """Holding the lead: stop the drivers, release every channel and the device."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            self._wake()
            with self._cond:
                self._cond.notify_all()
            thread.join(5.0)
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._uio_fd)
        for ch in self.channels:
            ch._release()
        self.guard.close()  # waits for a sender's fd write in progress
        with self._close_lock:
            self.closed = True
            with contextlib.suppress(OSError):
                os.close(self._wake_fd)
        with self._cond:
            self._cond.notify_all()

    def _report_closed(self) -> None:
        chans = self.channels
        for ch in (*chans[1:], *chans[:1]):  # subchannels first, then the primary
            cb = ch._cb_closed
            if cb is None:
                continue
            try:
                cb(ch, self.reason)
            except Exception:
                _log.exception("on_closed of %s raised", ch.name)


class Channel:
    """A VMBus channel of a device bound to uio_hv_generic (KMCL-style lifecycle).

    Get one from :meth:`pyvmbus.Vmbus.channel`, or ``Channel(root, guid)``. Register
    callbacks (each registration method returns its argument, so they work as
    decorators), then :meth:`enable`. ``state`` is a :class:`ChannelState`.

    Callbacks and the thread they run on:

    - ``on_opened(ch)``, ``on_started(ch)``, ``on_post_started(ch)``: on the thread that
      calls enable(). on_opened may raise (enable fails, nothing stays open);
      on_started may send but not wait; on_post_started may wait (send_request) and runs
      before any incoming packet reaches on_packet.
    - ``on_packet(ch, packet)``, ``on_processing_complete(ch, count)``: on the thread
      that holds the dispatch lead (the background thread, or a caller waiting for a
      completion, or the one in poll()/run(), or the asyncio loop).
    - ``on_closed(ch, reason)``: on the thread that tore the channel down. reason is
      "disabled", "rescinded", "host crashed...", "corrupt: ..." or "error: ...".

    Subchannels (:meth:`open_subchannels`) share the primary's dispatcher. By default
    (``poll_subchannels=None``) the channel works out whether the kernel survives a
    subchannel interrupt: it reads the primary's mask right after open (1: the kernel
    masks on open, before b15b7, safe), else it checks whether its unmask write clears
    the first subchannel's mask (cleared: d062463 or later, safe; still 1: b15b7 without
    d062463, e.g. Debian 6.12.57, where the interrupt oopses the kernel -- or OpenHCL).
    Unsafe: every subchannel stays masked and is polled every ``poll_interval``, a
    warning is logged once, and :meth:`describe` / :meth:`info` say so and why.
    ``poll_subchannels=True`` always polls; ``False`` always takes interrupts, which
    panics a guest in that window.
    """

    def __init__(self, root: str | os.PathLike[str], guid: str, *, dispatch: str = "thread",
                 poll_subchannels: bool | None = None, poll_interval: float = 0.001,
                 request_timeout: float = 30.0, send_timeout: float = 30.0,
                 _parent: Channel | None = None) -> None:
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}, not {dispatch!r}")
        self.root = Path(root)
        self.guid: Guid = parse_guid(guid)
        self.dispatch = dispatch
        self.poll_subchannels = poll_subchannels
        """How subchannels are dispatched. None (default): detect the kernel from its
        behaviour and keep subchannels masked and polled every ``poll_interval`` only on
        kernels with b15b7 but without d062463 (e.g. Debian 6.12.57), where a subchannel
        interrupt oopses the kernel (SPEC.md section 8), or where it cannot tell (OpenHCL).
        True: always poll. False: always take their interrupts -- dangerous: on a kernel
        in that window the first subchannel interrupt crashes the guest."""
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.parent = _parent
        self.subchannel_index = 0
        self.relid: int | None = None
        self.monitor_id: int | None = None
        self.name = str(self.guid)
        self.counters = ChannelCounters(self)
        self.last_error: BaseException | None = None
        """The exception that closed the channel (a raising callback, a corrupt ring)."""
        self._lc = Lifecycle(self.name)
        self._state_lock = threading.RLock()
        self._tx: RingBuffer | None = None
        self._rx: RingBuffer | None = None
        self._signal: HostSignal | None = None
        self._dev: UioDevice | None = None
        self._guard: _DeviceGuard | None = None
        self._disp: Dispatcher | None = None
        self._polled = False
        self._polled_reason = ""
        self._masked_on_open: bool | None = None
        self._tx_lock = threading.Lock()
        self._req_lock = threading.Lock()
        self._blocked_senders = 0
        self._signal_due = False
        self._flush_scheduled = False
        self._pending: dict[int, _Request] = {}
        self._cancelled: dict[int, None] = {}
        self._txids = itertools.count(1)
        self._inbox: collections.deque[Packet] = collections.deque()
        self._sinks: list[Callable[[Packet | None], None]] = []
        self._subs: list[Channel] = []
        self._cb_opened: StateCallback | None = None
        self._cb_started: StateCallback | None = None
        self._cb_post_started: StateCallback | None = None
        self._cb_packet: PacketCallback | None = None
        self._cb_complete: CompleteCallback | None = None
        self._cb_closed: ClosedCallback | None = None
        self._cb_subchannel: SubchannelCallback | None = None

    # -- callbacks ---------------------------------------------------------------------------

    def on_opened(self, callback: _F) -> _F:
        """Run after the rings are mapped; raising fails the enable (KMCL EvtVmbChannelOpened)."""
        self._cb_opened = callback
        return callback

    def on_started(self, callback: _F) -> _F:
        """Run before dispatch starts: may send, must not wait (EvtVmbChannelStarted)."""
        self._cb_started = callback
        return callback

    def on_post_started(self, callback: _F) -> _F:
        """Run once packets flow, before any reaches on_packet: may wait (EvtVmbChannelPostStarted)."""
        self._cb_post_started = callback
        return callback

    def on_packet(self, callback: _F) -> _F:
        """on_packet(channel, packet) for every packet that is not one of our completions."""
        self._cb_packet = callback
        return callback

    def on_processing_complete(self, callback: _F) -> _F:
        """on_processing_complete(channel, count) when a drain emptied the ring."""
        self._cb_complete = callback
        return callback

    def on_closed(self, callback: _F) -> _F:
        """on_closed(channel, reason) once the channel is closed and its resources released."""
        self._cb_closed = callback
        return callback

    def on_subchannel(self, callback: _F) -> _F:
        """on_subchannel(primary, sub) before a new subchannel starts: set its callbacks here."""
        self._cb_subchannel = callback
        return callback

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> ChannelState:
        """Where the channel is in its lifecycle."""
        return self._lc.state

    @property
    def close_reason(self) -> str | None:
        """Why the channel last closed; None before the first close and while open."""
        return self._lc.reason

    @property
    def subchannels(self) -> tuple[Channel, ...]:
        """The open subchannels of this (primary) channel."""
        return tuple(self._subs)

    @property
    def is_subchannel(self) -> bool:
        return self.parent is not None

    def fileno(self) -> int:
        """The uio fd (readable when an event is pending), for a caller's own select loop."""
        dev = self._dev
        if dev is None or dev.closed:
            raise self._not_open("get the fd of")
        return dev.fileno()

    def _not_open(self, action: str) -> VmbusError:
        st = self._lc.state
        if st in (ChannelState.DISABLED, ChannelState.CLOSING):
            return ChannelClosed(self.name, self._lc.reason or "not enabled")
        return InvalidState(self.name, st.value, action, "wait until the channel is started")

    # -- enable / disable --------------------------------------------------------------------

    def enable(self, *, dispatch: str | None = None, timeout: float = 10.0) -> None:
        """Open the device node, map the rings and start the channel (see the class docstring).

        Raises what on_opened / on_started / on_post_started raised (the channel is then
        closed again), :class:`InvalidState` if the channel is not disabled or the device
        is not bound to uio_hv_generic, :class:`DeviceRescinded`, :class:`RingCorrupt`
        for a ring map that is not a ring pair, or :class:`ChannelClosed` if the channel
        closed (a rescind) before the enable finished.
        """
        if self.parent is not None:
            raise InvalidState(self.name, self.state.value, "enable",
                               "subchannels start with their primary: use open_subchannels()")
        mode = self.dispatch if dispatch is None else dispatch
        if mode not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}, not {mode!r}")
        if mode == "asyncio":
            import asyncio

            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise InvalidState(self.name, self.state.value, "enable with dispatch='asyncio'",
                                   "no running event loop: use `async with channel.enabled()`") from None
        with self._state_lock:
            self._lc.enable()
        self.last_error = None
        try:
            dev = self._open_device(timeout)
        except BaseException:
            with self._state_lock:
                self._lc.fire(Event.OPEN_FAILED)
            raise
        try:
            if self._cb_opened is not None:
                self._cb_opened(self)
        except BaseException:
            self._tx = self._rx = None
            self._signal = None
            self._dev = None
            guard, self._guard = self._guard, None
            (guard.close if guard is not None else dev.close)()
            with self._state_lock:
                self._lc.fire(Event.OPEN_FAILED)
            raise
        disp = Dispatcher(dev, self.name, mode, self.poll_interval, self._guard)
        disp.masked_on_open = self._masked_on_open
        disp.channels = (self,)
        self._disp = disp
        self.counters._opened(disp)
        with self._state_lock:
            self._lc.fire(Event.OPENED)
        self._run_start_callback(self._cb_started, "on_started")
        with self._state_lock:
            self._lc.fire(Event.STARTED)
        try:
            disp.start()  # own the mask: unmask (store 0 + write 1), dispatch, re-check
        except BaseException as exc:
            if isinstance(exc, HostCrashed):
                reason = "host crashed"
            elif isinstance(exc, DeviceRescinded):
                reason = "rescinded"
            else:
                reason = f"error: dispatch did not start: {exc!r}"
            disp.request_close(reason)
            disp.finish_close(timeout)
            raise
        self._run_start_callback(self._cb_post_started, "on_post_started")
        with self._state_lock:
            if self._lc.state is not ChannelState.STARTED:
                raise ChannelClosed(self.name, self._lc.reason or "closed during enable")
            self._lc.fire(Event.POST_STARTED)
        disp.kick()  # deliver what was held during post-started, in order

    def _run_start_callback(self, cb: StateCallback | None, what: str) -> None:
        if cb is None:
            return
        try:
            cb(self)
        except BaseException as exc:
            disp = self._disp
            assert disp is not None
            self.last_error = exc
            disp.request_close(f"error: {what} raised {exc!r}")
            disp.finish_close(10.0)
            raise

    def _open_device(self, timeout: float) -> UioDevice:
        from .sysfs import Sysfs

        info = Sysfs(self.root).device(self.guid)
        uio_name = info.uio_name
        if uio_name is None:
            raise InvalidState(self.name, "not bound to uio_hv_generic", "enable",
                               f"bind it first (Vmbus.bind / vmbus bind {self.guid})")
        relid = info.relid
        monitor_id = info.monitor_id
        dev = UioDevice.open(self.root, uio_name, device=self.guid, timeout=timeout)
        try:
            tx, rx = split_rings(dev.map("txrx_rings").array, f"{uio_name} txrx_rings")
            # What open() left there tells the kernel apart: 1 = it masks on open (before
            # b15b7; subchannel interrupts are safe), 0 = b15b7 or later, or OpenHCL.
            masked_on_open = rx.interrupt_mask == 1
            # Own the mask from the first moment (never assume what open() left there):
            # masked until dispatch runs, so nobody interrupts before we listen.
            rx.interrupt_mask = 1
            guard = _DeviceGuard(dev)
            self._signal = HostSignal.for_channel(
                relid, monitor_id, int_page=_opt_map(dev, "int_page"),
                monitor_page=_opt_map(dev, "monitor_page"), write_one=guard.write_one)
        except BaseException:
            dev.close()
            raise
        self.relid = relid
        self.monitor_id = monitor_id
        self._tx, self._rx, self._dev = tx, rx, dev
        self._guard = guard
        self._polled = False
        self._polled_reason = ""
        self._masked_on_open = masked_on_open
        self._inbox.clear()
        self._subs = []
        return dev

    def disable(self, timeout: float = 10.0) -> None:
        """Close the channel (and its subchannels) and release the device; idempotent.

        Waits for the teardown, so no callback runs after it returns, except when called
        from a dispatch callback: then the teardown runs as that callback returns.
        on_closed(channel, "disabled") runs either way. Raises :class:`Timeout` if a
        callback on another thread keeps the dispatcher busy longer than ``timeout``.
        """
        if self.parent is not None:
            raise InvalidState(self.name, self.state.value, "disable",
                               "subchannels close with their primary: disable the primary")
        disp = self._disp
        if self._lc.state is ChannelState.DISABLED or disp is None:
            if self._lc.state is not ChannelState.DISABLED:
                raise InvalidState(self.name, self.state.value, "disable", "enable() is still opening it")
            return
        disp.request_close("disabled")
        if not disp.finish_close(timeout) and not disp.leading:
            raise Timeout(f"the dispatcher of {self.name} to let go (a callback is still running)", timeout)

    def enabled(self, dispatch: str | None = None) -> _Enabled:
        """``with channel.enabled():`` / ``async with channel.enabled():`` enable, then disable.

        The async form dispatches on the running loop (``dispatch="asyncio"``).
        """
        return _Enabled(self, dispatch)

    # -- closing internals -------------------------------------------------------------------

    def _begin_close(self, reason: str) -> None:
        with self._state_lock:
            self._lc.close(reason)
        self._fail_pending(ChannelClosed(self.name, reason))
        for sink in list(self._sinks):
            sink(None)

    def _fail_pending(self, error: ChannelClosed) -> None:
        with self._req_lock:
            reqs = list(self._pending.values())
            self._pending.clear()
            for req in reqs:
                req.error = error
                req.done = True
        for req in reqs:
            if req.callback is not None:
                req.callback(req)

    def _release(self) -> None:
        self.counters._fold()
        with self._state_lock:
            if self._lc.state is ChannelState.CLOSING:
                self._lc.fire(Event.CLOSED)
        rx = self._rx
        if rx is not None and self.parent is None:
            # Leave the primary's mask as a b15b7 kernel would (0): kernels that do not
            # zero the ring header on the next open must not show our 1 to the next
            # enable as "the kernel masks on open" (the crash-window detection).
            with contextlib.suppress(ValueError, VmbusError):
                rx.interrupt_mask = 0
        self._tx = self._rx = None
        self._dev = None
        self._guard = None
        self._inbox.clear()
        self._cancelled.clear()
        if self.parent is None:
            self._subs = []

    # -- receiving (runs on the thread holding the lead) -------------------------------------

    def _drain(self, rx: RingBuffer) -> int:
        """Read every packet of the RX ring, route completions, deliver the rest (when the
        state allows and no callback of this thread is running). Returns packets read."""
        inbox = self._inbox
        pending = self._pending
        counters = self.counters
        got = 0
        nbytes = 0
        comp = PacketType.COMP
        while True:
            try:
                pkts, signal = rx.read_batch(READ_BATCH)
            except RingCorrupt as exc:
                self._fatal(exc, f"corrupt: {exc}")
                return 0
            if signal and self._signal is not None:
                self._signal.signal()  # the host waits for room in our RX ring
            got += len(pkts)
            for pkt in pkts:
                nbytes += len(pkt.payload)
                if pkt.type == comp and pending and self._complete_request(pkt):
                    continue
                if pkt.type == comp and self._cancelled and self._drop_late(pkt.transaction_id):
                    continue
                inbox.append(pkt)
            if len(pkts) < READ_BATCH:
                # Everything published at the batch's load of the write index is read;
                # what came since is found by the dispatcher's fence + re-check.
                break
        if not got:
            return 0
        counters.drains += 1
        counters.packets_in += got
        counters.bytes_in += nbytes
        if inbox and self._lc.policy.packets:
            disp = self._disp
            if disp is not None and not disp._depth:
                self._deliver()
        return got

    def _complete_request(self, pkt: Packet) -> bool:
        with self._req_lock:
            req = self._pending.pop(pkt.transaction_id, None)
            if req is None:
                return False
            req.payload = pkt.payload
            req.done = True
        if req.callback is not None:
            req.callback(req)
        disp = self._disp
        if disp is not None and disp._followers:
            disp._notify()
        return True

    def _drop_late(self, txid: int) -> bool:
        with self._req_lock:
            if txid not in self._cancelled:
                return False
            del self._cancelled[txid]
            self.counters.late_completions += 1
        return True

    def _deliver(self) -> int:
        """Hand held packets to on_packet in order (not nested, and only while running)."""
        disp = self._disp
        inbox = self._inbox
        if disp is None or disp._depth or not inbox:
            return 0
        cb = self._cb_packet
        sinks = self._sinks
        n = 0
        disp._depth += 1
        try:
            while inbox:
                pkt = inbox.popleft()
                n += 1
                if cb is not None:
                    cb(self, pkt)
                elif not sinks:
                    self.counters.unhandled += 1
                for sink in sinks:
                    sink(pkt)
                if disp.stopping:
                    break
            if n and self._cb_complete is not None and not disp.stopping:
                self._cb_complete(self, n)
        except Exception as exc:
            _log.exception("a callback of channel %s raised; closing the channel", self.name)
            self._fatal(exc, f"error: callback raised {exc!r}")
        finally:
            disp._depth -= 1
        disp.delivered += n
        return n

    def _device_lost(self, exc: DeviceRescinded) -> None:
        """A sender's signal found the device rescinded (or the host dead): close now, so
        on_closed runs even when no thread is dispatching (the lead's holder, if any,
        finishes the teardown as it lets go)."""
        disp = self._disp
        if disp is None:
            return
        reason = "rescinded"
        if isinstance(exc, HostCrashed):
            reason = f"host crashed: {exc.detail}" if exc.detail else "host crashed"
        if disp.request_close(reason):
            disp.finish_close(0.0)

    def _fatal(self, exc: BaseException, reason: str) -> None:
        self.last_error = exc
        disp = self._disp
        if disp is not None:
            disp.request_close(reason)

    # -- sending -----------------------------------------------------------------------------

    def _new_txid(self) -> int:
        pending = self._pending
        cancelled = self._cancelled
        while True:
            txid = next(self._txids) & _TXID_MASK
            if txid and txid not in pending and txid not in cancelled:
                return txid

    def send(self, payload: Payload, completion_requested: bool = False, *,
             packet_type: int = PacketType.DATA_INBAND, transaction_id: int | None = None,
             timeout: float | None = None) -> int:
        """Write one packet to the TX ring; returns its transaction id.

        ``payload``: bytes-like, or a list/tuple of them (gathered). Signals the host only
        when the ring engine says so. When the ring is full, sets pending_send_size and
        sleeps until the host frees room (or ``timeout``, default ``send_timeout``:
        :class:`Timeout`); from on_started, which must not wait, a full ring raises
        :class:`RingFull`. :class:`ChannelClosed` when the channel is not open.
        """
        tx = self._tx
        if tx is None or not self._lc.policy.may_send:
            raise self._not_open("send")
        if transaction_id is None:
            transaction_id = self._new_txid()
        flags = 1 if completion_requested else 0
        needed = self._write(tx, payload, packet_type, flags, transaction_id, 0)
        if needed:
            self._send_when_room(tx, payload, packet_type, flags, transaction_id, needed,
                                 self.send_timeout if timeout is None else timeout)
        return transaction_id

    def _write(self, tx: RingBuffer, payload: Payload, packet_type: int, flags: int, txid: int,
               pending: int, defer: bool = False) -> int:
        """Write now (signal if the ring engine says so); 0, or the bytes needed when full.

        ``pending``: first ask the host to interrupt once that much is free (a blocked
        writer), then try: the host may have freed the room before it saw the request.
        ``defer``: do not signal now, set ``_signal_due`` for :meth:`_flush_signal` (the
        asyncio face signals once per loop turn for all the packets written in it).
        """
        with self._tx_lock:
            if pending and not self._polled:
                # (A polled subchannel never asks: the host's "room now" interrupt on it
                # would oops a crash-window kernel; its dispatcher polls anyway.)
                tx.set_pending_send_size(pending)
            try:
                signal = tx.write(payload, packet_type, flags, txid)
            except RingFull as full:
                return full.needed
            counters = self.counters  # under the lock: senders on several threads
            counters.packets_out += 1
            counters.bytes_out += _nbytes(payload)
        if signal:
            if defer:
                self._signal_due = True
            else:
                sig = self._signal
                if sig is not None:
                    try:
                        sig.signal()
                    except DeviceRescinded as exc:  # HostCrashed too
                        self._device_lost(exc)
                        raise
        return 0

    def _flush_signal(self) -> None:
        """Send the signal a deferred write owes the host (a later write may have sent it)."""
        if self._signal_due:
            self._signal_due = False
            sig = self._signal
            if sig is not None and self._tx is not None:
                with contextlib.suppress(VmbusError):  # closed meanwhile: the dispatcher says why
                    sig.signal()

    @contextlib.contextmanager
    def _blocked(self, tx: RingBuffer) -> Iterator[None]:
        """Count a writer waiting for room; the last one to leave clears pending_send_size."""
        with self._tx_lock:
            self.counters.ring_full_waits += 1
            self._blocked_senders += 1
        try:
            yield
        finally:
            with self._tx_lock:
                self._blocked_senders -= 1
                if not self._blocked_senders and self._tx is tx:
                    tx.clear_pending_send_size()

    def _send_when_room(self, tx: RingBuffer, payload: Payload, packet_type: int, flags: int,
                        txid: int, needed: int, timeout: float) -> None:
        disp = self._disp
        policy = self._lc.policy
        if disp is None or not policy.may_wait:
            if not policy.may_send:
                # disable() or a rescind on another thread closed the channel since send()
                # checked the state: that, not the ring, is why this packet cannot go out.
                raise self._not_open("send")
            raise RingFull(needed, tx.available_to_write())  # on_started, which must not wait
        deadline = time.monotonic() + timeout
        with self._blocked(tx):
            while True:
                if disp.stopping:  # before the write: nothing goes out once closing began
                    raise self._not_open("send")
                needed = self._write(tx, payload, packet_type, flags, txid, needed)
                if not needed:
                    return
                # Any dispatch cycle may have been the host's "room now" interrupt: retry.
                if not disp.wait_for(disp.next_cycle(), deadline):
                    raise Timeout(f"room for {needed} bytes in the TX ring of {self.name} "
                                  "(the host is not reading it)", timeout)

    def send_batch(self, payloads: Sequence[Payload], completion_requested: bool = False, *,
                   packet_type: int = PacketType.DATA_INBAND, timeout: float | None = None) -> list[int]:
        """Write several packets with one index update and at most one signal; their ids.

        The streaming form of :meth:`send`: a host that reads as soon as it is signalled
        would otherwise be signalled for every packet (each finds the ring empty). If the
        whole batch does not fit, it goes packet by packet, waiting for room as send() does.
        """
        tx = self._tx
        if tx is None or not self._lc.policy.may_send:
            raise self._not_open("send")
        flags = 1 if completion_requested else 0
        txids = [self._new_txid() for _ in payloads]
        specs = [(p, packet_type, flags, t) for p, t in zip(payloads, txids, strict=True)]
        with self._tx_lock:
            try:
                signal = tx.write_batch(specs)
            except RingFull:
                signal = None
            else:
                counters = self.counters
                counters.packets_out += len(specs)
                counters.bytes_out += sum(_nbytes(p) for p in payloads)
        if signal is None:
            for p, t in zip(payloads, txids, strict=True):
                self.send(p, completion_requested, packet_type=packet_type, transaction_id=t,
                          timeout=timeout)
            return txids
        if signal and self._signal is not None:
            try:
                self._signal.signal()
            except DeviceRescinded as exc:
                self._device_lost(exc)
                raise
        return txids

    def complete(self, packet: Packet, payload: Payload = b"") -> None:
        """Send a VM_PKT_COMP (0xb) carrying ``packet``'s transaction id and ``payload``."""
        self.send(payload, packet_type=PacketType.COMP, transaction_id=packet.transaction_id)

    def _start_request(self, payload: Payload, timeout: float,
                       callback: Callable[[_Request], None] | None = None) -> _Request:
        req = _Request(self._new_txid(), callback)
        self._pending[req.txid] = req
        try:
            self.send(payload, True, transaction_id=req.txid, timeout=timeout)
        except BaseException:
            with self._req_lock:
                self._pending.pop(req.txid, None)
            raise
        self._count_request()
        return req

    def _count_request(self) -> None:
        with self._req_lock:
            self.counters.requests += 1

    def _cancel(self, req: _Request) -> bool:
        """Cancel a request whose wait ended; False if its completion won the race."""
        with self._req_lock:
            if req.done or self._pending.pop(req.txid, None) is None:
                return False
            cancelled = self._cancelled
            cancelled[req.txid] = None
            if len(cancelled) > CANCELLED_MEMORY:
                del cancelled[next(iter(cancelled))]
            self.counters.cancelled += 1
        return True

    def send_request(self, payload: Payload, timeout: float | None = None) -> bytes:
        """Send ``payload`` asking for a completion and wait for it; returns its payload.

        The VmbChannelSendSynchronousRequest analog. The calling thread drives dispatch
        itself while nobody else does (leader/follower). On timeout (default
        ``request_timeout``) the request is cancelled, a late completion is dropped and
        counted, and :class:`Timeout` is raised; if the channel closes meanwhile,
        :class:`ChannelClosed`. From on_started (which must not wait): :class:`InvalidState`.
        """
        policy = self._lc.policy
        if not policy.may_wait:
            if policy.may_send:
                raise InvalidState(self.name, self.state.value, "wait for a completion",
                                   "on_started must not wait: send the request from on_post_started")
            raise self._not_open("send a request on")
        t = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        req = self._start_request(payload, t)
        if not req.done:
            disp = self._disp
            assert disp is not None
            disp.wait_for(req.is_done, deadline)
        if not req.done and self._cancel(req):
            raise Timeout(f"the completion of request {req.txid} on channel {self.name}", t)
        if req.error is not None:
            raise req.error
        return req.payload

    # -- caller-driven dispatch --------------------------------------------------------------

    def poll(self, timeout: float | None = 0.0) -> int:
        """Run one dispatch cycle on this thread, waiting up to ``timeout`` for an event.

        For callers with their own loop (select on :meth:`fileno`, then poll(0)). Returns
        the packets delivered to on_packet. If another thread is dispatching, waits for
        its next cycle instead.
        """
        disp = self._disp
        if disp is None or disp.closed:
            return 0
        return disp.run_once(timeout)

    def run(self, timeout: float | None = None) -> str | None:
        """Dispatch on this thread until the channel closes (or ``timeout``); the close reason."""
        disp = self._disp
        deadline = None if timeout is None else time.monotonic() + timeout
        while disp is not None and not disp.closed:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            disp.run_once(0.5 if remaining is None else min(0.5, remaining))
        return self._lc.reason if self._lc.state is ChannelState.DISABLED else None

    # -- subchannels -------------------------------------------------------------------------

    def open_subchannels(self, count: int | None = None, timeout: float = 10.0) -> list[Channel]:
        """Map and start the device's subchannels; wait until ``count`` are open in all.

        Subchannels appear when the host offers them (a device protocol asks for them;
        the mock: ``MockVmbus.offer_subchannels``); each one's ``channels/<relid>/ring``
        file appears asynchronously, so this polls for it until ``timeout``
        (:class:`Timeout`). ``count=None`` opens what is there now. Each new subchannel
        inherits this channel's on_packet / on_processing_complete / on_closed (change
        them in on_subchannel) and is dispatched by this channel's dispatcher. Returns
        the subchannels opened by this call.
        """
        from .sysfs import Sysfs

        if self.parent is not None:
            raise InvalidState(self.name, self.state.value, "open subchannels", "call it on the primary")
        disp, dev = self._disp, self._dev
        if disp is None or dev is None or self._lc.state not in (ChannelState.STARTED, ChannelState.RUNNING):
            raise self._not_open("open subchannels of")
        info = Sysfs(self.root).device(self.guid)
        deadline = time.monotonic() + timeout
        new: list[Channel] = []
        while True:
            known = {self.relid, *(s.relid for s in self._subs)}
            for chan in info.channels():
                if chan.relid in known:
                    continue
                ring = chan.ring_path
                if ring is None:
                    continue
                try:
                    arr = dev.map_ring_file(ring)
                except (FileNotFoundError, ChannelClosed):
                    continue  # not there yet, or the kernel has not opened it yet (ENODEV)
                new.append(self._attach_subchannel(chan, arr))
            if count is None or len(self._subs) >= count:
                return new
            if disp.stopping:
                raise self._not_open("open subchannels of")
            if time.monotonic() >= deadline:
                raise Timeout(f"{count} subchannel ring files under {info.path / 'channels'} "
                              f"({len(self._subs)} open)", timeout)
            time.sleep(0.01)

    def _attach_subchannel(self, info: ChannelInfo, ring: npt.NDArray[np.uint8]) -> Channel:
        disp, dev = self._disp, self._dev
        assert disp is not None and dev is not None
        sub = Channel(self.root, self.guid, dispatch=self.dispatch, poll_interval=self.poll_interval,
                      request_timeout=self.request_timeout, send_timeout=self.send_timeout, _parent=self)
        relid = info.relid
        sub.relid = relid
        sub.monitor_id = info.monitor_id
        with contextlib.suppress(VmbusError):
            sub.subchannel_index = info.subchannel_id
        sub.name = f"{self.guid}/{relid}"
        sub._lc.device = sub.name
        tx, rx = split_rings(ring, f"channels/{relid}/ring")
        rx.interrupt_mask = 1  # masked at once: until the verdict, and for good when polled
        sub._signal = HostSignal.for_channel(
            relid, sub.monitor_id, int_page=_opt_map(dev, "int_page"),
            monitor_page=_opt_map(dev, "monitor_page"), write_one=disp.guard.write_one, subchannel=True)
        sub._tx, sub._rx, sub._dev, sub._disp = tx, rx, dev, disp
        sub.counters._opened(disp)
        sub._polled, sub._polled_reason = self._subchannel_mode(disp, sub)
        sub._cb_packet = self._cb_packet
        sub._cb_complete = self._cb_complete
        sub._cb_closed = self._cb_closed
        sub._lc.enable()
        sub._lc.fire(Event.OPENED)
        if self._cb_subchannel is not None:
            self._cb_subchannel(self, sub)
        sub._lc.fire(Event.STARTED)
        sub._lc.fire(Event.POST_STARTED)
        self._subs.append(sub)
        disp.add(sub)
        return sub

    def _subchannel_mode(self, disp: Dispatcher, sub: Channel) -> tuple[bool, str]:
        """(polled, why) for a new subchannel: forced by ``poll_subchannels`` or detected."""
        if self.poll_subchannels is True:
            return True, f"poll_subchannels=True: polled every {self.poll_interval * 1000:g} ms"
        safe = disp.subchannel_interrupts_safe(self, sub)
        if self.poll_subchannels is False:
            why = "poll_subchannels=False: interrupts forced"
            if not safe:
                why += " although " + disp.subchannel_reason.split(";")[0] + " (expect a kernel oops)"
                _warn_once(self.guid, f"channel {self.guid}: {why}")
            return False, why
        if not safe:
            _warn_once(self.guid, f"channel {self.guid}: {disp.subchannel_reason}")
        return not safe, disp.subchannel_reason

    # -- asyncio (pyvmbus.aio) ---------------------------------------------------------------

    async def request(self, payload: Payload, timeout: float | None = None) -> bytes:
        """``await channel.request(payload)``: send_request without blocking the loop."""
        from .aio import request

        return await request(self, payload, timeout)

    def packets(self) -> AsyncIterator[Packet]:
        """``async for packet in channel.packets():`` every packet on_packet would get."""
        from .aio import packets

        return packets(self)

    # -- diagnostics -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """State, signalling, rings, counters and subchannels as data (``vmbus show``)."""
        out: dict[str, Any] = {
            "device": str(self.guid),
            "relid": self.relid,
            "monitor_id": self.monitor_id,
            "state": self.state.value,
            "close_reason": self.close_reason,
            "dispatch": self.dispatch,
            "polled": self._polled,
            "polled_reason": self._polled_reason or None,
            "counters": self.counters.as_dict(),
            "held_packets": len(self._inbox),
            "outstanding_requests": len(self._pending),
        }
        sig = self._signal
        if sig is not None:
            out["signal"] = sig.info()
            out["signal_reason"] = sig.reason
        disp = self._disp
        if disp is not None:
            out["interrupts"] = self.counters.interrupts
            out["event_count"] = disp.event_count
        for key, ring in (("tx", self._tx), ("rx", self._rx)):
            if ring is not None:
                with contextlib.suppress(ValueError, VmbusError):  # released under us
                    out[key] = {"data_size": ring.data_size, "write_index": ring.write_index,
                                "read_index": ring.read_index, "interrupt_mask": ring.interrupt_mask,
                                "pending_send_size": ring.pending_send_size}
        if self.parent is None:
            out["subchannels"] = [s.info() for s in self._subs]
            out["subchannel_interrupts"] = self._subchannel_summary()
        return out

    def _subchannel_summary(self) -> dict[str, Any]:
        """How subchannels are (or will be) dispatched and why: for info() and describe()."""
        subs = self._subs
        disp = self._disp
        if subs:
            polled = subs[-1]._polled
            return {"mode": "polled" if polled else "interrupts", "reason": subs[-1]._polled_reason}
        if self.poll_subchannels is not None:
            return {"mode": "polled" if self.poll_subchannels else "interrupts",
                    "reason": f"poll_subchannels={self.poll_subchannels}"}
        if disp is not None and self._masked_on_open:
            return {"mode": "interrupts", "reason": "the kernel masked the primary on open "
                    "(before b15b7): subchannel interrupts are safe"}
        return {"mode": "undecided", "reason": "decided when the first subchannel is mapped: "
                "does a write of 1 clear its mask?"}

    def describe(self) -> str:
        """A few lines for ``vmbus show``: state, how the host is signalled and why, counters."""
        lines = [f"channel {self.name} relid {self.relid}: {self.state.value}"
                 + (f" (last closed: {self.close_reason})" if self.close_reason else "")]
        if self._signal is not None:
            lines.append(f"  signal: {self._signal.describe()}")
        if self.parent is None:
            if self._lc.state is not ChannelState.DISABLED:
                summary = self._subchannel_summary()
                lines.append(f"  subchannels: {summary['mode']} ({summary['reason']})")
        elif self._polled:
            lines.append(f"  interrupts: masked and polled every {self.poll_interval * 1000:g} ms "
                         f"({self._polled_reason})")
        else:
            lines.append(f"  interrupts: enabled ({self._polled_reason})")
        c = self.counters
        lines.append(f"  in {c.packets_in} packets / {c.bytes_in} B, out {c.packets_out} packets / "
                     f"{c.bytes_out} B, signals {c.signals}, interrupts {c.interrupts}, ring-full "
                     f"waits {c.ring_full_waits}, requests {c.requests} (cancelled {c.cancelled}, "
                     f"late completions dropped {c.late_completions})")
        lines.extend("  " + s.describe().replace("\n", "\n  ") for s in self._subs)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Channel {self.name} relid={self.relid} {self.state.value}>"


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, text: str) -> None:
    """One logging.warning per device and process: the verdict is the same every enable."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    _log.warning("%s", text)


def _opt_map(dev: UioDevice, name: str) -> npt.NDArray[np.uint8] | None:
    try:
        return dev.map(name).array
    except KeyError:
        return None


class _Enabled:
    """What :meth:`Channel.enabled` returns: a sync and async context manager."""

    def __init__(self, channel: Channel, dispatch: str | None) -> None:
        self.channel = channel
        self.dispatch = dispatch

    def __enter__(self) -> Channel:
        self.channel.enable(dispatch=self.dispatch)
        return self.channel

    def __exit__(self, *exc: object) -> None:
        self.channel.disable()

    async def __aenter__(self) -> Channel:
        from .aio import enable

        await enable(self.channel, self.dispatch or "asyncio")
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        from .aio import disable

        await disable(self.channel)
