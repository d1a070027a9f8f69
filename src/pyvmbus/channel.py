"""A VMBus channel in userspace: lifecycle, dispatch, sends, requests (issue 4).

:class:`Channel` gives a device bound to uio_hv_generic the lifecycle of Microsoft's
kernel-mode client library (the table is in :mod:`pyvmbus.lifecycle`); this module does
the I/O that table asks for.

Dispatch lives in :mod:`pyvmbus.dispatch`: one :class:`~pyvmbus.dispatch.Dispatcher` per
open uio device waits on the fd, drains every ring of the primary and its subchannels,
unmasks, fences and re-checks (SPEC.md section 8), and decides the leader/follower
hand-off and the close. A channel is what it drives (:class:`~pyvmbus.dispatch.Dispatched`):
it reads its own ring, routes completions to their requests and delivers the rest.

Requests
    :meth:`Channel.send_request` registers a :class:`Request` under a fresh transaction id,
    sends, and waits through the dispatcher (leading it itself when nobody does). A request
    whose wait times out is cancelled; its id is remembered (``CANCELLED_MEMORY``) so a late
    completion is dropped and counted, never delivered as a packet. :mod:`pyvmbus.aio` uses
    the same pieces through the names without a leading underscore below ("for the asyncio
    driver"), never the private ones.

Imports: the layers below (shm, errors, guid, lifecycle, packet, ring, signal, uio, dispatch);
:mod:`pyvmbus.aio` lazily, for the async methods (aio imports nothing from here).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .dispatch import DISPATCH_MODES, DeviceGuard, Dispatcher
from .errors import (
    ChannelClosed,
    DeviceRescinded,
    HostCrashed,
    InvalidState,
    RingCorrupt,
    RingFull,
    Timeout,
    UnsupportedKernel,
    VmbusError,
)
from .guid import Guid, parse_guid
from .lifecycle import ChannelState, Event, Lifecycle
from .packet import Packet, PacketType
from .ring import HeaderCheck, RingBuffer
from .signal import HostSignal
from .uio import PAGE_SIZE, UioDevice

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

    import numpy as np
    import numpy.typing as npt

    from .capture import CaptureWriter, ChannelTap
    from .sysfs import ChannelInfo

__all__ = [
    "DISPATCH_MODES",
    "Channel",
    "ChannelCounters",
    "ChannelState",
    "Dispatcher",
    "Request",
    "split_rings",
]

_log = logging.getLogger(__name__)

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


class Request:
    """One outstanding request: completed by the channel's drain, or failed on close.

    ``callback(request)`` runs once it is done (on the dispatching thread, or on the
    thread that closes the channel): the asyncio driver resolves a future there, the
    one it keeps in ``waiter`` (so its callback is one bound method, not a closure each).
    It also runs, with ``done`` still False, when the packet of a request the asyncio
    driver deferred (:meth:`Channel.begin_request`) could not be written at the end of
    the loop turn (a full ring, a channel no longer open): the requester writes it
    itself then, waiting for room as a send does."""

    __slots__ = ("callback", "done", "error", "payload", "txid", "waiter")

    def __init__(self, txid: int, callback: Callable[[Request], None] | None = None,
                 waiter: Any = None) -> None:
        self.txid = txid
        self.done = False
        self.payload = b""
        self.error: BaseException | None = None
        self.callback = callback
        self.waiter = waiter

    def is_done(self) -> bool:
        return self.done


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


@functools.cache
def _aio_request() -> Callable[[Channel, Payload, float | None], Coroutine[Any, Any, bytes]]:
    """pyvmbus.aio.request, imported on first use (asyncio stays unimported for threads);
    cached, because a ``from .aio import`` statement per request costs ~1 us."""
    from .aio import request

    return request


def _nbytes(payload: Payload) -> int:
    cls = payload.__class__
    if cls is bytes or cls is bytearray:
        return len(payload)
    if isinstance(payload, (list, tuple)):
        return sum(memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


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
    subchannel interrupt with SPEC.md rule 6's test: does its unmask write clear the
    first subchannel's mask? (cleared: d062463 or the Dec 2025 5.4-6.6 backport, safe;
    still 1: any older kernel, 6.12.y before Nov 2025 e.g. Debian 6.12.57, or OpenHCL,
    where the interrupt oopses the kernel). The primary's mask after open says nothing
    about subchannels. Unsafe: every subchannel stays masked and is polled every
    ``poll_interval``, never sets pending_send_size, a warning is logged once, and
    :meth:`describe` / :meth:`info` say so and why. ``poll_subchannels=True`` always
    polls; ``False`` always takes interrupts, which panics such a guest. A subchannel
    without a monitor id that the kernel cannot signal is refused with
    :class:`UnsupportedKernel`.

    ``capture=PATH`` (or :meth:`capture`) records every packet of the channel and its
    subchannels, its lifecycle events, signals and interrupts into a pcapng file
    (:mod:`pyvmbus.capture`, docs/capture.md).
    """

    def __init__(self, root: str | os.PathLike[str], guid: str, *, dispatch: str = "thread",
                 poll_subchannels: bool | None = None, poll_interval: float = 0.001,
                 request_timeout: float = 30.0, send_timeout: float = 30.0,
                 capture: str | os.PathLike[str] | CaptureWriter | None = None,
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
        self.tx_ring: RingBuffer | None = None
        self.rx_ring: RingBuffer | None = None
        self._check: HeaderCheck | None = None
        """The validation point of this channel's header words (:class:`HeaderCheck`)."""
        self._signal: HostSignal | None = None
        self._dev: UioDevice | None = None
        self._guard: DeviceGuard | None = None
        self._disp: Dispatcher | None = None
        self.polled = False
        self._polled_reason = ""
        self._masked_on_open: bool | None = None
        self._tx_lock = threading.Lock()
        self._req_lock = threading.Lock()
        self._blocked_senders = 0
        self.signal_due = False
        self.flush_scheduled = False
        self.aio_state: Any = None
        """pyvmbus.aio's per-loop state for this channel (its loop, deadlines, callbacks)."""
        self.deferred: list[Request] = []
        """asyncio requests registered in this loop turn whose packets are written together
        at its end (:meth:`write_deferred`), in order, before any other packet."""
        self._deferred_specs: list[tuple[Payload, int, int, int]] = []
        self._defer_thread = 0
        self._pending: dict[int, Request] = {}
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
        self._capture: CaptureWriter | None = None
        self._capture_owned = False
        self._tap: ChannelTap | None = None
        """Set while a capture records this channel: the packet paths call it (else one check)."""
        if capture is not None:
            self.capture(capture)

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
            raise self.not_open("get the fd of")
        return dev.fileno()

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The device's dispatcher while the channel is open (shared with its subchannels)."""
        return self._disp

    @property
    def may_send(self) -> bool:
        """Whether the lifecycle state allows a send now (started, post-started, running)."""
        return self._lc.policy.may_send

    @property
    def may_wait(self) -> bool:
        """Whether the state allows waiting for a completion (not in on_started)."""
        return self._lc.policy.may_wait

    def add_sink(self, sink: Callable[[Packet | None], None]) -> None:
        """Give ``sink`` every delivered packet too, then None when the channel closes."""
        self._sinks = [*self._sinks, sink]

    def remove_sink(self, sink: Callable[[Packet | None], None]) -> None:
        """Undo :meth:`add_sink`."""
        self._sinks = [s for s in self._sinks if s is not sink]

    def not_open(self, action: str) -> VmbusError:
        """The error for ``action`` on a channel whose state does not allow it."""
        st = self._lc.state
        if st in (ChannelState.DISABLED, ChannelState.CLOSING):
            return ChannelClosed(self.name, self._lc.reason or "not enabled")
        return InvalidState(self.name, st.value, action, "wait until the channel is started")

    # -- capture (pyvmbus.capture) -----------------------------------------------------------

    def capture(self, path: str | os.PathLike[str] | CaptureWriter) -> CaptureWriter:
        """Record this channel and its subchannels into the pcapng file ``path`` (or a
        :class:`~pyvmbus.capture.CaptureWriter` shared with other channels); returns the writer.

        Every packet both ways, lifecycle events, signals and interrupts, from now on
        (the next enable, or at once if open) until :meth:`stop_capture`. A file this
        call opened is replaced by a new one if called again. Recording never changes
        what the channel does; a write error stops it with a warning. :class:`~pyvmbus.
        capture.CaptureError` if the file cannot be created.
        """
        from .capture import CaptureWriter

        if self.parent is not None:
            raise InvalidState(self.name, self.state.value, "capture", "capture the primary channel")
        owned = not isinstance(path, CaptureWriter)
        writer = path if isinstance(path, CaptureWriter) else CaptureWriter(path)
        old = self._capture
        if old is not None and old is not writer:
            self.stop_capture()
        self._capture = writer
        self._capture_owned = owned
        if self._dev is not None and self._lc.state is not ChannelState.DISABLED:
            for ch in (self, *self._subs):
                ch._start_tap(writer)
        return writer

    def stop_capture(self) -> None:
        """Stop recording; close the capture file if this channel opened it (a writer
        passed in is only flushed: its other channels go on). No-op without a capture."""
        writer = self._capture
        if writer is None:
            return
        for ch in (self, *self._subs):
            ch._tap = None
        if self._disp is not None:
            self._disp.on_event = None
        self._capture = None
        if self._capture_owned:
            writer.close()
        else:
            writer.flush()

    @property
    def capturing(self) -> CaptureWriter | None:
        """The capture writer recording this channel, or None."""
        return self._capture if self.parent is None else self.parent._capture

    def _start_tap(self, writer: CaptureWriter) -> None:
        """Open this channel's interface in the capture, hook its signal, record "opened"."""
        from .sysfs import Sysfs

        relid = self.relid if self.relid is not None else 0xFFFF_FFFF
        sub = self.subchannel_index
        tap = writer.tap(str(self.guid), relid, sub,
                         f"VMBus channel relid {relid} (subchannel {sub}) of {self.guid}")
        if self._signal is not None:
            tap.hook_signal(self._signal)
        cls_guid = cls_name = None
        with contextlib.suppress(Exception):  # a label only: never fail the enable for it
            dev = Sysfs(self.root).device(self.guid)
            cls_guid, cls_name = str(dev.class_guid), dev.device_class.name
        tx, rx = self.tx_ring, self.rx_ring
        tap.event("opened", device=str(self.guid), relid=self.relid, subchannel=sub,
                  monitor_id=self.monitor_id, class_guid=cls_guid, **{"class": cls_name},
                  tx_ring_size=tx.data_size if tx is not None else None,
                  rx_ring_size=rx.data_size if rx is not None else None,
                  signal=self._signal.mechanism.value if self._signal is not None else None)
        self._tap = tap
        if self.parent is None and self._disp is not None:
            self._disp.on_event = tap.interrupt

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
        if self._capture is not None:
            self._start_tap(self._capture)
        try:
            if self._cb_opened is not None:
                self._cb_opened(self)
        except BaseException as exc:
            tap, self._tap = self._tap, None
            if tap is not None:
                tap.event("closed", reason=f"error: on_opened raised {exc!r}")
                tap.flush()
            self.tx_ring = self.rx_ring = None
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
        if self._tap is not None:
            disp.on_event = self._tap.interrupt
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
            closed_meanwhile = self._lc.state is not ChannelState.STARTED
            if not closed_meanwhile:
                self._lc.fire(Event.POST_STARTED)
        if closed_meanwhile:
            # A rescind, a dead host or a corrupt ring closed the channel during
            # post-started: finish that close here, so on_closed has run when enable()
            # raises, as it has for every other close a caller sees.
            disp.finish_close(timeout)
            raise ChannelClosed(self.name, self._lc.reason or "closed during enable")
        if self._tap is not None:
            self._tap.event("post_started")
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
            # What open() left there: 1 = the kernel masks on open (before b15b7), 0 = b15b7
            # or later, or OpenHCL. Diagnostics only: it says nothing about subchannels.
            masked_on_open = rx.interrupt_mask == 1
            # Own the mask from the first moment (never assume what open() left there):
            # masked until dispatch runs, so nobody interrupts before we listen.
            rx.interrupt_mask = 1
            guard = DeviceGuard(dev)
            self._signal = HostSignal.for_channel(
                relid, monitor_id, int_page=_opt_map(dev, "int_page"),
                monitor_page=_opt_map(dev, "monitor_page"), write_one=guard.write_one)
        except BaseException:
            dev.close()
            raise
        self.relid = relid
        self.monitor_id = monitor_id
        self.tx_ring, self.rx_ring, self._dev = tx, rx, dev
        self._check = HeaderCheck(tx, rx)
        self._guard = guard
        self.polled = False
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

    def begin_close(self, reason: str) -> None:
        """Closing begins (the dispatcher, any thread): fail requests, end packets() readers."""
        with self._state_lock:
            self._lc.close(reason)
        if reason == "rescinded" and self._tap is not None:
            self._tap.event("rescind")
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

    def report_closed(self, reason: str) -> None:
        """Run on_closed(channel, reason) after the teardown (the dispatcher calls it)."""
        tap, self._tap = self._tap, None
        if tap is not None:
            tap.event("closed", reason=reason)
            tap.flush()
        cb = self._cb_closed
        if cb is None:
            return
        try:
            cb(self, reason)
        except Exception:
            _log.exception("on_closed of %s raised", self.name)

    def release(self) -> None:
        """The teardown, holding the lead: fold the counters, drop the rings and the device."""
        self.counters._fold()
        with self._state_lock:
            if self._lc.state is ChannelState.CLOSING:
                self._lc.fire(Event.CLOSED)
        rx = self.rx_ring
        if rx is not None and self.parent is None:
            # Leave the primary's mask as a b15b7 kernel would (0): kernels that do not
            # zero the ring header on the next open must not show our 1 to the next
            # enable as "the kernel masks on open" (diagnostics: masked_on_open).
            with contextlib.suppress(ValueError, VmbusError):
                rx.interrupt_mask = 0
        self.tx_ring = self.rx_ring = None
        self._check = None
        self._dev = None
        self._guard = None
        self._inbox.clear()
        self._cancelled.clear()
        self.deferred = []
        self._deferred_specs = []
        self.aio_state = None  # keeps no loop alive once the channel is closed
        if self.parent is None:
            self._subs = []

    # -- receiving (runs on the thread holding the lead) -------------------------------------

    def drain(self, rx: RingBuffer, checked: bool = False) -> int:
        """Read every packet of the RX ring, route completions, deliver the rest (when the
        state allows and no callback of this thread is running). Returns packets read.

        ``checked``: the dispatcher checked both rings just before (and found data), with
        no ring access in between: the check would find what it found."""
        inbox = self._inbox
        pending = self._pending
        counters = self.counters
        got = 0
        nbytes = 0
        comp = PacketType.COMP
        check = self._check
        # Every header word of both rings, before the engine trusts our read index: an
        # interrupt is when a host that scribbled on a header wants us to look.
        if check is not None and not checked and not self.check_rings("before a drain"):
            return 0  # nothing to read, or a violation closed the device
        while True:
            try:
                pkts, signal = rx.read_batch(READ_BATCH)
            except RingCorrupt as exc:
                self._corrupt(exc.in_ring("rx ring"), "in a drain")
                return 0
            if self._tap is not None and pkts:
                self._tap.rx(pkts)
            if check is not None:
                check.note_rx()
            if signal and self._signal is not None:
                self._signal.signal()  # the host waits for room in our RX ring
            got += len(pkts)
            for pkt in pkts:
                nbytes += len(pkt.payload)
                if pkt.type == comp:
                    if pending and self._complete_request(pkt):
                        continue
                    if self._cancelled and self._drop_late(pkt.transaction_id):
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
        if inbox:
            self.deliver()
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
        if disp is not None and disp.followers:  # notify_followers, without its frame
            disp.notify_followers()
        return True

    def _drop_late(self, txid: int) -> bool:
        with self._req_lock:
            if txid not in self._cancelled:
                return False
            del self._cancelled[txid]
            self.counters.late_completions += 1
        return True

    def deliver(self) -> int:
        """Hand held packets to on_packet in order: not nested in a callback of the
        dispatching thread, and only in a state that delivers (after post-started)."""
        disp = self._disp
        inbox = self._inbox
        if disp is None or disp.depth or not inbox or not self._lc.policy.packets:
            return 0
        cb = self._cb_packet
        sinks = self._sinks
        n = 0
        disp.depth += 1
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
            disp.depth -= 1
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

    def check_rings(self, where: str) -> int:
        """Check every header word of both rings (:class:`HeaderCheck`); RX bytes to read.

        For the dispatcher, on the thread holding the lead. A violation closes the channel
        (``corrupt: ...``) and returns 0.
        """
        check = self._check
        if check is None:
            return 0
        try:
            with self._tx_lock:  # a writer between its store and its note is not the host
                return check.check_rings()  # check_tx, then check_rx: one call
        except RingCorrupt as exc:
            self._corrupt(exc, where)
            return 0

    def _corrupt(self, exc: RingCorrupt, where: str) -> ChannelClosed:
        """A header word or descriptor broke a rule: close every channel of the device once,
        with reason ``corrupt: <what> (<ring> of <channel>, <where>)``; the error for the
        caller that saw it. Never called holding ``_tx_lock`` (the teardown may need it)."""
        located = exc.located(f"channel {self.name} relid {self.relid}, {where}")
        reason = f"corrupt: {located.detail}"
        disp = self._disp
        if disp is None:
            return ChannelClosed(self.name, reason)
        if disp.request_close(reason):
            self.last_error = located
            if self.parent is not None:
                self.parent.last_error = located
            _log.warning("channel %s: %s", self.name, reason)
            disp.finish_close(0.0)  # the lead's holder finishes it if this thread cannot
        return ChannelClosed(self.name, disp.reason or reason)

    # -- sending -----------------------------------------------------------------------------

    def new_txid(self) -> int:
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
        tx = self.tx_ring
        if tx is None or not self._lc.policy.may_send:
            raise self.not_open("send")
        if transaction_id is None:
            transaction_id = self.new_txid()
        flags = 1 if completion_requested else 0
        needed = self.write_packet(tx, payload, packet_type, flags, transaction_id, 0)
        if needed:
            self._send_when_room(tx, payload, packet_type, flags, transaction_id, needed,
                                 self.send_timeout if timeout is None else timeout)
        return transaction_id

    def write_packet(self, tx: RingBuffer, payload: Payload, packet_type: int, flags: int, txid: int,
               pending: int, defer: bool = False) -> int:
        """Write now (signal if the ring engine says so); 0, or the bytes needed when full.

        ``pending``: first ask the host to interrupt once that much is free (a blocked
        writer), then try: the host may have freed the room before it saw the request.
        ``defer``: do not signal now, set ``signal_due`` for :meth:`flush_signal` (the
        asyncio face signals once per loop turn for all the packets written in it).
        """
        if self.deferred:  # the asyncio requests of this turn go first, in order
            self.write_deferred()
        check = self._check
        with self._tx_lock:
            tap = self._tap
            try:
                if check is not None:
                    check.check_tx()  # every TX word, before we write where it says
                if pending and not self.polled:
                    # (A polled subchannel never asks: the host's "room now" interrupt on it
                    # would oops a crash-window kernel; its dispatcher polls anyway.)
                    tx.set_pending_send_size(pending)
                    if check is not None:
                        check.note_tx()
                if tap is None:
                    signal = tx.write(payload, packet_type, flags, txid)
                else:
                    signal = tap.write(tx, payload, packet_type, flags, txid)
            except RingFull as full:
                return full.needed
            except RingCorrupt as exc:
                bad: RingCorrupt | None = exc
            else:
                bad = None
                if check is not None:
                    check.note_tx()
                counters = self.counters  # under the lock: senders on several threads
                counters.packets_out += 1
                counters.bytes_out += len(payload) if payload.__class__ is bytes else _nbytes(payload)
        if bad is not None:
            raise self._corrupt(bad.in_ring("tx ring"), "in flow control" if pending else "in a send")
        if signal:
            if defer:
                self.signal_due = True
            else:
                sig = self._signal
                if sig is not None:
                    try:
                        sig.signal()
                    except DeviceRescinded as exc:  # HostCrashed too
                        self._device_lost(exc)
                        raise
        return 0

    def flush_signal(self) -> None:
        """Send the signal a deferred write owes the host (a later write may have sent it)."""
        if self.signal_due:
            self.signal_due = False
            sig = self._signal
            if sig is not None and self.tx_ring is not None:
                with contextlib.suppress(VmbusError):  # closed meanwhile: the dispatcher says why
                    sig.signal()

    @contextlib.contextmanager
    def waiting_for_room(self, tx: RingBuffer) -> Iterator[None]:
        """Count a writer waiting for room; the last one to leave clears pending_send_size."""
        with self._tx_lock:
            self.counters.ring_full_waits += 1
            self._blocked_senders += 1
        try:
            yield
        finally:
            with self._tx_lock:
                self._blocked_senders -= 1
                if not self._blocked_senders and self.tx_ring is tx:
                    tx.clear_pending_send_size()
                    check = self._check
                    if check is not None:
                        check.note_tx()

    def _send_when_room(self, tx: RingBuffer, payload: Payload, packet_type: int, flags: int,
                        txid: int, needed: int, timeout: float) -> None:
        disp = self._disp
        policy = self._lc.policy
        if disp is None or not policy.may_wait:
            if not policy.may_send:
                # disable() or a rescind on another thread closed the channel since send()
                # checked the state: that, not the ring, is why this packet cannot go out.
                raise self.not_open("send")
            raise RingFull(needed, tx.available_to_write())  # on_started, which must not wait
        deadline = time.monotonic() + timeout
        with self.waiting_for_room(tx):
            while True:
                if disp.stopping:  # before the write: nothing goes out once closing began
                    raise self.not_open("send")
                needed = self.write_packet(tx, payload, packet_type, flags, txid, needed)
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
        tx = self.tx_ring
        if tx is None or not self._lc.policy.may_send:
            raise self.not_open("send")
        flags = 1 if completion_requested else 0
        if self.deferred:  # the asyncio requests of this turn go first, in order
            self.write_deferred()
        txids = [self.new_txid() for _ in payloads]
        specs = [(p, packet_type, flags, t) for p, t in zip(payloads, txids, strict=True)]
        signal = self._write_specs(tx, specs, (RingFull,))
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

    # For send_request and the asyncio driver: the request table.

    def register_request(self, callback: Callable[[Request], None] | None = None) -> Request:
        """A new outstanding request under a fresh transaction id (not sent yet)."""
        req = Request(self.new_txid(), callback)
        self._pending[req.txid] = req
        return req

    def begin_request(self, payload: Payload, callback: Callable[[Request], None],
                      waiter: Any) -> tuple[Request, int]:
        """For the asyncio driver, one call per request: register it and queue its packet
        for :meth:`write_deferred` at the end of the loop turn.

        The packets of a turn then go out with one header check, one index update and
        one signal decision (a write each was ~1 us of Python per request), still in
        order and before any other packet of the channel (every write writes the queue
        first). (request, 0) once queued; (request, -1) when the channel cannot send:
        the caller goes through the waiting send, which raises as it always did.
        :meth:`not_open` if the channel cannot wait for a completion. Loop thread only.
        """
        if not self._lc.policy.may_wait:
            raise self.not_open("send a request on")
        req = Request(self.new_txid(), callback, waiter)
        self._pending[req.txid] = req
        if self.tx_ring is None or not self._lc.policy.may_send:
            return req, -1
        if not self.deferred:
            self._defer_thread = threading.get_ident()
        self.deferred.append(req)
        self._deferred_specs.append((payload, PacketType.DATA_INBAND, 1, req.txid))
        return req, 0

    def write_deferred(self) -> None:
        """Write the packets :meth:`begin_request` queued, in order; the signal is left
        due for :meth:`flush_signal`. On the queuing thread only (elsewhere: nothing).

        All of them with one ``write_batch`` when they fit; else one by one, and from
        the first that does not fit (or if the channel closed meanwhile) each request's
        callback runs with ``done`` False: its requester waits for room and writes it
        itself, as a send does. A payload the ring refuses (ValueError, TypeError) fails
        only its own request; a corrupt ring closes the channel (every request fails).
        """
        reqs = self.deferred
        if not reqs or threading.get_ident() != self._defer_thread:
            return
        specs = self._deferred_specs
        self.deferred = []
        self._deferred_specs = []
        tx = self.tx_ring
        if tx is None or not self._lc.policy.may_send:
            self._hand_back(reqs, 0)
            return
        try:
            signal = self._write_specs(tx, specs, (RingFull, ValueError, TypeError))
        except ChannelClosed:
            return  # a corrupt ring closed the channel: every request failed with it
        if signal is None:
            self._write_one_by_one(tx, reqs, specs)
            return
        if signal:
            self.signal_due = True
        with self._req_lock:
            self.counters.requests += len(reqs)

    def _write_specs(self, tx: RingBuffer, specs: list[tuple[Payload, int, int, int]],
                     refused: tuple[type[Exception], ...]) -> bool | None:
        """One checked ``write_batch`` of ``specs`` under the TX writers' lock (check every
        TX word, write, note, count): the signal decision, or None when the ring refused
        the batch with one of ``refused`` (nothing written; RingFull at least, and what
        else the caller then writes packet by packet). A corrupt ring closes the channel:
        :class:`ChannelClosed` (raised after the lock is let go: the teardown may need it)."""
        check = self._check
        with self._tx_lock:
            tap = self._tap
            try:
                if check is not None:
                    check.check_tx()
                signal = tx.write_batch(specs) if tap is None else tap.write_batch(tx, specs)
            except refused:
                return None
            except RingCorrupt as exc:
                bad = exc
            else:
                if check is not None:
                    check.note_tx()
                nbytes = 0
                for spec in specs:
                    payload = spec[0]
                    nbytes += len(payload) if payload.__class__ is bytes else _nbytes(payload)
                counters = self.counters
                counters.packets_out += len(specs)
                counters.bytes_out += nbytes
                return signal
        raise self._corrupt(bad.in_ring("tx ring"), "in a send")

    def _write_one_by_one(self, tx: RingBuffer, reqs: list[Request],
                          specs: list[tuple[Payload, int, int, int]]) -> None:
        for i, (req, spec) in enumerate(zip(reqs, specs, strict=True)):
            try:
                needed = self.write_packet(tx, spec[0], spec[1], spec[2], spec[3], 0, defer=True)
            except (ValueError, TypeError) as exc:
                with self._req_lock:
                    if self._pending.pop(req.txid, None) is None:
                        continue  # cancelled or failed meanwhile
                    req.error = exc
                    req.done = True
                if req.callback is not None:
                    req.callback(req)
                continue
            except VmbusError:  # the channel closed (a corrupt ring): the close failed them
                self._hand_back(reqs, i + 1)
                return
            if needed:
                self._hand_back(reqs, i)
                return
            with self._req_lock:
                self.counters.requests += 1

    def _hand_back(self, reqs: list[Request], start: int) -> None:
        for req in reqs[start:]:
            if not req.done and req.callback is not None:
                req.callback(req)  # done False: write it yourself (see Request)

    def forget_request(self, req: Request) -> None:
        """Drop a request whose packet never went out (the send raised)."""
        with self._req_lock:
            self._pending.pop(req.txid, None)

    def count_request(self) -> None:
        """Count a request whose packet reached the ring."""
        with self._req_lock:
            self.counters.requests += 1

    def cancel_request(self, req: Request) -> bool:
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
            raise self.not_open("send a request on")
        t = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        # Register, write (waiting for room as send() does), count; forget the request if
        # the write raised. send(), register_request() and count_request() inlined: three
        # frames less per request (each ~0.3 us on an interpreter that every request's
        # switch to the host's process leaves cold).
        req = Request(self.new_txid())
        self._pending[req.txid] = req
        try:
            tx = self.tx_ring
            if tx is None or not self._lc.policy.may_send:
                raise self.not_open("send")
            needed = self.write_packet(tx, payload, PacketType.DATA_INBAND, 1, req.txid, 0)
            if needed:
                self._send_when_room(tx, payload, PacketType.DATA_INBAND, 1, req.txid, needed, t)
        except BaseException:
            self.forget_request(req)
            raise
        with self._req_lock:
            self.counters.requests += 1
        if not req.done:
            disp = self._disp
            assert disp is not None
            # One cycle led by this thread usually finds the completion; wait_for (its
            # loop, predicate calls and clock reads) only when it did not, or another
            # thread leads. The remaining time is ~t here unless the write waited for room.
            if needed or disp.lead_cycle(t) is None or not req.done:
                disp.wait_for(req.is_done, deadline)
        if not req.done and self.cancel_request(req):
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
            raise self.not_open("open subchannels of")
        info = Sysfs(self.root).device(self.guid)
        deadline = time.monotonic() + timeout
        new: list[Channel] = []
        while True:
            known = {self.relid, *(s.relid for s in self._subs)}
            for chan in info.channels():
                if chan.relid in known:
                    continue
                ring = chan.ring_path
                size = _subchannel_ring_bytes(chan)
                if ring is None or size is None:
                    continue
                try:
                    # Sized from the channel, never from st_size: before 65995e97a1ca the
                    # file claims a fixed 4 MiB and an mmap beyond the real ring is EINVAL.
                    arr = dev.map_ring_file(ring, size)
                except (FileNotFoundError, ChannelClosed):
                    continue  # not there yet, or the kernel has not opened it yet (ENODEV)
                new.append(self._attach_subchannel(chan, arr))
            if count is None or len(self._subs) >= count:
                return new
            if disp.stopping:
                raise self.not_open("open subchannels of")
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
        started_unmasked = rx.interrupt_mask == 0
        rx.interrupt_mask = 1  # masked at once: until the verdict, and for good when polled
        sub._signal = HostSignal.for_channel(
            relid, sub.monitor_id, int_page=_opt_map(dev, "int_page"),
            monitor_page=_opt_map(dev, "monitor_page"), write_one=disp.guard.write_one, subchannel=True)
        sub.tx_ring, sub.rx_ring, sub._dev, sub._disp = tx, rx, dev, disp
        sub._check = HeaderCheck(tx, rx)
        sub.counters._opened(disp)
        if sub.monitor_id is None:
            self._check_signallable(disp, sub, info)
        if self._capture is not None:
            sub._start_tap(self._capture)
        sub.polled, sub._polled_reason = self._subchannel_mode(disp, sub)
        if sub.polled and started_unmasked and not disp.subchannel_irqs_safe:
            _warn_once(f"{self.guid}/unmasked", (
                f"channel {self.guid}: subchannel relid {relid} was UNMASKED when pyvmbus mapped it, on a "
                "kernel whose interrupt callback oopses on a subchannel interrupt (b15b7 without d062463, "
                "or OpenHCL): a host packet on it before that moment would have crashed the guest. "
                "Requesting subchannels on this kernel risks the VM; update to a kernel with d062463 "
                "(6.15+, 6.12.y from Nov 2025) or the Dec 2025 5.4-6.6 backport"))
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

    def _check_signallable(self, disp: Dispatcher, sub: Channel, info: ChannelInfo) -> None:
        """A non-monitored subchannel needs the kernel to signal the host for it (SPEC rule 7).

        Userspace cannot make the HvSignalEvent hypercall; only a d062463 kernel's write of
        1 signals a non-monitored subchannel. Rule 6's probe tells whether a write reaches
        subchannels at all; the channel's ``events`` count (the kernel's sig_events, read
        live from sysfs) tells whether the write signalled, which tells d062463 from the
        Dec 2025 5.4-6.6 backport (masks only). Anything else: refuse, rather than let the
        subchannel's requests reach a host that is never told.
        """
        where = ("kernels with d062463 (\"uio_hv_generic: Set event for all channels on the device\"): "
                 "upstream 6.15 and later (inferred) and 6.12.y from the Nov 2025 stable release")
        what = f"open non-monitored subchannel relid {sub.relid}"
        covers = disp.subchannel_interrupts_safe(self, sub)
        if not covers:
            raise UnsupportedKernel(str(self.guid), what, (
                "it has no monitor id, userspace cannot make the HvSignalEvent hypercall, and on "
                "this kernel a write of 1 to the uio fd signals the primary only (<= 6.14 before "
                "d062463, 6.12.y before Nov 2025, OpenHCL) or nothing (5.4-6.6): its sends would "
                "reach a host that is never told"), where)
        before = info.events
        disp.guard.write_one()
        after = info.events
        if sub.rx_ring is not None:
            sub.rx_ring.interrupt_mask = 1  # the write cleared it; add() decides
        disp.kick()
        if before is None or after is None or after <= before:
            raise UnsupportedKernel(str(self.guid), what, (
                "it has no monitor id, userspace cannot make the HvSignalEvent hypercall, and a "
                "write of 1 to the uio fd reached the subchannel's mask but did not signal the host "
                f"(its sysfs events count stayed at {before}): the 5.4-6.6 LTS backport of Dec 2025 "
                "masks subchannels but never signals"), where)

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

    def request(self, payload: Payload, timeout: float | None = None) -> Coroutine[Any, Any, bytes]:
        """``await channel.request(payload)``: send_request without blocking the loop.

        The coroutine of :func:`pyvmbus.aio.request` itself (not a coroutine around it:
        one frame less on every resume of a pipelined request)."""
        return _aio_request()(self, payload, timeout)

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
            "polled": self.polled,
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
        for key, ring in (("tx", self.tx_ring), ("rx", self.rx_ring)):
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
        if subs:
            polled = subs[-1].polled
            return {"mode": "polled" if polled else "interrupts", "reason": subs[-1]._polled_reason}
        if self.poll_subchannels is not None:
            return {"mode": "polled" if self.poll_subchannels else "interrupts",
                    "reason": f"poll_subchannels={self.poll_subchannels}"}
        return {"mode": "undecided", "reason": "decided when the first subchannel is mapped: "
                "does a write of 1 clear its mask? (SPEC.md rule 6; the mask the kernel left on the "
                "primary says nothing about subchannels)"}

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
        elif self.polled:
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


def _subchannel_ring_bytes(chan: ChannelInfo) -> int | None:
    """TX + RX bytes of a new subchannel's ring pair, from the channel itself.

    The outbound ring of a subchannel nobody has written to is empty, so its sysfs
    ``write_avail`` is the kernel's ring_datasize (ring size minus the one-page header).
    None while the kernel has not set the ring up yet.
    """
    free = chan.write_avail
    if free is None or free <= 0:
        return None
    return 2 * (free + PAGE_SIZE)


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
