"""One dispatcher per uio device: wait, drain, unmask, fence, re-check (SPEC.md section 8).

The kernel has one event counter for a device's primary channel and all its subchannels,
so one wakeup means "scan every ring". :class:`Dispatcher` owns that cycle; the channels
it drives (:class:`Dispatched`, which :class:`pyvmbus.Channel` implements) only read their
rings and deliver. This module knows nothing of lifecycles, requests or callbacks.

The cycle
    wait on the fd -> drain every ring that has data and deliver -> unmask every owned
    ring found masked (store 0, then one write of 1 to the fd) -> full fence -> re-check
    every ring, and drain again if anything arrived (nobody would interrupt us for it)
    -> wait. The client owns every mask on every kernel generation (SPEC.md section 8):
    it stores mask=1 right after open and when a subchannel appears, unmasks when
    dispatch starts, and reads the mask word after each drain instead of assuming what
    the kernel did (5.15-6.17 mask on every interrupt, 6.18 / 6.6-lts / OpenHCL never
    do). It does not mask itself while draining: a read that finds the ring empty after
    the read-index store is the re-check the protocol needs, and on 6.18 this saves an
    fd write (and, for a non-monitored channel, a host wakeup) per interrupt. Nothing
    blocks until a cycle has completed that sequence (``_armed``). The whole cycle is
    :meth:`Dispatcher._drain_all`. Every ring access of the cycle goes through the channel's
    one validation point (``check_rings``: :class:`pyvmbus.ring.HeaderCheck`), before the
    drain, at the unmask and in the re-check, and no driver sleeps longer than
    :data:`RECHECK` without one: a violation closes the device (``corrupt: ...``), it
    never kills the thread that saw it.

Subchannels and the crash window
    Before d062463 ("Set event for all channels on the device") and the Dec 2025 5.4-6.6
    backport, hv_uio_channel_cb reads the interrupting channel's device_obj, which is
    NULL for a subchannel: the first host interrupt on a subchannel oopses the guest
    (<= 6.14 upstream, 6.10, the 5.4-6.6 LTS lines before Dec 2025, 6.12.y before Nov
    2025 such as Debian 6.12.57, and OpenHCL). Old kernels only survive because they mask
    subchannels at creation and nobody unmasks them. So "the kernel masked the primary on
    open" says nothing about subchannels. The only test userspace has is SPEC.md rule 6,
    done once, on the first subchannel, before it is dispatched
    (:meth:`Dispatcher.subchannel_interrupts_safe`): store 1 in its mask, do the normal
    unmask (store 0 on the primary + a write of 1), read the subchannel's mask back. Only
    a kernel whose write clears subchannel masks (d062463 or the Dec 2025 backport) has
    the safe callback. Everywhere else every subchannel stays masked and is polled every
    ``poll_interval``, never sets pending_send_size (the host's "room now" interrupt is an
    interrupt too) and a warning says why. ``poll_subchannels=True`` / ``False`` force
    either mode (False on such a kernel panics the guest at the first host packet).

Leader / follower
    Whoever holds the dispatch lead polls the fd and drains; every callback runs on that
    thread. A thread that waits for a completion (or for room in a full ring) takes the
    lead itself when nobody holds it, so its completion needs no hand-off between threads;
    otherwise it sleeps until the leader delivers it. With ``dispatch="thread"`` a
    background thread leads while no caller does (it polls the fd without the lead, and
    steps aside for ``LINGER`` after a caller -- never itself -- let go, so back-to-back
    requests keep leading themselves); with ``dispatch="caller"`` nothing runs unless a
    caller waits, calls :meth:`Channel.poll` / :meth:`Channel.run`, or :mod:`pyvmbus.aio`
    drives it (``dispatch="asyncio"``: ``loop.add_reader`` on the fd, no threads).
    A callback that waits (send_request in on_packet) runs a nested cycle on the same
    thread (``depth`` > 0): completions reach their waiters, other packets are held and
    delivered in order when the callback returns.

Closing
    disable(), a rescind (EIO), a dead host, a corrupt ring or a raising on_packet all go
    through :meth:`Dispatcher.request_close`: every channel of the device moves to
    ``closing``, outstanding requests fail with :class:`ChannelClosed` at once, and the
    thread that holds (or next takes) the lead releases the device and then calls
    on_closed(channel, reason) for each subchannel and the primary.

Imports: only the layers below (shm, errors, ring, uio); never channel or aio.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from . import shm
from .errors import ChannelClosed, DeviceRescinded, HostCrashed, RingCorrupt
from .uio import UioDevice

if TYPE_CHECKING:
    import asyncio

    from .ring import RingBuffer

__all__ = ["DISPATCH_MODES", "LINGER", "RECHECK", "DeviceGuard", "Dispatched", "Dispatcher"]

_log = logging.getLogger(__name__)

DISPATCH_MODES: Final = ("thread", "caller", "asyncio")
"""Who drives dispatch: a background thread (plus leading waiters), only callers, or asyncio."""
LINGER: Final = 0.005
"""After a caller lets go of the lead, the background thread waits this long before it
polls again, so a caller doing back-to-back requests keeps leading (no hand-offs)."""
RECHECK: Final = 0.5
"""Longest a dispatcher sleeps without checking every ring header (seconds): a host that
stores garbage in a mask word never interrupts, and is seen within this."""


class Dispatched(Protocol):
    """What a dispatcher needs of a channel it drives (:class:`pyvmbus.Channel` is one).

    Called only on the thread that holds the lead, except :meth:`begin_close` (on the
    thread that asks to close).
    """

    name: str
    rx_ring: RingBuffer | None
    """The RX ring while the channel is open; None once released."""
    polled: bool
    """Kept masked and polled (a subchannel on a kernel its interrupt would crash)."""

    def drain(self, rx: RingBuffer, checked: bool = False) -> int:
        """Read every packet of ``rx``, route completions, deliver; packets read.

        ``checked``: the dispatcher has just called :meth:`check_rings` on this channel
        and found data, with nothing in between, so the drain need not check again."""
        ...

    def check_rings(self, where: str) -> int:
        """Check every header word of both rings (the channel's one validation point);
        the bytes ready to read. A violation closes the device (``corrupt: ...``): 0."""
        ...

    def deliver(self) -> int:
        """Hand packets held earlier to on_packet if the state allows now; packets delivered."""
        ...

    def begin_close(self, reason: str) -> None:
        """Move to closing and fail outstanding requests (any thread)."""
        ...

    def release(self) -> None:
        """Drop the rings and the device (the teardown, holding the lead)."""
        ...

    def report_closed(self, reason: str) -> None:
        """Run on_closed(channel, reason); a raising callback is logged, not propagated."""
        ...


class DeviceGuard:
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
            self.dev.irqcontrol(True, "closed while signalling the host")

    def close(self) -> None:
        with self.lock:
            self.dev.close()


class Dispatcher:
    """Waits on one uio device's fd and drains the rings of all its channels.

    Built by :meth:`pyvmbus.Channel.enable`; one per enable. See the module docstring for the
    cycle and the leader/follower rules. ``events`` counts uio events consumed,
    ``event_count`` is the kernel's cumulative count from the last one.
    """

    def __init__(self, dev: UioDevice, name: str, mode: str, poll_interval: float,
                 guard: DeviceGuard | None = None) -> None:
        self.dev = dev
        self.guard = guard if guard is not None else DeviceGuard(dev)
        self.name = name
        self.mode = mode
        self.poll_interval = poll_interval
        self.channels: tuple[Dispatched, ...] = ()
        self.events = 0
        self.event_count = 0
        self.cycles = 0
        self.delivered = 0
        """Packets handed to on_packet / packets() readers."""
        self.stopping = False
        self.closed = False
        self.reason = ""
        self.polled = False
        """True when some channel is kept masked and polled (a kernel without the primary lookup)."""
        self.masked_on_open: bool | None = None
        """The primary's RX mask read right after open, before the client stored its own:
        True means the kernel masks on open (before b15b7). It does NOT make subchannel
        interrupts safe (5.15 and 6.10 mask on open and oops on one); only rule 6 does."""
        self.subchannel_irqs_safe: bool | None = None
        """Verdict on subchannel interrupts (None until a subchannel was probed)."""
        self.subchannel_reason = ""
        """Why subchannels are polled or interrupt-driven (describe(), info())."""
        self._lead = threading.Lock()
        self._leader = 0
        self._cond = threading.Condition(threading.Lock())
        self.followers = 0
        """Threads waiting on the leader's condition (read without the lock: a completion
        notifies only when someone waits; a follower re-checks under the lock)."""
        self._fresh: Dispatched | None = None
        """The channel whose rings :meth:`_data_waiting` or the re-check has just checked
        and found data in: its drain right after need not check again."""
        self.depth = 0
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
        self._thread_ident = -1
        """The background thread's ident (-1: none): compared in _unlead without a
        threading.current_thread() call per release."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._cycle_hooks: list[Callable[[], None]] = []
        self._before_unmask: Callable[[], None] | None = None
        """Test hook: runs after the drain, before the unmask step (no-lost-wakeup tests)."""
        self.on_event: Callable[[int], None] | None = None
        """Called with the kernel's event count for each uio event consumed (a capture's
        interrupt record); None costs one check per interrupt, nothing per packet."""

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Unmask every channel (store 0 + write 1), then start the mode's driver and rescan."""
        for ch in self.channels:
            rx = ch.rx_ring
            if rx is not None and not ch.polled:
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
            self._loop.call_later(RECHECK, self._aio_recheck_tick)
            if self.polled:
                self._aio_poll_tick()
        self.kick()

    def add(self, ch: Dispatched) -> None:
        """Dispatch ``ch`` too (a subchannel that appeared); unmasked unless it is polled."""
        self.channels = (*self.channels, ch)
        if ch.polled:
            if not self.polled and self._loop is not None:
                self._loop.call_soon_threadsafe(self._aio_poll_tick)
            self.polled = True
        elif ch.rx_ring is not None:
            ch.rx_ring.interrupt_mask = 0  # unmask: store 0 and write 1, as for the primary
            self.guard.write_one()  # not the leader: a teardown may be closing the fd
            shm.fence()
        self.kick()

    def subchannel_interrupts_safe(self, primary: Dispatched, sub: Dispatched) -> bool:
        """Whether this kernel survives a subchannel interrupt; probed once, on ``sub``.

        ``sub`` is mapped with its RX mask stored at 1 and is not dispatched yet, so
        nothing unmasks it behind this probe. See the module docstring for the rule.
        """
        if self.subchannel_irqs_safe is not None:
            return self.subchannel_irqs_safe
        prx, srx = primary.rx_ring, sub.rx_ring
        if prx is None or srx is None:
            raise ChannelClosed(self.name, self.reason or "closed while opening a subchannel")
        # SPEC.md rule 6: the subchannel's mask holds 1; the channel's normal unmask (store 0
        # on the primary, then a 4-byte write of 1, synchronous: the kernel's irqcontrol
        # has run when it returns); then read the subchannel's mask back.
        srx.interrupt_mask = 1
        prx.interrupt_mask = 0
        shm.fence()
        self.guard.write_one()
        shm.fence()
        safe = srx.interrupt_mask == 0
        srx.interrupt_mask = 1  # not dispatched yet: add() unmasks it when it may
        shm.fence()
        self.kick()  # the primary was unmasked outside a cycle: let the leader re-check
        every = f"{self.poll_interval * 1000:g} ms"
        if safe:
            why = ("a write of 1 cleared the subchannel's mask (d062463, or the Dec 2025 5.4-6.6 "
                   "backport): the kernel's callback finds the primary, subchannel interrupts are safe")
        elif self.masked_on_open:
            why = ("a write of 1 left the subchannel's mask alone and the kernel masks on open (before "
                   "d062463: <= 6.14, 5.4-6.6 LTS before b15b7): its interrupt callback would oops on a "
                   f"subchannel interrupt (NULL device_obj); subchannels stay masked, polled every {every}")
        else:
            why = ("a write of 1 left the subchannel's mask alone and the kernel leaves masks to "
                   "userspace: b15b7 without d062463 (e.g. Debian 6.12.57, 5.4-6.6 LTS between Oct and "
                   "Dec 2025) or OpenHCL (no_mask=1), where subchannels start UNMASKED and a host "
                   "interrupt before pyvmbus masks one oopses the guest (fixed by d062463 and the "
                   f"Dec 2025 backport); subchannels stay masked, polled every {every}")
        self.subchannel_irqs_safe = safe
        self.subchannel_reason = why
        return safe

    # -- leadership --------------------------------------------------------------------------

    def _try_lead(self) -> bool:
        if self._lead.acquire(False):
            self._leader = threading.get_ident()
            return True
        return False

    def lead_cycle(self, timeout: float | None, ready: bool = False) -> int | None:
        """One cycle if the lead is free (then let go); None if another thread holds it."""
        if not self._lead.acquire(False):  # _try_lead, inlined (once per request)
            return None
        self._leader = threading.get_ident()
        try:
            return self._cycle(timeout, ready)
        finally:
            self._unlead()

    def _unlead(self) -> None:
        while True:
            closed_now = False
            if self.stopping and not self.closed:
                try:
                    self._teardown()
                finally:
                    closed_now = True
            leader, self._leader = self._leader, 0
            if leader != self._thread_ident:
                # Only a caller's release makes the background thread step aside for
                # LINGER (so back-to-back requests keep leading themselves). Its own
                # release must not: it would sleep LINGER after every cycle it ran, and an
                # answer to a packet sent from on_packet would wait for it (measured: 5.3
                # ms vs 0.27 ms per exchange on a monitored echo; docs/performance.md).
                self._last_release = time.monotonic()
            self._lead.release()
            if self.followers:
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

    def notify_followers(self) -> None:
        """Wake the threads waiting for the leader (a completion they wait for arrived)."""
        if self.followers:
            with self._cond:
                self._cond.notify_all()

    def add_cycle_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every dispatch cycle and when closing begins (asyncio senders
        waiting for room in the TX ring look again then)."""
        self._cycle_hooks.append(hook)

    def remove_cycle_hook(self, hook: Callable[[], None]) -> None:
        """Undo :meth:`add_cycle_hook` (no error if it is already gone)."""
        with contextlib.suppress(ValueError):
            self._cycle_hooks.remove(hook)

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
            elif self.lead_cycle(remaining) is None:
                with self._cond:
                    self.followers += 1
                    try:
                        if not done() and not self.stopping and self._lead.locked():
                            self._cond.wait(remaining)
                    finally:
                        self.followers -= 1
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
        delivered = self.lead_cycle(timeout)
        if delivered is not None:
            return delivered
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
        if self.lead_cycle(0) is None:
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
        self._fresh = None  # set by _data_waiting below, for this cycle's drain only
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
                for fd, _ in self._poll(timeout):
                    if fd == self._uio_fd:
                        event = self._consume_event() or event
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake_fd)
            self._rescan = False
            if self.stopping:
                return 0
            delivered = self._drain_all(event)
        except RingCorrupt as exc:  # every ring access above checks and closes; never die on one
            self.request_close(f"corrupt: {exc.located(f'{self.name}, in a dispatch cycle').detail}")
            return 0
        except HostCrashed as exc:
            self.request_close(f"host crashed: {exc.detail}" if exc.detail else "host crashed")
            return 0
        except DeviceRescinded:
            self.request_close("rescinded")
            return 0
        self.cycles += 1
        for hook in self._cycle_hooks:
            hook()
        if self.followers:
            with self._cond:
                self._cond.notify_all()
        return delivered

    def _poll(self, timeout: float | None) -> list[tuple[int, int]]:
        """Poll the fds up to ``timeout``, checking the headers every :data:`RECHECK` meanwhile
        (a quiet spell ends early when data waits without an interrupt, or on a close)."""
        if timeout is not None and timeout <= 0:
            return self._poller.poll(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = RECHECK if deadline is None else min(RECHECK, deadline - time.monotonic())
            ready = self._poller.poll(max(0, math.ceil(step * 1000)))
            if ready or self.stopping or (deadline is not None and time.monotonic() >= deadline):
                return ready
            if self._data_waiting():  # every header checked (a violation closes)
                return ready

    def _data_waiting(self) -> bool:
        for ch in self.channels:
            if ch.rx_ring is not None and ch.check_rings("before a drain"):
                self._fresh = ch  # checked just now: its drain need not check again
                return True
        return self.stopping  # a violation closed the device: the cycle ends at once

    def _consume_event(self) -> bool:
        count = self.dev.read_event()
        if count is None:
            return False
        self.events += 1
        self.event_count = count
        hook = self.on_event
        if hook is not None:
            hook(count)
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
            fresh, self._fresh = self._fresh, None
            for ch in self.channels:
                rx = ch.rx_ring
                if rx is None:
                    continue
                if ch.drain(rx, ch is fresh):
                    busy = True
                    if self.stopping:
                        return self.delivered - start
                else:
                    ch.deliver()  # packets held while a callback ran or before post-started
            hook = self._before_unmask
            if hook is not None:
                hook()
            masked = False
            for ch in self.channels:
                rx = ch.rx_ring
                if rx is not None and not ch.polled:
                    mask = rx.interrupt_mask
                    if mask > 1:  # neither we nor the kernel store that: check, and close
                        ch.check_rings("at the unmask")
                        if self.stopping:
                            return self.delivered - start
                    if mask:
                        rx.interrupt_mask = 0
                        masked = True
            if masked:
                # Also write 1: on <= 6.9 that is how the kernel unmasks the primary, on
                # 6.10+ how a non-monitored channel's host is told (SPEC.md section 8).
                self.dev.irqcontrol(True)
                if self.polled:  # 6.15+ writes cover subchannels: keep polled ones masked
                    for ch in self.channels:
                        if ch.polled and ch.rx_ring is not None:
                            ch.rx_ring.interrupt_mask = 1
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
                if ch.rx_ring is not None and ch.check_rings("in the re-check"):
                    again = True
                    self._fresh = ch  # checked just now: the next pass's drain need not
                    break
            if self.stopping:  # a violation closed the device
                return self.delivered - start
            if not again:
                self._armed = True
                return self.delivered - start

    # -- the drivers -------------------------------------------------------------------------

    def _thread_main(self) -> None:
        """Background driver: poll without the lead; lead only when no caller does."""
        self._thread_ident = threading.get_ident()  # before this thread ever leads
        poller = select.poll()
        poller.register(self._uio_fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        idle_ms = math.ceil(RECHECK * 1000)
        try:
            while not self.stopping:
                with self._cond:
                    while not self.stopping and (
                            self._lead.locked() or time.monotonic() - self._last_release < LINGER):
                        self._cond.wait(LINGER)
                if self.stopping:
                    break
                ms = math.ceil(self.poll_interval * 1000) if self.polled else idle_ms
                poller.poll(ms)
                if self.stopping:
                    break
                # A quiet second is a cycle too: it checks every header (a host that stored
                # garbage in a mask never interrupts).
                self.lead_cycle(0)
        except Exception:  # pragma: no cover - a bug; do not die silently
            _log.exception("dispatcher thread of %s failed", self.name)
            self.request_close("error: dispatcher thread failed")
            if self._try_lead():
                self._unlead()

    def _aio_poll_tick(self) -> None:
        """asyncio: look at the polled (masked) channels every ``poll_interval``."""
        if self.stopping or self._loop is None:
            return
        self.lead_cycle(0)
        self._loop.call_later(self.poll_interval, self._aio_poll_tick)

    def _aio_recheck_tick(self) -> None:
        """asyncio: a cycle (every header checked) every :data:`RECHECK` (see there)."""
        if self.stopping or self._loop is None:
            return
        if not self.polled:  # the poll tick runs cycles often enough
            self.lead_cycle(0)
        self._loop.call_later(RECHECK, self._aio_recheck_tick)

    def _on_readable(self) -> None:
        """asyncio reader callback: one non-blocking cycle when the fd is readable."""
        self.lead_cycle(0, ready=True)

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
            ch.begin_close(reason)
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
                self.followers += 1
                try:
                    if not self.closed and self._lead.locked():
                        self._cond.wait(min(remaining, 0.05))
                finally:
                    self.followers -= 1
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
            # A closed channel keeps its last dispatcher (for its reason and counters):
            # it must not keep the loop, and all that loop holds, alive through it. The
            # loop's pending ticks see ``stopping`` and end; kick() returns before it.
            self._loop = None
        for ch in self.channels:
            ch.release()
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
            ch.report_closed(self.reason)
