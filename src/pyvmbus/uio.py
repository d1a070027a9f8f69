"""The uio transport: open ``root/dev/uioN``, map its regions, wait for and control interrupts.

:class:`UioDevice` mirrors one open of a uio_hv_generic device node. Two transports sit
behind it, picked by the node's file type, and nothing above this module knows which one
it has:

- **kernel** (a character device): map ``k`` is ``mmap(fd, size_k, offset=k*PAGE_SIZE)``;
  ``read()`` of exactly 4 bytes blocks until an interrupt and returns the cumulative event
  count; ``write()`` of a 4-byte int is irqcontrol (1 unmask, 0 mask). EIO from either
  means the host rescinded the device.
- **mock** (a unix ``SOCK_SEQPACKET`` socket of :mod:`pyvmbus.mock`): connecting is the
  open; the mock kernel answers with one message carrying one fd per map (memfds, and
  the ring file for map 0) plus one more, the *write socket* (``SCM_RIGHTS``); the maps
  are mapped like the kernel's. After the client's ``UIOACK!!`` the node socket carries
  exactly the 4-byte reads of the real node: a 4-byte message from the kernel is an
  interrupt event (the cumulative count). Closing it is the release. An 8-byte ``ERR!``
  + errno message is the mock's way of failing a read (EIO after a rescind); a
  connection closed without one means the mock's process died.

  irqcontrol is a 4-byte message on the write socket, answered with a 4-byte status (0 or
  an errno: EINVAL for a write that is not 4 bytes, as uio_write says) once the mock
  kernel has applied it. So, as on the real node, when ``irqcontrol`` returns the masks
  are set and the host has been signalled; a write that returned before the kernel acted
  would let a client that unmasks with write(1) and re-checks the ring sleep on a packet
  the host wrote in between. (A 4-byte message on the node socket itself is accepted too,
  as an asynchronous irqcontrol, for raw clients.)

The policy (the rescinded state, timeouts, error translation) lives in :class:`UioDevice`;
the transports only move bytes, as in python-can's bus / backend split.

One user at a time: the kernel (and so the mock) lets several processes open a node and
share its channel, where they would take each other's packets. :meth:`UioDevice.open`
therefore takes pyvmbus's lock of the device (:mod:`pyvmbus.devlock`) before it opens the
node and holds it until :meth:`UioDevice.close`; a second user is refused with
:class:`DeviceBusy`, which names the holder. ``exclusive=False`` opens without it, for
observers that only read the ring headers (``vmbus ring --map``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import mmap
import os
import select
import socket
import stat
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import devlock
from .errors import (
    ChannelClosed,
    DeviceNotFound,
    DeviceRescinded,
    HostCrashed,
    InvalidGuid,
    NotPermitted,
    Timeout,
    VmbusError,
)
from .guid import parse_guid
from .sysfs import mock_ring_call

_log = logging.getLogger(__name__)

__all__ = [
    "MOCK_ACK",
    "MOCK_ERR",
    "MOCK_OK",
    "PAGE_SIZE",
    "UioDevice",
    "UioMap",
    "connect_unix",
    "lock_key",
    "pack_error",
    "pack_open_reply",
]

PAGE_SIZE = mmap.PAGESIZE
"""The system page size: map k of a uio node lives at mmap offset k * PAGE_SIZE."""

_COUNT = struct.Struct("=I")  # uio_read copies an s32 count; it is a cumulative counter.
_IRQ = struct.Struct("=i")  # uio_write takes an s32 (irq_on).
_IRQ_ONE = _IRQ.pack(1)  # the hot path's write (signal / unmask), packed once
_STATUS_OK = _COUNT.pack(0)  # the mock kernel's answer to an applied write

MOCK_OK = b"UIOK"
"""Magic of the mock kernel's open reply: ``UIOK``, u32 map count, u64 size per map + fds."""
MOCK_ERR = b"ERR!"
"""Magic of the mock kernel's error message: ``ERR!`` + u32 errno (8 bytes, never 4)."""
MOCK_ACK = b"UIOACK!!"
"""The client's last handshake message: its maps are set up; from now on only 4-byte
reads and writes. The mock kernel starts delivering events to the connection then (and
delivers one at once if the count moved since the connect, as uio_open's snapshot of
the event count makes the first read() return)."""
_ERR = struct.Struct("<4sI")
_OPEN_HEAD = struct.Struct("<4sI")
_MAX_MAPS = 8
_UNIX_PATH_MAX = 107


def pack_error(err: int) -> bytes:
    """The mock's error message for ``err`` (used by the mock kernel)."""
    return _ERR.pack(MOCK_ERR, err)


def pack_open_reply(sizes: list[int]) -> bytes:
    """The mock's open reply header for maps of ``sizes`` (used by the mock kernel)."""
    return _OPEN_HEAD.pack(MOCK_OK, len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)


def connect_unix(sock: socket.socket, path: Path, *, bind: bool = False) -> None:
    """connect() (or bind()) a unix socket to ``path``, even past the 107-byte sun_path limit.

    A long root (a user's deep --root folder) would otherwise make the node unusable; the
    directory is reached through /proc/self/fd/N instead, which is always short.
    """
    text = os.fsencode(path)
    if len(text) <= _UNIX_PATH_MAX:
        (sock.bind if bind else sock.connect)(text)
        return
    dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{dfd}/".encode() + os.fsencode(path.name)
        (sock.bind if bind else sock.connect)(short)
    finally:
        os.close(dfd)


@dataclass(eq=False)
class UioMap:
    """One region of the node (sysfs ``maps/mapK``): index, name, size and its mapping."""

    index: int
    name: str
    size: int
    array: npt.NDArray[np.uint8] = field(repr=False)


_libc = ctypes.CDLL(None, use_errno=True)
_c_mmap = _libc.mmap
_c_mmap.restype = ctypes.c_void_p
_c_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                    ctypes.c_int64]
_c_munmap = _libc.munmap
_c_munmap.restype = ctypes.c_int
_c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_c_mremap = _libc.mremap
_c_mremap.restype = ctypes.c_void_p
_c_mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class _Mapping:
    """One shared mapping of a node's region (or a ring file) that can be let go at once.

    Python's ``mmap.mmap`` cannot: ``close()`` refuses while a numpy view exists
    (BufferError), and it keeps a dup of the fd meanwhile. A live mapping (or that fd)
    keeps the uio file open, and hv_uio_release -- which closes the host channel -- runs
    only when the last reference goes. So the mapping is made here with mmap(2), and
    :meth:`detach` replaces it in place (mremap of a private anonymous copy onto the same
    addresses, atomically) when the device closes: every view handed out stays valid and
    reads the region as it was at the close (a detached copy; writes go nowhere), and the
    file is no longer referenced. The copy is unmapped when the last view is gone.
    """

    __slots__ = ("__weakref__", "addr", "detached", "length")

    def __init__(self, fd: int, length: int, offset: int) -> None:
        addr = _c_mmap(None, length, _PROT_RW, mmap.MAP_SHARED, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            raise _os_error(f"mmap of {length} bytes at offset {offset}")
        self.addr: int = addr
        self.length = length
        self.detached = False
        # At interpreter exit the process unmaps everything anyway; unmapping earlier
        # could pull the memory from under a daemon thread still reading a ring.
        weakref.finalize(self, _c_munmap, addr, length).atexit = False

    def array(self, start: int, count: int) -> npt.NDArray[np.uint8]:
        """A numpy view of ``count`` bytes from ``start``; it keeps this mapping alive."""
        if start < 0 or count < 0 or start + count > self.length:
            raise ValueError(f"bytes {start}..{start + count} are outside the {self.length}-byte mapping")
        raw = (ctypes.c_uint8 * count).from_address(self.addr + start)
        raw._owner = self  # type: ignore[attr-defined]  # the views keep the mapping
        return np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)

    def detach(self) -> None:
        """Swap the shared pages for a private copy at the same address (idempotent)."""
        if self.detached:
            return
        length = self.length
        tmp = _c_mmap(None, length, _PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if tmp is None or tmp == _MAP_FAILED:
            raise _os_error(f"mmap of a {length}-byte copy")
        ctypes.memmove(tmp, self.addr, length)
        moved = _c_mremap(tmp, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, self.addr)
        if moved is None or moved == _MAP_FAILED:
            exc = _os_error("mremap of the copy over the shared mapping")
            _c_munmap(tmp, length)
            raise exc
        self.detached = True


def _read_attr(path: Path) -> str:
    return path.read_text().strip()


def _sysfs_maps(root: Path, name: str) -> list[tuple[int, str, int, int]]:
    """(index, name, size, addr) of every map sysfs lists for uio ``name``, by index.

    ``addr`` is 0 when the file is missing or unreadable: it only places the map inside
    its first page (see :meth:`_KernelTransport.map`), and 0 means "at the start".
    """
    maps_dir = root / "sys" / "class" / "uio" / name / "maps"
    out = []
    try:
        entries = list(maps_dir.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.startswith("map") or not entry.name[3:].isdigit():
            continue
        index = int(entry.name[3:])
        try:
            size = int(_read_attr(entry / "size"), 0)
            map_name = _read_attr(entry / "name")
        except FileNotFoundError:
            continue
        try:
            addr = int(_read_attr(entry / "addr"), 0)
        except (OSError, ValueError):
            addr = 0
        out.append((index, map_name, size, addr))
    out.sort()
    return out


def lock_key(root: str | os.PathLike[str], name: str, device: str | None = None) -> str:
    """The name of the device lock (:mod:`pyvmbus.devlock`) for uio node ``name``.

    The device's instance GUID: ``device`` when it is one, else the GUID the node's
    ``root/sys/class/uio/<name>/device`` link leads to. A node that leads to no VMBus
    device (a test fixture) is locked as ``uio-<name>``.
    """
    candidates = [device]
    with contextlib.suppress(OSError):
        link = os.readlink(Path(root) / "sys" / "class" / "uio" / name / "device")
        candidates.append(os.path.basename(link))
    for text in candidates:
        if text:
            with contextlib.suppress(InvalidGuid):
                return str(parse_guid(text))
    return f"uio-{name}"


class _Transport:
    """Moves bytes for one open node; :class:`UioDevice` holds the policy."""

    def fileno(self) -> int:
        raise NotImplementedError

    def map(self, index: int, size: int, addr: int) -> tuple[_Mapping, int]:
        """Map region ``index``: (the mapping, where the region starts inside it)."""
        raise NotImplementedError

    def read_blocking(self) -> int:
        """One blocking 4-byte read: the event count."""
        raise NotImplementedError

    def read_nowait(self) -> int | None:
        """A 4-byte read if one is ready now, else None."""
        raise NotImplementedError

    def write(self, value: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _KernelTransport(_Transport):
    """The real node: a character device of uio_hv_generic."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def fileno(self) -> int:
        return self.fd

    def map(self, index: int, size: int, addr: int) -> tuple[_Mapping, int]:
        # uio_mmap hands out whole pages, starting with the page that holds ``addr``
        # (uio_vma_fault: virt_to_page(mem->addr + offset)), and allows
        # (addr & ~PAGE_MASK) + size bytes. A region that does not start on a page boundary
        # therefore starts that far into the mapping: the int / monitor pages on 64 KiB-page
        # kernels before 09eea7ad0b8e are 4 KiB kzalloc'd somewhere inside a 64 KiB page.
        # The ring map (physical / IOVA) is always page-aligned, so its skew is 0.
        skew = addr % PAGE_SIZE
        return _Mapping(self.fd, skew + size, index * PAGE_SIZE), skew

    def read_blocking(self) -> int:
        data = os.read(self.fd, 4)
        if len(data) != 4:  # uio_read never does this; do not loop on it either.
            raise OSError(errno.EIO, f"uio read returned {len(data)} bytes")
        return int(_COUNT.unpack(data)[0])

    def read_nowait(self) -> int | None:
        if not self.poller.poll(0):
            return None
        return self.read_blocking()

    def write(self, value: int) -> None:
        try:
            os.write(self.fd, _IRQ.pack(value))
        except OSError as exc:
            # uio_write answers EIO once the rescind cleared info->irq, but EINVAL once
            # uio_unregister_device has run (idev->info gone: newest kernels unregister a
            # rescinded device; an unbind does the same). Our write is always 4 bytes, so
            # EINVAL can only mean the device is gone.
            if exc.errno == errno.EINVAL:
                raise _Gone(True, "write: EINVAL: the uio device was unregistered "
                            "(rescinded or unbound)") from None
            raise

    def close(self) -> None:
        os.close(self.fd)


class _Gone(Exception):
    """The mock connection ended: ``rescinded`` if the kernel said EIO first."""

    def __init__(self, rescinded: bool, detail: str) -> None:
        super().__init__(detail)
        self.rescinded = rescinded
        self.detail = detail


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO / SO_RCVTIMEO (0 would mean "never time out")."""
    if not math.isfinite(seconds):
        return struct.pack("@ll", 0, 0)
    sec = int(seconds)
    usec = int((seconds - sec) * 1_000_000)
    return struct.pack("@ll", sec, max(usec, 1) if sec == 0 else usec)


def _kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    """Make ``sock`` blocking with its timeout in the kernel (SO_SNDTIMEO / SO_RCVTIMEO).

    A Python socket with settimeout() polls before every send and recv: two extra
    syscalls per irqcontrol write on the hot path. A call that times out here fails with
    EAGAIN (BlockingIOError), which the write reports as the same TimeoutError.
    """
    tv = _timeval(timeout)
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


class _MockTransport(_Transport):
    """The mock node: a SOCK_SEQPACKET connection to the mock kernel."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.fds: list[int] = []
        self.sizes: list[int] = []
        self.wsock: socket.socket | None = None
        self.wlock = threading.Lock()
        self.timeout = timeout
        try:
            connect_unix(self.sock, path)
            self._handshake(timeout)
        except BaseException:
            self.close()
            raise

    def _handshake(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            msg, fds, flags, _ = socket.recv_fds(self.sock, 4096, _MAX_MAPS)
        except TimeoutError:
            raise TimeoutError(f"no open reply from the mock kernel within {timeout:g} s") from None
        finally:
            self.sock.settimeout(None)
        self.fds = list(fds)
        if flags & socket.MSG_CTRUNC:
            raise OSError(errno.EMSGSIZE, "mock open reply carried more map fds than expected")
        if not msg:
            raise _Gone(False, "the mock kernel closed the connection during open")
        if len(msg) == _ERR.size and msg[:4] == MOCK_ERR:
            err = _ERR.unpack(msg)[1]
            raise OSError(err, f"open failed in the mock kernel: {os.strerror(err)}")
        if len(msg) < _OPEN_HEAD.size or msg[:4] != MOCK_OK:
            raise OSError(errno.EPROTO, f"bad open reply from the mock kernel: {msg[:16]!r}")
        count = _OPEN_HEAD.unpack_from(msg)[1]
        if count + 1 != len(self.fds) or len(msg) != _OPEN_HEAD.size + 8 * count:
            raise OSError(errno.EPROTO, f"open reply lists {count} maps but carries {len(self.fds)} fds")
        self.sizes = list(struct.unpack_from(f"<{count}Q", msg, _OPEN_HEAD.size))
        self.wsock = socket.socket(fileno=self.fds.pop())
        _kernel_timeouts(self.wsock, self.timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def map(self, index: int, size: int, addr: int) -> tuple[_Mapping, int]:
        # A memfd per map holds the region from byte 0: ``addr`` means nothing here.
        if index >= len(self.fds):
            raise OSError(errno.EINVAL, f"map{index}: the mock kernel passed only {len(self.fds)} maps")
        if size > self.sizes[index]:
            raise OSError(errno.EINVAL, f"map{index}: sysfs says {size} bytes, the mock passed "
                          f"{self.sizes[index]}")
        return _Mapping(self.fds[index], size, 0), 0

    def finish_open(self) -> None:
        """The maps hold their own references: drop the fds and tell the kernel we are done."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the first read says why
            self.sock.send(MOCK_ACK, socket.MSG_NOSIGNAL)

    def _decode(self, msg: bytes) -> int:
        if len(msg) == 4:
            return int(_COUNT.unpack(msg)[0])
        if not msg:
            raise _Gone(False, "the mock kernel closed the connection without a rescind")
        if len(msg) == _ERR.size and msg[:4] == MOCK_ERR:
            err = _ERR.unpack(msg)[1]
            if err in (errno.EIO, errno.ENODEV):
                raise _Gone(True, f"read: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))
        raise OSError(errno.EPROTO, f"unexpected {len(msg)}-byte message from the mock kernel")

    def _recv(self, flags: int = 0) -> bytes:
        try:
            return self.sock.recv(64, flags)
        except ConnectionResetError:
            # The kernel closed with our last message unread: the error comes before the
            # messages still queued for us (the ERR! of a rescind among them).
            try:
                return self.sock.recv(64, socket.MSG_DONTWAIT)
            except (BlockingIOError, ConnectionResetError):
                return b""

    def read_blocking(self) -> int:
        return self._decode(self._recv())

    def read_nowait(self) -> int | None:
        try:
            msg = self._recv(socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        return self._decode(msg)

    def write(self, value: int) -> None:
        wsock = self.wsock
        if wsock is None:
            raise OSError(errno.EBADF, "the node is closed")
        with self.wlock:
            try:
                wsock.send(_IRQ_ONE if value == 1 else _IRQ.pack(value), socket.MSG_NOSIGNAL)
                status = wsock.recv(16)
            except (TimeoutError, BlockingIOError):  # EAGAIN: SO_SNDTIMEO / SO_RCVTIMEO ran out
                raise TimeoutError(f"the mock kernel did not apply irqcontrol within {self.timeout:g} s") \
                    from None
            except (BrokenPipeError, ConnectionResetError):
                status = b""
        if status == _STATUS_OK:
            return
        if len(status) == 4:
            err = _COUNT.unpack(status)[0]
            if err == 0:
                return
            if err in (errno.EIO, errno.ENODEV):
                raise _Gone(True, f"write: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))
        # The kernel closed its end: find out whether it said EIO on the node before it did.
        while True:
            try:
                msg = self._recv(socket.MSG_DONTWAIT)
            except BlockingIOError:
                msg = b""
            self._decode(msg)  # raises _Gone at the ERR! message or at EOF

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.wsock is not None:
            self.wsock.close()
            self.wsock = None
        # The release, synchronous as the real close() is (uio_release -> hv_uio_release
        # runs inside it when this is the last open): say we are done and wait until the
        # kernel has released (it closes its end then), so an open right after this one
        # finds the channel closed and its rings reset, never the previous contents.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(self.timeout)
            for _ in range(1 << 16):  # events still queued for us, an ERR!: until EOF
                if not self.sock.recv(64):
                    break
        self.sock.close()


class UioDevice:
    """One open of a uio_hv_generic node (``root/dev/uioN``) with its maps and interrupt fd.

    Build it with :meth:`open`. ``maps`` are numpy uint8 views of the node's regions
    (``txrx_rings``, ``int_page``, ``monitor_page``, and for the network class
    ``recv:<gpadl>`` / ``send:<gpadl>``). :meth:`wait` blocks for an interrupt,
    :meth:`irqcontrol` masks or unmasks, :meth:`fileno` feeds select / ``add_reader``.
    A rescinded device raises :class:`DeviceRescinded` (a dead mock host:
    :class:`HostCrashed`, a kind of DeviceRescinded) from every call that touches the fd.
    """

    def __init__(self, root: Path, name: str, device: str, transport: _Transport, kind: str,
                 lock: devlock.DeviceLock | None = None) -> None:
        self.root = root
        self.name = name
        self.device = device
        self.kind = kind
        """"kernel" (character device) or "mock" (the mock kernel's socket)."""
        self.maps: list[UioMap] = []
        self._transport: _Transport | None = transport
        self._mmaps: list[_Mapping] = []
        self._gone: DeviceRescinded | None = None
        self._poller = select.poll()
        self._poller.register(transport.fileno(), select.POLLIN)
        self._lock = lock

    @classmethod
    def open(cls, root: str | os.PathLike[str], name: str, device: str | None = None,
             *, timeout: float = 10.0, exclusive: bool = True) -> UioDevice:
        """Open ``root/dev/<name>`` and map every map listed in ``root/sys/class/uio/<name>/maps``.

        ``device`` (the instance GUID) names the device in errors and its lock.
        ``timeout`` bounds the mock's open handshake, and the wait for a bind / unbind /
        restore of the device that runs in another process. ``exclusive`` (the default):
        take the device's lock first (see the module docstring) and hold it until
        :meth:`close`; False: open without it, to read only (the ring headers), never to
        send or receive. Raises :class:`DeviceBusy` if another user holds the device,
        :class:`DeviceNotFound` if the node does not exist, :class:`NotPermitted` without
        access, :class:`DeviceRescinded` if the device was rescinded (or its mock host is
        gone).
        """
        rootp = Path(root)
        dev = device or name
        path = rootp / "dev" / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DeviceNotFound(name, where=str(rootp / "dev")) from None
        maps = _sysfs_maps(rootp, name)
        if not maps:
            raise DeviceNotFound(name, where=str(rootp / "sys" / "class" / "uio") + " (no maps listed)")
        # The lock comes before the node's open: on a kernel the first open opens the
        # channel, in the mock the connect does, and either resets the rings.
        lock = devlock.acquire(rootp, lock_key(rootp, name, device), "open", wait=timeout,
                               action=f"open {path}") if exclusive else None
        try:
            transport, kind = cls._open_transport(path, st, dev, timeout)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self = cls(rootp, name, dev, transport, kind, lock)
        try:
            for index, map_name, size, addr in maps:
                try:
                    mm, start = transport.map(index, size, addr)
                except PermissionError:
                    raise NotPermitted(str(path), f"mmap map{index}") from None
                except (ConnectionResetError, BrokenPipeError):
                    raise DeviceRescinded(dev, f"{path} went away while its maps arrived") from None
                self._mmaps.append(mm)
                self.maps.append(UioMap(index, map_name, size, mm.array(start, size)))
        except BaseException:
            self.close()
            raise
        if isinstance(transport, _MockTransport):
            transport.finish_open()
        return self

    @staticmethod
    def _open_transport(path: Path, st: os.stat_result, dev: str, timeout: float) -> tuple[_Transport, str]:
        """Open the node with the transport its file type asks for; errors translated."""
        transport: _Transport
        try:
            if stat.S_ISCHR(st.st_mode):
                transport = _KernelTransport(path)
                kind = "kernel"
            elif stat.S_ISSOCK(st.st_mode):
                transport = _MockTransport(path, timeout)
                kind = "mock"
            else:
                raise VmbusError(f"{path} is neither a character device nor a mock uio socket")
        except PermissionError:
            raise NotPermitted(str(path), "open") from None
        except FileNotFoundError:
            raise DeviceRescinded(dev, f"{path} vanished while being opened") from None
        except ConnectionRefusedError:
            raise HostCrashed(dev, f"nobody serves {path}: the mock kernel is gone") from None
        except (ConnectionResetError, BrokenPipeError):
            # The node was being torn down (rescind) while we connected.
            raise DeviceRescinded(dev, f"{path} went away while being opened") from None
        except _Gone as exc:
            raise (DeviceRescinded(dev, exc.detail) if exc.rescinded else HostCrashed(dev, exc.detail)) \
                from None
        except TimeoutError as exc:
            raise Timeout(f"the open of {path} ({exc})", timeout) from None
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENODEV):
                raise DeviceRescinded(dev, f"open of {path}: {os.strerror(exc.errno)}") from None
            raise
        return transport, kind

    # -- maps -------------------------------------------------------------------------------
    def map(self, name: str) -> UioMap:
        """The map called ``name``; a ``recv:``/``send:`` prefix matches the GPADL maps."""
        for m in self.maps:
            if m.name == name or (name.endswith(":") and m.name.startswith(name)):
                return m
        raise KeyError(f"{self.name} has no map {name!r}; it has {', '.join(m.name for m in self.maps)}")

    def map_ring_file(self, path: str | os.PathLike[str], size: int | None = None) -> npt.NDArray[np.uint8]:
        """Map a ``channels/<relid>/ring`` file (a subchannel's TX+RX ring pair).

        Pass ``size``, the channel's real pair: before 65995e97a1ca the file claims a fixed
        4 MiB whatever the ring is, and the kernel refuses (EINVAL, vm_iomap_memory) to map
        more than the ring; None takes st_size, which is right only on newer kernels. The
        mapping is closed with the device. Raises FileNotFoundError while the file has not
        appeared yet (it appears asynchronously), :class:`ChannelClosed` if the kernel
        refuses because the channel is not open (ENODEV), :class:`VmbusError` for a size
        the kernel refuses, :class:`NotPermitted` without access. The mock kernel's ring
        file is a socket that answers as the kernel would (:func:`mock_ring_call`).
        """
        p = Path(path)
        try:
            st = os.stat(p)
        except PermissionError:
            raise NotPermitted(str(p), "open") from None
        mock = stat.S_ISSOCK(st.st_mode)
        fd: int | None = None
        try:
            if mock:
                try:
                    if size is None:
                        status, size, _ = mock_ring_call(p, b"STAT")
                        if status:
                            raise OSError(status, os.strerror(status))
                    status, _, fd = mock_ring_call(p, b"MMAP", size)
                except (ConnectionRefusedError, ConnectionResetError):
                    raise ChannelClosed(self.device, f"{p}: the mock kernel is gone") from None
                if status:
                    raise OSError(status, os.strerror(status))
            else:
                try:
                    fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
                except PermissionError:
                    raise NotPermitted(str(p), "open") from None
                if size is None:
                    size = os.fstat(fd).st_size
            length = size
            if length is None or length <= 0 or length % 4096:
                raise VmbusError(f"ring file {p}: size {length} is not a positive multiple of 4096; "
                                 "is this a ring file?")
            if fd is None:
                raise VmbusError(f"ring file {p}: the mock kernel sent no memory")
            mm = _Mapping(fd, length, 0)
        except PermissionError:
            raise NotPermitted(str(p), "mmap") from None
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise ChannelClosed(self.device, f"the kernel refuses to map {p}: the channel "
                                    "is not open (ENODEV)") from None
            if exc.errno == errno.EINVAL:
                raise VmbusError(f"the kernel refuses to map {size} bytes of {p} (EINVAL): more than "
                                 "the channel's ring pair; size the map from the channel (sysfs "
                                 "write_avail + one header page per ring), not from st_size") from None
            raise
        finally:
            if fd is not None:
                os.close(fd)
        self._mmaps.append(mm)
        return mm.array(0, length)

    # -- interrupts -------------------------------------------------------------------------
    def fileno(self) -> int:
        """The fd to select / poll / ``loop.add_reader`` on: readable when an event is pending."""
        return self._live().fileno()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block for the next interrupt: the cumulative event count, or None on timeout.

        One 4-byte read (plus one poll when there is a timeout). Raises
        :class:`DeviceRescinded` on EIO, on a closed connection or a vanished node.
        """
        t = self._live()
        if timeout is not None:
            ms = max(0, math.ceil(timeout * 1000))
            if not self._poller.poll(ms):
                return None
        try:
            return t.read_blocking()
        except _Gone as exc:
            raise self._mark_gone(exc) from None
        except OSError as exc:
            raise self._translate(exc, "read") from None

    def read_event(self) -> int | None:
        """The event count if an interrupt is pending now, else None (for readiness callbacks)."""
        t = self._live()
        try:
            return t.read_nowait()
        except _Gone as exc:
            raise self._mark_gone(exc) from None
        except OSError as exc:
            raise self._translate(exc, "read") from None

    def irqcontrol(self, enable: bool, closed: str = "") -> None:
        """Write 1 (unmask; on 6.10+ also signals a non-monitored host) or 0 (mask).

        ``closed``: the detail of the :class:`ChannelClosed` raised when the device is
        closed already (a sender racing the teardown says what it was doing)."""
        t = self._transport
        if t is None or self._gone is not None:
            if t is None and closed:
                raise ChannelClosed(self.device, closed)
            t = self._live()  # raises why
        try:
            t.write(1 if enable else 0)
        except _Gone as exc:
            raise self._mark_gone(exc) from None
        except OSError as exc:
            raise self._translate(exc, "write") from None

    @property
    def rescinded(self) -> bool:
        """True once a read or write has reported the device gone."""
        return self._gone is not None

    def _live(self) -> _Transport:
        if self._gone is not None:
            raise self._gone
        if self._transport is None:
            raise ChannelClosed(self.device, f"{self.name} is closed")
        return self._transport

    def _mark_gone(self, exc: _Gone) -> DeviceRescinded:
        detail = f"{self.name}: {exc.detail}"
        gone = DeviceRescinded if exc.rescinded else HostCrashed
        self._gone = gone(self.device, detail)
        return self._gone

    def _translate(self, exc: OSError, what: str) -> Exception:
        if isinstance(exc, TimeoutError):  # the mock kernel did not answer a write in time
            return Timeout(f"the mock kernel to apply a {what} of /dev/{self.name} ({exc})",
                           getattr(self._transport, "timeout", 0.0))
        if exc.errno in (errno.EIO, errno.ENODEV, errno.ENXIO):
            self._gone = DeviceRescinded(self.device, f"{what} of /dev/{self.name}: {os.strerror(exc.errno)}")
            return self._gone
        return exc

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close the node (the last close releases the channel, now), then release
        the device's lock. Idempotent.

        Every numpy view of a map handed out (``maps[k].array``, a ring file's array, a
        :class:`~pyvmbus.ring.RingBuffer` over one) stays valid but is detached: it reads
        the region as it was at this close, and writes to it reach nobody. Nothing of the
        device (no mapping, no fd) outlives this call, so the host channel closes here and
        not at garbage collection.
        """
        transport, self._transport = self._transport, None
        mmaps, self._mmaps = self._mmaps, []
        lock, self._lock = self._lock, None
        self.maps = []
        try:
            for mm in mmaps:
                try:
                    mm.detach()
                except OSError as exc:  # no memory for the copy: the views keep the pages
                    _log.warning("%s: cannot detach a mapping at close (%s); it lives until its "
                                 "views go", self.name, exc)
            if transport is not None:
                transport.close()
        finally:
            if lock is not None:  # after the node's close: the next user finds it released
                lock.release()

    @property
    def exclusive(self) -> bool:
        """True while this open holds the device's lock (opened with ``exclusive=True``)."""
        return self._lock is not None and self._lock.held

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (the maps are gone; the node may be open elsewhere)."""
        return self._transport is None

    def __enter__(self) -> UioDevice:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("gone" if self._gone else "open")
        return f"<UioDevice {self.name} ({self.kind}) of {self.device} {state}>"
