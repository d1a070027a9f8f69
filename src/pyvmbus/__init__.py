"""pyvmbus: drive a Hyper-V VMBus channel from Linux userspace through uio_hv_generic.

The layers, bottom-up (a module imports only modules below it; tests/test_layout.py
checks there is no circle): guid/classes, shm, ring/packet, sysfs, devlock, binding, uio, signal,
dispatch, aio, lifecycle/channel, bus; then :mod:`pyvmbus.ic` (integration services),
:mod:`pyvmbus.mock` (the mock bus) and :mod:`pyvmbus.cli` (the ``vmbus`` command) on top.
docs/architecture.md draws them. This module re-exports the public names.
"""

from __future__ import annotations

from .bus import Vmbus
from .channel import Channel
from .errors import (
    AlreadyBound,
    BindFailed,
    ChannelClosed,
    DeviceBusy,
    DeviceNotFound,
    DeviceRescinded,
    DriverNotLoaded,
    GuardRailRefused,
    HostCrashed,
    HostError,
    InvalidGuid,
    InvalidState,
    NotPermitted,
    RingCorrupt,
    RingFull,
    Timeout,
    UnsupportedKernel,
    UsageError,
    VmbusError,
)
from .guid import Guid, parse_guid
from .lifecycle import ChannelState

__version__ = "0.1.0"

__all__ = [
    "AlreadyBound",
    "BindFailed",
    "Channel",
    "ChannelClosed",
    "ChannelState",
    "DeviceBusy",
    "DeviceNotFound",
    "DeviceRescinded",
    "DriverNotLoaded",
    "GuardRailRefused",
    "Guid",
    "HostCrashed",
    "HostError",
    "InvalidGuid",
    "InvalidState",
    "NotPermitted",
    "RingCorrupt",
    "RingFull",
    "Timeout",
    "UnsupportedKernel",
    "UsageError",
    "Vmbus",
    "VmbusError",
    "__version__",
    "parse_guid",
]
