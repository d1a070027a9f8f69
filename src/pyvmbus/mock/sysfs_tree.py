"""The mock's fake sysfs: ``root/sys/bus/vmbus``, ``root/sys/class/uio`` and friends.

:class:`SysfsTree` lays out files with the real names, formats and places of SPEC
section 3 (drivers/hv/vmbus_drv.c, drivers/uio/uio.c, the driver core) for one
:class:`~pyvmbus.mock.generations.KernelGeneration`, so that :mod:`pyvmbus.sysfs` and
:mod:`pyvmbus.binding` run unchanged against it. The tree is mechanical: it never decides
who binds what; :mod:`pyvmbus.mock.driver_core` and the mock kernel call it.

Layout, as on a Gen2 guest: the device directories live under
``root/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/<guid>``;
``root/sys/bus/vmbus/devices/<guid>``, ``root/sys/class/uio/uioN``, ``root/sys/block/sdX``
and ``root/sys/class/net/ethN`` are relative symlinks into it, and ``driver`` links point
back to ``root/sys/bus/vmbus/drivers/<name>``.

Files a reader may see change are replaced atomically (written in ``root/run/mock/.tmp``
and renamed into place), and whole directories are built there and renamed in, so a
reader never sees a half-written value or a half-built device. Where the kernel's show()
would fail (ring counters of a ring that is not allocated: EINVAL) the mock file is empty;
:func:`pyvmbus.sysfs.read_attr` reads both as None. Write-only kernel files (mode 0200)
are mode 0600 here so the mock, running as the same unprivileged user, can read what a
client wrote; they read back empty.

Monitor attributes of a channel without a monitor allocation (device: ``monitor_id`` and
the six ``*_monitor_*``; channel: ``pending``, ``latency``, ``monitor_id``) are hidden
when ``generation.hide_monitor_attrs`` says so, and otherwise shown with the invalid id
255 such kernels print. (The kernel source has hidden both groups since 46fc15487d02,
v5.2 and 4.19.y; the generations that show them model older kernels.)
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..classes import DeviceClass, lookup_class
from ..guid import Guid, parse_guid
from .generations import DEFAULT_GENERATION, PAGE_SIZE, KernelGeneration, generation

__all__ = [
    "ALIVE_LOCK",
    "hold_alive_lock",
    "mock_liveness",
    "CHANNEL_ATTRS",
    "DEVICE_MONITOR_ATTRS",
    "FIXED_RING_FILE_SIZE",
    "KERNEL_DRIVERS",
    "MockChannel",
    "MockDevice",
    "Mount",
    "RING_DEBUG_ATTRS",
    "Route",
    "SysfsTree",
    "UIO_DRIVER",
    "UIO_MAJOR",
    "VMBUS_PARENT",
]

UIO_DRIVER = "uio_hv_generic"

KERNEL_DRIVERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hv_netvsc", ("network",)),
    ("hv_storvsc", ("scsi", "ide", "fc")),
    ("hv_utils", ("shutdown", "timesync", "heartbeat", "kvp", "vss", "fcopy")),
    ("hyperv_fb", ("video",)),
    ("hyperv_keyboard", ("keyboard",)),
    ("hid_hyperv", ("mouse",)),
    ("hv_balloon", ("balloon",)),
)
"""In-kernel VMBus drivers in registration order, with the classes of their id tables.

hv_utils lists fcopy only before 6.10 (the kernel fcopy driver was replaced by the uio
daemon in the same series that made ring sizes per class); see
:func:`pyvmbus.mock.driver_core.id_table`.
"""

VMBUS_PARENT = ("sys", "devices", "LNXSYSTM:00", "LNXSYBUS:00", "ACPI0004:00", "VMBUS:00")
UIO_MAJOR = 243
FIXED_RING_FILE_SIZE = 2 * 512 * PAGE_SIZE
"""Old kernels: the ``ring`` bin attribute claims 2 * HV_RING_SIZE pages whatever the ring."""

CHANNEL_ATTRS = (
    "cpu", "in_mask", "out_mask", "read_avail", "write_avail", "pending", "latency", "interrupts",
    "events", "intr_in_full", "intr_out_empty", "out_full_first", "out_full_total", "monitor_id",
    "subchannel_id",
)
"""vmbus_chan_attrs (the bin attribute ``ring`` apart)."""
_CHANNEL_MONITOR_ATTRS = ("pending", "latency", "monitor_id")
_CHANNEL_RING_ATTRS = ("in_mask", "out_mask", "read_avail", "write_avail")
_CHANNEL_COUNTERS = ("interrupts", "events", "intr_in_full", "intr_out_empty", "out_full_first",
                     "out_full_total")

DEVICE_MONITOR_ATTRS = (
    "monitor_id", "server_monitor_pending", "client_monitor_pending", "server_monitor_latency",
    "client_monitor_latency", "server_monitor_conn_id", "client_monitor_conn_id",
)
RING_DEBUG_ATTRS = (
    "out_intr_mask", "out_read_index", "out_write_index", "out_read_bytes_avail",
    "out_write_bytes_avail", "in_intr_mask", "in_read_index", "in_write_index",
    "in_read_bytes_avail", "in_write_bytes_avail",
)
_INVALID_MONITOR_ID = 255
"""What kernels that show monitor_id for an unmonitored channel print (an invalid id)."""

_RO, _RW, _WO = 0o444, 0o644, 0o600

AttrValue = int | str | None


@dataclass
class MockChannel:
    """What the tree knows of one channel (the mock kernel's view, not read from files)."""

    relid: int
    subchannel_id: int
    monitor_id: int | None
    cpu: int


@dataclass
class MockDevice:
    """What the tree knows of one device."""

    guid: Guid
    cls: DeviceClass
    class_guid: Guid
    relid: int
    monitor_id: int | None
    path: Path
    ifname: str | None = None
    channels: dict[int, MockChannel] = field(default_factory=dict)

    @property
    def monitored(self) -> bool:
        return self.monitor_id is not None


@dataclass(frozen=True)
class Mount:
    """One line of ``proc/self/mountinfo`` for :meth:`SysfsTree.set_mounts`."""

    source: str
    mountpoint: str
    fstype: str = "ext4"
    dev: str | None = None
    """``major:minor``; looked up from ``root/sys/block`` for /dev/<name> sources when None."""


@dataclass(frozen=True)
class Route:
    """One IPv4 route for :meth:`SysfsTree.set_routes` (``0.0.0.0/0`` is the default route)."""

    iface: str
    destination: str = "0.0.0.0"
    gateway: str = "0.0.0.0"
    mask: str = "0.0.0.0"
    metric: int = 0


def _hex_ip(text: str) -> str:
    """An IPv4 address as /proc/net/route prints it: the __be32 printed as a host-order %08X."""
    return f"{int.from_bytes(ipaddress.IPv4Address(text).packed, sys.byteorder):08X}"


class SysfsTree:
    """Build and update the fake sysfs under ``root`` for one kernel generation.

    ``uio_loaded``: whether ``drivers/uio_hv_generic`` exists (``modprobe uio_hv_generic``).
    ``driver_override``: False builds devices without that file, as kernels before 4.18
    (then binding has to use new_id). ``numa``: False omits ``numa_node`` (no CONFIG_NUMA).
    Thread-safe: every mutation holds one lock.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        gen: KernelGeneration | str = DEFAULT_GENERATION,
        *,
        uio_loaded: bool = True,
        driver_override: bool = True,
        numa: bool = True,
    ) -> None:
        self.root = Path(root)
        self.generation = generation(gen) if isinstance(gen, str) else gen
        self.has_driver_override = driver_override
        self.numa = numa
        self.bus_dir = self.root / "sys" / "bus" / "vmbus"
        self.devices_dir = self.bus_dir / "devices"
        self.drivers_dir = self.bus_dir / "drivers"
        self.class_uio_dir = self.root / "sys" / "class" / "uio"
        self.class_net_dir = self.root / "sys" / "class" / "net"
        self.block_dir = self.root / "sys" / "block"
        self.dev_dir = self.root / "dev"
        self.run_dir = self.root / "run" / "mock"
        self.tmp_dir = self.run_dir / ".tmp"
        self.log_path = self.run_dir / "kernel.log"
        self.parent_dir = self.root.joinpath(*VMBUS_PARENT)
        self._lock = threading.RLock()
        self._devices: dict[Guid, MockDevice] = {}
        self._hosts: dict[Guid, int] = {}
        self._tmp_seq = 0
        for d in (self.devices_dir, self.drivers_dir, self.class_uio_dir, self.class_net_dir,
                  self.block_dir, self.dev_dir, self.tmp_dir, self.parent_dir,
                  self.root / "proc" / "self", self.root / "proc" / "net"):
            d.mkdir(parents=True, exist_ok=True)
        self.write_attr(self.bus_dir / "drivers_probe", "", _WO)
        self.write_attr(self.bus_dir / "drivers_autoprobe", "1\n", _RW)
        self.write_attr(self.bus_dir / "uevent", "", _WO)
        for name, _ in KERNEL_DRIVERS:
            self.load_driver(name)
        if uio_loaded:
            self.load_driver(UIO_DRIVER)
        self.log_path.touch()
        self.set_mounts(())
        self.set_routes(())

    # -- low-level writes ---------------------------------------------------------------------
    def _tmp_path(self, name: str) -> Path:
        with self._lock:
            self._tmp_seq += 1
            return self.tmp_dir / f"{name}.{os.getpid()}.{self._tmp_seq}"

    def write_attr(self, path: Path, text: str, mode: int = _RO) -> None:
        """Replace ``path`` with ``text`` atomically (readers see the old or the new value)."""
        tmp = self._tmp_path(path.name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # the umask may have cut bits the kernel's file has
        os.replace(tmp, path)

    def _symlink(self, link: Path, target: Path) -> None:
        """A relative symlink, so the root can be moved or bind-mounted elsewhere."""
        tmp = self._tmp_path(link.name)
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)

    def _install_dir(self, build: Path, dest: Path) -> None:
        """Move a directory built under tmp into place in one rename."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(build, dest)

    def _remove_dir(self, path: Path) -> None:
        """Make a directory vanish in one rename, then delete it."""
        if not path.exists():
            return
        gone = self._tmp_path(path.name + ".gone")
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def log(self, message: str) -> None:
        """Append a line to ``root/run/mock/kernel.log`` (the mock's dmesg)."""
        with self._lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[{time.monotonic():12.6f}] {message}\n")

    def kernel_log(self) -> list[str]:
        """Every line logged so far (errors a kernel would return from a write, probe failures)."""
        try:
            return self.log_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    # -- drivers ------------------------------------------------------------------------------
    def load_driver(self, name: str) -> Path:
        """Create ``drivers/<name>/{bind,unbind,new_id,remove_id,uevent}`` (module loaded)."""
        with self._lock:
            path = self.drivers_dir / name
            if path.is_dir():
                return path
            build = self._tmp_path(name)
            build.mkdir()
            for attr in ("bind", "unbind", "new_id", "remove_id", "uevent"):
                fd = os.open(build / attr, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, _WO)
                os.close(fd)
                os.chmod(build / attr, _WO)
            self._install_dir(build, path)
            return path

    def unload_driver(self, name: str) -> None:
        """Remove ``drivers/<name>`` (rmmod); the caller unbinds its devices first."""
        with self._lock:
            self._remove_dir(self.drivers_dir / name)

    def driver_loaded(self, name: str) -> bool:
        return (self.drivers_dir / name).is_dir()

    def drivers(self) -> list[str]:
        """Loaded drivers in registration order (kernel drivers, then uio_hv_generic)."""
        order = [n for n, _ in KERNEL_DRIVERS] + [UIO_DRIVER]
        present = {e.name for e in self.drivers_dir.iterdir() if e.is_dir()}
        return [n for n in order if n in present] + sorted(present - set(order))

    # -- devices ------------------------------------------------------------------------------
    def device(self, guid: str) -> MockDevice:
        """The tree's record of a device; KeyError if there is none."""
        with self._lock:
            return self._devices[parse_guid(guid)]

    def devices(self) -> list[Guid]:
        with self._lock:
            return list(self._devices)

    def device_dir(self, guid: str) -> Path:
        """The real directory (``root/sys/devices/.../VMBUS:00/<guid>``)."""
        return self.parent_dir / parse_guid(guid)

    def _free_relid(self) -> int:
        used = {r for d in self._devices.values() for r in d.channels}
        relid = 1
        while relid in used:
            relid += 1
        return relid

    def _free_monitor_id(self) -> int:
        used = {c.monitor_id for d in self._devices.values() for c in d.channels.values()}
        for mid in range(128):
            if mid not in used:
                return mid
        raise RuntimeError("all 128 monitor ids are in use")

    def _free_ifname(self) -> str:
        used = {d.ifname for d in self._devices.values()}
        n = 0
        while f"eth{n}" in used:
            n += 1
        return f"eth{n}"

    def add_device(
        self,
        cls: DeviceClass | str,
        instance: str | None = None,
        *,
        monitored: bool | None = None,
        monitor_id: int | None = None,
        relid: int | None = None,
        cpu: int = 0,
        numa_node: int = 0,
    ) -> Guid:
        """Offer a device: create its directory, primary channel and bus link; return its GUID.

        ``cls``: a DeviceClass, a class short name or a class GUID. ``monitored`` defaults
        to the class's perf_device (Hyper-V gives monitor ids to perf devices);
        ``monitor_id`` picks the id (else the lowest free one). The device starts unbound
        with state 2 (vmbus_process_offer sets CHANNEL_OPEN_STATE before it registers the
        device; 3 means a driver opened it); binding is the driver core's job.
        """
        dc = cls if isinstance(cls, DeviceClass) else lookup_class(cls)
        if dc.guid is None:
            raise ValueError("a device needs a class GUID")
        with self._lock:
            guid = parse_guid(instance) if instance is not None else Guid(str(uuid.uuid4()))
            if guid in self._devices or self.device_dir(guid).exists():
                raise ValueError(f"device {guid} exists already")
            if monitored is None:
                monitored = monitor_id is not None or dc.perf_device
            if monitored and monitor_id is None:
                monitor_id = self._free_monitor_id()
            if not monitored:
                monitor_id = None
            relid = relid if relid is not None else self._free_relid()
            dev = MockDevice(guid, dc, dc.guid, relid, monitor_id, self.device_dir(guid),
                             ifname=self._free_ifname() if dc.network else None)
            dev.channels[relid] = MockChannel(relid, 0, monitor_id, cpu)
            build = self._tmp_path(guid)
            build.mkdir()
            self._fill_device(build, dev, numa_node)
            self._install_dir(build, dev.path)
            self._devices[guid] = dev
            self._symlink(self.devices_dir / guid, dev.path)
            return guid

    def _fill_device(self, d: Path, dev: MockDevice, numa_node: int) -> None:
        gen = self.generation
        show_monitor = dev.monitored or not gen.hide_monitor_attrs
        values: dict[str, str] = {
            "id": f"{dev.relid}\n",
            "state": "2\n",  # CHANNEL_OPEN_STATE, set by vmbus_process_offer
            "class_id": f"{{{dev.class_guid}}}\n",
            "device_id": f"{{{dev.guid}}}\n",
            "modalias": f"vmbus:{dev.class_guid.bytes_le.hex()}\n",
            "vendor": "0x1414\n",
            "device": f"0x{dev.cls.dev_type:x}\n",
            "channel_vp_mapping": self._vp_mapping(dev),
            "uevent": f"MODALIAS=vmbus:{dev.class_guid.bytes_le.hex()}\n",
        }
        if self.numa:
            values["numa_node"] = f"{numa_node}\n"
        if show_monitor:
            mid = dev.monitor_id if dev.monitor_id is not None else _INVALID_MONITOR_ID
            values["monitor_id"] = f"{mid}\n"
            for name in DEVICE_MONITOR_ATTRS[1:]:
                values[name] = "0\n"
        for name in RING_DEBUG_ATTRS:
            values[name] = ""  # show() fails with EINVAL until a driver allocates the ring
        for name, text in values.items():
            self.write_attr(d / name, text)
        if self.has_driver_override:
            self.write_attr(d / "driver_override", "(null)\n", _RW)
        (d / "power").mkdir()
        (d / "channels").mkdir()
        os.symlink(os.path.relpath(self.bus_dir, dev.path), d / "subsystem")
        chan = dev.channels[dev.relid]
        cdir = d / "channels" / str(chan.relid)
        cdir.mkdir()
        self._fill_channel(cdir, chan)

    def remove_device(self, guid: str) -> None:
        """Unregister a device: its bus link, uio entries, block/net links and directory vanish."""
        with self._lock:
            g = parse_guid(guid)
            self._devices.pop(g, None)
            self._unlink(self.devices_dir / g)
            self.remove_uio(g)
            self.remove_net(g)
            self.remove_block_devices(g)
            self._unlink_from_driver(g)
            self._remove_dir(self.device_dir(g))

    def set_device_attrs(self, guid: str, **values: AttrValue) -> None:
        """Rewrite device attributes (``state=3``, ``in_read_index=...``); None empties one.

        Names must be real attributes; hidden monitor attributes stay hidden (ignored).
        """
        with self._lock:
            d = self.device_dir(guid)
            for name, value in values.items():
                if name in ("driver_override", "id", "class_id", "device_id", "modalias", "vendor",
                            "device"):
                    raise ValueError(f"{name} is not a dynamic attribute")
                if not (d / name).exists():
                    if name in DEVICE_MONITOR_ATTRS:
                        continue
                    if name not in (*RING_DEBUG_ATTRS, "state", "numa_node", "channel_vp_mapping"):
                        raise ValueError(f"no device attribute {name!r}")
                self.write_attr(d / name, "" if value is None else f"{value}\n")

    def set_state(self, guid: str, state: int) -> None:
        """The primary channel's state: 0 offer, 1 opening, 2 open (closed again), 3 opened."""
        self.set_device_attrs(guid, state=state)

    def set_driver_override_file(self, guid: str, value: str | None) -> None:
        """Show form of driver_override ("%s\\n"; NULL prints "(null)"); the driver core calls it."""
        if self.has_driver_override:
            self.write_attr(self.device_dir(guid) / "driver_override",
                            f"{value if value is not None else '(null)'}\n", _RW)

    # -- driver links -------------------------------------------------------------------------
    def driver_of(self, guid: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self.device_dir(guid) / "driver"))
        except FileNotFoundError:
            return None

    def _unlink_from_driver(self, guid: Guid) -> None:
        for drv in self.drivers_dir.iterdir():
            self._unlink(drv / guid)

    def set_driver(self, guid: str, name: str | None) -> None:
        """Point ``driver`` at ``drivers/<name>`` (and back-link the device there), or unbind."""
        with self._lock:
            g = parse_guid(guid)
            d = self.device_dir(g)
            self._unlink(d / "driver")
            self._unlink_from_driver(g)
            uevent = f"MODALIAS=vmbus:{self.device(g).class_guid.bytes_le.hex()}\n"
            if name is not None:
                drv = self.drivers_dir / name
                if not drv.is_dir():
                    raise ValueError(f"driver {name} is not loaded")
                self._symlink(d / "driver", drv)
                self._symlink(drv / g, d)
                uevent = f"DRIVER={name}\n" + uevent
            self.write_attr(d / "uevent", uevent)

    # -- channels -----------------------------------------------------------------------------
    def channel_dir(self, guid: str, relid: int) -> Path:
        return self.device_dir(guid) / "channels" / str(relid)

    def channels(self, guid: str) -> list[MockChannel]:
        with self._lock:
            return sorted(self.device(guid).channels.values(), key=lambda c: c.subchannel_id)

    def _vp_mapping(self, dev: MockDevice) -> str:
        chans = sorted(dev.channels.values(), key=lambda c: c.subchannel_id)
        return "".join(f"{c.relid}:{c.cpu}\n" for c in chans)

    def _fill_channel(self, cdir: Path, chan: MockChannel) -> None:
        show_monitor = chan.monitor_id is not None or not self.generation.hide_monitor_attrs
        for name in CHANNEL_ATTRS:
            if name in _CHANNEL_MONITOR_ATTRS and not show_monitor:
                continue  # vmbus_chan_attr_is_visible hides them without a monitor
            if name == "cpu":
                self.write_attr(cdir / name, f"{chan.cpu}\n", _RW)
            elif name == "subchannel_id":
                self.write_attr(cdir / name, f"{chan.subchannel_id}\n")
            elif name == "monitor_id":
                mid = chan.monitor_id if chan.monitor_id is not None else _INVALID_MONITOR_ID
                self.write_attr(cdir / name, f"{mid}\n")
            elif name in _CHANNEL_RING_ATTRS:
                self.write_attr(cdir / name, "")  # EINVAL until the ring is allocated
            else:
                self.write_attr(cdir / name, "0\n")

    def add_channel(
        self,
        guid: str,
        relid: int | None = None,
        subchannel_id: int | None = None,
        monitor_id: int | None = None,
        cpu: int = 0,
    ) -> int:
        """Add a subchannel's ``channels/<relid>/`` (built aside, renamed in); return the relid.

        ``subchannel_id`` defaults to the next index; ``monitor_id`` None = not monitored.
        """
        with self._lock:
            dev = self.device(guid)
            relid = relid if relid is not None else self._free_relid()
            if relid in dev.channels:
                raise ValueError(f"device {dev.guid} has a channel {relid} already")
            if subchannel_id is None:
                subchannel_id = max(c.subchannel_id for c in dev.channels.values()) + 1
            chan = MockChannel(relid, subchannel_id, monitor_id, cpu)
            build = self._tmp_path(str(relid))
            build.mkdir()
            self._fill_channel(build, chan)
            self._install_dir(build, self.channel_dir(dev.guid, relid))
            dev.channels[relid] = chan
            self.write_attr(dev.path / "channel_vp_mapping", self._vp_mapping(dev))
            return relid

    def remove_channel(self, guid: str, relid: int) -> None:
        """A subchannel is rescinded: its directory (and ring file) vanish."""
        with self._lock:
            dev = self.device(guid)
            if relid == dev.relid:
                raise ValueError("the primary channel goes with the device: use remove_device")
            dev.channels.pop(relid, None)
            self._remove_dir(self.channel_dir(dev.guid, relid))
            self.write_attr(dev.path / "channel_vp_mapping", self._vp_mapping(dev))

    def set_channel_attrs(self, guid: str, relid: int, **values: AttrValue) -> None:
        """Rewrite channel attributes (``in_mask=1``, ``events=7``, ...); None empties one.

        Hidden monitor attributes of an unmonitored channel stay hidden (ignored).
        """
        with self._lock:
            cdir = self.channel_dir(guid, relid)
            for name, value in values.items():
                if name not in CHANNEL_ATTRS:
                    raise ValueError(f"no channel attribute {name!r}; known: {', '.join(CHANNEL_ATTRS)}")
                if name in _CHANNEL_MONITOR_ATTRS and not (cdir / name).exists():
                    continue
                if name == "cpu":
                    dev = self.device(guid)
                    dev.channels[relid].cpu = int(value or 0)
                    self.write_attr(dev.path / "channel_vp_mapping", self._vp_mapping(dev))
                self.write_attr(cdir / name, "" if value is None else f"{value}\n",
                                _RW if name == "cpu" else _RO)

    def set_ring_allocated(self, guid: str, relid: int, ring_size: int | None) -> None:
        """A driver allocated (``ring_size`` bytes per direction, header included) or freed a ring.

        Sets the channel's ring counters (and, for the primary, the device's ring debug
        files) to an empty ring's values, or back to "show() fails" when freed.
        """
        with self._lock:
            dev = self.device(guid)
            if ring_size is None:
                self.set_channel_attrs(guid, relid, **dict.fromkeys(_CHANNEL_RING_ATTRS))
                if relid == dev.relid:
                    self.set_device_attrs(guid, **dict.fromkeys(RING_DEBUG_ATTRS))
                return
            data = ring_size - PAGE_SIZE
            self.set_channel_attrs(guid, relid, in_mask=0, out_mask=0, read_avail=0, write_avail=data)
            if relid == dev.relid:
                debug: dict[str, AttrValue] = dict.fromkeys(RING_DEBUG_ATTRS, 0)
                debug["out_write_bytes_avail"] = debug["in_write_bytes_avail"] = data
                self.set_device_attrs(guid, **debug)

    def ring_file_size(self, actual: int) -> int:
        """The st_size a ``ring`` file must show for a TX+RX pair of ``actual`` bytes."""
        return FIXED_RING_FILE_SIZE if self.generation.fixed_ring_file_size else actual

    def set_ring_file(
        self, guid: str, relid: int, source: Path | Callable[[Path], None] | None
    ) -> Path | None:
        """Make ``channels/<relid>/ring`` appear (or vanish with None).

        ``source`` is either a file to hard-link there (same filesystem; the mock kernel's
        backing file of the ring pair) or a callable that creates the file at the path it
        is given (e.g. binds a unix socket). The file must have mode 0600 and the size
        :meth:`ring_file_size` gives; that is the caller's job. Returns the path.
        """
        with self._lock:
            path = self.channel_dir(guid, relid) / "ring"
            if source is None:
                self._unlink(path)
                return None
            if not path.parent.is_dir():
                raise KeyError(f"device {guid} has no channel {relid}")
            if callable(source):
                self._unlink(path)  # never write through an old hard link into its backing file
                source(path)
            else:
                tmp = self._tmp_path("ring")
                os.link(source, tmp)
                os.replace(tmp, path)
            return path

    # -- uio ----------------------------------------------------------------------------------
    def next_uio_index(self) -> int:
        """The lowest free uio minor (the uio core allocates minors with an idr)."""
        used = {int(e.name[3:]) for e in self.class_uio_dir.iterdir() if e.name[3:].isdigit()}
        n = 0
        while n in used:
            n += 1
        return n

    def uio_maps(self, guid: str, gpadl: int = 0x1000) -> list[tuple[str, int]]:
        """(name, size) of the maps uio_hv_generic's probe would create for this device.

        txrx_rings = TX + RX ring of the generation's size for the class; int_page and
        monitor_page one Hyper-V page; recv/send GPADL buffers for the NIC (before 6.10 and
        on the 5.4-6.6 LTS lines for every device; never on OpenHCL, whose boot line sets
        send/recv_buf_size=0), named after their GPADL handle.
        """
        dev = self.device(guid)
        ring = self.generation.ring_size(dev.cls)
        maps = [("txrx_rings", 2 * ring), ("int_page", 4096), ("monitor_page", 4096)]
        buffers = self.generation.gpadl_buffers
        if buffers == "all" or (buffers == "nic" and dev.cls.network):
            maps += [(f"recv:{gpadl}", 31 * 1024 * 1024), (f"send:{gpadl + 1}", 16 * 1024 * 1024)]
        return maps

    def add_uio(self, guid: str, index: int, maps: Sequence[tuple[str, int]],
                addrs: Sequence[int] | None = None) -> str:
        """Register uio node ``uio<index>`` for the device; return its name.

        Creates ``<device>/uio/uioN/{name,version,event,dev,device,maps/mapK/...}`` and the
        ``root/sys/class/uio/uioN`` link. The node itself (``root/dev/uioN``) is the
        mock kernel's. ``addrs`` defaults to made-up page-aligned physical addresses.
        """
        with self._lock:
            dev = self.device(guid)
            name = f"uio{index}"
            if (self.class_uio_dir / name).exists():
                raise ValueError(f"{name} exists already")
            build = self._tmp_path(name)
            build.mkdir()
            self.write_attr(build / "name", f"{UIO_DRIVER}\n")
            self.write_attr(build / "version", "0.02.1\n")
            self.write_attr(build / "event", "0\n")
            self.write_attr(build / "dev", f"{UIO_MAJOR}:{index}\n")
            self.write_attr(build / "uevent", f"MAJOR={UIO_MAJOR}\nMINOR={index}\nDEVNAME={name}\n")
            os.symlink("../../../" + dev.guid, build / "device")
            (build / "maps").mkdir()
            addr = 0x10_0000_0000 + index * 0x1000_0000
            for k, (map_name, size) in enumerate(maps):
                mdir = build / "maps" / f"map{k}"
                mdir.mkdir()
                a = addrs[k] if addrs is not None else addr
                addr += (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
                self.write_attr(mdir / "name", f"{map_name}\n")
                self.write_attr(mdir / "addr", f"0x{a:016x}\n")
                self.write_attr(mdir / "size", f"0x{size:016x}\n")
                self.write_attr(mdir / "offset", "0x0\n")
            (dev.path / "uio").mkdir(exist_ok=True)
            self._install_dir(build, dev.path / "uio" / name)
            self._symlink(self.class_uio_dir / name, dev.path / "uio" / name)
            return name

    def uio_of(self, guid: str) -> str | None:
        try:
            names = [e.name for e in (self.device_dir(guid) / "uio").iterdir()]
        except FileNotFoundError:
            return None
        return min(names, default=None)

    def remove_uio(self, guid: str) -> str | None:
        """Unregister the device's uio node (class link first, then the directory); its name."""
        with self._lock:
            name = self.uio_of(guid)
            if name is None:
                return None
            self._unlink(self.class_uio_dir / name)
            self._remove_dir(self.device_dir(guid) / "uio" / name)
            with contextlib.suppress(OSError):
                (self.device_dir(guid) / "uio").rmdir()
            return name

    def set_uio_event(self, guid_or_name: str, count: int) -> None:
        """The uio ``event`` attribute: the cumulative count a 4-byte read() returns."""
        name = guid_or_name if guid_or_name.startswith("uio") else self.uio_of(guid_or_name)
        if name is None:
            return
        path = self.class_uio_dir / name / "event"
        if path.exists():
            self.write_attr(path, f"{count}\n")

    # -- network and storage (what the guard rails look at) -------------------------------------
    def add_net(self, guid: str, ifname: str | None = None) -> str:
        """hv_netvsc registered the interface: ``<device>/net/<ifname>`` and its class link."""
        with self._lock:
            dev = self.device(guid)
            name = ifname or dev.ifname or self._free_ifname()
            dev.ifname = name
            build = self._tmp_path(name)
            build.mkdir()
            mac = dev.guid.bytes_le[-3:]
            self.write_attr(build / "address", "00:15:5d:" + ":".join(f"{b:02x}" for b in mac) + "\n")
            self.write_attr(build / "ifindex", f"{2 + sorted(self._devices).index(dev.guid)}\n")
            self.write_attr(build / "operstate", "up\n")
            self.write_attr(build / "mtu", "1500\n")
            (dev.path / "net").mkdir(exist_ok=True)
            self._install_dir(build, dev.path / "net" / name)
            self._symlink(self.class_net_dir / name, dev.path / "net" / name)
            return name

    def remove_net(self, guid: str) -> None:
        """hv_netvsc let go of the device: its interfaces vanish."""
        with self._lock:
            net = self.device_dir(guid) / "net"
            if not net.is_dir():
                return
            for e in list(net.iterdir()):
                self._unlink(self.class_net_dir / e.name)
            self._remove_dir(net)

    def add_block_device(self, guid: str, name: str = "sda", *, partitions: int = 1,
                         major: int = 8, minor: int | None = None) -> Path:
        """A SCSI disk behind a storage device, laid out as storvsc + sd do it.

        ``<device>/hostH/targetH:0:0/H:0:0:L/block/<name>/{dev,<name>N/{dev,partition}}``,
        ``root/sys/block/<name>`` -> there, and ``block/<name>/device`` -> ``../../../H:0:0:L``.
        Returns the real path of ``block/<name>``.
        """
        with self._lock:
            g = parse_guid(guid)
            dev_path = self.device_dir(g)
            host = self._hosts.get(g)
            if host is None:
                host = max(self._hosts.values(), default=-1) + 1
                self._hosts[g] = host
            target = dev_path / f"host{host}" / f"target{host}:0:0"
            target.mkdir(parents=True, exist_ok=True)
            lun = sum(1 for e in target.iterdir() if e.name.startswith(f"{host}:"))
            sdev = target / f"{host}:0:0:{lun}"
            if minor is None:
                minor = 16 * (ord(name[-1]) - ord("a")) if name[-1].isalpha() else 0
            build = self._tmp_path(name)
            build.mkdir()
            self.write_attr(build / "dev", f"{major}:{minor}\n")
            self.write_attr(build / "size", "134217728\n")
            for i in range(1, partitions + 1):
                p = build / f"{name}{i}"
                p.mkdir()
                self.write_attr(p / "dev", f"{major}:{minor + i}\n")
                self.write_attr(p / "partition", f"{i}\n")
            (build / "holders").mkdir()
            os.symlink(f"../../../{host}:0:0:{lun}", build / "device")
            (sdev / "block").mkdir(parents=True, exist_ok=True)
            self._install_dir(build, sdev / "block" / name)
            self._symlink(self.block_dir / name, sdev / "block" / name)
            return sdev / "block" / name

    def remove_block_devices(self, guid: str) -> None:
        """storvsc let go of the device: its SCSI hosts and their disks vanish."""
        with self._lock:
            d = self.device_dir(guid)
            for link in list(self.block_dir.iterdir()):
                if link.is_symlink() and str(d) + "/" in os.path.realpath(link) + "/":
                    self._unlink(link)
            if d.is_dir():
                for host in [e for e in d.iterdir() if e.name.startswith("host")]:
                    self._remove_dir(host)

    def set_mounts(self, mounts: Iterable[Mount | tuple[str, str] | tuple[str, str, str]]) -> None:
        """Write ``root/proc/self/mountinfo``: proc and sysfs, then ``mounts`` in order."""
        lines = ["21 1 0:20 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
                 "22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw"]
        for i, m in enumerate(mounts):
            mount = m if isinstance(m, Mount) else Mount(*m)
            dev = mount.dev or self._dev_of(mount.source) or f"0:{40 + i}"
            point = mount.mountpoint.replace("\\", "\\134").replace(" ", "\\040")
            lines.append(f"{30 + i} 1 {dev} / {point} rw,relatime shared:{30 + i} - "
                         f"{mount.fstype} {mount.source} rw")
        self.write_attr(self.root / "proc" / "self" / "mountinfo", "\n".join(lines) + "\n")

    def _dev_of(self, source: str) -> str | None:
        """``major:minor`` of /dev/<name> from root/sys/block (disks and partitions)."""
        if not source.startswith("/dev/"):
            return None
        name = source[5:]
        for disk in self.block_dir.iterdir():
            dev = disk / "dev" if disk.name == name else disk / name / "dev"
            if dev.exists():
                return dev.read_text().strip()
        return None

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Write ``root/proc/net/route`` in the kernel's format (fib_route_seq_show)."""
        lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
        for r in routes:
            flags = 0x1 | (0x2 if r.gateway != "0.0.0.0" else 0)
            lines.append(f"{r.iface}\t{_hex_ip(r.destination)}\t{_hex_ip(r.gateway)}\t{flags:04X}\t0\t0\t"
                         f"{r.metric}\t{_hex_ip(r.mask)}\t0\t0\t0")
        self.write_attr(self.root / "proc" / "net" / "route", "\n".join(lines) + "\n")


ALIVE_LOCK = ("run", "mock", "alive.lock")
"""Under a mock root: the file the mock process holds an exclusive flock on while it runs
(the kernel drops it when the process dies, even by kill -9). It holds the pid."""


def hold_alive_lock(root: str | os.PathLike[str]) -> int:
    """Take the mock root's liveness lock for this process; the fd (keep it open)."""
    path = Path(root).joinpath(*ALIVE_LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def mock_liveness(root: str | os.PathLike[str]) -> tuple[bool, int | None] | None:
    """(alive, pid) of the mock process that built ``root``; None when ``root`` is not a mock
    root (no liveness lock: a real /sys, or a tree no mock process serves by design)."""
    path = Path(root).joinpath(*ALIVE_LOCK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            text = os.read(fd, 32).decode(errors="replace").strip()
            pid = int(text) if text.isdigit() else None
        except OSError:
            pid = None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, pid  # held: the mock process runs
        except OSError:
            return None
        return False, pid
    finally:
        os.close(fd)
