"""``vmbus enable`` and ``vmbus demo``: run one channel in the foreground and show what happens.

:func:`run_enable` reserves the device (:mod:`pyvmbus.devlock`: another ``vmbus enable``
or program using it is refused, and none can slip in between this one's bind and its
open), binds it to uio_hv_generic if it is not bound yet, enables a
:class:`~pyvmbus.channel.Channel` with callbacks that print each lifecycle event and each
packet, optionally sends packets from on_post_started, and runs until Ctrl-C / SIGTERM,
``count`` packets or ``timeout`` seconds. On the way out it always disables the channel
and, if it did the binding, gives the device back to the driver it had; SIGINT and
SIGTERM only set a flag, so a second Ctrl-C cannot interrupt that restore half-way.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import devlock
from ..errors import (
    ChannelClosed,
    DeviceNotFound,
    DeviceRescinded,
    HostCrashed,
    Timeout,
    VmbusError,
)
from ..lifecycle import ChannelState
from ..sysfs import UIO_DRIVER
from .errors import PayloadTooLarge
from .output import Output, packet_event
from .params import max_payload, read_payload

if TYPE_CHECKING:
    from ..bus import Vmbus
    from ..channel import Channel
    from ..packet import Packet
    from ..sysfs import VmbusDevice

__all__ = [
    "DEMO_SENDS",
    "EnableOptions",
    "SendSpec",
    "StopFlag",
    "parse_send",
    "run_demo",
    "run_enable",
    "stop_on_signals",
]


@dataclass(frozen=True)
class SendSpec:
    """One packet to send from on_post_started: as a request (wait for the completion) or not."""

    payload: bytes
    wait: bool = True


DEMO_SENDS: tuple[SendSpec, ...] = (
    SendSpec(b"hello, vmbus"),
    SendSpec(b"ping 1"),
    SendSpec(b"ping 2"),
    SendSpec(b"in-band, no completion", wait=False),
)
"""What ``vmbus demo`` sends to the echo device: three requests and one plain in-band packet."""


@dataclass
class EnableOptions:
    """What ``vmbus enable`` was asked to do."""

    count: int | None = None
    """Stop after this many packets (on_packet deliveries plus replies to sends)."""
    timeout: float | None = None
    """Stop after this many seconds (with ``count``: fail if fewer packets came)."""
    sends: tuple[SendSpec, ...] = ()
    reply_timeout: float = 5.0
    force: bool = False
    bind_timeout: float = 10.0
    capture: str | None = None
    """Record the session into this pcapng file (pyvmbus.capture)."""


def parse_send(text: str) -> bytes:
    """``--send`` value: hex digits (spaces, ``:`` and a ``0x`` prefix allowed) or ``@FILE``;
    at most the largest VMBus payload (:func:`pyvmbus.cli.params.read_payload`)."""
    return read_payload(text)


@dataclass
class StopFlag:
    """Set once, with the reason the run stops (the first reason wins)."""

    event: threading.Event = field(default_factory=threading.Event)
    why: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self, why: str) -> None:
        with self._lock:
            if self.why is None:
                self.why = why
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self.event.wait(timeout)


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag | Callable[[str], object]) -> Iterator[None]:
    """SIGINT and SIGTERM stop ``flag`` (a :class:`StopFlag`, or any ``stop(why)``
    function; reason: the signal's name) instead of raising, so the command cleans up in
    order and a second Ctrl-C only repeats the request.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = flag.stop if isinstance(flag, StopFlag) else flag

    def handler(signum: int, frame: object) -> None:
        stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Run:
    """The callbacks and counters of one enable run."""

    def __init__(self, dev: VmbusDevice, opts: EnableOptions, out: Output, flag: StopFlag,
                 start: float | None = None) -> None:
        self.guid = str(dev.guid)
        self.opts = opts
        self.out = out
        self.flag = flag
        self.start = time.monotonic() if start is None else start
        self.packets = 0
        self.replies = 0
        self.closed_reason: str | None = None
        self.deadline: float | None = None
        """When --timeout ends the run: counted from the channel's open, so the sends from
        on_post_started are bounded by it too."""
        self._lock = threading.Lock()

    def ev(self, kind: str, **fields: Any) -> None:
        self.out.event({"event": kind, "t": round(time.monotonic() - self.start, 3), "device": self.guid,
                        **fields})

    def _received(self, replies: int = 0) -> None:
        with self._lock:
            self.packets += 1
            self.replies += replies
            done = self.opts.count is not None and self.packets >= self.opts.count
        if done:
            self.flag.stop("count")

    # -- callbacks (on_opened ... run on the enabling thread, the rest on the dispatcher's) --
    def opened(self, ch: Channel) -> None:
        if self.opts.timeout is not None:
            self.deadline = time.monotonic() + self.opts.timeout
        self.ev("opened", relid=ch.relid, monitor_id=ch.monitor_id)
        # Refuse, before the first byte goes out, a payload this ring can never take (the
        # ring size is known only now: it depends on the kernel and the device class).
        tx = ch.tx_ring
        if tx is not None:
            limit = max_payload(tx.data_size)
            for spec in self.opts.sends:
                if len(spec.payload) > limit:
                    raise PayloadTooLarge(self.guid, len(spec.payload), limit, tx.data_size)

    def started(self, ch: Channel) -> None:
        self.ev("started")

    def post_started(self, ch: Channel) -> None:
        self.ev("post_started")
        for spec in self.opts.sends:
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                self.flag.stop("timeout")
            if self.flag.is_set():
                break
            if spec.wait:
                self.ev("sent", length=len(spec.payload), transaction_id=None, completion_requested=True)
                wait = self.opts.reply_timeout if left is None else min(self.opts.reply_timeout, left)
                try:
                    reply = ch.send_request(spec.payload, timeout=wait)
                except Timeout:
                    if wait >= self.opts.reply_timeout:
                        raise  # --reply-timeout passed: the device did not answer
                    self.flag.stop("timeout")  # --timeout came first: the run ends, as asked
                    break
                self.ev("reply", request_length=len(spec.payload), length=len(reply),
                        payload_hex=reply[:self.out.preview].hex())
                self._received(replies=1)
            else:
                txid = ch.send(spec.payload)
                self.ev("sent", length=len(spec.payload), transaction_id=txid, completion_requested=False)

    def packet(self, ch: Channel, pkt: Packet) -> None:
        ev = packet_event(self.guid, pkt, self.out.preview)
        ev["t"] = round(time.monotonic() - self.start, 3)
        self.out.event(ev)
        self._received()

    def processing_complete(self, ch: Channel, count: int) -> None:
        self.ev("processing_complete", count=count)

    def closed(self, ch: Channel, reason: str) -> None:
        self.ev("closed", reason=reason)
        if reason != "disabled":
            self.closed_reason = reason
            self.flag.stop("closed")


def _host_error(guid: str, ch: Channel, reason: str) -> VmbusError:
    err = ch.last_error
    if isinstance(err, VmbusError):
        return err
    if reason.startswith("host crashed"):
        return HostCrashed(guid, reason.removeprefix("host crashed").lstrip(": "))
    if reason == "rescinded":
        return DeviceRescinded(guid, "while 'vmbus enable' ran")
    return ChannelClosed(guid, reason)


def run_enable(bus: Vmbus, dev: VmbusDevice, opts: EnableOptions, out: Output,
               flag: StopFlag | None = None, start: float | None = None) -> None:
    """Bind if needed, enable, print, wait for the end, disable, restore (see the module doc).

    Raises what went wrong (after cleaning up): :class:`DeviceBusy` when another process
    uses the device, the enable's error, a host-side close (:class:`DeviceRescinded`,
    :class:`HostCrashed`, :class:`RingCorrupt`...), or :class:`Timeout` when ``count``
    packets did not come within ``timeout``.
    """
    flag = flag or StopFlag()
    run = _Run(dev, opts, out, flag, start)
    guid = run.guid
    out.on_broken = lambda: flag.stop("output closed")
    with stop_on_signals(flag), devlock.reserve(bus.root, guid, wait=opts.bind_timeout, action="enable"):
        previous = bus.device(guid).driver  # read again under the reservation
        bound_here = False
        if previous != UIO_DRIVER:
            uio = bus.bind(guid, force=opts.force, timeout=opts.bind_timeout)
            bound_here = True
            run.ev("bound", uio=uio, previous_driver=previous)
        ch = bus.channel(guid) if opts.capture is None else bus.channel(guid, capture=opts.capture)
        ch.on_opened(run.opened)
        ch.on_started(run.started)
        ch.on_post_started(run.post_started)
        ch.on_packet(run.packet)
        ch.on_processing_complete(run.processing_complete)
        ch.on_closed(run.closed)
        failure: BaseException | None = None
        try:
            ch.enable()
            deadline = run.deadline
            while not flag.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    flag.stop("timeout")
                    break
                flag.wait(0.25 if left is None else min(0.25, left))
        except BaseException as exc:
            failure = exc
            flag.stop("error")
        finally:
            if ch.state is not ChannelState.DISABLED:
                with contextlib.suppress(VmbusError):
                    ch.disable()
            ch.stop_capture()
            if bound_here:
                _restore(bus, run, failure or run.closed_reason)
        run.ev("stopped", why=flag.why or "error", packets=run.packets, replies=run.replies)
        if failure is not None:
            raise failure
        if run.closed_reason is not None:
            raise _host_error(guid, ch, run.closed_reason)
        if flag.why == "timeout" and opts.count is not None and run.packets < opts.count:
            raise Timeout(f"{opts.count} packets from {guid} (got {run.packets}; try a longer --timeout "
                          "or a smaller --count)", opts.timeout or 0.0)


def _restore(bus: Vmbus, run: _Run, failure: BaseException | str | None) -> None:
    """Give the device back; when something already failed, a failed restore is only a note."""
    if isinstance(failure, str) and failure.startswith("host crashed"):
        run.ev("note", message=f"the host is gone, so the driver cannot be restored now; run "
               f"'vmbus restore {run.guid}' once it is back")
        return
    try:
        driver = bus.restore(run.guid, timeout=run.opts.bind_timeout)
    except (DeviceNotFound, DeviceRescinded):
        run.ev("note", message="the device is gone (rescinded); nothing to restore")
        return
    except VmbusError as exc:
        if failure is not None:
            run.ev("note", message=f"restoring the previous driver failed too: {exc}; "
                   f"run 'vmbus restore {run.guid}'")
            return
        raise
    run.ev("restored", driver=driver)


def run_demo(kernel: str, out: Output) -> None:
    """Start a mock bus with an echo device and run :func:`run_enable` on it with a few sends."""
    from ..bus import Vmbus
    from ..mock import MockVmbus

    t0 = time.monotonic()
    with MockVmbus(kernel=kernel, devices=["echo"]) as mock:
        bus = Vmbus(mock.root)
        dev = bus.devices()[0]
        out.emit({"event": "demo", "t": round(time.monotonic() - t0, 3), "root": str(mock.root),
                  "kernel": mock.generation.name, "device": str(dev.guid)},
                 f"pyvmbus demo: a mock VMBus (kernel generation {mock.generation.name}) runs under\n"
                 f"  {mock.root}\n"
                 f"with one 'echo' device {dev.guid}. Its mock host answers a request with a\n"
                 "completion carrying the same bytes and echoes any other packet back.\n"
                 "This runs 'vmbus enable echo' with three requests and one plain packet:\n")
        opts = EnableOptions(count=len(DEMO_SENDS), timeout=15.0, sends=DEMO_SENDS)
        run_enable(bus, dev, opts, out, start=t0)
        out.echo("\nThat is the whole path: bind to uio_hv_generic, open the node, map the rings, "
                 "signal the host,\nreceive, disable, give the device back. Next: 'vmbus --mock list', "
                 "'vmbus --mock show echo',\n'vmbus mock serve' for your own programs, and "
                 "docs/quickstart.md for a real Hyper-V guest.")
