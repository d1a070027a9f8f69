"""Host side of the integration services, for the mock and for in-process tests.

Two layers:

- Sans-I/O host state machines (:class:`HeartbeatHost`, :class:`ShutdownHost`,
  :class:`TimesyncHost`; file copy's :class:`~pyvmbus.mock.fcopy_model.FcopySender` and
  KVP's :class:`~pyvmbus.mock.kvp_model.KvpHost` live in modules of their own). Each
  speaks the host side as Linux's guest code expects it: a version negotiation first
  (offering several framework and service versions, oldest first, so the guest must
  choose by its own order), then requests, one outstanding at a time, each checked when
  answered. ``next_request()`` gives the bytes to send (or None), ``receive(response)``
  consumes an answer, ``no_answer()`` records a drop, ``tick(now)`` runs timers.
  :func:`pump` runs one against a guest service in-process.
- Thin :class:`~pyvmbus.mock.models.DeviceModel` adapters (``heartbeat``, ``shutdown``,
  ``timesync``; ``fcopy`` and ``kvp`` in their modules) that put those requests on a mock
  channel and feed the guest's answers back; ``MockVmbus.command(guid, name, **args)``
  drives them.

Messages are built with the same :mod:`pyvmbus.ic.messages` classes the guest services use,
in the framing OpenVMM's hyperv_ic host uses (pipe header flags 1 and msgsize = 20 + body,
icmsgsize = body length, icflags TRANSACTION|REQUEST, status 0).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Generic, TypeVar

from ..ic.framework import RESPONSE_FLAGS, IcService
from ..ic.messages import (
    ICMSG_HDR,
    UTIL_FW_VERSION,
    UTIL_WS2K8_FW_VERSION,
    Buffer,
    HeartbeatMsg,
    IcMsgHdr,
    IcMsgType,
    IcNegotiate,
    PipeHeader,
    ShutdownMsg,
    TimesyncData,
    TimesyncFlags,
    TimesyncRefData,
    build_message,
    status_name,
    unix_ns_to_filetime,
    version,
    version_str,
)
from ..packet import Packet, PacketType
from .models import DeviceModel, HostChannel, register_model

__all__ = [
    "HeartbeatHost",
    "HeartbeatModel",
    "HostState",
    "IcHost",
    "IcModel",
    "ShutdownHost",
    "ShutdownModel",
    "TimesyncHost",
    "TimesyncModel",
    "pump",
]

HOST_FW_VERSIONS: tuple[int, ...] = (UTIL_WS2K8_FW_VERSION, UTIL_FW_VERSION)
"""Framework versions the host offers by default (OpenVMM's order: oldest first)."""


class HostState(Enum):
    NEGOTIATING = "negotiating"
    READY = "ready"
    FAILED = "failed"
    """No common version: the host sends nothing more."""


@dataclass(slots=True)
class HostRequest:
    kind: str
    body: Callable[[], bytes]
    """Built when sent (timesync takes the time then), not when queued."""
    msgtype: int
    on_answer: Callable[[HostRequest, int, bytes], None] | None = None
    """(this request, status, whole response)."""
    sent: bytes = b""


@dataclass(slots=True)
class HostStats:
    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    errors: list[str] = field(default_factory=list)
    """Protocol violations by the guest (a test asserts this stays empty)."""
    warnings: list[str] = field(default_factory=list)
    """Answers Hyper-V accepts but a stricter host would not (only with ``strict`` on)."""


class IcHost:
    """Sans-I/O host end of one IC channel: negotiation, then one request at a time."""

    message_type: ClassVar[int] = -1
    default_service_versions: ClassVar[tuple[int, ...]] = ()
    response_timeout: ClassVar[float] = 5.0
    """Seconds without an answer after which :meth:`tick` counts a request unanswered."""

    def __init__(
        self,
        *,
        framework_versions: tuple[int, ...] = HOST_FW_VERSIONS,
        service_versions: tuple[int, ...] | None = None,
    ) -> None:
        self.offer_framework = tuple(framework_versions)
        if service_versions is None:
            service_versions = self.default_service_versions
        self.offer_service = tuple(service_versions)
        self.stats = HostStats()
        self.state = HostState.NEGOTIATING
        self.framework_version: int | None = None
        self.service_version: int | None = None
        self._queue: deque[HostRequest] = deque()
        self._outstanding: HostRequest | None = None
        self._sent_at: float | None = None
        self._ictid = 0
        self._queue.append(HostRequest("negotiate", self._negotiate_body, IcMsgType.NEGOTIATE))

    # --- what the transport calls -------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """A request is out and not answered yet."""
        return self._outstanding is not None

    def next_request(self) -> bytes | None:
        """The next message to send now, or None (waiting for an answer, or nothing to say)."""
        if self._outstanding is not None or self.state is HostState.FAILED:
            return None
        if self.state is HostState.READY and not self._queue:
            more = self._produce()
            if more is not None:
                self._queue.append(more)
        if not self._queue:
            return None
        req = self._queue.popleft()
        self._ictid = (self._ictid + 1) & 0xFF
        fw = self.framework_version or 0
        srv = self.service_version or 0
        req.sent = build_message(
            req.msgtype, req.body(), framework_version=fw, message_version=srv, transaction_id=self._ictid
        )
        self._outstanding = req
        self._sent_at = None
        self.stats.sent += 1
        return req.sent

    def receive(self, response: Buffer) -> None:
        """Consume the guest's answer to the outstanding request (checked; errors recorded)."""
        req = self._outstanding
        if req is None:
            self._error(f"unsolicited message of {len(response)} bytes")
            return
        data = bytes(response)
        if len(data) < len(req.sent):
            self._error(f"{req.kind} answer of {len(data)} bytes; Linux answers at the received "
                        f"length ({len(req.sent)})")
            if len(data) < ICMSG_HDR:
                return
        hdr = IcMsgHdr.unpack_from(data)
        sent = IcMsgHdr.unpack_from(req.sent)
        if hdr.flags != RESPONSE_FLAGS:
            self._error(f"{req.kind} answer has icflags {hdr.flags:#x}, expected TRANSACTION|RESPONSE")
        if hdr.transaction_id != sent.transaction_id or hdr.msgtype != sent.msgtype:
            self._error(f"{req.kind} answer is for ictransaction_id {hdr.transaction_id} type "
                        f"{hdr.msgtype}, expected {sent.transaction_id} / {sent.msgtype}")
            return
        if data[: PipeHeader.SIZE] != req.sent[: PipeHeader.SIZE]:
            self._error(f"{req.kind} answer changed the pipe header (Linux echoes it)")
        self._outstanding = None
        self.stats.answered += 1
        if req.msgtype == IcMsgType.NEGOTIATE:
            self._negotiated(data)
        elif req.on_answer is not None:
            req.on_answer(req, hdr.status, data)

    def no_answer(self) -> None:
        """The guest dropped the outstanding request (or it timed out): move on."""
        req = self._outstanding
        if req is None:
            return
        self._outstanding = None
        self.stats.unanswered += 1
        if req.msgtype == IcMsgType.NEGOTIATE:
            self.state = HostState.FAILED

    def tick(self, now: float) -> None:
        """Timers: the answer timeout here; periodic requests in subclasses."""
        if self._outstanding is not None:
            if self._sent_at is None:
                self._sent_at = now
            elif now - self._sent_at > self.response_timeout:
                self.no_answer()

    def restart(self) -> None:
        """The channel was (re)opened: forget everything and negotiate again."""
        self.state = HostState.NEGOTIATING
        self.framework_version = self.service_version = None
        self._queue.clear()
        self._outstanding = None
        self._queue.append(HostRequest("negotiate", self._negotiate_body, IcMsgType.NEGOTIATE))

    def snapshot(self) -> dict[str, Any]:
        """Counters and state, picklable (the ``stats`` command)."""
        return {
            "state": self.state.value,
            "framework_version": version_str(self.framework_version) if self.framework_version else None,
            "service_version": version_str(self.service_version) if self.service_version else None,
            "sent": self.stats.sent,
            "answered": self.stats.answered,
            "unanswered": self.stats.unanswered,
            "errors": list(self.stats.errors),
            "warnings": list(self.stats.warnings),
        }

    # --- for subclasses -----------------------------------------------------------------

    def _queue_request(self, kind: str, body: Callable[[], bytes],
                       on_answer: Callable[[HostRequest, int, bytes], None] | None = None) -> None:
        self._queue.append(HostRequest(kind, body, self.message_type, on_answer))

    def _produce(self) -> HostRequest | None:
        """A request to send when the queue is empty (a transfer in progress)."""
        return None

    def _on_ready(self) -> None:
        """Negotiation succeeded."""

    def _error(self, text: str) -> None:
        self.stats.errors.append(text)

    def _negotiate_body(self) -> bytes:
        return IcNegotiate(self.offer_framework, self.offer_service).pack()

    def _negotiated(self, data: bytes) -> None:
        if len(data) < IcNegotiate.DATA_AT + 8:
            self._error(f"negotiate answer of {len(data)} bytes cannot hold the chosen versions")
            self.state = HostState.FAILED
            return
        nf, nm = IcNegotiate.COUNTS.unpack_from(data, IcNegotiate.COUNTS_AT)
        if (nf, nm) == (0, 0):
            self.state = HostState.FAILED
            return
        fw = version(*IcNegotiate.VERSION.unpack_from(data, IcNegotiate.DATA_AT))
        srv = version(*IcNegotiate.VERSION.unpack_from(data, IcNegotiate.DATA_AT + 4))
        if (nf, nm) != (1, 1) or fw not in self.offer_framework or srv not in self.offer_service:
            self._error(f"negotiate answer counts {nf}/{nm}, versions {version_str(fw)}/{version_str(srv)} "
                        "not among those offered")
            self.state = HostState.FAILED
            return
        if IcMsgHdr.unpack_from(data).msgsize != 0x10:
            self._error("negotiate answer icmsgsize is not 0x10")
        self.framework_version, self.service_version = fw, srv
        self.state = HostState.READY
        self._on_ready()


# --- heartbeat -----------------------------------------------------------------------------


class HeartbeatHost(IcHost):
    """Sends a heartbeat every ``interval`` seconds (Hyper-V: 2) and checks seq_num + 1.

    A beat due while the previous one is unanswered counts as missed.
    """

    message_type = IcMsgType.HEARTBEAT
    default_service_versions = (version(1, 0), version(3, 0))

    def __init__(self, *, interval: float | None = 2.0, seq_start: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.interval = interval
        self.seq = seq_start
        self.acked = 0
        self.missed = 0
        self._due: float | None = None

    def beat(self) -> None:
        """Queue one heartbeat now."""
        seq = self.seq
        self.seq = (self.seq + 1) & 0xFFFFFFFFFFFFFFFF
        self._queue_request(
            "heartbeat", lambda: HeartbeatMsg(seq).pack(), lambda r, st, d: self._answer(seq, d)
        )

    def _answer(self, seq: int, data: bytes) -> None:
        got = HeartbeatMsg.SEQ_NUM.unpack_from(data, HeartbeatMsg.SEQ_NUM_AT)[0]
        if got != (seq + 1) & 0xFFFFFFFFFFFFFFFF:
            self._error(f"heartbeat {seq} answered with seq_num {got}, expected {seq + 1}")
        else:
            self.acked += 1

    def set_interval(self, seconds: float | None) -> None:
        """Beat every ``seconds`` (None or 0: only on demand)."""
        self.interval = seconds or None
        self._due = None

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.state is not HostState.READY or not self.interval:
            return
        if self._due is None or now >= self._due:
            self._due = now + self.interval
            if self.waiting or self._queue:
                self.missed += 1
            else:
                self.beat()

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "acked": self.acked, "missed": self.missed, "seq": self.seq}


# --- shutdown ------------------------------------------------------------------------------


class ShutdownHost(IcHost):
    """Sends shutdown requests on demand and records (flags, status) of each answer."""

    message_type = IcMsgType.SHUTDOWN
    default_service_versions = (version(1, 0), version(3, 0), version(3, 1), version(3, 2))

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.results: list[tuple[int, int]] = []

    def request(
        self, flags: int = 0, *, reason_code: int = 0, timeout_seconds: int = 0, message: str = ""
    ) -> None:
        """Queue a request: flags 0 shut down, 2 reboot, 4 hibernate, | 1 force."""
        text = message.encode("utf-16-le")[:2046].ljust(2048, b"\0")
        body = ShutdownMsg(reason_code, timeout_seconds, flags, text).pack()
        self._queue_request("shutdown", lambda: body, lambda r, st, d: self.results.append((flags, st)))

    @property
    def last_status(self) -> int | None:
        return self.results[-1][1] if self.results else None

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "results": [(f, status_name(s)) for f, s in self.results]}


# --- timesync ------------------------------------------------------------------------------


class TimesyncHost(IcHost):
    """Sends time samples on demand or every ``interval`` seconds; a SYNC first after
    negotiation (as OpenVMM does). The format follows the negotiated version: 4.0 carries
    ``ictimesync_ref_data`` with ``reference_counter()`` (100 ns units), older ones
    ``ictimesync_data``. ``offset_ns`` skews the host clock against ``clock``. The default
    reference counter is CLOCK_MONOTONIC in 100 ns units, which is system-wide, so a guest
    service in another process can pass the same function and see 4.0's delay correction."""

    message_type = IcMsgType.TIMESYNC
    default_service_versions = (version(1, 0), version(3, 0), version(4, 0))

    def __init__(
        self,
        *,
        clock: Callable[[], int] = time.time_ns,
        reference_counter: Callable[[], int] | None = None,
        offset_ns: int = 0,
        interval: float | None = None,
        sync_on_ready: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.clock = clock
        self.reference_counter = reference_counter or (lambda: time.monotonic_ns() // 100)
        self.offset_ns = offset_ns
        self.interval = interval
        self.sync_on_ready = sync_on_ready
        self.acked = 0
        self.last_sent_ns: int | None = None
        """The host time in the last message, Unix ns."""
        self._due: float | None = None

    @property
    def ref_format(self) -> bool:
        return self.service_version is not None and self.service_version >= version(4, 0)

    def sample(self, flags: int = TimesyncFlags.SAMPLE) -> None:
        """Queue one time message (SAMPLE by default; SYNC asks the guest to set its clock)."""
        self._queue_request("timesync", lambda: self._body(flags), self._answer)

    def sync(self) -> None:
        self.sample(TimesyncFlags.SYNC)

    def _body(self, flags: int) -> bytes:
        now = self.clock() + self.offset_ns
        self.last_sent_ns = now
        ft = unix_ns_to_filetime(now)
        if self.ref_format:
            return TimesyncRefData(ft, self.reference_counter(), flags).pack()
        return TimesyncData(ft, 0, 0, flags).pack()

    def _answer(self, req: HostRequest, status: int, data: bytes) -> None:
        if data[ICMSG_HDR : len(req.sent)] != req.sent[ICMSG_HDR:]:
            self._error("timesync answer changed the body (Linux echoes it)")
        self.acked += 1

    def set_interval(self, seconds: float | None) -> None:
        """Sample every ``seconds`` (None or 0: only on demand)."""
        self.interval = seconds or None
        self._due = None

    def _on_ready(self) -> None:
        if self.sync_on_ready:
            self.sync()

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.state is not HostState.READY or not self.interval:
            return
        if self._due is None:
            self._due = now + self.interval
        elif now >= self._due:
            self._due = now + self.interval
            if not (self.waiting or self._queue):
                self.sample()

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "acked": self.acked, "ref_format": self.ref_format}


# --- in-process driver ---------------------------------------------------------------------


def pump(host: IcHost, service: IcService, *, limit: int = 1_000_000) -> int:
    """Run ``host``'s requests through ``service`` in-process until the host has nothing
    more to send (or ``limit`` messages); returns how many went. This is what a runner does
    over a channel: answer, send, then run the service's pending actions."""
    count = 0
    while count < limit:
        req = host.next_request()
        if req is None:
            break
        resp = service.handle(req)
        if resp is None:
            host.no_answer()
        else:
            host.receive(resp)
        service.run_pending()
        count += 1
    return count


# --- mock device models --------------------------------------------------------------------


_H = TypeVar("_H", bound=IcHost)


class IcModel(DeviceModel, Generic[_H]):
    """Puts an :class:`IcHost`'s requests on a mock channel and feeds the answers back.

    Requests go in-band with a fresh VMBus transaction id and flags 0. Hyper-V matches an
    IC answer by the IC header's ictransaction_id, not by the VMBus transaction id, so any
    VMBus id is a valid answer (the kernel's fcopy daemon sends all ones,
    VMBUS_RQST_ERROR). ``strict`` (command ``strict``, on=True) makes an answer whose
    VMBus id differs from the request's a warning in ``stats``; it is never an error.
    Commands: ``stats`` and ``strict`` (all models) plus each model's own.
    """

    monitored = False

    def __init__(self) -> None:
        self.host = self.make_host()
        self._xid = 0
        self.strict = False

    def make_host(self) -> _H:
        raise NotImplementedError

    def opened(self, chan: HostChannel) -> None:
        self.host.restart()
        self._pump(chan)

    def packet(self, chan: HostChannel, pkt: Packet) -> None:
        if pkt.type != PacketType.DATA_INBAND:
            self.host.stats.errors.append(f"guest sent a packet of type {pkt.type:#x}; ICs answer in-band")
            return
        if self.strict and pkt.transaction_id != self._xid:
            self.host.stats.warnings.append(
                f"answer has VMBus transaction id {pkt.transaction_id:#x}, the request had {self._xid:#x} "
                "(Hyper-V accepts it; Linux's own IC drivers echo the request's id)"
            )
        self.host.receive(pkt.payload)
        self._pump(chan)

    def tick(self, chan: HostChannel, now: float) -> None:
        self.host.tick(now)
        self._pump(chan)

    def command(self, chan: HostChannel, name: str, args: dict[str, Any]) -> Any:
        if name == "stats":
            return self.host.snapshot()
        if name == "strict":
            self.strict = bool(args.get("on", True))
            return self.strict
        result = self.host_command(name, args)
        self._pump(chan)
        return result

    def host_command(self, name: str, args: dict[str, Any]) -> Any:
        raise KeyError(f"model {self.name!r} has no command {name!r}")

    def _pump(self, chan: HostChannel) -> None:
        req = self.host.next_request()
        if req is not None:
            self._xid += 1
            chan.post(req, PacketType.DATA_INBAND, 0, self._xid)


@register_model
class HeartbeatModel(IcModel[HeartbeatHost]):
    """Heartbeat host. Commands: ``beat``; ``interval`` (ms=2000; 0 stops the timer)."""

    name = "heartbeat"
    class_name = "heartbeat"

    def make_host(self) -> HeartbeatHost:
        return HeartbeatHost()

    def host_command(self, name: str, args: dict[str, Any]) -> Any:
        host = self.host
        if name == "beat":
            host.beat()
            return None
        if name == "interval":
            host.set_interval(float(args.get("ms", 2000)) / 1000)
            return None
        return super().host_command(name, args)


@register_model
class ShutdownModel(IcModel[ShutdownHost]):
    """Shutdown host. Command ``shutdown`` (flags=0, reason_code=0, timeout_seconds=0, message="")."""

    name = "shutdown"
    class_name = "shutdown"

    def make_host(self) -> ShutdownHost:
        return ShutdownHost()

    def host_command(self, name: str, args: dict[str, Any]) -> Any:
        host = self.host
        if name == "shutdown":
            host.request(
                int(args.get("flags", 0)),
                reason_code=int(args.get("reason_code", 0)),
                timeout_seconds=int(args.get("timeout_seconds", 0)),
                message=str(args.get("message", "")),
            )
            return None
        return super().host_command(name, args)


@register_model
class TimesyncModel(IcModel[TimesyncHost]):
    """Time sync host. Commands: ``sample``, ``sync``, ``offset`` (ns=0: skew the host clock),
    ``interval`` (ms; 0 stops periodic samples)."""

    name = "timesync"
    class_name = "timesync"

    def make_host(self) -> TimesyncHost:
        return TimesyncHost(interval=5.0)

    def host_command(self, name: str, args: dict[str, Any]) -> Any:
        host = self.host
        if name == "sample":
            host.sample()
        elif name == "sync":
            host.sync()
        elif name == "offset":
            host.offset_ns = int(args.get("ns", 0))
        elif name == "interval":
            host.set_interval(float(args.get("ms", 5000)) / 1000)
        else:
            return super().host_command(name, args)
        return None
