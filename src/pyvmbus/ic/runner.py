"""Run an integration service over a :class:`~pyvmbus.channel.Channel`: the I/O half of pyvmbus.ic.

The services in this package are sans-I/O (``handle(request) -> response | None``); this
module moves their bytes the way every Linux util handler does (drivers/hv/hv_util.c):

- each in-band packet's payload goes to ``service.handle``; the answer goes back in-band
  with the request's VMBus transaction id and no completion requested;
- ``service.run_pending()`` (power off, set the clock, user callbacks) runs only after that
  send, so the host has its answer before anything drastic happens. An action that raises
  is logged and reported (``action_failed``); it never closes the channel;
- on every close ``service.close()`` runs (fcopy removes a partial file).

Around that loop the runner owns the device: it binds it to uio_hv_generic if needed
(``bind=True``) and gives it back to its previous driver on the way out; it survives a
rescind by waiting for the host to offer the device again, binding it again if the
re-offer brought the kernel driver back, and re-enabling (the host renegotiates). It
reserves the device (:mod:`pyvmbus.devlock`) from before the first bind until after the
restore, across rescinds too, so no other process can take it in between
(:class:`~pyvmbus.errors.DeviceBusy` for that one, or for this runner if it came second).

Dispatch runs on the runner's own thread (``dispatch="caller"``: a loop of
:meth:`Channel.poll`), so the service, its actions and ``on_event`` all run on the thread
that called :meth:`IcRunner.run`, and stopping (``stop_event``, :meth:`IcRunner.stop`, the
``until`` predicate) is noticed after the current dispatch cycle, at most ``poll_slice``
seconds later when idle. Nothing is logged or allocated per packet beyond what the
protocol needs; events are per lifecycle step, negotiation and service callback.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import devlock
from ..bus import Vmbus
from ..errors import (
    AlreadyBound,
    BindFailed,
    ChannelClosed,
    DeviceNotFound,
    DeviceRescinded,
    HostCrashed,
    InvalidState,
    RingCorrupt,
    Timeout,
    VmbusError,
)
from ..lifecycle import ChannelState
from ..packet import Packet, PacketType
from ..sysfs import UIO_DRIVER
from .framework import IcService
from .messages import version_str

if TYPE_CHECKING:
    from ..channel import Channel

__all__ = ["IcRunner", "RunResult", "RunnerEvent", "run_service"]

log = logging.getLogger("pyvmbus.ic.runner")

_RETRY = 0.2
"""Seconds between looks for a re-offered device."""
_RETRYABLE = (DeviceNotFound, DeviceRescinded, ChannelClosed, BindFailed, Timeout, InvalidState,
              AlreadyBound, ConnectionError)
"""What binding / enabling may raise while the host is still re-offering a device (an open
that races the removal of the old node can also fail with a bare ECONNRESET on the mock)."""
_INBAND = int(PacketType.DATA_INBAND)
"""ICs speak in-band only (a plain int: the per-packet compare is one op)."""
_REOPEN_TIMEOUT = 2.0
"""Seconds one enable may take while waiting for a re-offer (a node open is instant on a
kernel; a node that vanishes meanwhile must not hold the wait up)."""


@dataclass(frozen=True, slots=True)
class RunnerEvent:
    """One thing that happened to the runner (passed to ``on_event``).

    ``kind``: ``bound`` (uio, previous_driver), ``enabled`` (relid, attempt),
    ``negotiated`` (framework, service), ``negotiation_failed``, ``closed`` (reason),
    ``waiting`` (for a re-offer), ``action_failed`` (error), ``restored`` (driver),
    ``note`` (message), ``stopped`` (why).
    """

    kind: str
    device: str
    t: float
    """Seconds since the runner started."""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A flat dict: ``event``, ``t``, ``device`` and the data (for JSON lines)."""
        return {"event": self.kind, "t": round(self.t, 3), "device": self.device, **self.data}

    def __str__(self) -> str:
        rest = " ".join(f"{k}={v}" for k, v in self.data.items())
        return f"{self.kind} {self.device}" + (f" {rest}" if rest else "")


@dataclass(slots=True)
class RunResult:
    """What a run did (returned by :meth:`IcRunner.run`)."""

    device: str
    why: str = ""
    """``stopped`` (stop_event / stop(); or the reason given to stop()), ``timeout``,
    ``until`` (the predicate held), ``error`` (run() raised)."""
    enables: int = 0
    rescinds: int = 0
    packets: int = 0
    """In-band packets handed to the service."""
    answered: int = 0
    unanswered: int = 0
    """Packets the service gave no answer to (the kernel drops them too)."""
    ignored: int = 0
    """Packets of other types (ICs speak in-band only)."""
    action_errors: int = 0
    bound_here: bool = False
    restored_driver: str | None = None
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class IcRunner:
    """Serves one IC device with one service until stopped (see the module docstring).

    ``bus_or_root``: a :class:`~pyvmbus.Vmbus` or a root path. ``device``: an instance
    GUID, unique prefix or class name. ``bind``: bind to uio_hv_generic when the device is
    on another driver (or none), and restore that driver at the end; False: the device
    must already be bound (after a re-offer the runner waits until someone binds it).
    ``force``: passed to the binding's guard rails. ``reoffer_timeout``: seconds to wait
    for a rescinded device to come back (None: until stopped; then
    :class:`DeviceRescinded`). ``on_event(RunnerEvent)`` runs on the runner's thread.
    """

    def __init__(self, bus_or_root: Vmbus | str | os.PathLike[str], device: str, service: IcService, *,
                 bind: bool = True, force: bool = False, stop_event: threading.Event | None = None,
                 on_event: Callable[[RunnerEvent], object] | None = None,
                 until: Callable[[], bool] | None = None, reoffer_timeout: float | None = None,
                 bind_timeout: float = 10.0, poll_slice: float = 0.25) -> None:
        self.bus = bus_or_root if isinstance(bus_or_root, Vmbus) else Vmbus(Path(bus_or_root))
        self.query = device
        self.service = service
        self.bind = bind
        self.force = force
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.on_event = on_event
        self.until = until
        self.reoffer_timeout = reoffer_timeout
        self.bind_timeout = bind_timeout
        self.poll_slice = poll_slice
        self.guid = ""
        self.channel: Channel | None = None
        self.result = RunResult(device=device)
        self._start = time.monotonic()
        self._why = ""
        self._negotiations = service.stats.negotiations
        self._stats = service.stats
        self._deferred = service.deferred  # the service's deferred actions: true when some wait
        # answer(): a fresh bytearray, sent as it is (no copy to bytes). A subclass that
        # overrides handle() (an older service) keeps being called through it.
        self._answer: Callable[[bytes], bytes | bytearray | None] = (
            service.answer if type(service).handle is IcService.handle else service.handle)
        self._closed_reason: str | None = None

    # -- control -----------------------------------------------------------------------------

    def stop(self, why: str = "stopped") -> None:
        """Ask the run to end (thread-safe; from a callback it ends after the current cycle)."""
        if not self._why:
            self._why = why
        self.stop_event.set()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def _emit(self, kind: str, **data: Any) -> None:
        ev = RunnerEvent(kind, self.guid or self.query, time.monotonic() - self._start, data)
        if kind in ("closed", "waiting", "action_failed", "negotiation_failed"):
            log.warning("%s", ev)
        else:
            log.info("%s", ev)
        cb = self.on_event
        if cb is not None:
            try:
                cb(ev)
            except Exception:  # an observer must not take the service down
                log.exception("on_event raised on %s", ev)

    # -- the run -----------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> RunResult:
        """Bind if needed, enable, serve until stopped / ``timeout`` / ``until()``; clean up.

        Returns the :class:`RunResult`. Raises what made serving impossible, after the
        cleanup: errors of the first bind / enable (:class:`DeviceNotFound`,
        :class:`NotPermitted`, :class:`DriverNotLoaded`, ...), a host crash, a corrupt
        ring or a channel closed by an error (:class:`HostCrashed`, :class:`RingCorrupt`,
        :class:`ChannelClosed`), or :class:`DeviceRescinded` when a re-offer did not come
        within ``reoffer_timeout``.
        """
        self._start = time.monotonic()
        deadline = None if timeout is None else self._start + timeout
        failure: BaseException | None = None
        reservation: devlock.DeviceLock | None = None
        try:
            self.guid = str(self.bus.device(self.query).guid)
            self.result.device = self.guid
            reservation = devlock.reserve(self.bus.root, self.guid, wait=self.bind_timeout,
                                          action=f"serve {self.service.service_name or 'it'}")
            self._open()
            self._serve(deadline)
        except BaseException as exc:
            failure = exc
            if not self._why:
                self._why = "error"
        finally:
            try:
                self._shutdown(failure)
            finally:
                if reservation is not None:
                    reservation.release()
        self.result.why = self._why or "stopped"
        self.result.elapsed = time.monotonic() - self._start
        self._emit("stopped", why=self.result.why, packets=self.result.packets,
                   answered=self.result.answered)
        if failure is not None:
            raise failure
        return self.result

    def _serve(self, deadline: float | None) -> None:
        while True:
            ch = self.channel
            assert ch is not None
            while ch.state is not ChannelState.DISABLED:
                if self._check_stop(deadline):
                    return
                left = self.poll_slice if deadline is None else min(self.poll_slice,
                                                                    deadline - time.monotonic())
                ch.poll(max(0.0, left))
            reason = self._closed_reason or ch.close_reason or "closed"
            err = ch.last_error
            rescinded = reason == "rescinded" or (
                isinstance(err, DeviceRescinded) and not isinstance(err, HostCrashed))
            if not rescinded:
                raise self._close_error(ch, reason)
            self.result.rescinds += 1
            if not self._wait_reoffer(deadline):
                return

    def _check_stop(self, deadline: float | None) -> bool:
        if self.stop_event.is_set():
            return True
        if self.until is not None and self.until():
            self.stop("until")
            return True
        if deadline is not None and time.monotonic() >= deadline:
            self.stop("timeout")
            return True
        return False

    def _close_error(self, ch: Channel, reason: str) -> VmbusError:
        err = ch.last_error
        if isinstance(err, VmbusError):
            return err
        if reason.startswith("host crashed"):
            return HostCrashed(self.guid, reason)
        if reason.startswith("corrupt"):
            return RingCorrupt("ring", 0, reason)
        return ChannelClosed(self.guid, reason)

    # -- bind / enable -----------------------------------------------------------------------

    def _open(self, enable_timeout: float = 10.0) -> None:
        """Bind (if allowed and needed) and enable a fresh channel."""
        dev = self.bus.device(self.guid)
        if dev.driver != UIO_DRIVER:
            if not self.bind:
                raise InvalidState(self.guid, f"bound to {dev.driver or 'no driver'}", "serve",
                                   f"bind it first ('vmbus bind {self.guid}'), or let the runner bind it")
            previous = dev.driver
            uio = self.bus.bind(self.guid, force=self.force, timeout=self.bind_timeout)
            self.result.bound_here = True
            self._emit("bound", uio=uio, previous_driver=previous)
        ch = self.bus.channel(self.guid, dispatch="caller")
        ch.on_post_started(self._on_post_started)
        ch.on_packet(self._on_packet)
        ch.on_closed(self._on_closed)
        self._closed_reason = None
        self.channel = ch
        ch.enable(timeout=enable_timeout)

    def _wait_reoffer(self, deadline: float | None) -> bool:
        """After a rescind: wait for the device, bind it again if needed, re-enable.

        False when asked to stop first; :class:`DeviceRescinded` after ``reoffer_timeout``.
        """
        self._emit("waiting", what="the host to offer the device again",
                   timeout=self.reoffer_timeout)
        give_up = None if self.reoffer_timeout is None else time.monotonic() + self.reoffer_timeout
        while True:
            if self._check_stop(deadline):
                return False
            try:
                self._open(_REOPEN_TIMEOUT)
                return True
            except _RETRYABLE as exc:
                log.debug("%s not back yet: %s", self.guid, exc)  # or still being registered / probed
            if give_up is not None and time.monotonic() >= give_up:
                raise DeviceRescinded(self.guid, f"the host did not offer it again within "
                                      f"{self.reoffer_timeout:g} s")
            self.stop_event.wait(_RETRY)

    # -- the channel's callbacks (on the runner's thread) ------------------------------------

    def _on_post_started(self, ch: Channel) -> None:
        # Runs before the first packet reaches on_packet, so "enabled" precedes "negotiated".
        self.result.enables += 1
        self._emit("enabled", relid=ch.relid, attempt=self.result.enables)

    def _on_packet(self, ch: Channel, pkt: Packet) -> None:
        # Per packet (fcopy: ~8,500 a 50 MiB copy): one call into the service, one send, the
        # counters, two checks that cost no call (a counter compare and the deferred actions).
        if pkt.type != _INBAND:
            self.result.ignored += 1
            return
        res = self.result
        res.packets += 1
        resp = self._answer(pkt.payload)
        if resp is None:
            res.unanswered += 1
        else:
            try:
                ch.send(resp, transaction_id=pkt.transaction_id)
            except DeviceRescinded as exc:
                if isinstance(exc, HostCrashed):
                    raise
                # The host took the device away under us: the dispatcher's next read or
                # unmask sees the same EIO and closes the channel as "rescinded".
                res.unanswered += 1
                return
            res.answered += 1
        if self._stats.negotiations != self._negotiations:
            self._negotiated()
        if self._deferred:
            self._run_pending()

    def _negotiated(self) -> None:
        svc = self.service
        self._negotiations = svc.stats.negotiations
        if svc.negotiated and svc.framework_version is not None and svc.service_version is not None:
            self._emit("negotiated", service=svc.service_name,
                       framework=version_str(svc.framework_version), version=version_str(svc.service_version))
        else:
            self._emit("negotiation_failed", service=svc.service_name,
                       offered="no version in common with the host; it will send nothing more")

    def _run_pending(self) -> None:
        """Run the service's queued actions; one that raises is reported, the rest still run."""
        svc = self.service
        while True:
            try:
                svc.run_pending()
                return
            except Exception as exc:
                self.result.action_errors += 1
                log.exception("an action of the %s service failed", svc.service_name)
                self._emit("action_failed", error=f"{type(exc).__name__}: {exc}")

    def _on_closed(self, ch: Channel, reason: str) -> None:
        self._closed_reason = reason
        self.service.close()
        if self.service.pending:
            self._run_pending()
        if reason != "disabled":
            self._emit("closed", reason=reason)

    # -- the end -----------------------------------------------------------------------------

    def _shutdown(self, failure: BaseException | None) -> None:
        ch = self.channel
        if ch is not None and ch.state is not ChannelState.DISABLED:
            try:
                ch.disable()
            except VmbusError as exc:
                self._emit("note", message=f"disabling the channel failed: {exc}")
        self.service.close()
        if self.service.pending:
            self._run_pending()
        if not self.result.bound_here:
            return
        if isinstance(failure, HostCrashed):
            # No host, no driver to give the device back to: a restore would only wait
            # out its timeout (what 'vmbus enable' does too).
            self._emit("note", message="the host is gone, so the driver cannot be restored now; run "
                       f"'vmbus restore {self.guid}' once it is back")
            return
        try:
            driver = self.bus.restore(self.guid)
        except (DeviceNotFound, DeviceRescinded):
            self._emit("note", message="the device is gone (rescinded); nothing to restore")
            return
        except VmbusError as exc:
            if failure is None:
                raise
            self._emit("note", message=f"restoring the previous driver failed too: {exc}; "
                       f"run 'vmbus restore {self.guid}'")
            return
        self.result.restored_driver = driver
        self._emit("restored", driver=driver)


def run_service(bus_or_root: Vmbus | str | os.PathLike[str], device: str, service: IcService, *,
                stop_event: threading.Event | None = None, timeout: float | None = None,
                on_event: Callable[[RunnerEvent], object] | None = None, **options: Any) -> RunResult:
    """Serve ``device`` with ``service`` until ``stop_event`` is set or ``timeout`` passes.

    ``options`` go to :class:`IcRunner` (``bind``, ``force``, ``until``,
    ``reoffer_timeout``, ``bind_timeout``, ``poll_slice``)::

        stop = threading.Event()
        run_service("/", "heartbeat", HeartbeatService(), stop_event=stop)
    """
    runner = IcRunner(bus_or_root, device, service, stop_event=stop_event, on_event=on_event, **options)
    return runner.run(timeout)
