"""The IC framework: version negotiation and the request -> response skeleton of a service.

Sans-I/O (after h11): a service is a pure object with ``handle(request) -> response | None``.
It never touches a channel. The caller (a Channel-based runner, or a host model in a test)
moves bytes:

    resp = service.handle(pkt.payload)          # the in-band payload, pipe header first
    if resp is not None:
        channel.send(resp, transaction_id=pkt.transaction_id)   # DATA_INBAND, flags 0
    service.run_pending()                       # side effects (poweroff, set clock) after the send

That is what every Linux util handler does (drivers/hv/hv_util.c): answer in place in the
received buffer, with ``icflags = TRANSACTION | RESPONSE``, at the received length, with the
request's VMBus transaction id and no completion requested; and do anything drastic only after
the answer went out. ``handle`` never raises: malformed input gets the status the kernel would
give, or no answer where the kernel gives none (it logs and drops a message shorter than the
28-byte header or shorter than the body the type needs).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from .messages import (
    FW_VERSIONS,
    HV_E_FAIL,
    HV_S_OK,
    IC_VERSION_NEGOTIATION_MAX_VER_COUNT,
    ICMSG_HDR,
    Buffer,
    IcFlags,
    IcMsgHdr,
    IcMsgType,
    IcNegotiate,
    negotiate_pkt_size,
    version,
    version_str,
)

__all__ = [
    "IcService",
    "NegotiateResult",
    "RESPONSE_FLAGS",
    "ServiceStats",
    "prep_negotiate_response",
]

log = logging.getLogger("pyvmbus.ic")

RESPONSE_FLAGS = IcFlags.TRANSACTION | IcFlags.RESPONSE
"""icflags of every guest answer (5)."""


@dataclass(frozen=True, slots=True)
class NegotiateResult:
    """What :func:`prep_negotiate_response` chose.

    When ``found`` is false the versions hold what the kernel leaves in its variables (the raw
    counts as major numbers); callers must not adopt them.
    """

    found: bool
    framework_version: int
    service_version: int


def prep_negotiate_response(
    buf: bytearray, fw_versions: Sequence[int], srv_versions: Sequence[int]
) -> NegotiateResult:
    """Turn a negotiate request in ``buf`` into the response, in place, like the kernel's
    ``vmbus_prep_negotiate_resp`` (channel_mgmt.c, newest form with ``buflen`` validation).

    ``buf`` is the whole message (pipe header first); its length is the received length,
    and nothing is written past it (the kernel writes ``icversion_data[0..1]`` into its larger
    buffer but sends only the received length, so the wire bytes are the same).

    1. Fewer than 28 + 4 bytes: nothing changes, no match.
    2. ``icmsgsize = 0x10``.
    3. Either count > 100, or 28 + 8 + 4 * (counts) > length: no match.
    4. Walk *our* list in our order (newest first) and take the first entry found anywhere
       among the host's framework entries; then the same over the host's service entries.
    5. Counts become 1/1 on a full match, else 0/0; ``icversion_data[0]`` = framework,
       ``[1]`` = service (on failure: the raw counts as majors, or the matched framework).
    """
    n = len(buf)
    if n < ICMSG_HDR + 4:
        return NegotiateResult(False, 0, 0)
    IcMsgHdr.U16.pack_into(buf, IcMsgHdr.MSGSIZE_AT, 0x10)
    nf, nm = IcNegotiate.COUNTS.unpack_from(buf, IcNegotiate.COUNTS_AT)
    fw = version(nf, 0)
    srv = version(nm, 0)
    found = False
    if (
        nf <= IC_VERSION_NEGOTIATION_MAX_VER_COUNT
        and nm <= IC_VERSION_NEGOTIATION_MAX_VER_COUNT
        and negotiate_pkt_size(nf, nm) <= n
    ):
        at = IcNegotiate.DATA_AT
        offered = [version(*IcNegotiate.VERSION.unpack_from(buf, at + 4 * i)) for i in range(nf + nm)]
        host_fw, host_srv = offered[:nf], offered[nf:]
        for v in fw_versions:
            if v in host_fw:
                fw, found = v, True
                break
        if found:
            found = False
            for v in srv_versions:
                if v in host_srv:
                    srv, found = v, True
                    break
    count = 1 if found else 0
    IcNegotiate.COUNTS.pack_into(buf, IcNegotiate.COUNTS_AT, count, count)
    # icversion_data[0] = framework, [1] = service, clipped to the received length.
    data = IcNegotiate.VERSION.pack(fw >> 16, fw & 0xFFFF) + IcNegotiate.VERSION.pack(srv >> 16, srv & 0xFFFF)
    end = min(n, IcNegotiate.DATA_AT + len(data))
    if end > IcNegotiate.DATA_AT:
        buf[IcNegotiate.DATA_AT : end] = data[: end - IcNegotiate.DATA_AT]
    return NegotiateResult(found, fw, srv)


@dataclass(slots=True)
class ServiceStats:
    """Counters of one service (read by `vmbus ic ... --stats` and the tests)."""

    requests: int = 0
    responses: int = 0
    dropped: int = 0
    """Requests answered with nothing, as the kernel drops them (too short, too long)."""
    negotiations: int = 0
    unknown_types: int = 0
    errors: int = 0
    """Unexpected exceptions inside the service (answered HV_E_FAIL; a bug: please report)."""
    last_drop: str = ""
    last_error: str = ""


class IcService:
    """Base of a guest-side integration service: framework handling shared by all of them.

    Subclasses set the class attributes and implement :meth:`_message`. Side effects that
    must follow the answer (power off, set the clock, user callbacks) are queued with
    :meth:`_defer` and run by :meth:`run_pending`, which the runner calls after sending.
    """

    service_name: ClassVar[str] = ""
    class_name: ClassVar[str] = ""
    """Device class short name in :mod:`pyvmbus.classes` this service drives."""
    message_type: ClassVar[int] = -1
    framework_versions: ClassVar[tuple[int, ...]] = FW_VERSIONS
    service_versions: ClassVar[tuple[int, ...]] = ()
    max_request: ClassVar[int] = 4096
    """hv_util reads at most HV_HYP_PAGE_SIZE per packet; a longer one gets no answer (the
    kernel's vmbus_recvpacket fails with -ENOBUFS and leaves it in the ring; we drop it)."""
    negotiate_sets_status: ClassVar[bool] = False
    """hv_util leaves the negotiate status as the host sent it; the fcopy daemon sets
    HV_E_FAIL, then 0 on a match."""

    def __init__(self) -> None:
        self.framework_version: int | None = None
        self.service_version: int | None = None
        self.stats = ServiceStats()
        self.deferred: deque[Callable[[], None]] = deque()
        """The actions :meth:`_defer` queued for :meth:`run_pending` (read-only for others: a
        runner tests it for truth after each answer, which costs no call per packet)."""

    @property
    def negotiated(self) -> bool:
        return self.service_version is not None

    def handle(self, request: Buffer) -> bytes | None:
        """The answer to one IC message (pipe header first), or None for no answer.

        Send it in-band with the request's VMBus transaction id, flags 0; then call
        :meth:`run_pending`. Never raises.
        """
        resp = self.answer(request)
        return None if resp is None else bytes(resp)

    def answer(self, request: Buffer) -> bytearray | None:
        """:meth:`handle` without the final copy: the answer in a new bytearray the caller
        owns (the runner sends it as it is). Never raises."""
        self.stats.requests += 1
        n = len(request)
        if n < ICMSG_HDR:
            self._drop(f"message of {n} bytes, shorter than the {ICMSG_HDR}-byte IC header")
            return None
        if n > self.max_request:
            self._drop(f"message of {n} bytes, longer than the {self.max_request} the kernel reads")
            return None
        buf = bytearray(request)
        try:
            msgtype = IcMsgHdr.U16.unpack_from(buf, IcMsgHdr.MSGTYPE_AT)[0]
            if msgtype == IcMsgType.NEGOTIATE:
                self._negotiate(buf)
            elif msgtype == self.message_type:
                if not self._message(buf):
                    return None
            else:
                self.stats.unknown_types += 1
                self._set_status(buf, HV_E_FAIL)
        except Exception as exc:  # a bug in a service must not kill the channel: answer E_FAIL
            buf = self._failed(request, exc)
        buf[IcMsgHdr.FLAGS_AT] = RESPONSE_FLAGS
        self.stats.responses += 1
        return buf

    def _failed(self, request: Buffer, exc: Exception) -> bytearray:
        """Count an unexpected exception and make the HV_E_FAIL answer (flags still to set)."""
        self.stats.errors += 1
        self.stats.last_error = repr(exc)
        log.exception("%s service failed on a %d-byte message", self.service_name, len(request))
        buf = bytearray(request)
        self._set_status(buf, HV_E_FAIL)
        return buf

    def run_pending(self) -> int:
        """Run the actions queued by the last requests (call after sending the answers).

        Returns how many ran. An action that raises propagates to the caller (it is the
        user's callback); the ones after it stay queued.
        """
        ran = 0
        deferred = self.deferred
        while deferred:
            action = deferred.popleft()
            action()
            ran += 1
        return ran

    @property
    def pending(self) -> int:
        """How many actions wait for :meth:`run_pending`."""
        return len(self.deferred)

    def close(self) -> None:
        """Release what the service holds (the channel closed). Idempotent."""

    # --- for subclasses -----------------------------------------------------------------

    def _message(self, buf: bytearray) -> bool:
        """Handle a message of this service's type in place. False: send no answer."""
        raise NotImplementedError

    def _defer(self, action: Callable[[], None]) -> None:
        self.deferred.append(action)

    def _drop(self, why: str) -> None:
        self.stats.dropped += 1
        self.stats.last_drop = why

    @staticmethod
    def _set_status(buf: bytearray, status: int) -> None:
        IcMsgHdr.U32.pack_into(buf, IcMsgHdr.STATUS_AT, status)

    def _negotiate(self, buf: bytearray) -> None:
        self.stats.negotiations += 1
        if self.negotiate_sets_status:
            self._set_status(buf, HV_E_FAIL)
        res = prep_negotiate_response(buf, self.framework_versions, self.service_versions)
        if res.found:
            self.framework_version = res.framework_version
            self.service_version = res.service_version
            if self.negotiate_sets_status:
                self._set_status(buf, HV_S_OK)
            log.info(
                "%s IC version %s (framework %s)",
                self.service_name, version_str(res.service_version), version_str(res.framework_version),
            )
