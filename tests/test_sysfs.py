"""pyvmbus.sysfs against the mock tree: SPEC section 3 formats per generation, lookups, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmbus.classes import class_by_name
from pyvmbus.errors import DeviceNotFound, DeviceRescinded
from pyvmbus.mock.generations import GENERATIONS
from pyvmbus.mock.sysfs_tree import CHANNEL_ATTRS, DEVICE_MONITOR_ATTRS, RING_DEBUG_ATTRS, SysfsTree
from pyvmbus.sysfs import Sysfs, VmbusDevice, parse_int, read_attr, read_uio

NET = "ed963694-e847-4b2a-85af-bc9cfc11d6f3"
FCOPY = "eb765408-105f-49b6-b4aa-c123b64d17d4"
HB = "2dd1ce17-079e-403c-b352-a1921ee207ee"


@pytest.fixture(params=sorted(GENERATIONS))
def gen_tree(request: pytest.FixtureRequest, tmp_path: Path) -> SysfsTree:
    tree = SysfsTree(tmp_path, request.param)
    tree.add_device("network", NET, cpu=1)
    tree.add_device("fcopy", FCOPY, monitored=False)
    tree.add_device("heartbeat", HB, monitored=True, monitor_id=7)
    return tree


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    tree = SysfsTree(tmp_path, "6.18")
    tree.add_device("network", NET)
    tree.add_device("fcopy", FCOPY, monitored=False)
    tree.add_device("heartbeat", HB, monitored=True)
    return tree


def text(path: Path) -> str:
    return path.read_text()


# -- fidelity: the files and their exact formats ---------------------------------------------------
def test_device_files_exact_formats(gen_tree: SysfsTree) -> None:
    root = gen_tree.root
    d = root / "sys/bus/vmbus/devices" / NET
    assert d.is_symlink() and d.is_dir()
    assert os.path.realpath(d).endswith("VMBUS:00/" + NET)
    assert text(d / "class_id") == "{f8615163-df3e-46c5-913f-f2d2f965ed0e}\n"
    assert text(d / "device_id") == "{" + NET + "}\n"
    relid = int(text(d / "id"))
    assert text(d / "id") == f"{relid}\n"
    assert text(d / "state") == "2\n"  # CHANNEL_OPEN_STATE from vmbus_process_offer
    assert text(d / "vendor") == "0x1414\n"
    assert text(d / "device") == "0x3\n"
    assert text(root / "sys/bus/vmbus/devices" / FCOPY / "device") == "0xd\n"
    # modalias: the class GUID's 16 bytes in memory order, not the dashed text order
    assert text(d / "modalias") == "vmbus:635161f83edfc546913ff2d2f965ed0e\n"
    assert text(d / "numa_node") == "0\n"
    assert text(d / "channel_vp_mapping") == f"{relid}:1\n"
    assert text(d / "driver_override") == "(null)\n"
    assert int(text(d / "monitor_id")) < 128
    for name in RING_DEBUG_ATTRS:  # ring not allocated: the kernel's show() fails (mock: empty)
        assert text(d / name) == ""
    assert not (d / "driver").exists()
    assert os.path.realpath(d / "subsystem") == os.path.realpath(root / "sys/bus/vmbus")


def test_monitor_attributes_follow_the_generation(gen_tree: SysfsTree) -> None:
    gen = gen_tree.generation
    fc = gen_tree.root / "sys/bus/vmbus/devices" / FCOPY
    hb = gen_tree.root / "sys/bus/vmbus/devices" / HB
    for name in DEVICE_MONITOR_ATTRS:
        assert (hb / name).exists()
        assert (fc / name).exists() == (not gen.hide_monitor_attrs), name
    relid = int(text(fc / "id"))
    chan = fc / "channels" / str(relid)
    expected = set(CHANNEL_ATTRS)
    if gen.hide_monitor_attrs:
        expected -= {"pending", "latency", "monitor_id"}
    assert {p.name for p in chan.iterdir()} == expected
    # Whatever the kernel shows, the model says "not monitored" for fcopy and 7 for heartbeat.
    s = Sysfs(gen_tree.root)
    assert s.device(FCOPY).monitor_id is None and not s.device(FCOPY).monitored
    assert s.device(FCOPY).channels()[0].monitor_id is None
    assert s.device(HB).monitor_id == 7 and s.device(HB).monitored
    assert s.device(HB).channels()[0].monitor_id == 7


def test_channel_files_formats(gen_tree: SysfsTree) -> None:
    d = gen_tree.root / "sys/bus/vmbus/devices" / NET
    relid = int(text(d / "id"))
    c = d / "channels" / str(relid)
    assert text(c / "cpu") == "1\n"
    assert text(c / "subchannel_id") == "0\n"
    counters = ("interrupts", "events", "intr_in_full", "intr_out_empty", "out_full_first", "out_full_total")
    for name in counters:
        assert text(c / name) == "0\n"
    for name in ("in_mask", "out_mask", "read_avail", "write_avail"):
        assert text(c / name) == ""
    assert oct(os.stat(c / "cpu").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(c / "events").st_mode & 0o777) == oct(0o444)


def test_typed_model(tree: SysfsTree) -> None:
    s = Sysfs(tree.root)
    assert [d.guid for d in s.devices()] == sorted([NET, FCOPY, HB])
    d = s.device(NET)
    assert d.class_guid == class_by_name("network").guid
    assert d.device_class.name == "network"
    assert d.device_id == NET
    assert d.relid == tree.device(NET).relid
    assert d.state == 2  # offered, not opened
    assert d.vendor == 0x1414 and d.device == 3
    assert d.numa_node == 0
    assert d.channel_vp_mapping == [(d.relid, 0)]
    assert d.driver is None and d.driver_override is None and d.has_driver_override
    assert d.modalias.startswith("vmbus:")
    assert d.uio_name is None and d.uio() is None
    [ch] = d.channels()
    assert ch.relid == d.relid and ch.is_primary and ch.cpu == 0
    assert ch.in_mask is None and ch.read_avail is None  # ring not allocated
    assert ch.ring_path is None and ch.ring_file_size is None
    assert ch.events == 0 and ch.interrupts == 0
    assert d.channel(d.relid).relid == d.relid
    assert s.driver_loaded("uio_hv_generic") and s.driver_loaded("hv_netvsc")
    assert not s.driver_loaded("nope")
    assert "hv_utils" in s.drivers()


def test_values_are_read_each_time(tree: SysfsTree) -> None:
    """Nothing that changes is cached: the same object sees every update."""
    d = Sysfs(tree.root).device(NET)
    [ch] = d.channels()
    tree.set_ring_allocated(NET, d.relid, 2 * 1024 * 1024)
    assert ch.in_mask == 0 and ch.write_avail == 2 * 1024 * 1024 - 4096 and ch.read_avail == 0
    tree.set_channel_attrs(NET, d.relid, in_mask=1, events=5, interrupts=9)
    assert (ch.in_mask, ch.events, ch.interrupts) == (1, 5, 9)
    tree.set_state(NET, 3)
    assert d.state == 3
    tree.set_driver(NET, "hv_netvsc")
    assert d.driver == "hv_netvsc"
    tree.set_driver_override_file(NET, "uio_hv_generic")
    assert d.driver_override == "uio_hv_generic"
    tree.set_driver_override_file(NET, None)
    assert d.driver_override is None
    tree.set_channel_attrs(NET, d.relid, cpu=1)
    assert ch.cpu == 1 and d.channel_vp_mapping == [(d.relid, 1)]


def test_subchannels_listed_primary_first(tree: SysfsTree) -> None:
    d = Sysfs(tree.root).device(NET)
    r2 = tree.add_channel(NET, relid=40, subchannel_id=2, monitor_id=None, cpu=1)
    r1 = tree.add_channel(NET, relid=30, subchannel_id=1, monitor_id=9)
    chans = d.channels()
    assert [c.relid for c in chans] == [d.relid, r1, r2]
    assert [c.subchannel_id for c in chans] == [0, 1, 2]
    assert chans[1].monitor_id == 9 and chans[2].monitor_id is None
    assert d.channel_vp_mapping == [(d.relid, 0), (30, 0), (40, 1)]
    tree.remove_channel(NET, 30)
    assert [c.relid for c in d.channels()] == [d.relid, 40]


def test_uio_entries(tree: SysfsTree) -> None:
    d = Sysfs(tree.root).device(NET)
    name = tree.add_uio(NET, tree.next_uio_index(), tree.uio_maps(NET, gpadl=123))
    assert name == "uio0" and d.uio_name == "uio0"
    info = d.uio()
    assert info is not None
    assert (info.name, info.driver_name, info.version, info.event) == ("uio0", "uio_hv_generic", "0.02.1", 0)
    assert [m.name for m in info.maps] == ["txrx_rings", "int_page", "monitor_page", "recv:123", "send:124"]
    assert info.map("txrx_rings").size == 2 * 2 * 1024 * 1024
    assert info.map("recv:").size == 31 * 1024 * 1024 and info.map("send:").size == 16 * 1024 * 1024
    assert all(m.offset == 0 and m.addr % 4096 == 0 and m.addr for m in info.maps)
    with pytest.raises(KeyError, match="has no map"):
        info.map("nope")
    tree.set_uio_event(NET, 42)
    assert d.uio() is not None and d.uio().event == 42  # type: ignore[union-attr]
    assert read_uio(tree.root, "uio0") is not None
    tree.remove_uio(NET)
    assert d.uio_name is None and d.uio() is None and read_uio(tree.root, "uio0") is None


def test_ring_file(tree: SysfsTree, tmp_path: Path) -> None:
    d = Sysfs(tree.root).device(NET)
    backing = tree.root / "run" / "mock" / "ring-backing"
    backing.write_bytes(b"\0" * 8192)
    os.chmod(backing, 0o600)
    tree.set_ring_file(NET, d.relid, backing)
    [ch] = d.channels()
    assert ch.ring_path == d.path / "channels" / str(d.relid) / "ring"
    assert ch.ring_file_size == 8192
    assert os.stat(ch.ring_path).st_ino == os.stat(backing).st_ino
    made: list[Path] = []

    def make(path: Path) -> None:
        made.append(path)
        path.write_bytes(b"x")

    tree.set_ring_file(NET, d.relid, make)
    assert [os.path.realpath(p) for p in made] == [os.path.realpath(ch.ring_path)]
    assert ch.ring_file_size == 1 and backing.stat().st_size == 8192
    tree.set_ring_file(NET, d.relid, None)
    assert ch.ring_path is None


def test_numa_absent_reads_none(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path, "6.18", numa=False)
    tree.add_device("heartbeat", HB)
    assert Sysfs(tmp_path).device(HB).numa_node is None


# -- lookups ---------------------------------------------------------------------------------------
def test_lookup_spellings(tree: SysfsTree) -> None:
    s = Sysfs(tree.root)
    for q in (NET, NET.upper(), "{" + NET + "}", "{" + NET.upper() + "}", f"  {NET}\n", NET[:8], "ed96"):
        assert s.device(q).guid == NET, q
    assert s.device("fcopy").guid == FCOPY
    assert s.device("Heartbeat").guid == HB
    assert s.device(str(class_by_name("fcopy").guid)).guid == FCOPY  # a class GUID with one device


def test_lookup_typo_names_the_nearest(tree: SysfsTree) -> None:
    s = Sysfs(tree.root)
    typo = NET[:-1] + "4"
    with pytest.raises(DeviceNotFound) as exc:
        s.device(typo)
    assert NET in exc.value.nearest and NET in str(exc.value)
    with pytest.raises(DeviceNotFound) as exc:
        s.device("fcopyy")
    assert "fcopy" in exc.value.nearest
    with pytest.raises(DeviceNotFound, match="non-hex"):
        s.device(NET[:-1] + "z")
    with pytest.raises(DeviceNotFound) as exc:
        s.device("ffff")
    assert exc.value.nearest == ()


def test_lookup_ambiguous_and_short(tree: SysfsTree) -> None:
    s = Sysfs(tree.root)
    tree.add_device("heartbeat", "2dd1ce17-0000-4000-8000-000000000000")
    with pytest.raises(DeviceNotFound, match="ambiguous") as exc:
        s.device("heartbeat")
    assert set(exc.value.nearest) == {HB, "2dd1ce17-0000-4000-8000-000000000000"}
    with pytest.raises(DeviceNotFound, match="ambiguous"):
        s.device("2dd1ce17")
    with pytest.raises(DeviceNotFound, match="at least 4"):
        s.device("ed9")
    with pytest.raises(DeviceNotFound, match="no kvp device"):
        s.device("kvp")


def test_no_vmbus_at_all(tmp_path: Path) -> None:
    s = Sysfs(tmp_path)
    assert s.devices() == [] and s.drivers() == [] and not s.driver_loaded("uio_hv_generic")
    with pytest.raises(DeviceNotFound, match="vmbus list"):
        s.device(NET)


# -- a device that vanishes ------------------------------------------------------------------------
def test_vanished_device_raises_rescinded_not_filenotfound(tree: SysfsTree) -> None:
    s = Sysfs(tree.root)
    d = s.device(NET)
    [ch] = d.channels()
    tree.remove_device(NET)
    assert not d.exists()
    for read in (lambda: d.relid, lambda: d.class_guid, lambda: d.monitor_id, lambda: d.driver,
                 lambda: d.driver_override, d.channels, lambda: d.uio_name, lambda: ch.cpu,
                 lambda: d.channel(5)):
        with pytest.raises(DeviceRescinded, match=NET):
            read()
    assert [x.guid for x in s.devices()] == sorted([FCOPY, HB])
    with pytest.raises(DeviceNotFound):
        s.device(NET)


def test_device_equality_and_repr(tree: SysfsTree) -> None:
    s = Sysfs(tree.root)
    assert s.device(NET) == VmbusDevice(tree.root, s.device(NET).guid)
    assert len({s.device(NET), s.device(NET[:8])}) == 1
    assert NET in repr(s.device(NET)) and "relid" in repr(s.device(NET).channels()[0])


# -- parsing helpers -------------------------------------------------------------------------------
def test_parse_and_read_helpers(tmp_path: Path) -> None:
    assert parse_int("0x0000000010000000") == 0x10000000
    assert parse_int("42") == 42 and parse_int("007") == 7
    with pytest.raises(ValueError, match="expected a number"):
        parse_int("x1", "f")
    (tmp_path / "a").write_text("  5\n")
    (tmp_path / "e").write_text("")
    assert read_attr(tmp_path / "a") == "5"
    assert read_attr(tmp_path / "e") is None
    assert read_attr(tmp_path / "missing") is None
