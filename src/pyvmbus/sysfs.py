"""A read-only model of ``/sys/bus/vmbus`` and ``/sys/class/uio`` under a root.

Everything is read with pathlib under ``root`` (default ``/``): pyudev cannot be pointed at
another sysfs root, and the mock builds its root in a temporary folder. Objects here hold
only names and paths; every property reads its file when asked, because the kernel (or
the mock kernel) changes these values at any time: the driver, the uio node, ring
counters. Formats follow SPEC section 3 (drivers/hv/vmbus_drv.c, drivers/uio/uio.c).

A device that vanishes while it is being read (the host rescinded it; newest kernels
unregister the device) raises :class:`~pyvmbus.errors.DeviceRescinded`; a lookup that
matches nothing raises :class:`~pyvmbus.errors.DeviceNotFound` with the nearest names
(:class:`~pyvmbus.errors.AmbiguousDevice`, listing them all, when it matches several).
A file holding what the kernel never writes (``id`` = ``abc``, a directory where an
attribute belongs, a 10 MB value) raises :class:`~pyvmbus.errors.MalformedSysfs` naming
the file and the value. None of these lets a raw OSError or ValueError escape.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .classes import CLASSES, DeviceClass, lookup_class
from .errors import (
    AmbiguousDevice,
    DeviceNotFound,
    DeviceRescinded,
    InvalidGuid,
    MalformedSysfs,
    NotPermitted,
)
from .guid import Guid, is_guid, parse_guid

__all__ = [
    "MAX_ATTR_BYTES",
    "MAX_MONITOR_ID",
    "UIO_DRIVER",
    "ChannelInfo",
    "Sysfs",
    "UioInfo",
    "UioMapInfo",
    "VmbusDevice",
    "devices_dir",
    "is_real_root",
    "mock_ring_call",
    "parse_int",
    "read_attr",
    "read_uio",
]

UIO_DRIVER = "uio_hv_generic"
MAX_MONITOR_ID = 128
"""Hyper-V has 4 trigger groups of 32 monitor bits; a larger id means "no monitor"."""

_UNAVAILABLE = (errno.EINVAL, errno.EIO, errno.ENODEV, errno.ENODATA, errno.ENXIO)
"""errnos a sysfs show() returns when the value does not exist now (ring not allocated)."""

MAX_ATTR_BYTES = 1 << 16
"""Longest sysfs attribute read: show() fills one page (4 KiB; 64 KiB on some arm64)."""

_UIO_NAME = re.compile(r"uio([0-9]+)")
_MAP_NAME = re.compile(r"map([0-9]+)")
_INT_LIMIT = 1 << 64
"""sysfs numbers are C integers: anything outside +-2**64 was not printed by a kernel."""
_PREFIX = re.compile(r"\{?[0-9a-f-]+")
MIN_PREFIX = 4
"""Shortest GUID prefix :meth:`Sysfs.device` accepts, so one stray character binds nothing."""


RING_REQUEST = struct.Struct("=4sQ")
"""A mock ``ring`` file's request: op (b"STAT" or b"MMAP") and the length to map."""
RING_REPLY = struct.Struct("=iQ")
"""Its reply: 0 or an errno, and the st_size a kernel would report (one fd with MMAP)."""


def mock_ring_call(path: Path, op: bytes, length: int = 0,
                   timeout: float = 5.0) -> tuple[int, int, int | None]:
    """Ask the mock kernel behind a ``ring`` socket: (errno or 0, st_size, fd or None).

    A real ``ring`` file is a sysfs bin attribute (st_size, mmap); the mock's is a unix
    socket so it can answer as hv_uio_ring_mmap does: ENODEV for a channel that is not
    open, EINVAL (vm_iomap_memory) for a map longer than the real ring pair, and report
    the st_size of the generation (a fixed 4 MiB before 65995e97a1ca).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        text = os.fsencode(path)
        if len(text) < 100:
            sock.connect(text)
        else:  # past sun_path's 108 bytes: reach the directory through /proc/self/fd
            dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/".encode() + os.fsencode(path.name))
            finally:
                os.close(dfd)
        sock.send(RING_REQUEST.pack(op, length))
        msg, fds, _, _ = socket.recv_fds(sock, RING_REPLY.size, 1)
    finally:
        sock.close()
    if len(msg) != RING_REPLY.size:
        for fd in fds:
            os.close(fd)
        raise ConnectionResetError(f"{path}: the mock kernel closed the ring file")
    status, size = RING_REPLY.unpack(msg)
    return status, size, fds[0] if fds else None


def is_real_root(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` is this machine's own ``/`` (not a mock or a copied tree): only there
    are root privileges, /proc and the kernel's synchronous writes real."""
    return os.path.realpath(root) == "/"


def devices_dir(root: str | os.PathLike[str]) -> Path:
    """``root/sys/bus/vmbus/devices``."""
    return Path(root) / "sys" / "bus" / "vmbus" / "devices"


def read_attr(path: Path) -> str | None:
    """The text of one sysfs attribute, or None if it is absent or has no value now.

    A show() that fails with EINVAL / EIO / ENODEV (e.g. ring counters of a channel whose
    ring is not allocated) reads as None, and so does an empty file (the mock's
    stand-in for such a failure). PermissionError becomes :class:`NotPermitted`; a
    directory (or anything else that cannot be read) where the attribute belongs, or a
    value longer than :data:`MAX_ATTR_BYTES`, :class:`MalformedSysfs`. Reads at most
    that much: a bad tree cannot make this read gigabytes.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ATTR_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise NotPermitted(str(path), "read") from None
    except OSError as exc:
        if exc.errno in _UNAVAILABLE:
            return None
        what = "a directory" if exc.errno == errno.EISDIR else f"unreadable ({exc.strerror or exc})"
        raise MalformedSysfs(str(path), None, f"{what} where a sysfs attribute belongs") from None
    except ValueError as exc:  # a NUL byte in the path: not a file anyone can name
        raise MalformedSysfs(repr(str(path)), None, f"not a usable path ({exc})") from None
    if len(raw) > MAX_ATTR_BYTES:
        raise MalformedSysfs(str(path), raw[:64].decode("utf-8", "replace"),
                             f"at most {MAX_ATTR_BYTES} bytes (a sysfs attribute is one page)")
    text = raw.decode("utf-8", errors="replace").strip()
    return text or None


def _names(path: Path) -> list[str] | None:
    """The entries of a sysfs directory; None when it is absent (or not a directory).

    PermissionError becomes :class:`NotPermitted`; anything else (a symlink loop, EIO)
    :class:`MalformedSysfs`, never a raw OSError.
    """
    try:
        return [e.name for e in path.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise NotPermitted(str(path), "list") from None
    except OSError as exc:
        raise MalformedSysfs(str(path), None, f"unreadable directory ({exc.strerror or exc})") from None


def parse_int(text: str, path: Path | str = "") -> int:
    """Parse a sysfs number: decimal, or 0x-prefixed hex ("%pa", "0x%x"); base 0 rules.

    Anything else (a word, an empty string, a 5,000-digit number, ``1_0``) raises
    :class:`MalformedSysfs` naming ``path`` and the text (a ``ValueError`` too).
    """
    value: int | None = None
    if "_" not in text and len(text) <= 64:  # int() takes "1_0"; no kernel prints it
        for base in (0, 10):  # "%d" never pads, but base 0 rejects e.g. "007"
            try:
                value = int(text, base)
                break
            except ValueError:
                continue
    if value is None or not -_INT_LIMIT < value < _INT_LIMIT:
        raise MalformedSysfs(str(path) or "?", text, "a number")
    return value


@dataclass(frozen=True)
class UioMapInfo:
    """One ``/sys/class/uio/uioN/maps/mapK`` directory (drivers/uio/uio.c map_*_show)."""

    index: int
    name: str
    addr: int
    size: int
    offset: int


@dataclass(frozen=True)
class UioInfo:
    """``/sys/class/uio/uioN`` read at one moment (``event`` is the count at that moment)."""

    name: str
    """The node name, e.g. ``uio0`` (``/dev/uio0``)."""
    driver_name: str
    """The ``name`` attribute: ``uio_hv_generic`` for VMBus devices."""
    version: str
    event: int
    maps: tuple[UioMapInfo, ...]
    path: Path

    def map(self, name: str) -> UioMapInfo:
        """The map called ``name`` (``recv:`` / ``send:`` match the GPADL maps by prefix)."""
        for m in self.maps:
            if m.name == name or (name.endswith(":") and m.name.startswith(name)):
                return m
        raise KeyError(f"{self.name} has no map {name!r}; it has {', '.join(m.name for m in self.maps)}")


def read_uio(root: str | os.PathLike[str], name: str) -> UioInfo | None:
    """Read ``root/sys/class/uio/<name>``; None if that node does not exist (any more)."""
    path = Path(root) / "sys" / "class" / "uio" / name
    maps: list[UioMapInfo] = []
    entries = sorted(
        (int(m.group(1)), path / "maps" / n)
        for n in _names(path / "maps") or () if (m := _MAP_NAME.fullmatch(n))
    )
    for index, entry in entries:
        fields = [read_attr(entry / f) for f in ("name", "addr", "size", "offset")]
        if fields[0] is None or fields[2] is None:
            continue  # the map vanished while we read it
        maps.append(UioMapInfo(
            index, fields[0],
            parse_int(fields[1] or "0", entry / "addr"),
            parse_int(fields[2], entry / "size"),
            parse_int(fields[3] or "0", entry / "offset"),
        ))
    driver_name = read_attr(path / "name")
    if driver_name is None:
        return None
    event = read_attr(path / "event")
    return UioInfo(
        name=name,
        driver_name=driver_name,
        version=read_attr(path / "version") or "",
        event=parse_int(event, path / "event") if event is not None else 0,
        maps=tuple(maps),
        path=path,
    )


class ChannelInfo:
    """One channel of a device: ``/sys/bus/vmbus/devices/<guid>/channels/<relid>/``.

    The primary channel and each subchannel have one. Every property reads its file when
    asked. Ring counters (``in_mask`` ... ``write_avail``) are None while the ring is not
    allocated (the kernel's show() fails with EINVAL then); ``monitor_id`` is None when
    the channel is not monitored (the kernel hides the file).
    """

    __slots__ = ("device", "path", "relid")

    def __init__(self, device: Guid, relid: int, path: Path) -> None:
        self.device = device
        self.relid = relid
        self.path = path

    def __repr__(self) -> str:
        return f"ChannelInfo({self.device}, relid={self.relid})"

    def _opt(self, name: str) -> int | None:
        text = read_attr(self.path / name)
        return None if text is None else parse_int(text, self.path / name)

    def _int(self, name: str) -> int:
        value = self._opt(name)
        if value is None:
            if not self.path.is_dir():
                raise DeviceRescinded(self.device, f"channel {self.relid} vanished while reading {name}")
            raise DeviceNotFound(f"{self.device} channel {self.relid}", where=str(self.path / name))
        return value

    @property
    def cpu(self) -> int:
        """The CPU the host interrupts for this channel (target_cpu)."""
        return self._int("cpu")

    @property
    def subchannel_id(self) -> int:
        """0 for the primary channel, 1.. for subchannels (offer.sub_channel_index)."""
        return self._int("subchannel_id")

    @property
    def is_primary(self) -> bool:
        """True for the device's primary channel (the one uio map 0 holds)."""
        return self.subchannel_id == 0

    @property
    def monitor_id(self) -> int | None:
        """This channel's monitor id; None when it is not monitored (hidden file or id >= 128)."""
        value = self._opt("monitor_id")
        return value if value is not None and 0 <= value < MAX_MONITOR_ID else None

    @property
    def monitored(self) -> bool:
        """True when the host watches a monitor-page bit for this channel."""
        return self.monitor_id is not None

    @property
    def in_mask(self) -> int | None:
        """The inbound (host->guest) ring's interrupt_mask: 1 while the guest does not want signals."""
        return self._opt("in_mask")

    @property
    def out_mask(self) -> int | None:
        """The outbound ring's interrupt_mask, as the host set it."""
        return self._opt("out_mask")

    @property
    def read_avail(self) -> int | None:
        """Bytes waiting in the inbound ring (a stalled reader shows here)."""
        return self._opt("read_avail")

    @property
    def write_avail(self) -> int | None:
        """Free bytes in the outbound ring (0-ish: the host stopped reading)."""
        return self._opt("write_avail")

    @property
    def events(self) -> int | None:
        """Signals the guest sent the host on this channel (the kernel's count, not uio's)."""
        return self._opt("events")

    @property
    def interrupts(self) -> int | None:
        """Interrupts the host raised for this channel."""
        return self._opt("interrupts")

    @property
    def ring_path(self) -> Path | None:
        """``channels/<relid>/ring`` once uio_hv_generic has exposed it (it appears late)."""
        p = self.path / "ring"
        return p if p.exists() else None

    @property
    def ring_file_size(self) -> int | None:
        """st_size of the ring file: TX + RX bytes on newest kernels, a fixed 4 MiB on old ones."""
        path = self.path / "ring"
        try:
            st = path.stat()
            if not stat.S_ISSOCK(st.st_mode):
                return st.st_size
            return mock_ring_call(path, b"STAT")[1]  # the mock kernel's ring file
        except OSError:
            return None


class VmbusDevice:
    """One VMBus device: mirrors ``/sys/bus/vmbus/devices/<instance guid>``.

    Holds the GUID and the path only; every property reads sysfs when asked. Get one from
    :meth:`Sysfs.device` or :meth:`Sysfs.devices`.
    """

    __slots__ = ("guid", "path", "root")

    def __init__(self, root: Path, guid: Guid) -> None:
        self.root = root
        self.guid = guid
        self.path = devices_dir(root) / guid

    def __repr__(self) -> str:
        return f"VmbusDevice({self.guid})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VmbusDevice) and (self.root, self.guid) == (other.root, other.guid)

    def __hash__(self) -> int:
        return hash((self.root, self.guid))

    def exists(self) -> bool:
        """False once the device is gone (rescinded and unregistered, or removed)."""
        return self.path.is_dir()

    def _gone(self, what: str) -> DeviceRescinded:
        return DeviceRescinded(self.guid, f"its sysfs directory vanished while reading {what}")

    def _opt(self, name: str) -> str | None:
        return read_attr(self.path / name)

    def _str(self, name: str) -> str:
        text = self._opt(name)
        if text is None:
            if not self.exists():
                raise self._gone(name)
            raise DeviceNotFound(self.guid, where=f"{self.path} (no '{name}' attribute)")
        return text

    def _int(self, name: str) -> int:
        return parse_int(self._str(name), self.path / name)

    def _opt_int(self, name: str) -> int | None:
        text = self._opt(name)
        return None if text is None else parse_int(text, self.path / name)

    # -- identity ---------------------------------------------------------------------------
    @property
    def class_guid(self) -> Guid:
        """The device class (``class_id``, printed with braces by the kernel)."""
        return self._guid("class_id")

    @property
    def device_class(self) -> DeviceClass:
        """The class table row; an ``unknown`` class carrying the GUID if Linux does not know it."""
        return lookup_class(str(self.class_guid))

    @property
    def device_id(self) -> Guid:
        """The instance GUID as ``device_id`` prints it (the same as :attr:`guid`)."""
        return self._guid("device_id")

    def _guid(self, name: str) -> Guid:
        text = self._str(name)
        try:
            return parse_guid(text)
        except InvalidGuid:
            raise MalformedSysfs(str(self.path / name), text, "a GUID") from None

    @property
    def relid(self) -> int:
        """The primary channel's relid (``id``)."""
        return self._int("id")

    @property
    def state(self) -> int:
        """Primary channel state: 2 offered or closed again (CHANNEL_OPEN_STATE), 3 opened
        by a driver; 0 and 1 are passing states a reader hardly sees."""
        return self._int("state")

    @property
    def monitor_id(self) -> int | None:
        """The monitor id, or None when the channel is not monitored.

        Kernels since 5.2 (46fc15487d02, also in 4.19.y) hide the file for channels
        without a monitor allocation; kernels that still show it print an invalid id
        (>= 128) there, which also reads as None.
        """
        value = self._opt_int("monitor_id")
        if value is None and not self.exists():
            raise self._gone("monitor_id")
        return value if value is not None and 0 <= value < MAX_MONITOR_ID else None

    @property
    def monitored(self) -> bool:
        """True when the host watches a monitor-page bit for this channel (perf devices)."""
        return self.monitor_id is not None

    @property
    def modalias(self) -> str:
        """``vmbus:`` + the class GUID's 16 raw bytes in hex (what udev rules match on)."""
        return self._str("modalias")

    @property
    def numa_node(self) -> int | None:
        """NUMA node (None without CONFIG_NUMA)."""
        return self._opt_int("numa_node")

    @property
    def vendor(self) -> int:
        """PCI vendor id: 0x1414 (Microsoft)."""
        return self._int("vendor")

    @property
    def device(self) -> int:
        """The kernel's dev_type index (HV_NIC = 3, ...; 16 = unknown)."""
        return self._int("device")

    @property
    def channel_vp_mapping(self) -> list[tuple[int, int]]:
        """(relid, cpu) for the primary channel first, then each subchannel."""
        out = []
        path = self.path / "channel_vp_mapping"
        for line in self._str("channel_vp_mapping").splitlines():
            relid, _, cpu = line.partition(":")
            if cpu:
                out.append((parse_int(relid.strip(), path), parse_int(cpu.strip(), path)))
        return out

    # -- driver -----------------------------------------------------------------------------
    @property
    def driver(self) -> str | None:
        """Name of the bound driver (the target of the ``driver`` link), None if unbound."""
        try:
            return os.path.basename(os.readlink(self.path / "driver"))
        except FileNotFoundError:
            if not self.exists():
                raise self._gone("driver") from None
            return None
        except PermissionError:
            raise NotPermitted(str(self.path / "driver"), "read") from None
        except OSError as exc:  # EINVAL: a file or directory, not the kernel's link
            raise MalformedSysfs(str(self.path / "driver"), None,
                                 f"not a link to a driver ({exc.strerror or exc})") from None

    @property
    def driver_override(self) -> str | None:
        """The driver_override, None when unset ("(null)" or empty)."""
        text = self._opt("driver_override")
        if text is None and not self.exists():
            raise self._gone("driver_override")
        return None if text in (None, "(null)") else text

    @property
    def has_driver_override(self) -> bool:
        """Whether the kernel offers driver_override for this bus (since 4.18)."""
        return (self.path / "driver_override").exists()

    # -- channels, uio, net -----------------------------------------------------------------
    def channels(self) -> list[ChannelInfo]:
        """The primary channel and every subchannel, primary first, then by subchannel id."""
        base = self.path / "channels"
        names = _names(base)
        if names is None:
            if not self.exists():
                raise self._gone("channels")
            return []
        chans: list[tuple[int, int, ChannelInfo]] = []
        for name in names:
            if not (name.isascii() and name.isdigit()):
                continue
            info = ChannelInfo(self.guid, int(name), base / name)
            try:
                sub = info.subchannel_id
            except (DeviceNotFound, DeviceRescinded):
                continue  # a subchannel rescinded while listing: not there any more
            chans.append((sub, info.relid, info))
        chans.sort(key=lambda t: (t[0], t[1]))
        return [c for _, _, c in chans]

    def channel(self, relid: int) -> ChannelInfo:
        """The channel with this relid; DeviceNotFound if the device has none."""
        path = self.path / "channels" / str(relid)
        if not path.is_dir():
            if not self.exists():
                raise self._gone("channels")
            raise DeviceNotFound(f"{self.guid} channel {relid}", where=str(self.path / "channels"))
        return ChannelInfo(self.guid, relid, path)

    @property
    def uio_name(self) -> str | None:
        """``uioN`` when the device is bound to uio_hv_generic and its node is registered."""
        names = _names(self.path / "uio")
        if names is None:
            if not self.exists():
                raise self._gone("uio")
            return None
        nodes = sorted((int(m.group(1)), n) for n in names if (m := _UIO_NAME.fullmatch(n)))
        return nodes[0][1] if nodes else None

    def uio(self) -> UioInfo | None:
        """The uio node's class attributes (name, version, event count, maps), or None."""
        name = self.uio_name
        return None if name is None else read_uio(self.root, name)

    @property
    def net_interfaces(self) -> list[str]:
        """Network interface names the bound driver registered (hv_netvsc: ``net/eth0``)."""
        return sorted(_names(self.path / "net") or ())


class Sysfs:
    """The VMBus view of a sysfs tree under ``root`` (``/`` on a real guest).

    Holds only the root; nothing that can change is cached.
    """

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self.devices_dir = devices_dir(self.root)
        self.drivers_dir = self.root / "sys" / "bus" / "vmbus" / "drivers"

    def __repr__(self) -> str:
        return f"Sysfs({str(self.root)!r})"

    def guids(self) -> list[Guid]:
        """Instance GUIDs of every device, sorted."""
        names = _names(self.devices_dir) or []
        # Entries are links to device directories; anything else (a stray file) is no device.
        return sorted(Guid(n) for n in names
                      if is_guid(n) and n == n.lower() and (self.devices_dir / n).is_dir())

    def devices(self) -> list[VmbusDevice]:
        """Every VMBus device, sorted by instance GUID; [] on a machine without VMBus."""
        return [VmbusDevice(self.root, g) for g in self.guids()]

    def driver_loaded(self, name: str) -> bool:
        """True when ``root/sys/bus/vmbus/drivers/<name>`` exists (the module is loaded)."""
        return (self.drivers_dir / name).is_dir()

    def drivers(self) -> list[str]:
        """Names of the VMBus drivers registered now."""
        return sorted(n for n in _names(self.drivers_dir) or () if (self.drivers_dir / n).is_dir())

    def device(self, query: str) -> VmbusDevice:
        """Find one device by instance GUID (any spelling), unique GUID prefix, or class.

        A class (short name such as ``fcopy``, or a class GUID) selects the device only
        when exactly one device has it. Raises :class:`DeviceNotFound` naming the nearest
        GUIDs / class names, or the candidates when the query is ambiguous.
        """
        q = query.strip()
        guids = self.guids()
        if is_guid(q):
            g = parse_guid(q)
            if g in guids:
                return VmbusDevice(self.root, g)
            by_class = self._by_class(g, guids)
            if len(by_class) == 1:
                return by_class[0]
            if by_class:
                raise self._ambiguous(query, "devices of that class", by_class)
            raise DeviceNotFound(query, self._nearest(str(g), guids), str(self.devices_dir))
        low = q.lower()
        try:
            cls = lookup_class(low) if not is_guid(low) and low.isalpha() else None
        except KeyError:
            cls = None
        if cls is not None and cls.guid is not None:
            matches = self._by_class(cls.guid, guids)
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise self._ambiguous(query, f"{cls.name} devices", matches)
            raise DeviceNotFound(query, self._nearest(low, guids), str(self.devices_dir)
                                 + f" (no {cls.name} device)")
        if _PREFIX.fullmatch(low):
            prefix = low.lstrip("{")
            hits = [g for g in guids if g.startswith(prefix)]
            if len(prefix.replace("-", "")) < MIN_PREFIX:
                raise DeviceNotFound(
                    query, tuple(hits[:5]),
                    str(self.devices_dir) + f" (a GUID prefix needs at least {MIN_PREFIX} hex digits)",
                )
            if len(hits) == 1:
                return VmbusDevice(self.root, hits[0])
            if hits:
                raise self._ambiguous(query, "devices with that prefix",
                                      [VmbusDevice(self.root, g) for g in hits], "give more of the GUID")
        elif not low.isalpha():
            try:
                parse_guid(q)
            except InvalidGuid as exc:
                nearest = self._nearest(low, guids)
                raise DeviceNotFound(query, nearest, f"{self.devices_dir} ({exc.reason})") from None
        raise DeviceNotFound(query, self._nearest(low, guids), str(self.devices_dir))

    def _by_class(self, cls_guid: Guid, guids: list[Guid]) -> list[VmbusDevice]:
        out = []
        for g in guids:
            dev = VmbusDevice(self.root, g)
            try:
                if dev.class_guid == cls_guid:
                    out.append(dev)
            except (DeviceRescinded, DeviceNotFound, MalformedSysfs):
                continue  # gone, or unreadable: reading it directly says which file
        return out

    def _ambiguous(self, query: str, what: str, devs: list[VmbusDevice],
                   fix: str = "give the instance GUID") -> AmbiguousDevice:
        labels = []
        for d in devs:
            try:
                labels.append(d.device_class.name)
            except (DeviceRescinded, DeviceNotFound, InvalidGuid, MalformedSysfs):
                labels.append("")
        return AmbiguousDevice(query, what, tuple(d.guid for d in devs), str(self.devices_dir), fix,
                               tuple(labels))

    def _nearest(self, query: str, guids: list[Guid]) -> tuple[str, ...]:
        """GUIDs (and class names of present devices) closest to a mistyped query."""
        names: list[str] = list(guids)
        present: set[str] = set()
        for g in guids:
            try:
                present.add(VmbusDevice(self.root, g).device_class.name)
            except (DeviceRescinded, DeviceNotFound, InvalidGuid, MalformedSysfs):
                continue
        known = [c.name for c in CLASSES if c.name in present]
        close = difflib.get_close_matches(query, names + known, n=3, cutoff=0.6)
        if not close and guids:
            # A GUID typed with a wrong group still shares most characters with the right one.
            scored = sorted(guids, key=lambda g: -difflib.SequenceMatcher(None, query, g).ratio())
            close = [g for g in scored[:3] if difflib.SequenceMatcher(None, query, g).ratio() >= 0.4]
        return tuple(close)
