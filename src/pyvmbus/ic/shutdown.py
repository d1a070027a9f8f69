"""Shutdown IC (HV_SHUTDOWN_GUID 0e0b6031-5213-4934-818b-38d90ced39db; ICMSGTYPE 3).

The status follows hv_util.c shutdown_onchannelcallback: flags 0/1 power off, 2/3 reboot
(bit 0 = force; Linux always forces), 4/5 hibernate (HV_S_OK only where hibernation is
supported, else HV_E_FAIL), anything else HV_E_FAIL. The answer goes out first; the action is
a callback queued for :meth:`~pyvmbus.ic.framework.IcService.run_pending`. This module never
powers anything off itself: the CLI passes a callback that does, and only with
``--allow-shutdown``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from .framework import IcService
from .messages import HV_E_FAIL, HV_S_OK, ICMSG_HDR, SD_VERSIONS, IcMsgType, ShutdownMsg

__all__ = ["ShutdownAction", "ShutdownRequest", "ShutdownService", "shutdown_status"]


class ShutdownAction(Enum):
    """What the host asked for."""

    POWEROFF = "poweroff"
    REBOOT = "reboot"
    HIBERNATE = "hibernate"


@dataclass(frozen=True, slots=True)
class ShutdownRequest:
    """One accepted request, handed to the callback after the answer was sent."""

    action: ShutdownAction
    force: bool
    flags: int
    reason_code: int
    timeout_seconds: int
    message: str


def shutdown_status(flags: int, *, hibernate_supported: bool = False) -> tuple[int, ShutdownAction | None]:
    """The kernel's table: (status, action or None) for ``shutdown_msg_data.flags``."""
    if flags in (0, 1):
        return HV_S_OK, ShutdownAction.POWEROFF
    if flags in (2, 3):
        return HV_S_OK, ShutdownAction.REBOOT
    if flags in (4, 5):
        return (HV_S_OK, ShutdownAction.HIBERNATE) if hibernate_supported else (HV_E_FAIL, None)
    return HV_E_FAIL, None


class ShutdownService(IcService):
    """Answers shutdown requests with the kernel's status and queues ``on_shutdown``.

    ``on_shutdown`` None: requests are answered and recorded in :attr:`requests` only.
    ``hibernate_supported``: whether to accept flags 4/5 (the kernel asks
    hv_is_hibernation_supported(); userspace has no such answer, so the caller decides).
    """

    service_name: ClassVar[str] = "shutdown"
    class_name: ClassVar[str] = "shutdown"
    message_type: ClassVar[int] = IcMsgType.SHUTDOWN
    service_versions: ClassVar[tuple[int, ...]] = SD_VERSIONS

    def __init__(
        self,
        on_shutdown: Callable[[ShutdownRequest], None] | None = None,
        *,
        hibernate_supported: bool = False,
    ) -> None:
        super().__init__()
        self.on_shutdown = on_shutdown
        self.hibernate_supported = hibernate_supported
        self.requests: list[ShutdownRequest] = []
        """Accepted requests, oldest first."""

    def _message(self, buf: bytearray) -> bool:
        if len(buf) < ICMSG_HDR + ShutdownMsg.SIZE:
            self._drop(f"shutdown message of {len(buf)} bytes, needs {ICMSG_HDR + ShutdownMsg.SIZE}")
            return False
        msg = ShutdownMsg.unpack_from(buf)
        status, action = shutdown_status(msg.flags, hibernate_supported=self.hibernate_supported)
        self._set_status(buf, status)
        if action is not None:
            req = ShutdownRequest(
                action, bool(msg.flags & 1), msg.flags, msg.reason_code, msg.timeout_seconds, msg.message
            )
            self.requests.append(req)
            callback = self.on_shutdown
            if callback is not None:
                self._defer(lambda: callback(req))
        return True
