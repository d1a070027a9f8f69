"""The mock kernel: the guest's VMBus driver and uio_hv_generic, in the mock's process.

It owns what Linux owns: device registration (through :class:`SysfsTree` and the
:class:`DriverCore`, which calls :meth:`MockKernel.probe` / :meth:`MockKernel.remove` for
uio_hv_generic), the uio nodes, the ring memory and its ring files, the interrupt masks,
the event counter, and the rules of one :class:`KernelGeneration` for all of them:

- ``root/dev/uioN`` is a listening unix SOCK_SEQPACKET socket. A connect is an open():
  the first one opens the channel (rings set up as hv_ringbuffer_init does, the inbound
  mask left at 1 where the generation masks on open, the host told), every one gets the
  maps as memfds / the ring file's fd over SCM_RIGHTS; the last close is the release
  (the channel closes, subchannels go, ring state is lost). See :mod:`pyvmbus.uio` for
  the wire format.
- a 4-byte message on the connection's write socket is irqcontrol (hv_uio_irqcontrol of
  the generation: which masks it sets, and whether it signals the host), answered with a
  4-byte status once applied, so the client's write is synchronous as on the real node;
  any other size gets EINVAL (uio_write). A 4-byte message on the node socket itself is
  applied too, without an answer (other sizes there are logged and ignored).
- a host interrupt (hv_uio_channel_cb) masks the channel where the generation does, adds
  one to the device's single event counter, and sends the 4-byte count to every open
  connection that has none pending (the real read() returns one count however many
  interrupts came, so events coalesce the same way).
- a host interrupt on a subchannel of a generation with ``subchannel_interrupt_crash``
  (every callback without the primary lookup: 5.15, 6.10, 6.12-debian, openhcl) is the
  kernel's NULL dereference: a BUG line naming the function in the kernel log, then the
  process dies (:meth:`MockKernel.oops`), as with the "crash" fault.
- rescind (hv_uio_rescind): ``ERR!``+EIO to every connection, which is then closed; the
  device is unregistered (6fd28941447b, on every generation but OpenHCL's tree, and
  always where the node was never opened, as vmbus_onoffer_rescind does without a
  rescind callback).

Run as ``python -m pyvmbus.mock.kernel`` by :class:`pyvmbus.mock.MockVmbus`, which talks to
it over a control socket (:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import importlib
import itertools
import mmap
import os
import shutil
import signal as _signal
import socket
import struct
import sys
import termios
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from ..guid import Guid, parse_guid
from ..ring import RingBuffer
from ..shm import fence, load32, store32
from ..sysfs import RING_REPLY, RING_REQUEST
from ..uio import MOCK_ACK, connect_unix, pack_error, pack_open_reply
from .driver_core import DriverCore
from .generations import KernelGeneration, generation
from .host import MockHost, Offer
from .loop import Loop
from .sysfs_tree import UIO_DRIVER, SysfsTree, hold_alive_lock

__all__ = ["PROFILE_ENV", "MockKernel", "main"]

HEADER = mmap.PAGESIZE
"""sizeof(struct hv_ring_buffer) == PAGE_SIZE."""
SUBCHANNEL_DELAY = 0.05
"""How long after the host's offer a subchannel's ring file appears (hv_uio_new_channel
runs from a work queue; the kernel's own comment says userspace must wait for it)."""
STATS_PERIOD = 0.1
"""How often the sysfs counters (masks, bytes available, events) are refreshed."""
PROFILE_ENV = "PYVMBUS_MOCK_PROFILE"
"""Set to a path prefix: the mock process runs its loop under cProfile and writes the
stats to ``<prefix>.<pid>`` when it stops (a debugging aid: cProfile slows it ~2x)."""
OOPS_EXIT = 71
"""Exit status of the mock process when the modelled guest kernel oopses (70: fault crash)."""
_COUNT = struct.Struct("=I")
_IRQ = struct.Struct("=i")
_NOWAIT = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
"""Flags of every send to a client (an int once: or-ing the enum costs ~1 µs a time)."""
_STATE_OPENED = 3
_STATE_CLOSED = 2
_RECV_BUFFER_SIZE = 31 * 1024 * 1024
_SEND_BUFFER_SIZE = 16 * 1024 * 1024


_OK = _COUNT.pack(0)
"""irqcontrol's answer when it was applied (packed once)."""
_NOTHING_QUEUED = b"\0\0\0\0"
"""SIOCOUTQ's answer (an int, as bytes) for a socket whose peer read everything."""
_OUTQ = termios.TIOCOUTQ
_ioctl = fcntl.ioctl


def _outq(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (SIOCOUTQ == TIOCOUTQ)."""
    buf = _ioctl(sock.fileno(), _OUTQ, _NOTHING_QUEUED)
    return int(struct.unpack("i", buf)[0])


def _drain(sock: socket.socket) -> None:
    """Read what the peer sent and we did not: closing a unix socket with unread data
    makes the peer's next recv fail with ECONNRESET before it sees what we sent last."""
    for _ in range(1024):
        try:
            if not sock.recv(64, socket.MSG_DONTWAIT):
                return
        except OSError:
            return


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@dataclass(eq=False)
class _Channel:
    """Kernel side of one channel: its ring pair memory and counters."""

    offer: Offer
    ring_size: int
    fd: int
    mm: mmap.mmap
    arr: npt.NDArray[np.uint8]
    backing: Path | None = None
    ring_sock: socket.socket | None = None
    """The listening socket that is this channel's ``ring`` file (see _publish_ring_file)."""
    opened: bool = False
    interrupts: int = 0
    sig_events: int = 0
    shown: dict[str, int] = field(default_factory=dict)
    relid: int = field(init=False)
    monitored: bool = field(init=False)
    subchannel: bool = field(init=False)
    """The offer's fixed facts, copied once (read on every signal and interrupt)."""
    rx_mask_off: int = field(init=False)
    """interrupt_mask of the inbound (RX, host -> guest) ring: the second ring."""

    def __post_init__(self) -> None:
        self.relid = self.offer.relid
        self.monitored = self.offer.monitored
        self.subchannel = self.offer.primary is not None
        self.rx_mask_off = self.ring_size + 8

    def free(self) -> None:
        if self.ring_sock is not None:
            with contextlib.suppress(OSError):
                self.ring_sock.close()
            self.ring_sock = None
        if self.backing is not None:
            with contextlib.suppress(OSError):
                self.backing.unlink()
        self.arr = np.zeros(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(eq=False)
class _Conn:
    """One open() of a uio node: the node socket (events) and the write socket (irqcontrol)."""

    sock: socket.socket
    wsock: socket.socket
    snapshot: int
    ready: bool = False
    fd: int = field(init=False)
    """The node socket's fd (for the SIOCOUTQ of every event)."""

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()


@dataclass(eq=False)
class _Device:
    """Kernel side of one registered device."""

    offer: Offer
    uio_name: str | None = None
    listener: socket.socket | None = None
    node: Path | None = None
    conns: list[_Conn] = field(default_factory=list)
    opencount: int = 0
    channels: dict[int, _Channel] = field(default_factory=dict)
    map_fds: list[int] = field(default_factory=list)
    map_sizes: list[int] = field(default_factory=list)
    own_fds: list[int] = field(default_factory=list)
    callbacks_set: bool = False
    rescinded: bool = False
    event_count: int = 0
    shown_event: int = 0
    einval: int = 0
    relid: int = field(init=False)
    """The primary's relid (the offer of a _Device never changes: a re-offer makes a new one)."""

    def __post_init__(self) -> None:
        self.relid = self.offer.relid

    @property
    def guid(self) -> Guid:
        return self.offer.instance

    @property
    def primary(self) -> _Channel | None:
        return self.channels.get(self.relid)


class MockKernel:
    """uio_hv_generic and the VMBus driver of one generation, over a fake root."""

    def __init__(self, root: str | os.PathLike[str], gen: KernelGeneration | str, loop: Loop) -> None:
        self.root = Path(root)
        self.gen = generation(gen) if isinstance(gen, str) else gen
        self.loop = loop
        self.tree = SysfsTree(self.root, self.gen)
        self._alive_fd = hold_alive_lock(self.root)  # held while this process lives
        self.rings_dir = self.tree.run_dir / "rings"
        self.rings_dir.mkdir(parents=True, exist_ok=True)
        self.core = DriverCore(self.tree, probe=self.probe, remove=self.remove)
        self.int_fd = _memfd("int_page", 4096)
        self.mon_fd = _memfd("monitor_page", 4096)
        self._int_mm = mmap.mmap(self.int_fd, 4096)
        self._mon_mm = mmap.mmap(self.mon_fd, 4096)
        self.host = MockHost(self, np.frombuffer(self._int_mm, dtype=np.uint8),
                             np.frombuffer(self._mon_mm, dtype=np.uint8))
        self.devices: dict[Guid, _Device] = {}
        self.by_relid: dict[int, tuple[_Device, _Channel]] = {}
        self._gpadl = itertools.count(0x1000, 2)
        self._seq = itertools.count(1)
        self.internal_errors = 0
        loop.add_reader(self.core.fileno(), self._driver_core_ready)
        loop.scan = self.host.scan
        loop.on_error = self._internal_error
        loop.call_later(STATS_PERIOD, self._refresh_stats)

    # -- KernelSide (called by the host) ----------------------------------------------------
    def log(self, text: str) -> None:
        self.tree.log(text)

    def offered(self, offer: Offer) -> None:
        """vmbus_onoffer -> vmbus_device_register (+ driver matching, auto-probe)."""
        old = self.devices.get(offer.instance)
        if old is not None:  # a rescinded device an old kernel kept registered
            self._unregister(old, "re-offered by the host")
        self.devices[offer.instance] = _Device(offer)
        self.core.add_device(offer.device_class, offer.instance, monitored=offer.monitored,
                             monitor_id=offer.monitor_id, relid=offer.relid)

    def subchannel_offered(self, offer: Offer) -> None:
        self.loop.call_later(SUBCHANNEL_DELAY, lambda: self._new_subchannel(offer))

    def rescinded(self, offer: Offer, remove: bool) -> None:
        """vmbus_onoffer_rescind (+ hv_uio_rescind when uio_hv_generic set its callback)."""
        dev = self.devices.get(offer.instance)
        if dev is None:
            return
        dev.rescinded = True
        bound = dev.uio_name is not None
        if bound and dev.callbacks_set:
            self.log(f"{UIO_DRIVER} {dev.guid}: rescind: reads and writes of {dev.uio_name} fail "
                     "with EIO from now on")
        self._fail_conns(dev)
        keep = bound and dev.callbacks_set and not self.gen.unregister_on_rescind and not remove
        if keep:
            self.log(f"vmbus {dev.guid}: rescinded; the device stays registered (this kernel's "
                     "hv_uio_rescind lacks 6fd28941447b's vmbus_device_unregister)")
        else:
            self._unregister(dev, "rescinded")

    def interrupt(self, relid: int) -> None:
        """hv_uio_channel_cb: the host signalled the guest on ``relid``."""
        found = self.by_relid.get(relid)
        if found is None:
            return
        dev, ch = found
        if not ch.opened or dev.rescinded:
            return
        gen = self.gen
        if ch.subchannel and gen.subchannel_interrupt_crash:
            self.oops(dev, relid)
        if gen.masks_on_interrupt:
            store32(ch.arr, ch.rx_mask_off, 1)
            fence()  # virt_mb()
        ch.interrupts += 1
        count = dev.event_count = (dev.event_count + 1) & 0xFFFFFFFF
        data = None
        for conn in dev.conns:
            if conn.ready:
                # _send_event, inlined (every interrupt comes here): one count per
                # connection unless one is still unread, as a real read() coalesces.
                try:
                    if _ioctl(conn.fd, _OUTQ, _NOTHING_QUEUED) != _NOTHING_QUEUED:
                        continue
                    if data is None:
                        data = _COUNT.pack(count)
                    conn.sock.send(data, _NOWAIT)
                except OSError:
                    pass  # full or gone: the reader has something to read, or will see EOF

    def oops(self, dev: _Device, relid: int) -> NoReturn:
        """A callback without the primary lookup dereferences NULL for a subchannel.

        Before d062463 (and the Dec 2025 LTS backport) hv_uio_channel_cb does
        ``hv_get_drvdata(chan->device_obj)``; vmbus_process_offer never creates a device
        for a subchannel, so device_obj is NULL (Debian bug 1120602 has the trace). The
        guest kernel is gone, so is everything the mock models: the process dies as for
        the "crash" fault, every connection closes and clients see HostCrashed. The BUG
        line goes to the kernel log first (and to stderr, which MockVmbus quotes).
        """
        line = (f"BUG: kernel NULL pointer dereference in "
                f"{self.gen.crash_function} (subchannel relid {relid} of {dev.guid}): "
                "hv_get_drvdata(chan->device_obj) with the subchannel's NULL device_obj; "
                f"kernel {self.gen.name} has no primary-channel lookup (fixed by d062463 and "
                "the Dec 2025 5.4-6.6 backport); a client must keep every subchannel masked here")
        self.log(line)
        self.log("Oops: kernel panic - not syncing: Fatal exception in interrupt (mock: the "
                 "process dies now)")
        sys.stderr.write(f"mock: {line}\n")
        sys.stderr.flush()
        os._exit(OOPS_EXIT)

    # -- uio_hv_generic probe / remove (called by the driver core) --------------------------
    def probe(self, guid: Guid) -> bool:
        """hv_uio_probe: allocate the ring, create the node, maps and the primary's ring file."""
        dev = self.devices.get(guid)
        if dev is None or dev.rescinded:
            return False
        offer = dev.offer
        if self.gen.refuses_unmonitored and not offer.monitored:
            self.log(f"{UIO_DRIVER} {guid}: vmbus channel requires hypercall")
            return False
        ring_size = self.gen.ring_size(offer.device_class)
        maps = self.tree.uio_maps(guid, gpadl=next(self._gpadl))
        if maps[0][1] != 2 * ring_size:
            raise AssertionError(f"tree says map0 is {maps[0][1]} bytes, kernel says {2 * ring_size}")
        ch = self._alloc_channel(offer, ring_size)
        dev.channels[offer.relid] = ch
        self.by_relid[offer.relid] = (dev, ch)
        fds = [ch.fd, self.int_fd, self.mon_fd]
        for name, size in maps[3:]:
            fd = _memfd(name, size)
            dev.own_fds.append(fd)
            fds.append(fd)
        dev.map_fds = fds
        dev.map_sizes = [size for _, size in maps]
        index = self.tree.next_uio_index()
        name = f"uio{index}"
        node = self.tree.dev_dir / name
        with contextlib.suppress(FileNotFoundError):
            node.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        connect_unix(listener, node, bind=True)
        os.chmod(node, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        dev.listener, dev.node, dev.uio_name = listener, node, name
        self.loop.add_reader(listener.fileno(), lambda: self._accept(dev))
        self.tree.add_uio(guid, index, maps)
        self._publish_ring_file(dev, ch)
        self.log(f"{UIO_DRIVER} {guid}: {name}: ring {ring_size:#x} bytes per direction, "
                 f"{len(maps)} maps")
        return True

    def remove(self, guid: Guid) -> None:
        """hv_uio_remove: the node and its sysfs entries vanish; open fds fail with EIO."""
        dev = self.devices.get(guid)
        if dev is None:
            return
        self._fail_conns(dev)
        if dev.listener is not None:
            self.loop.remove_reader(dev.listener.fileno())
            dev.listener.close()
            dev.listener = None
        if dev.node is not None:
            with contextlib.suppress(FileNotFoundError):
                dev.node.unlink()
            dev.node = None
        if self.tree.device_dir(guid).is_dir():
            with contextlib.suppress(KeyError, FileNotFoundError):
                self.tree.set_ring_file(guid, dev.offer.relid, None)
        self.tree.remove_uio(guid)
        for relid, ch in list(dev.channels.items()):
            self.by_relid.pop(relid, None)
            self._free_channel(ch)
        dev.channels.clear()
        for fd in dev.own_fds:
            os.close(fd)
        dev.own_fds, dev.map_fds, dev.map_sizes = [], [], []
        dev.uio_name = None

    # -- channel memory ---------------------------------------------------------------------
    def _alloc_channel(self, offer: Offer, ring_size: int) -> _Channel:
        """vmbus_alloc_ring: the TX + RX pair, in a file that becomes the ``ring`` file."""
        size = 2 * ring_size
        path = self.rings_dir / f"{offer.instance}.{offer.relid}.{next(self._seq)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return _Channel(offer, ring_size, fd, mm, np.frombuffer(mm, dtype=np.uint8), backing=path)

    def _publish_ring_file(self, dev: _Device, ch: _Channel) -> None:
        """Make ``channels/<relid>/ring`` appear: a socket that answers as the bin file does.

        A real ring file is a sysfs bin attribute: its st_size is the generation's (a fixed
        4 MiB before 65995e97a1ca), and hv_uio_ring_mmap refuses with ENODEV while the
        channel is not open and vm_iomap_memory with EINVAL for more than the real pair.
        A regular file can do none of that, so the mock's ring file is a unix socket
        (:func:`pyvmbus.sysfs.mock_ring_call` is the client side). The backing file loses
        its name at once; the channel keeps its fd.
        """
        backing, ch.backing = ch.backing, None
        if backing is not None:
            backing.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)

        def bind(path: Path) -> None:
            # Listening before the name appears: bind() creates the name and a client
            # that connects before listen() gets ECONNREFUSED, which it reads as a dead
            # mock kernel (seen on a loaded machine). So bind a temporary name, listen,
            # then rename it into place (a unix socket is found by its inode).
            tmp = path.with_name(f".ring-{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            connect_unix(listener, tmp, bind=True)
            listener.listen(16)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)

        try:
            self.tree.set_ring_file(dev.guid, ch.offer.relid, bind)
        except BaseException:
            listener.close()
            raise
        listener.setblocking(False)
        ch.ring_sock = listener
        self.loop.add_reader(listener.fileno(), lambda: self._ring_accept(ch, listener))

    def _free_channel(self, ch: _Channel) -> None:
        """Stop serving the channel's ring file, then free its memory."""
        if ch.ring_sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(ch.ring_sock.fileno())
        ch.free()

    def _ring_accept(self, ch: _Channel, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                if ch.ring_sock is not listener:  # freed: stop watching the closed fd
                    with contextlib.suppress(ValueError, OSError):
                        self.loop.remove_reader(listener.fileno())
                return
            conn.setblocking(False)
            self.loop.add_reader(conn.fileno(), functools.partial(self._ring_request, ch, conn))

    def _ring_request(self, ch: _Channel, conn: socket.socket) -> None:
        """hv_uio_ring_mmap (MMAP) or a stat of the bin file (STAT), then hang up."""
        try:
            msg = conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(conn.fileno())
        try:
            if len(msg) != RING_REQUEST.size:
                return
            op, length = RING_REQUEST.unpack(msg)
            pair = 2 * ch.ring_size
            st_size = self.tree.ring_file_size(pair)
            if op == b"STAT":
                conn.send(RING_REPLY.pack(0, st_size), _NOWAIT)
            elif op == b"MMAP":
                if not ch.opened or ch.ring_sock is None:
                    conn.send(RING_REPLY.pack(errno.ENODEV, st_size), _NOWAIT)
                elif length <= 0 or length > pair:
                    self.log(f"{UIO_DRIVER}: mmap of {length:#x} bytes of relid {ch.offer.relid}'s ring "
                             f"file ({pair:#x} bytes): -EINVAL (vm_iomap_memory)")
                    conn.send(RING_REPLY.pack(errno.EINVAL, st_size), _NOWAIT)
                else:
                    socket.send_fds(conn, [RING_REPLY.pack(0, st_size)], [ch.fd], _NOWAIT)
        except OSError:
            pass  # the client went away
        finally:
            conn.close()

    def _init_rings(self, ch: _Channel) -> None:
        """hv_ringbuffer_init for both directions, then the generation's mask on open."""
        for half in (ch.arr[:ch.ring_size], ch.arr[ch.ring_size:2 * ch.ring_size]):
            with RingBuffer(half, header_size=HEADER) as rb:
                rb.reset()
        if self.gen.masks_on_open:
            store32(ch.arr, ch.rx_mask_off, 1)
        fence()
        ch.opened = True
        ch.interrupts = ch.sig_events = 0

    def _new_subchannel(self, offer: Offer) -> None:
        """hv_uio_new_channel: open the subchannel, mask it, expose its ring file."""
        primary = offer.primary
        dev = self.devices.get(offer.instance)
        if primary is None or dev is None or dev.rescinded or offer not in primary.subchannels \
                or dev.primary is None or not dev.primary.opened:
            return
        ring_size = self.gen.ring_size(offer.device_class, subchannel=True)
        self.tree.add_channel(dev.guid, offer.relid, offer.subchannel_index, offer.monitor_id)
        ch = self._alloc_channel(offer, ring_size)
        dev.channels[offer.relid] = ch
        self.by_relid[offer.relid] = (dev, ch)
        self._init_rings(ch)
        self.host.open_channel(offer, ch.arr, ring_size)
        self.tree.set_ring_allocated(dev.guid, offer.relid, ring_size)
        self._publish_ring_file(dev, ch)
        self.log(f"{UIO_DRIVER} {dev.guid}: subchannel {offer.subchannel_index} relid {offer.relid} "
                 f"opened, ring {ring_size:#x} bytes per direction")

    def _close_channels(self, dev: _Device) -> None:
        """vmbus_disconnect_ring: subchannels first (they go away), then the primary."""
        for relid, ch in list(dev.channels.items()):
            if relid == dev.offer.relid:
                continue
            if ch.opened:
                ch.opened = False
            if not ch.offer.rescinded:
                self.host.drop_subchannel(ch.offer)
            else:
                self.host.close_channel(relid)
            with contextlib.suppress(KeyError, FileNotFoundError, ValueError):
                self.tree.remove_channel(dev.guid, relid)
            self.by_relid.pop(relid, None)
            del dev.channels[relid]
            self._free_channel(ch)
        for offer in list(dev.offer.subchannels):  # offered, not set up yet: gone as well
            if not offer.rescinded:
                self.host.drop_subchannel(offer)
        primary = dev.primary
        if primary is not None and primary.opened:
            primary.opened = False
            self.host.close_channel(dev.offer.relid)
            if self.tree.device_dir(dev.guid).is_dir():
                self.tree.set_state(dev.guid, _STATE_CLOSED)

    def _unregister(self, dev: _Device, why: str) -> None:
        """vmbus_device_unregister: the driver lets go, the device directory vanishes."""
        self.core.remove_device(dev.guid)  # calls remove() if uio_hv_generic holds it
        for relid, ch in list(dev.channels.items()):
            self.by_relid.pop(relid, None)
            self._free_channel(ch)
        dev.channels.clear()
        if self.devices.get(dev.guid) is dev:
            del self.devices[dev.guid]
        self.log(f"vmbus {dev.guid}: unregistered ({why})")

    # -- the node: open / read / write / release --------------------------------------------
    def _accept(self, dev: _Device) -> None:
        listener = dev.listener
        while listener is not None:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            self._open(dev, sock)

    def _open(self, dev: _Device, sock: socket.socket) -> None:
        """uio_open + hv_uio_open."""
        if dev.rescinded or dev.primary is None:
            with contextlib.suppress(OSError):
                sock.send(pack_error(errno.ENODEV), socket.MSG_NOSIGNAL)
            sock.close()
            return
        wsock, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        wsock.setblocking(False)
        conn = _Conn(sock, wsock, dev.event_count)
        if dev.opencount == 0:
            dev.callbacks_set = True
            self._init_rings(dev.primary)
            self.tree.set_state(dev.guid, _STATE_OPENED)
            self.host.open_channel(dev.offer, dev.primary.arr, dev.primary.ring_size)
        dev.opencount += 1
        dev.conns.append(conn)
        # partial, not a lambda: one Python frame less on every signal
        self.loop.add_reader(sock.fileno(), functools.partial(self._readable, dev, conn))
        self.loop.add_reader(wsock.fileno(), functools.partial(self._write, dev, conn))
        try:
            socket.send_fds(sock, [pack_open_reply(dev.map_sizes)], [*dev.map_fds, client_end.fileno()],
                            socket.MSG_NOSIGNAL)
        except OSError:
            self._release(dev, conn)
        finally:
            client_end.close()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes | None:
        """One message; b"" at EOF (or a broken connection), None if there is none yet."""
        try:
            return sock.recv(64)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _write(self, dev: _Device, conn: _Conn) -> None:
        """uio_write: apply irqcontrol, then answer with the status (0 or an errno)."""
        wsock = conn.wsock
        try:  # _recv, inlined: every signal of a non-monitored channel comes here
            msg = wsock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        if not msg:  # the client closed; its node socket's EOF does the release
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(wsock.fileno())
            return
        reply = _OK
        if len(msg) != 4:
            dev.einval += 1
            reply = _COUNT.pack(errno.EINVAL)
            self.log(f"{dev.uio_name}: write of {len(msg)} bytes: -EINVAL (uio_write takes exactly 4)")
        elif dev.rescinded:
            reply = _COUNT.pack(errno.EIO)
        else:
            self.irqcontrol(dev, _IRQ.unpack(msg)[0])
        try:
            wsock.send(reply, _NOWAIT)
        except OSError:
            return  # the client went away: its EOF does the rest

    def _readable(self, dev: _Device, conn: _Conn) -> None:
        msg = self._recv(conn.sock)
        if msg is None:
            return
        if not msg:
            self._release(dev, conn)
            return
        if not conn.ready:
            if msg == MOCK_ACK:
                conn.ready = True
                if dev.event_count != conn.snapshot:
                    self._send_event(conn, _COUNT.pack(dev.event_count))
            else:
                self.log(f"{dev.uio_name}: bad open handshake ({len(msg)} bytes); closing")
                self._release(dev, conn)
            return
        if len(msg) != 4:  # a raw client's write on the node socket: nobody to tell
            dev.einval += 1
            self.log(f"{dev.uio_name}: write of {len(msg)} bytes: -EINVAL (uio_write takes exactly 4); "
                     "ignored")
            return
        self.irqcontrol(dev, _IRQ.unpack(msg)[0])

    def _send_event(self, conn: _Conn, data: bytes) -> None:
        """Deliver one event unless one is still unread (a real read returns one count anyway)."""
        try:
            if _outq(conn.sock) > 0:
                return
            conn.sock.send(data, _NOWAIT)
        except OSError:
            pass  # full or gone: the reader has something to read, or will see EOF

    def _fail_conns(self, dev: _Device) -> None:
        """Every open fd of the device fails with EIO (rescind, remove); the channels close."""
        for conn in list(dev.conns):
            with contextlib.suppress(OSError):
                conn.sock.send(pack_error(errno.EIO), _NOWAIT)
            self._drop_conn(dev, conn)
        dev.opencount = 0
        self._close_channels(dev)

    def _drop_conn(self, dev: _Device, conn: _Conn) -> None:
        if conn in dev.conns:
            dev.conns.remove(conn)
            for s in (conn.sock, conn.wsock):
                with contextlib.suppress(OSError, ValueError):
                    self.loop.remove_reader(s.fileno())
                _drain(s)
                s.close()

    def _release(self, dev: _Device, conn: _Conn) -> None:
        """uio_release + hv_uio_release: the last close disconnects the ring."""
        if conn not in dev.conns:
            return
        self._drop_conn(dev, conn)
        dev.opencount = max(0, dev.opencount - 1)
        if dev.opencount == 0 and not dev.rescinded:
            self._close_channels(dev)

    def irqcontrol(self, dev: _Device, value: int) -> None:
        """hv_uio_irqcontrol of this generation (SPEC section 8)."""
        chans = dev.channels
        primary = chans.get(dev.relid)
        if primary is None or not primary.opened:
            return
        gen = self.gen
        if len(chans) == 1:
            # The common device, one channel: the same steps without building lists.
            if gen.write_touches_mask:
                store32(primary.arr, primary.rx_mask_off, 0 if value else 1)
                fence()  # virt_mb()
            if value and gen.signal_on_unmask and not primary.monitored:
                primary.sig_events += 1
                self.host.signal(primary.relid)
            return
        subs = [ch for relid, ch in chans.items() if relid != dev.offer.relid and ch.opened]
        if gen.write_touches_mask:
            for ch in [primary, *subs] if gen.write_covers_subchannels else [primary]:
                store32(ch.arr, ch.rx_mask_off, 0 if value else 1)
            fence()  # virt_mb()
        if value and gen.signal_on_unmask:
            for ch in [primary, *subs] if gen.signal_subchannels else [primary]:
                if not ch.offer.monitored:
                    ch.sig_events += 1
                    if ch is not primary:  # sysfs events is read live: clients probe it (rule 7)
                        self.tree.set_channel_attrs(dev.guid, ch.offer.relid, events=ch.sig_events)
                        ch.shown["events"] = ch.sig_events
                    self.host.signal(ch.offer.relid)

    # -- sysfs counters ---------------------------------------------------------------------
    def _refresh_stats(self) -> None:
        """Rewrite the sysfs files a real kernel computes on read, where they changed."""
        try:
            for dev in list(self.devices.values()):
                if not self.tree.device_dir(dev.guid).is_dir():
                    continue
                for relid, ch in list(dev.channels.items()):
                    if ch.opened:
                        self._refresh_channel(dev, relid, ch)
                if dev.uio_name is not None and dev.shown_event != dev.event_count:
                    self.tree.set_uio_event(dev.uio_name, dev.event_count)
                    dev.shown_event = dev.event_count
        except (OSError, KeyError, ValueError) as exc:
            self.log(f"mock: sysfs refresh failed: {exc!r}")
        self.loop.call_later(STATS_PERIOD, self._refresh_stats)

    def _refresh_channel(self, dev: _Device, relid: int, ch: _Channel) -> None:
        rs = ch.ring_size
        dsize = rs - HEADER

        def ring(off: int) -> tuple[int, int, int, int]:
            w, r, mask = load32(ch.arr, off), load32(ch.arr, off + 4), load32(ch.arr, off + 8)
            w, r = min(w, dsize), min(r, dsize)
            to_write = dsize - (w - r) if w >= r else r - w
            return w, r, mask, to_write

        tw, tr, tmask, t_free = ring(0)
        rw, rr, rmask, r_free = ring(rs)
        values = {"in_mask": rmask, "out_mask": tmask, "read_avail": dsize - r_free,
                  "write_avail": t_free, "events": ch.sig_events, "interrupts": ch.interrupts}
        changed = {k: v for k, v in values.items() if ch.shown.get(k) != v}
        if changed:
            self.tree.set_channel_attrs(dev.guid, relid, **changed)
            ch.shown.update(changed)
        if relid == dev.offer.relid:
            debug = {"out_intr_mask": tmask, "out_read_index": tr, "out_write_index": tw,
                     "out_read_bytes_avail": dsize - t_free, "out_write_bytes_avail": t_free,
                     "in_intr_mask": rmask, "in_read_index": rr, "in_write_index": rw,
                     "in_read_bytes_avail": dsize - r_free, "in_write_bytes_avail": r_free}
            changed = {k: v for k, v in debug.items() if ch.shown.get(k) != v}
            if changed:
                self.tree.set_device_attrs(dev.guid, **changed)
                ch.shown.update(changed)

    def _driver_core_ready(self) -> None:
        self.core.process()

    def _internal_error(self, exc: BaseException) -> None:
        """A bug in the mock itself: say so loudly (kernel log, process log) and go on."""
        self.internal_errors += 1
        tb = "".join(traceback.format_exception(exc))
        sys.stderr.write(f"mock: INTERNAL ERROR\n{tb}")
        sys.stderr.flush()
        self.log(f"mock: INTERNAL ERROR {exc!r} (traceback in run/mock/process.log)")

    # -- test hooks and state ---------------------------------------------------------------
    def bind_uio(self, guid: str) -> str | None:
        """Bind to uio_hv_generic the way binding.bind does (override, unbind, drivers_probe)."""
        g = parse_guid(guid)
        path = self.tree.device_dir(g) / "driver_override"
        if path.exists():
            with open(path, "w") as f:
                f.write(UIO_DRIVER + "\n")
            self.core.process()
        else:
            self.core.new_id(UIO_DRIVER, str(self.devices[g].offer.class_guid))
        current = self.tree.driver_of(g)
        if current is not None and current != UIO_DRIVER:
            self.core.unbind(current, g)
        if self.tree.driver_of(g) is None:
            self.core.drivers_probe(g)
        return self.devices[g].uio_name if g in self.devices else None

    def state(self, guid: str) -> dict[str, Any]:
        """What the kernel knows of a device (for tests and diagnostics)."""
        g = parse_guid(guid)
        dev = self.devices.get(g)
        if dev is None:
            return {"registered": False}
        chans = {}
        for relid, ch in dev.channels.items():
            chans[relid] = {
                "opened": ch.opened, "ring_size": ch.ring_size, "interrupts": ch.interrupts,
                "sig_events": ch.sig_events, "subchannel": ch.offer.subchannel_index,
                "in_mask": load32(ch.arr, ch.rx_mask_off) if ch.opened else None,
            }
        return {
            "registered": True, "uio": dev.uio_name, "opencount": dev.opencount,
            "connections": len(dev.conns), "event_count": dev.event_count,
            "rescinded": dev.rescinded, "relid": dev.offer.relid, "einval": dev.einval,
            "driver": self.tree.driver_of(g), "channels": chans,
            "internal_errors": self.internal_errors,
        }

    def shutdown(self) -> None:
        """Close every connection and channel (the clients see their node go away)."""
        self.host.close_all()
        for dev in list(self.devices.values()):
            for conn in list(dev.conns):
                self._drop_conn(dev, conn)
            if dev.listener is not None:
                dev.listener.close()
                dev.listener = None
        self.core.close()


# -- the process ------------------------------------------------------------------------------
class _Server:
    """The mock process: one loop running the kernel, the host and the control connection."""

    def __init__(self, kernel: MockKernel, control: Connection, loop: Loop, owns_root: bool) -> None:
        self.kernel = kernel
        self.control = control
        self.loop = loop
        self.owns_root = owns_root
        self.orderly = False
        loop.add_reader(control.fileno(), self._command)

    def _command(self) -> None:
        try:
            msg = self.control.recv()
        except (EOFError, OSError):
            self.loop.stop()  # the parent is gone
            return
        seq, name, args = msg
        try:
            result = self._run(name, args)
        except Exception as exc:
            self._reply((seq, "err", type(exc).__module__, type(exc).__qualname__, str(exc),
                         _attrs(exc)))
            return
        self._reply((seq, "ok", result))
        if name == "fault" and args.get("kind") == "crash":
            self.kernel.log("mock: fault crash: the host process dies now")
            sys.stderr.flush()
            os._exit(70)
        if name == "shutdown":
            self.orderly = True
            self.loop.stop()

    def _reply(self, msg: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):
            self.control.send(msg)

    def _run(self, name: str, a: dict[str, Any]) -> Any:
        k, h = self.kernel, self.kernel.host
        if name == "ping":
            return os.getpid()
        if name == "add_device":
            script = a.get("replay")
            if script is not None:
                from . import replay  # registers the "replay" model
            offer = h.add_device(a["what"], a.get("instance"), a.get("monitored"), a.get("model"))
            if script is not None:
                script.device = str(offer.instance)
                replay.SCRIPTS[str(offer.instance)] = script
            return str(offer.instance)
        if name == "replay_report":
            from .replay import SCRIPTS

            script = SCRIPTS.get(a["guid"])
            return script.report() if script is not None else None
        if name == "remove_device":
            return h.rescind(a["guid"], remove=True)
        if name == "rescind":
            return h.rescind(a["guid"])
        if name == "reoffer":
            return h.reoffer(a["guid"]).relid
        if name == "fault":
            if a["kind"] == "crash":
                h.device(a["guid"])  # a known device, or DeviceNotFound
                return None
            return h.fault(a["guid"], a["kind"], a.get("args", {}))
        if name == "offer_subchannels":
            return h.offer_subchannels(a["guid"], a["count"], a.get("monitored"))
        if name == "command":
            return h.command(a["guid"], a["name"], a.get("args", {}), a.get("subchannel", 0))
        if name == "host_stats":
            return h.stats(a["guid"])
        if name == "kernel_state":
            return k.state(a["guid"])
        if name == "bind_uio":
            return k.bind_uio(a["guid"])
        if name == "shutdown":
            return None
        raise KeyError(f"unknown mock command {name!r}")

    def run(self) -> None:
        """Say "ready", serve until told to stop or orphaned, then clean up.

        "ready" is sent inside the ``try``: the parent may be killed (with us, by a signal
        to the process group) the moment it hears it, and the cleanup must run then too.
        """
        global _CLEANING
        profile = os.environ.get(PROFILE_ENV)
        try:
            self.control.send(("ready", os.getpid()))
            if profile:
                _profiled(self.loop.run, f"{profile}.{os.getpid()}")
            else:
                self.loop.run()
        finally:
            _CLEANING = True
            try:
                self.kernel.shutdown()
            finally:
                if not self.orderly and self.owns_root:  # the parent died or we were killed
                    shutil.rmtree(self.kernel.root, ignore_errors=True)


def _profiled(run: Callable[[], None], path: str) -> None:
    """Run the loop under cProfile and dump the stats to ``path`` (pstats format) at the end."""
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(run)
    finally:
        prof.dump_stats(path)


_CLEANING = False
"""Set once the process is shutting down: termination signals are ignored from then on."""


def _attrs(exc: BaseException) -> dict[str, Any]:
    out = {}
    for key, value in vars(exc).items():
        if isinstance(value, (str, int, float, bool, type(None), tuple)):
            out[key] = value
    return out


def _import_models(names: list[str], kernel: MockKernel) -> None:
    """Import the model modules: the built-in ones (integration services, KVP) when present,
    then the named ones."""
    builtin = ("pyvmbus.mock.ic_models", "pyvmbus.mock.fcopy_model", "pyvmbus.mock.kvp_model")
    for name in [*builtin, *names]:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name in builtin and exc.name == name:
                continue
            kernel.log(f"mock: cannot import device models from {name}: {exc!r}")
            traceback.print_exc()
        except Exception as exc:
            kernel.log(f"mock: importing device models from {name} failed: {exc!r}")
            traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the mock process (``python -m pyvmbus.mock.kernel``)."""
    p = argparse.ArgumentParser(prog="python -m pyvmbus.mock.kernel")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--kernel", default="6.18")
    p.add_argument("--models", default="")
    p.add_argument("--owns-root", action="store_true")
    ns = p.parse_args(argv)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # the parent decides when we stop

    def terminated(signum: int, frame: object) -> None:
        # SIGTERM/SIGHUP: often sent to the whole process group, so the parent may be
        # dying too and never clean up; leave through run()'s cleanup, not the default
        # action (which would leave the root behind). Once cleaning up, ignore them: an
        # exception raised in the middle of rmtree would leave half the root behind.
        if _CLEANING:
            return
        raise SystemExit(128 + signum)

    _signal.signal(_signal.SIGTERM, terminated)
    _signal.signal(_signal.SIGHUP, terminated)
    control = Connection(ns.control_fd)
    loop = Loop()
    try:
        kernel = MockKernel(ns.root, ns.kernel, loop)
        _import_models([m for m in ns.models.split(",") if m], kernel)
    except Exception as exc:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            control.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    except SystemExit:  # a termination signal while starting: nobody else will clean up
        if ns.owns_root:
            shutil.rmtree(ns.root, ignore_errors=True)
        raise
    server: _Server | None = None
    try:
        server = _Server(kernel, control, loop, ns.owns_root)
        server.run()
    except SystemExit:
        if server is None and ns.owns_root:  # killed between the two try blocks
            shutil.rmtree(ns.root, ignore_errors=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
