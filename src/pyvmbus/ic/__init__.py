"""Hyper-V integration services (heartbeat, shutdown, time sync, file copy, KVP) as sans-I/O code.

Each service turns one received IC message into the answer to send (or None) and queues its
side effects; a runner moves the bytes over a :class:`pyvmbus.Channel` (or a mock host model
in-process) and calls ``run_pending()`` after each send. See :mod:`pyvmbus.ic.framework`.

What it may import: the library (bus, channel through it, errors, lifecycle, packet, sysfs),
never the CLI or the mock; :mod:`.messages` and :mod:`.framework` import nothing from
the library at all, since the mock's host models use them too.
"""

from __future__ import annotations

from .fcopy import FcopyEvent, FcopyService
from .framework import IcService, NegotiateResult, ServiceStats, prep_negotiate_response
from .heartbeat import HeartbeatService
from .kvp import KvpEvent, KvpService
from .shutdown import ShutdownAction, ShutdownRequest, ShutdownService, shutdown_status
from .timesync import TimeSample, TimesyncService

__all__ = [
    "SERVICES",
    "FcopyEvent",
    "FcopyService",
    "HeartbeatService",
    "KvpEvent",
    "KvpService",
    "IcService",
    "NegotiateResult",
    "ServiceStats",
    "ShutdownAction",
    "ShutdownRequest",
    "ShutdownService",
    "TimeSample",
    "TimesyncService",
    "prep_negotiate_response",
    "shutdown_status",
]

SERVICES: dict[str, type[IcService]] = {
    cls.service_name: cls
    for cls in (HeartbeatService, ShutdownService, TimesyncService, FcopyService, KvpService)
}
"""Service name (also the device class name) -> class: the CLI's choices."""
