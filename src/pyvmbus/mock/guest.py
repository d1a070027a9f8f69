"""A bare ring-level guest: open a node, map the rings, signal, wait with a re-check.

:class:`RawGuest` is what the mock's own tests use to drive a device without the channel
layer (no lifecycle, no dispatcher, no threads), and a small worked example of the
rules every client must follow (SPEC section 8): own the inbound mask, signal the host
the way the channel needs (monitor page + int page bit when monitored, a write of 1 to
the node otherwise), and before blocking unmask, fence and look at the ring again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..classes import DEFAULT_RING_SIZE
from ..guid import Guid, parse_guid
from ..packet import Packet, PacketType
from ..ring import RingBuffer
from ..shm import fence, fetch_or32
from ..sysfs import Sysfs
from ..uio import PAGE_SIZE, UioDevice
from .host import INT_PAGE_SEND_OFFSET, monitor_word

__all__ = ["RawChannel", "RawGuest"]


class RawChannel:
    """One channel's ring pair (primary or subchannel) with its signalling."""

    def __init__(self, guest: RawGuest, relid: int, monitor_id: int | None,
                 ring: npt.NDArray[np.uint8]) -> None:
        self.guest = guest
        self.relid = relid
        self.monitor_id = monitor_id
        half = len(ring) // 2
        self.tx = RingBuffer(ring[:half], header_size=PAGE_SIZE)
        self.rx = RingBuffer(ring[half:], header_size=PAGE_SIZE)
        self.signals = 0

    @property
    def monitored(self) -> bool:
        return self.monitor_id is not None

    def signal(self) -> None:
        """Tell the host to look at this channel (vmbus_setevent, done from userspace)."""
        self.signals += 1
        dev = self.guest.dev
        if self.monitor_id is not None:
            fetch_or32(dev.map("int_page").array, INT_PAGE_SEND_OFFSET + 4 * (self.relid // 32),
                       1 << (self.relid % 32))
            off, bit = monitor_word(self.monitor_id)
            fetch_or32(dev.map("monitor_page").array, off, bit)
        else:
            dev.irqcontrol(True)  # 6.10+: the kernel signals a non-monitored channel

    def send(self, payload: bytes | Sequence[bytes], type: int = PacketType.DATA_INBAND, flags: int = 0,
             transaction_id: int = 0) -> None:
        """Write one packet; signal if the ring engine says so (RingFull propagates)."""
        if self.tx.write(payload, type, flags, transaction_id):
            self.signal()

    def read(self) -> Packet | None:
        """One packet from RX if there is one; signals the host if it waits for room."""
        pkt = self.rx.read()
        if pkt is not None and self.rx.read_signal:
            self.signal()
        return pkt

    def unmask(self) -> int:
        """Clear our inbound mask, fence, and return the bytes waiting (drain if not 0)."""
        self.rx.interrupt_mask = 0
        fence()
        return self.rx.available_to_read()


class RawGuest:
    """A bound device opened from userspace: the primary's rings plus any subchannels.

    ``unmask_with_write``: also write 1 to the node when unmasking (the only way to unmask
    on <= 6.9, and how a non-monitored channel signals on 6.10+). ``exclusive``: hold the
    device's lock like any user (:meth:`UioDevice.open`); False for tests that open a node
    twice or unbind it under an open client on purpose, to see what the kernel does then.
    """

    def __init__(self, root: str | os.PathLike[str], guid: str, *, timeout: float = 10.0,
                 unmask_with_write: bool = True, exclusive: bool = True) -> None:
        self.root = Path(root)
        self.guid: Guid = parse_guid(guid)
        info = Sysfs(self.root).device(self.guid)
        name = info.uio_name
        if name is None:
            raise RuntimeError(f"{guid} is not bound to uio_hv_generic")
        self.info = info
        self.dev = UioDevice.open(self.root, name, self.guid, timeout=timeout, exclusive=exclusive)
        self.unmask_with_write = unmask_with_write
        self.primary = RawChannel(self, info.relid, info.monitor_id, self.dev.map("txrx_rings").array)
        self.channels: dict[int, RawChannel] = {self.primary.relid: self.primary}

    def subchannel(self, relid: int, timeout: float = 5.0) -> RawChannel:
        """Map subchannel ``relid``'s ring file once it appears (it appears late)."""
        if relid in self.channels:
            return self.channels[relid]
        path = self.info.path / "channels" / str(relid) / "ring"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear within {timeout} s")
            time.sleep(0.005)
        ring = self.dev.map_ring_file(path, 2 * DEFAULT_RING_SIZE)  # subchannels: always 2 MiB
        mon = self.info.channel(relid).monitor_id
        ch = RawChannel(self, relid, mon, ring)
        self.channels[relid] = ch
        return ch

    def unmask_all(self) -> int:
        """Unmask every channel; returns the bytes waiting in their RX rings."""
        waiting = sum(ch.unmask() for ch in self.channels.values())
        if self.unmask_with_write:
            self.dev.irqcontrol(True)
        return waiting

    def recv(self, timeout: float = 5.0, channel: RawChannel | None = None) -> Packet | None:
        """The next packet on ``channel`` (default: the primary), waiting for interrupts the
        right way: read, unmask, fence, re-check, block. None after ``timeout``."""
        ch = channel or self.primary
        deadline = time.monotonic() + timeout
        while True:
            pkt = ch.read()
            if pkt is not None:
                return pkt
            if self.unmask_all():
                continue
            left = deadline - time.monotonic()
            if left <= 0 or self.dev.wait(left) is None:
                return ch.read()

    def close(self) -> None:
        for ch in self.channels.values():
            ch.tx.close()
            ch.rx.close()
        self.channels.clear()
        self.dev.close()

    def __enter__(self) -> RawGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
