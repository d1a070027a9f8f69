"""The mock's sysfs tree and driver core: layout, the kernel's binding rules, file-driven writes."""

from __future__ import annotations

import errno
import os
import re
import selectors
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvmbus.classes import class_by_name
from pyvmbus.guid import Guid
from pyvmbus.mock.driver_core import DriverCore, id_table
from pyvmbus.mock.generations import GENERATIONS, generation
from pyvmbus.mock.sysfs_tree import FIXED_RING_FILE_SIZE, KERNEL_DRIVERS, Mount, Route, SysfsTree
from pyvmbus.sysfs import Sysfs

NET = "ed963694-e847-4b2a-85af-bc9cfc11d6f3"
FCOPY = "eb765408-105f-49b6-b4aa-c123b64d17d4"
SCSI = "f8b3781b-1e82-4818-a1c3-63d806ec15bb"
NET_CLASS = str(class_by_name("network").guid)


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    return SysfsTree(tmp_path, "6.18")


@pytest.fixture
def core(tree: SysfsTree) -> Iterator[DriverCore]:
    with DriverCore(tree) as c:
        yield c


def until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


# -- layout ----------------------------------------------------------------------------------------
def test_bus_and_drivers(tree: SysfsTree) -> None:
    bus = tree.root / "sys/bus/vmbus"
    assert (bus / "drivers_probe").read_text() == ""
    assert (bus / "drivers_autoprobe").read_text() == "1\n"
    for name, _ in KERNEL_DRIVERS:
        for attr in ("bind", "unbind", "new_id", "remove_id"):
            p = bus / "drivers" / name / attr
            assert p.read_text() == "" and os.stat(p).st_mode & 0o777 == 0o600
    assert (bus / "drivers/uio_hv_generic/new_id").exists()
    assert tree.drivers()[-1] == "uio_hv_generic"


def test_uio_not_loaded(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path, "6.18", uio_loaded=False)
    assert not tree.driver_loaded("uio_hv_generic") and tree.driver_loaded("hv_netvsc")
    tree.load_driver("uio_hv_generic")
    assert tree.driver_loaded("uio_hv_generic")
    tree.unload_driver("uio_hv_generic")
    assert not (tmp_path / "sys/bus/vmbus/drivers/uio_hv_generic").exists()


def test_uio_class_entries_formats(tree: SysfsTree) -> None:
    g = tree.add_device("network", NET)
    name = tree.add_uio(g, 3, [("txrx_rings", 0x400000), ("int_page", 4096)])
    u = tree.root / "sys/class/uio" / name
    assert name == "uio3" and u.is_symlink()
    assert os.path.realpath(u) == os.path.realpath(tree.root / "sys/bus/vmbus/devices" / NET / "uio/uio3")
    assert (u / "name").read_text() == "uio_hv_generic\n"
    assert (u / "version").read_text() == "0.02.1\n"
    assert (u / "event").read_text() == "0\n"
    assert os.path.realpath(u / "device") == os.path.realpath(tree.device_dir(g))
    for k in (0, 1):
        m = u / "maps" / f"map{k}"
        assert re.fullmatch(r"0x[0-9a-f]{16}\n", (m / "addr").read_text())
        assert re.fullmatch(r"0x[0-9a-f]{16}\n", (m / "size").read_text())
        assert (m / "offset").read_text() == "0x0\n"
    assert (u / "maps/map0/size").read_text() == "0x0000000000400000\n"
    assert (u / "maps/map1/name").read_text() == "int_page\n"
    assert tree.next_uio_index() == 0
    assert tree.remove_uio(g) == "uio3"
    assert not (tree.root / "sys/class/uio/uio3").exists() and tree.uio_of(g) is None


MIB = 1 << 20
EXPECTED_MAPS = {
    # gen: (network ring, fcopy ring per direction, who gets recv/send GPADL maps)
    "5.15": (2 * MIB, 2 * MIB, "all"),  # HV_RING_SIZE 512 pages; buffers for every device
    "6.10": (2 * MIB, 0x4000, "nic"),  # e566ed5b6417 hv_dev_ring_size
    "6.15": (2 * MIB, 0x5000, "nic"),  # 0315fef2aff9 VMBUS_RING_SIZE
    "6.18": (2 * MIB, 0x5000, "nic"),
    "6.12-debian": (2 * MIB, 0x5000, "nic"),
    "6.6-lts": (2 * MIB, 2 * MIB, "all"),  # no 6.10 series on 5.4-6.6
    "openhcl": (0x11000, 0x11000, "none"),  # uio_hv_generic.ring_size=0x11000, *_buf_size=0
}


@pytest.mark.parametrize("gen", sorted(GENERATIONS))
def test_uio_maps_per_generation(tmp_path: Path, gen: str) -> None:
    tree = SysfsTree(tmp_path, gen)
    net = tree.add_device("network")
    fc = tree.add_device("fcopy")
    net_ring, fc_ring, buffers = EXPECTED_MAPS[gen]
    net_maps = dict(tree.uio_maps(net, gpadl=7))
    assert net_maps["txrx_rings"] == 2 * net_ring
    assert ("recv:7" in net_maps and "send:8" in net_maps) == (buffers != "none")
    if buffers != "none":
        assert net_maps["recv:7"] == 31 << 20 and net_maps["send:8"] == 16 << 20
    fc_maps = dict(tree.uio_maps(fc))
    assert fc_maps["txrx_rings"] == 2 * fc_ring
    assert any(n.startswith("recv:") for n in fc_maps) == (buffers == "all")
    fixed = gen in ("5.15", "6.10", "6.6-lts", "openhcl")  # before 65995e97a1ca
    assert tree.ring_file_size(0x10000) == (FIXED_RING_FILE_SIZE if fixed else 0x10000)


def test_block_device_layout(tree: SysfsTree) -> None:
    g = tree.add_device("scsi", SCSI)
    real = tree.add_block_device(g, "sda", partitions=2)
    link = tree.root / "sys/block/sda"
    assert os.path.realpath(link) == str(real)
    dev = os.path.realpath(link / "device")
    assert dev == str(tree.device_dir(g) / "host0/target0:0:0/0:0:0:0")
    assert (link / "dev").read_text() == "8:0\n"
    assert (link / "sda2/dev").read_text() == "8:2\n" and (link / "sda2/partition").read_text() == "2\n"
    tree.add_block_device(g, "sdb", partitions=0)
    assert os.path.realpath(tree.root / "sys/block/sdb/device").endswith("host0/target0:0:0/0:0:0:1")
    tree.remove_block_devices(g)
    assert not link.exists() and not (tree.device_dir(g) / "host0").exists()


def test_proc_files(tree: SysfsTree) -> None:
    g = tree.add_device("scsi", SCSI)
    tree.add_block_device(g, "sda")
    tree.set_mounts([("/dev/sda1", "/"), Mount("/dev/mapper/vg-x", "/my data", "xfs", dev="253:0")])
    lines = (tree.root / "proc/self/mountinfo").read_text().splitlines()
    assert lines[2].split()[2] == "8:1" and lines[2].split()[4] == "/"
    assert " - ext4 /dev/sda1 " in lines[2]
    assert lines[3].split()[4] == "/my\\040data" and lines[3].split()[2] == "253:0"
    tree.set_routes([Route("eth0", gateway="192.168.0.1"),
                     Route("eth0", "192.168.0.0", mask="255.255.255.0")])
    route = (tree.root / "proc/net/route").read_text().splitlines()
    assert route[0].startswith("Iface\tDestination\tGateway")
    f = route[1].split("\t")
    assert f[0] == "eth0" and f[1] == "00000000" and f[7] == "00000000" and f[3] == "0003"
    if sys.byteorder == "little":
        assert f[2] == "0100A8C0" and route[2].split("\t")[7] == "00FFFFFF"


def test_add_remove_device_leaves_nothing(tree: SysfsTree) -> None:
    g = tree.add_device("network", NET)
    tree.add_channel(g, 50, 1, None)
    tree.add_uio(g, 0, [("txrx_rings", 8192)])
    tree.add_net(g)
    assert (tree.root / "sys/class/net/eth0").exists()
    tree.set_driver(g, "uio_hv_generic")
    assert (tree.root / "sys/bus/vmbus/drivers/uio_hv_generic" / NET).is_symlink()
    assert "DRIVER=uio_hv_generic" in (tree.device_dir(g) / "uevent").read_text()
    tree.remove_device(g)
    for p in (tree.root / "sys/bus/vmbus/devices" / NET, tree.device_dir(g), tree.root / "sys/class/uio/uio0",
              tree.root / "sys/class/net/eth0", tree.root / "sys/bus/vmbus/drivers/uio_hv_generic" / NET):
        assert not os.path.lexists(p), p
    assert not list(tree.tmp_dir.iterdir())
    assert tree.devices() == []


def test_attribute_updates_validate_names(tree: SysfsTree) -> None:
    g = tree.add_device("fcopy", FCOPY, monitored=False)
    relid = tree.device(g).relid
    with pytest.raises(ValueError, match="no channel attribute"):
        tree.set_channel_attrs(g, relid, bogus=1)
    with pytest.raises(ValueError, match="not a dynamic"):
        tree.set_device_attrs(g, class_id="x")
    tree.set_channel_attrs(g, relid, pending=1, monitor_id=3)  # hidden on 6.18: stays hidden
    assert not (tree.channel_dir(g, relid) / "pending").exists()
    with pytest.raises(ValueError, match="exists already"):
        tree.add_device("fcopy", FCOPY)
    with pytest.raises(ValueError, match="primary"):
        tree.remove_channel(g, relid)


# -- the driver core's rules (store() functions called directly) --------------------------------------
def test_autoprobe_binds_kernel_drivers(core: DriverCore) -> None:
    tree = core.tree
    net = core.add_device("network", NET)
    fc = core.add_device("fcopy", FCOPY, monitored=False)
    scsi = core.add_device("scsi", SCSI)
    assert tree.driver_of(net) == "hv_netvsc" and tree.driver_of(scsi) == "hv_storvsc"
    assert tree.driver_of(fc) is None  # 6.10+: no kernel fcopy driver any more
    d = Sysfs(tree.root).device(net)
    assert d.net_interfaces == ["eth0"] and d.state == 3
    assert d.channels()[0].write_avail is not None  # the open allocated the ring


def test_fcopy_has_a_kernel_driver_before_6_10(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path, "5.15")
    with DriverCore(tree) as core:
        fc = core.add_device("fcopy", FCOPY, monitored=False)
        assert tree.driver_of(fc) == "hv_utils"
    assert class_by_name("fcopy").guid in id_table(generation("5.15"))["hv_utils"]
    assert class_by_name("fcopy").guid not in id_table(generation("6.18"))["hv_utils"]


def test_override_decides_matching(core: DriverCore) -> None:
    net = core.add_device("network", NET)
    assert core.bind("uio_hv_generic", net) == -errno.ENODEV  # no id, no override: no match
    assert core.bind("hv_netvsc", net) == -errno.EBUSY
    core._override[net] = "uio_hv_generic"
    assert core.matches("uio_hv_generic", net) and not core.matches("hv_netvsc", net)
    assert core.unbind("hv_utils", net) == -errno.ENODEV
    assert core.unbind("hv_netvsc", net) == 0
    assert core.tree.driver_of(net) is None and Sysfs(core.tree.root).device(net).net_interfaces == []
    assert core.bind("hv_netvsc", net) == -errno.ENODEV  # the override excludes it
    assert core.drivers_probe(net) == 0
    assert core.tree.driver_of(net) == "uio_hv_generic" and core.tree.uio_of(net) == "uio0"
    assert (core.tree.dev_dir / "uio0").exists()


def test_new_id_rules(core: DriverCore) -> None:
    tree = core.tree
    a = core.add_device("network", NET)
    b = core.add_device("network")
    assert core.new_id("uio_hv_generic", "{" + NET_CLASS + "}") == -errno.EINVAL  # guid_parse: no braces
    assert core.new_id("uio_hv_generic", "nonsense") == -errno.EINVAL
    assert core.new_id("uio_hv_generic", NET_CLASS + "\n") == 0
    assert core.new_id("uio_hv_generic", NET_CLASS) == -errno.EEXIST
    assert tree.driver_of(a) == tree.driver_of(b) == "hv_netvsc"  # driver_attach skips bound devices
    assert core.unbind("hv_netvsc", b) == 0 and core.bind("uio_hv_generic", b) == 0
    assert tree.driver_of(b) == "uio_hv_generic" and tree.driver_of(a) == "hv_netvsc"
    assert core.dynamic_ids("uio_hv_generic") == (Guid(NET_CLASS),)
    assert core.remove_id("uio_hv_generic", NET_CLASS) == 0
    assert core.remove_id("uio_hv_generic", NET_CLASS) == -errno.ENODEV
    assert tree.driver_of(b) == "uio_hv_generic"  # remove_id does not unbind


def test_new_id_attaches_every_unbound_device_of_the_class(core: DriverCore) -> None:
    a = core.add_device("fcopy", FCOPY)
    b = core.add_device("fcopy")
    assert core.tree.driver_of(a) is None and core.tree.driver_of(b) is None
    assert core.new_id("uio_hv_generic", str(class_by_name("fcopy").guid)) == 0
    assert core.tree.driver_of(a) == core.tree.driver_of(b) == "uio_hv_generic"
    assert {core.tree.uio_of(a), core.tree.uio_of(b)} == {"uio0", "uio1"}


def test_unknown_device_names(core: DriverCore) -> None:
    core.add_device("network", NET)
    for name in ("ed963694", NET.upper(), "{" + NET + "}", "5d8c3c4a-0000-4000-8000-000000000000", "x"):
        assert core.bind("hv_netvsc", name) == -errno.ENODEV
        assert core.drivers_probe(name) == -errno.ENODEV
        assert core.unbind("hv_netvsc", name) == -errno.ENODEV


def test_old_kernel_refuses_unmonitored_at_probe(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path, "5.15")
    with DriverCore(tree) as core:
        g = core.add_device("heartbeat", monitored=False)
        assert core.unbind("hv_utils", g) == 0
        core._override[g] = "uio_hv_generic"
        assert core.drivers_probe(g) == 0  # a failed probe is not a drivers_probe error
        assert tree.driver_of(g) is None and tree.uio_of(g) is None
        assert core.bind("uio_hv_generic", g) == -524
        assert any("failed with error -524" in line for line in tree.kernel_log())
        m = core.add_device("heartbeat", monitored=True)
        core.unbind("hv_utils", m)
        core._override[m] = "uio_hv_generic"
        assert core.drivers_probe(m) == 0 and tree.driver_of(m) == "uio_hv_generic"


def test_probe_hook_and_failed_probe_falls_through(tree: SysfsTree) -> None:
    calls: list[tuple[str, Guid]] = []

    def probe(g: Guid) -> bool:
        calls.append(("probe", g))
        return False

    with DriverCore(tree, probe=probe, remove=lambda g: calls.append(("remove", g))) as core:
        g = core.add_device("fcopy", FCOPY)
        assert core.new_id("uio_hv_generic", str(class_by_name("fcopy").guid)) == 0
        assert calls == [("probe", g)] and tree.driver_of(g) is None


def test_load_and_unload_driver(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path, "6.18", uio_loaded=False)
    with DriverCore(tree) as core:
        g = core.add_device("fcopy", FCOPY)
        core._override[g] = "uio_hv_generic"
        core.load_driver("uio_hv_generic")  # driver_register -> driver_attach honours the override
        assert tree.driver_of(g) == "uio_hv_generic"
        core.new_id("uio_hv_generic", str(class_by_name("fcopy").guid))
        core.unload_driver("uio_hv_generic")
        assert tree.driver_of(g) is None and tree.uio_of(g) is None
        assert not tree.driver_loaded("uio_hv_generic") and core.dynamic_ids("uio_hv_generic") == ()


def test_remove_device_releases_the_driver(core: DriverCore) -> None:
    removed: list[Guid] = []
    core._remove_uio = removed.append
    g = core.add_device("fcopy", FCOPY)
    core._override[g] = "uio_hv_generic"
    core.drivers_probe(g)
    core.remove_device(g)
    assert removed == [g] and not core.tree.device_dir(g).exists()
    core.remove_device(g)  # twice is harmless


def test_storvsc_unbind_takes_the_disks(core: DriverCore) -> None:
    g = core.add_device("scsi", SCSI)
    core.tree.add_block_device(g, "sda")
    assert core.unbind("hv_storvsc", g) == 0
    assert not (core.tree.root / "sys/block/sda").exists()


# -- writes through the files, processed asynchronously -----------------------------------------------
@pytest.mark.timeout(20)
def test_file_writes_bind_and_read_back(core: DriverCore) -> None:
    tree = core.tree
    net = core.add_device("network", NET)
    bus = tree.root / "sys/bus/vmbus"
    dev = bus / "devices" / NET
    with core.running():
        (dev / "driver_override").write_text("uio_hv_generic\n")
        (bus / "drivers/hv_netvsc/unbind").write_text(NET)
        (bus / "drivers_probe").write_text(NET + "\n")
        assert until(lambda: tree.driver_of(net) == "uio_hv_generic")
        assert (dev / "driver_override").read_text() == "uio_hv_generic\n"
        for p in (bus / "drivers_probe", bus / "drivers/hv_netvsc/unbind"):
            assert p.read_text() == ""  # write-only files read back empty
        (dev / "driver_override").write_text("\n")
        assert until(lambda: (dev / "driver_override").read_text() == "(null)\n")
        (bus / "drivers/uio_hv_generic/unbind").write_text(NET)
        assert until(lambda: tree.driver_of(net) is None)
        (bus / "drivers/hv_netvsc/bind").write_text(NET)
        assert until(lambda: tree.driver_of(net) == "hv_netvsc")
        assert (dev / "net/eth0").is_dir()


@pytest.mark.timeout(20)
def test_rejected_writes_go_to_the_kernel_log(core: DriverCore) -> None:
    tree = core.tree
    core.add_device("network", NET)
    drv = tree.root / "sys/bus/vmbus/drivers/uio_hv_generic"
    with core.running():
        (drv / "new_id").write_text(NET_CLASS)
        assert until(lambda: core.dynamic_ids("uio_hv_generic") == (Guid(NET_CLASS),))
        (drv / "new_id").write_text(NET_CLASS)
        (drv / "bind").write_text("ed963694-0000-4000-8000-000000000000")
        (tree.root / "sys/bus/vmbus/drivers_autoprobe").write_text("maybe")
        assert until(lambda: len([x for x in tree.kernel_log() if "-E" in x]) >= 3)
    log = "\n".join(tree.kernel_log())
    assert "new_id: -EEXIST" in log and "bind: -ENODEV" in log and "drivers_autoprobe: -EINVAL" in log


@pytest.mark.timeout(20)
def test_selector_integration_and_autoprobe_switch(core: DriverCore) -> None:
    tree = core.tree
    sel = selectors.DefaultSelector()
    sel.register(core.fileno(), selectors.EVENT_READ)
    assert sel.select(0) == []
    (tree.root / "sys/bus/vmbus/drivers_autoprobe").write_text("0")
    assert sel.select(5) and core.process() == 1
    assert (tree.root / "sys/bus/vmbus/drivers_autoprobe").read_text() == "0\n"
    g = core.add_device("network", NET)
    assert tree.driver_of(g) is None  # autoprobe off
    (tree.root / "sys/bus/vmbus/drivers_probe").write_text(NET)
    assert sel.select(5) and core.process() == 1
    assert tree.driver_of(g) == "hv_netvsc"
    open(tree.root / "sys/bus/vmbus/drivers_probe", "w").close()  # open+close, no write: nothing
    assert sel.select(5) and core.process() == 0
    sel.close()


@pytest.mark.timeout(20)
def test_queue_overflow_rescan(core: DriverCore) -> None:
    """After IN_Q_OVERFLOW the core looks at every file; the rescan alone must bind."""
    tree = core.tree
    g = core.add_device("fcopy", FCOPY)
    (tree.device_dir(g) / "driver_override").write_text("uio_hv_generic")
    (tree.root / "sys/bus/vmbus/drivers_probe").write_text(FCOPY)
    assert core._rescan() == 2
    assert tree.driver_of(g) == "uio_hv_generic"
    core.process()  # the queued events now find nothing new
    assert tree.driver_of(g) == "uio_hv_generic"


def test_override_store_rules(core: DriverCore) -> None:
    g = core.add_device("fcopy", FCOPY)
    path = core.tree.device_dir(g) / "driver_override"
    for written, expect in (("abc\ndef", "abc"), ("\n", None), ("x\0y", "x"), ("", "x"), ("y" * 5000, "x")):
        path.write_text(written)
        core.process()
        assert core.driver_override(g) == expect, written
        assert path.read_text() == f"{expect if expect else '(null)'}\n"
    assert any("longer than a page" in x for x in core.tree.kernel_log())


def test_no_driver_override_file(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path, "6.18", driver_override=False)
    g = tree.add_device("network", NET)
    assert not (tree.device_dir(g) / "driver_override").exists()
    assert not Sysfs(tmp_path).device(NET).has_driver_override
    tree.set_driver_override_file(g, "x")  # a no-op without the file
    assert not (tree.device_dir(g) / "driver_override").exists()
