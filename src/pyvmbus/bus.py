"""``pyvmbus.Vmbus``: the entry point that ties discovery, binding and channels together.

One object per root (``/`` on a Hyper-V guest, ``MockVmbus.root`` in tests); it holds
nothing but the root, so every call sees the bus as it is now::

    bus = Vmbus(root=mock.root)
    bus.bind(guid)                 # -> uio_hv_generic (guard rails unless force=True)
    ch = bus.channel(guid)         # a Channel; enable() it
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import devlock
from .binding import bind as _bind
from .binding import restore as _restore
from .binding import unbind as _unbind
from .channel import Channel
from .sysfs import Sysfs, VmbusDevice

__all__ = ["Vmbus"]


class Vmbus:
    """The VMBus seen under ``root``: devices, binding to uio_hv_generic, channels.

    ``query`` arguments take an instance GUID (any spelling), a unique GUID prefix, or a
    class name / class GUID that exactly one device has (see :meth:`Sysfs.device`);
    :class:`DeviceNotFound` names the nearest matches otherwise.
    """

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self.sysfs = Sysfs(self.root)

    def devices(self) -> list[VmbusDevice]:
        """Every VMBus device, sorted by instance GUID ([] without VMBus)."""
        return self.sysfs.devices()

    def device(self, query: str) -> VmbusDevice:
        """The one device ``query`` names."""
        return self.sysfs.device(query)

    def bind(self, query: str, *, force: bool = False, timeout: float = 10.0) -> str:
        """Bind the device to uio_hv_generic; returns its uio node name (``uio0``).

        Guard rails refuse a disk in use or the network interface that carries the
        default route or this SSH session unless ``force`` (:class:`GuardRailRefused`).
        """
        return _bind(self.root, self.device(query).guid, force=force, timeout=timeout)

    def unbind(self, query: str, *, force: bool = False, timeout: float = 10.0) -> str | None:
        """Release the device from its driver; returns that driver's name."""
        return _unbind(self.root, self.device(query).guid, force=force, timeout=timeout)

    def restore(self, query: str, *, timeout: float = 10.0) -> str | None:
        """Give the device back to the driver it had before :meth:`bind`."""
        return _restore(self.root, self.device(query).guid, timeout=timeout)

    def reserve(self, query: str, *, wait: float = 0.0) -> devlock.DeviceLock:
        """Hold the device for this process across several steps; use it as a context manager::

            with bus.reserve(guid):
                bus.bind(guid)
                ch = bus.channel(guid)
                ch.enable(); ...; ch.disable()
                bus.restore(guid)

        Other processes are refused (:class:`DeviceBusy`) from the first step to the last,
        so none can open or rebind the device between this process's bind and its enable.
        Inside, this process's bind / unbind / restore and one open Channel at a time go
        through. ``wait``: seconds to wait for another process's bind / unbind / restore
        of the device to end (an open device is refused at once). See :mod:`pyvmbus.devlock`.
        """
        return devlock.reserve(self.root, self.device(query).guid, wait=wait)

    def channel(self, query: str, **options: Any) -> Channel:
        """A (disabled) :class:`Channel` for the device; ``options`` go to its constructor
        (``dispatch``, ``poll_subchannels``, ``request_timeout``, ``send_timeout``, ...)."""
        return Channel(self.root, self.device(query).guid, **options)

    def __repr__(self) -> str:
        return f"Vmbus({str(self.root)!r})"
