"""What ``vmbus list``, ``show`` and ``ring`` report, as plain data (keys in cli.schema).

Read-only: nothing here opens a device node unless asked (``ring --map``), because on a
real kernel the first open of ``/dev/uioN`` opens the channel and the last close closes
it again, resetting the rings. By default ring state comes from the sysfs attributes the
kernel computes on read (``in_read_index`` ..., ``channels/<relid>/read_avail`` ...), which
any user can read and which exist whenever the ring is allocated, whoever drives it
(also a kernel driver such as hv_utils). They do not carry ``pending_send_sz`` or the
feature bits; ``--map`` reads those from the mapped ring headers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..binding import guard_rails, read_record
from ..errors import DeviceRescinded, MalformedSysfs, RingCorrupt, VmbusError
from ..ring import HeaderCheck, RingBuffer
from ..signal import HostSignal
from ..sysfs import UIO_DRIVER, ChannelInfo, Sysfs, VmbusDevice, parse_int, read_attr
from .state import class_label

__all__ = [
    "CHANNEL_COUNTERS",
    "STATE_NAMES",
    "channel_row",
    "device_detail",
    "device_row",
    "list_devices",
    "MappedRings",
    "ring_from_sysfs",
    "signal_info",
]

STATE_NAMES = {0: "offer", 1: "opening", 2: "open", 3: "opened"}
"""sysfs ``state``: enum vmbus_channel_state (2 is also where a closed channel ends up)."""

CHANNEL_COUNTERS = ("events", "interrupts", "intr_in_full", "intr_out_empty", "out_full_first",
                    "out_full_total")


def _opt_int(path: Path) -> int | None:
    text = read_attr(path)
    return None if text is None else parse_int(text, path)  # MalformedSysfs names a bad file


def device_row(dev: VmbusDevice) -> dict[str, Any]:
    """One ``vmbus list`` row."""
    return {
        "guid": str(dev.guid),
        "class": class_label(dev),
        "class_guid": str(dev.class_guid),
        "relid": dev.relid,
        "driver": dev.driver,
        "uio": dev.uio_name,
        "monitored": dev.monitored,
        "monitor_id": dev.monitor_id,
    }


def list_devices(fs: Sysfs) -> list[dict[str, Any]]:
    """Rows of every device, by relid; a device that vanishes meanwhile is left out (one
    with a malformed attribute is not: :class:`MalformedSysfs` says which file)."""
    rows = []
    for dev in fs.devices():
        try:
            rows.append(device_row(dev))
        except MalformedSysfs:
            raise
        except (DeviceRescinded, VmbusError):
            continue
    rows.sort(key=lambda r: (r["relid"], r["guid"]))
    return rows


def channel_row(chan: ChannelInfo) -> dict[str, Any]:
    """One channel of ``show`` / ``ring``: ids, masks, bytes available, counters, ring file."""
    row: dict[str, Any] = {
        "relid": chan.relid,
        "subchannel_id": _opt_int(chan.path / "subchannel_id"),
        "cpu": _opt_int(chan.path / "cpu"),
        "monitor_id": chan.monitor_id,
        "in_mask": chan.in_mask,
        "out_mask": chan.out_mask,
        "read_avail": chan.read_avail,
        "write_avail": chan.write_avail,
    }
    for name in CHANNEL_COUNTERS:
        row[name] = _opt_int(chan.path / name)
    ring = chan.ring_path
    row["ring_file"] = str(ring) if ring is not None else None
    row["ring_file_size"] = chan.ring_file_size
    return row


def signal_info(dev: VmbusDevice) -> dict[str, Any]:
    """How pyvmbus will signal the host for the primary channel, and why (no node opened).

    The mechanism follows from the offer alone (monitored or not); the bit positions are
    computed on scratch pages, since nothing is mapped here.
    """
    relid = dev.relid
    monitor_id = dev.monitor_id
    sig = HostSignal.for_channel(relid, monitor_id, int_page=bytearray(4096),
                                 monitor_page=bytearray(4096), write_one=lambda: None)
    info: dict[str, Any] = dict.fromkeys(("int_page_word_offset", "int_page_bit_mask",
                                          "monitor_pending_offset", "monitor_bit_mask"))
    info.update(sig.info())  # the bit positions exist for monitor-page signalling only
    info.pop("signals", None)
    notes = []
    if monitor_id is None:
        notes.append("uio_hv_generic before 6.10 refuses channels without a monitor id at probe "
                     "(ENOTSUPP), so binding this device needs kernel 6.10 or later")
    else:
        notes.append("works on every uio_hv_generic generation; the write of 1 to the fd "
                     "after each drain only unmasks")
    subs = []
    with contextlib.suppress(VmbusError):
        for chan in dev.channels():
            sub_id = _opt_int(chan.path / "subchannel_id")
            if not sub_id:
                continue
            s = HostSignal.for_channel(chan.relid, chan.monitor_id, int_page=bytearray(4096),
                                       monitor_page=bytearray(4096), write_one=lambda: None,
                                       subchannel=True)
            subs.append({"relid": chan.relid, "mechanism": s.mechanism.value, "reason": s.reason})
    return {**info, "reason": sig.reason, "notes": notes, "subchannels": subs}


def _side(used: int | None, free: int | None, read_index: int | None, write_index: int | None,
          mask: int | None, pending: int | None = None, features: int | None = None,
          data_size: int | None = None) -> dict[str, Any]:
    if data_size is None and used is not None and free is not None:
        data_size = used + free
    occupancy = (used / data_size) if used is not None and data_size else None
    return {
        "read_index": read_index,
        "write_index": write_index,
        "interrupt_mask": mask,
        "bytes_used": used,
        "bytes_free": free,
        "data_size": data_size,
        "occupancy": round(occupancy, 6) if occupancy is not None else None,
        "pending_send_size": pending,
        "feature_bits": features,
    }


def _ring_common(dev: VmbusDevice, source: str) -> dict[str, Any]:
    state = dev.state
    uio = dev.uio()
    chans = []
    try:
        chans = [channel_row(c) for c in dev.channels()]
    except MalformedSysfs:
        raise
    except VmbusError:
        pass  # a channel rescinded while being read
    return {
        "device": str(dev.guid),
        "class": class_label(dev),
        "source": source,
        "state": state,
        "channel_open": state == 3,
        "driver": dev.driver,
        "uio": uio.name if uio is not None else None,
        "uio_events": uio.event if uio is not None else None,
        "channels": chans,
        "note": None,
        "violations": [],
    }


def ring_from_sysfs(dev: VmbusDevice) -> dict[str, Any]:
    """Ring state of the primary channel from the kernel's debug attributes (no open)."""
    out = _ring_common(dev, "sysfs")
    p = dev.path
    out["tx"] = _side(_opt_int(p / "out_read_bytes_avail"), _opt_int(p / "out_write_bytes_avail"),
                      _opt_int(p / "out_read_index"), _opt_int(p / "out_write_index"),
                      _opt_int(p / "out_intr_mask"))
    out["rx"] = _side(_opt_int(p / "in_read_bytes_avail"), _opt_int(p / "in_write_bytes_avail"),
                      _opt_int(p / "in_read_index"), _opt_int(p / "in_write_index"),
                      _opt_int(p / "in_intr_mask"))
    if out["tx"]["read_index"] is None:
        out["note"] = ("the ring is not allocated (no driver holds the device), so the kernel "
                       "shows no ring state")
    else:
        out["note"] = ("from sysfs; pending_send_size and feature bits are only in the ring "
                       "headers: use --map on a device bound to uio_hv_generic")
    return out


class MappedRings:
    """The primary channel's ring headers, read through the uio node (``vmbus ring --map``).

    Opening the node opens the channel if nobody holds it open, and the close then closes
    it again, resetting the rings: :meth:`read` says so in ``note``. Kept open across the
    refreshes of ``--watch``. Needs the device bound to uio_hv_generic.
    """

    def __init__(self, root: str | os.PathLike[str], dev: VmbusDevice, timeout: float = 10.0) -> None:
        from ..channel import split_rings
        from ..errors import InvalidState
        from ..uio import PAGE_SIZE, UioDevice

        name = dev.uio_name
        if name is None or dev.driver != UIO_DRIVER:
            raise InvalidState(dev.guid, f"bound to {dev.driver or 'no driver'}", "map the rings",
                               f"--map needs the device bound to uio_hv_generic ('vmbus bind {dev.guid}'); "
                               "without --map the state comes from sysfs")
        self.dev = dev
        self.was_open = dev.state == 3
        # An observer: without the device's lock, so it can look at a channel that another
        # process (vmbus enable, a program) holds, and never stands in that one's way.
        self.uio = UioDevice.open(root, name, device=dev.guid, timeout=timeout, exclusive=False)
        try:
            arr = self.uio.map("txrx_rings").array
            half = len(arr) // 2
            try:
                self.tx, self.rx = split_rings(arr, f"{name} txrx_rings")
            except RingCorrupt as exc:
                if exc.field.endswith(" size"):
                    raise
                # Bad indices: show them anyway (read() lists what is wrong).
                self.tx = RingBuffer(arr[:half], header_size=PAGE_SIZE)
                self.rx = RingBuffer(arr[half:], header_size=PAGE_SIZE)
            self.check = HeaderCheck(self.tx, self.rx)
            self.first_violation: RingCorrupt | None = None
        except BaseException:
            self.uio.close()
            raise

    def read(self) -> dict[str, Any]:
        """The headers through the one validation point: what breaks a rule is listed in
        ``violations`` (and the byte counts it makes meaningless are null)."""
        out = _ring_common(self.dev, "map")
        bad = self.check.violations()
        out["violations"] = [b.detail for b in bad]
        self.first_violation = bad[0].located(f"device {self.dev.guid}, seen by vmbus ring --map") \
            if bad else None
        for key, ring in (("tx", self.tx), ("rx", self.rx)):
            used = free = None
            with contextlib.suppress(RingCorrupt):
                used, free = ring.available_to_read(), ring.available_to_write()
            out[key] = _side(used, free, ring.read_index, ring.write_index, ring.interrupt_mask,
                             ring.pending_send_size, ring.feature_bits, ring.data_size)
        if self.was_open:
            out["note"] = "read from the ring headers of the open channel (uio map 0)"
        else:
            out["note"] = ("the channel was not open: opening the node opened it for this read "
                           "(fresh rings) and closing it closes it again; run this while another "
                           "process (e.g. 'vmbus enable') holds the device")
        return out

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        self.uio.close()

    def __enter__(self) -> MappedRings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ring_engine() -> str:
    """The ring engine this process runs: "c" (pyvmbus._ring) or "python" (PYVMBUS_RING)."""
    from .. import ring

    return ring.ENGINE


def device_detail(root: Path, dev: VmbusDevice) -> dict[str, Any]:
    """Everything ``vmbus show`` reports about one device."""
    attrs: dict[str, str | None] = {}
    try:
        entries = sorted(os.scandir(dev.path), key=lambda e: e.name)
    except FileNotFoundError:
        raise DeviceRescinded(dev.guid, "its sysfs directory vanished") from None
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            with contextlib.suppress(VmbusError):
                attrs[entry.name] = read_attr(Path(entry.path))
    uio = dev.uio()
    uio_out = None
    if uio is not None:
        uio_out = {
            "name": uio.name,
            "node": str(root / "dev" / uio.name),
            "driver_name": uio.driver_name,
            "version": uio.version,
            "event": uio.event,
            "maps": [{"index": m.index, "name": m.name, "addr": m.addr, "size": m.size,
                      "offset": m.offset} for m in uio.maps],
        }
    record = read_record(root, dev.guid)
    rails: list[str] = []
    if dev.driver != UIO_DRIVER:
        with contextlib.suppress(VmbusError, OSError):
            rails = guard_rails(root, dev.guid)
    cls = dev.device_class
    state = dev.state
    return {
        "guid": str(dev.guid),
        "path": str(dev.path),
        "class": class_label(dev),
        "class_guid": str(dev.class_guid),
        "class_description": cls.description if cls.name != "unknown" else None,
        "relid": dev.relid,
        "state": state,
        "state_name": STATE_NAMES.get(state, "unknown"),
        "monitored": dev.monitored,
        "monitor_id": dev.monitor_id,
        "driver": dev.driver,
        "driver_override": dev.driver_override,
        "numa_node": dev.numa_node,
        "vendor": _opt_int(dev.path / "vendor"),
        "device_type": _opt_int(dev.path / "device"),
        "channel_vp_mapping": [list(t) for t in _safe_vp(dev)],
        "net_interfaces": dev.net_interfaces,
        "attributes": attrs,
        "channels": [channel_row(c) for c in dev.channels()],
        "uio": uio_out,
        "ring": {**{k: v for k, v in ring_from_sysfs(dev).items() if k in ("tx", "rx", "note")},
                 "engine": ring_engine()},
        "signal": signal_info(dev),
        "bind_record": None if record is None else {
            "previous_driver": record.previous_driver, "method": record.method,
            "new_id": record.new_id, "created": record.created},
        "guard_rails": rails,
    }


def _safe_vp(dev: VmbusDevice) -> list[tuple[int, int]]:
    try:
        return dev.channel_vp_mapping
    except VmbusError:
        return []
