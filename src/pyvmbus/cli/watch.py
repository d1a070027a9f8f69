"""``vmbus watch``: add, remove, bind and unbind events of VMBus devices and their uio nodes.

Two sources behind one event shape (the ``watch.action`` schema):

- **udev** on a real guest (root ``/`` with udevd running): a pyudev netlink monitor on
  the ``vmbus`` and ``uio`` subsystems, so the events are the kernel's own uevents.
- **poll** everywhere else (``--mock``, ``--root DIR``, containers without udev): pyudev
  cannot read a fake sysfs root, so the tree is snapshotted every ``interval`` seconds
  (device directories, ``driver`` links, ``uio/uioN`` entries) and the differences are
  reported in the order the kernel would emit them. Changes that come and go within one
  interval are not seen; the kernel's events are the authority where udev exists.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VmbusError
from ..guid import is_guid
from ..sysfs import Sysfs
from .state import class_label

__all__ = [
    "DevSnap",
    "WatchEvent",
    "diff",
    "event_from_udev",
    "poll_events",
    "snapshot",
    "udev_available",
    "udev_events",
]


@dataclass(frozen=True)
class DevSnap:
    """What the poller remembers of one device between two looks."""

    cls: str | None
    driver: str | None
    uio: str | None


@dataclass(frozen=True)
class WatchEvent:
    """One event: ``action`` add/remove/bind/unbind/change of a ``vmbus`` device or ``uio`` node."""

    action: str
    subsystem: str
    name: str
    device: str | None
    cls: str | None = None
    driver: str | None = None

    def as_dict(self, t: float) -> dict[str, Any]:
        return {"event": self.action, "t": round(t, 3), "subsystem": self.subsystem, "name": self.name,
                "device": self.device, "class": self.cls, "driver": self.driver}


def snapshot(fs: Sysfs) -> dict[str, DevSnap]:
    """Every device's class, driver and uio node now (a device vanishing meanwhile is left out)."""
    out: dict[str, DevSnap] = {}
    for dev in fs.devices():
        try:
            out[str(dev.guid)] = DevSnap(class_label(dev), dev.driver, dev.uio_name)
        except (VmbusError, OSError, ValueError):
            continue
    return out


def diff(old: dict[str, DevSnap], new: dict[str, DevSnap]) -> list[WatchEvent]:
    """Events that turn ``old`` into ``new``, in kernel order.

    Kernel order: a device is added, then bound; binding to uio_hv_generic unbinds the old
    driver, registers the uio node, then reports the bind; a removal unregisters the uio
    node, unbinds, then removes the device.
    """
    events: list[WatchEvent] = []
    for guid in sorted(set(old) | set(new)):
        a, b = old.get(guid), new.get(guid)
        if a == b:
            continue
        cls = b.cls if b is not None else a.cls if a is not None else None
        old_drv, new_drv = (a.driver if a else None), (b.driver if b else None)
        old_uio, new_uio = (a.uio if a else None), (b.uio if b else None)
        if old_uio is not None and old_uio != new_uio:
            events.append(WatchEvent("remove", "uio", old_uio, guid, cls))
        if old_drv is not None and old_drv != new_drv:
            events.append(WatchEvent("unbind", "vmbus", guid, guid, cls, old_drv))
        if b is None:
            events.append(WatchEvent("remove", "vmbus", guid, guid, cls))
            continue
        if a is None:
            events.append(WatchEvent("add", "vmbus", guid, guid, cls))
        if new_uio is not None and new_uio != old_uio:
            events.append(WatchEvent("add", "uio", new_uio, guid, cls))
        if new_drv is not None and new_drv != old_drv:
            events.append(WatchEvent("bind", "vmbus", guid, guid, cls, new_drv))
    return events


def poll_events(root: Path, stop: Callable[[], bool], interval: float = 0.05,
                sleep: Callable[[float], object] = time.sleep) -> Iterator[WatchEvent]:
    """Events from diffing snapshots of ``root`` every ``interval`` s until ``stop()``.

    ``sleep(interval)`` waits between looks; the CLI's returns early at its deadline and on
    Ctrl-C, so ``--interval 10 --timeout 1`` ends after 1 s.
    """
    fs = Sysfs(root)
    last = snapshot(fs)
    while not stop():
        sleep(interval)
        now = snapshot(fs)
        yield from diff(last, now)
        last = now


def udev_available(root: Path) -> bool:
    """pyudev can report this root's events: it is the real root and udevd runs."""
    return os.path.realpath(root) == "/" and os.path.exists("/run/udev/control")


def event_from_udev(action: str, subsystem: str, sys_path: str, driver: str | None,
                    cls: str | None = None) -> WatchEvent | None:
    """Turn one uevent (from pyudev) into a :class:`WatchEvent`; None for other devices.

    A uio node's GUID is the directory above ``uio/`` in its sys_path
    (``.../<guid>/uio/uio0``); this also works for a remove, when the parent is gone.
    """
    parts = Path(sys_path).parts
    name = parts[-1] if parts else ""
    if subsystem == "vmbus":
        return WatchEvent(action, "vmbus", name, name if is_guid(name) else None, cls, driver)
    if subsystem == "uio":
        guid = None
        if len(parts) >= 3 and parts[-2] == "uio" and is_guid(parts[-3]):
            guid = parts[-3]
        return WatchEvent(action, "uio", name, guid, cls, driver)
    return None


def udev_events(root: Path, stop: Callable[[], bool]) -> Iterator[WatchEvent]:  # pragma: no cover - real udev
    """Events from a pyudev netlink monitor on the vmbus and uio subsystems."""
    import pyudev

    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("vmbus")
    monitor.filter_by("uio")
    monitor.start()
    fs = Sysfs(root)
    while not stop():
        device = monitor.poll(timeout=0.25)
        if device is None:
            continue
        cls = None
        if device.subsystem == "vmbus" and device.action != "remove":
            with contextlib.suppress(VmbusError, OSError, ValueError):
                cls = class_label(fs.device(device.sys_name))
        ev = event_from_udev(device.action or "change", device.subsystem or "", device.sys_path,
                             device.driver, cls)
        if ev is not None:
            yield ev
