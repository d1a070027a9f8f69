"""The device layer on a real Hyper-V guest: sysfs as the kernel prints it, the guard rails,
and a uio_hv_generic node through the kernel transport.

Marked ``hyperv`` (skipped where there is no /sys/bus/vmbus) and, where a test opens a
device node, ``root``. Nothing here binds or unbinds: a test run must not take a disk or
a NIC away from the guest. The mock tests cover the same code on every kernel generation;
these check the assumptions the mock is built on against the real thing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pyvmbus.binding import guard_rails
from pyvmbus.classes import lookup_class
from pyvmbus.ring import RingBuffer
from pyvmbus.sysfs import UIO_DRIVER, Sysfs, VmbusDevice
from pyvmbus.uio import PAGE_SIZE, UioDevice

pytestmark = [pytest.mark.hyperv, pytest.mark.timeout(60)]

_BRACED = re.compile(r"\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\}")


def _devices() -> list[VmbusDevice]:
    devs = Sysfs("/").devices()
    assert devs, "a Hyper-V guest has VMBus devices"
    return devs


def test_every_device_reads_as_spec_section_3_says() -> None:
    for dev in _devices():
        raw = (dev.path / "device_id").read_text().strip()
        assert _BRACED.fullmatch(raw) and raw[1:-1] == dev.guid  # braced, lower case, = dir name
        assert _BRACED.fullmatch((dev.path / "class_id").read_text().strip())
        assert dev.device_id == dev.guid and dev.vendor == 0x1414
        assert lookup_class(str(dev.class_guid)) == dev.device_class
        assert dev.state in (0, 1, 2, 3)
        chans = dev.channels()
        if chans:  # channels/ lists the primary first
            assert chans[0].relid == dev.relid and chans[0].subchannel_id == 0
            assert dev.channel_vp_mapping[0][0] == dev.relid
        if dev.monitor_id is not None:
            assert 0 <= dev.monitor_id < 128


def test_devices_bound_to_uio_list_their_maps() -> None:
    """uio_hv_generic's maps: ring pair first (each ring a page-aligned header + data),
    then the 4 KiB-or-page int and monitor pages; sizes never hard-coded."""
    bound = [d for d in _devices() if d.driver == UIO_DRIVER]
    if not bound:
        pytest.skip("no device is bound to uio_hv_generic on this guest")
    for dev in bound:
        info = dev.uio()
        assert info is not None and info.driver_name == UIO_DRIVER
        names = [m.name for m in info.maps]
        assert names[:3] == ["txrx_rings", "int_page", "monitor_page"]
        ring = info.maps[0].size
        assert ring % 2 == 0 and (ring // 2) % 4096 == 0 and ring // 2 > PAGE_SIZE
        assert all(m.size >= 4096 for m in info.maps[1:3])


@pytest.mark.root
def test_open_a_bound_node_through_the_kernel_transport() -> None:
    """Open (refcounted: a daemon holding it is not disturbed), check each ring's indices
    lie in its data area, and close. Nothing is written to the rings or the node."""
    bound = [d for d in _devices() if d.driver == UIO_DRIVER and d.uio_name]
    if not bound:
        pytest.skip("no device is bound to uio_hv_generic on this guest")
    dev = bound[0]
    name = dev.uio_name
    assert name is not None
    with UioDevice.open("/", name, device=dev.guid) as node:
        assert node.kind == "kernel"
        rings = node.map("txrx_rings").array
        half = len(rings) // 2
        for part in (rings[:half], rings[half:]):
            ring = RingBuffer(part, header_size=PAGE_SIZE)
            assert 0 <= ring.available_to_read() < ring.data_size  # RingCorrupt otherwise
        assert len(node.map("int_page").array) == node.map("int_page").size


def _root_disk() -> str | None:
    """The /sys/block name of the disk holding "/" (major:minor from mountinfo)."""
    majmin = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            majmin = fields[2]
    if majmin is None:
        return None
    for disk in Path("/sys/block").iterdir():
        names = [disk, *(p for p in disk.iterdir() if (p / "partition").exists())]
        if any((p / "dev").read_text().strip() == majmin for p in names):
            return disk.name
    return None


def test_the_boot_disk_and_the_default_route_are_guarded() -> None:
    """Whatever VMBus device carries "/" or the default route is refused without --force."""
    disk = _root_disk()
    real = os.path.realpath(f"/sys/block/{disk}/device") if disk else ""
    checked = 0
    for dev in _devices():
        cls = dev.device_class
        if cls.storage and dev.guid in real:
            assert any("mounted on /" in r for r in guard_rails("/", dev.guid)), dev.guid
            checked += 1
        if cls.network and dev.net_interfaces:
            route = Path("/proc/net/route").read_text().splitlines()[1:]
            default = {f[0] for f in (line.split() for line in route)
                       if len(f) > 7 and f[1] == "00000000" and f[7] == "00000000"}
            if default & set(dev.net_interfaces):
                assert any("default route" in r for r in guard_rails("/", dev.guid)), dev.guid
                checked += 1
    if not checked:
        pytest.skip("neither the boot disk nor the default route sits on a VMBus device here")
