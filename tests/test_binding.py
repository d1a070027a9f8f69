"""pyvmbus.binding on the mock tree + driver core: round trips, guard rails, error paths."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmbus import binding, guardrails
from pyvmbus.binding import bind, guard_rails, read_record, record_path, restore, unbind, wait_for_uio
from pyvmbus.errors import (
    AlreadyBound,
    BindFailed,
    DeviceNotFound,
    DeviceRescinded,
    DriverNotLoaded,
    GuardRailRefused,
    NotPermitted,
    Timeout,
)
from pyvmbus.mock.driver_core import DriverCore
from pyvmbus.mock.sysfs_tree import Mount, Route, SysfsTree
from pyvmbus.sysfs import Sysfs

NET = "ed963694-e847-4b2a-85af-bc9cfc11d6f3"
NET2 = "8a2d3c1e-5b4f-4e6a-9c7d-1f2e3d4c5b6a"
FCOPY = "eb765408-105f-49b6-b4aa-c123b64d17d4"
SCSI = "f8b3781b-1e82-4818-a1c3-63d806ec15bb"


@pytest.fixture(autouse=True)
def _no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard rails read SSH_CONNECTION; tests set it only where they mean to."""
    monkeypatch.delenv("SSH_CONNECTION", raising=False)


def make(tmp_path: Path, gen: str = "6.18", **kw: bool) -> DriverCore:
    core = DriverCore(SysfsTree(tmp_path, gen, **kw))
    core.add_device("network", NET)
    core.add_device("fcopy", FCOPY, monitored=False)
    core.add_device("scsi", SCSI)
    return core


@pytest.fixture
def core(tmp_path: Path) -> Iterator[DriverCore]:
    core = make(tmp_path)
    with core, core.running():
        yield core


def as_unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, where os.access says yes to everything: judge by the mode bits."""
    def access(path: str | os.PathLike[str], mode: int) -> bool:
        st = os.stat(path)
        return not mode & os.W_OK or bool(st.st_mode & stat.S_IWUSR)

    monkeypatch.setattr(os, "access", access)


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_bind_restore_by_driver_override(core: DriverCore) -> None:
    root = core.tree.root
    assert bind(root, NET) == "uio0"
    d = Sysfs(root).device(NET)
    assert d.driver == "uio_hv_generic" and d.driver_override == "uio_hv_generic"
    assert d.uio_name == "uio0" and (root / "dev/uio0").exists() and d.net_interfaces == []
    rec = read_record(root, NET)
    assert rec is not None
    assert (rec.previous_driver, rec.method, rec.new_id) == ("hv_netvsc", "driver_override", None)
    assert json.loads(record_path(root, NET).read_text())["previous_driver"] == "hv_netvsc"
    with pytest.raises(AlreadyBound, match="already bound to uio_hv_generic"):
        bind(root, NET)
    assert restore(root, NET) == "hv_netvsc"
    assert d.driver == "hv_netvsc" and d.driver_override is None and d.uio_name is None
    assert d.net_interfaces == ["eth0"] and not (root / "dev/uio0").exists()
    assert read_record(root, NET) is None


@pytest.mark.timeout(20)
def test_bind_restore_by_new_id(tmp_path: Path) -> None:
    core = make(tmp_path, driver_override=False)
    root = core.tree.root
    core.add_device("network", NET2)
    with core, core.running():
        assert bind(root, NET) == "uio0"
        rec = read_record(root, NET)
        assert rec is not None and rec.method == "new_id"
        assert rec.new_id == "f8615163-df3e-46c5-913f-f2d2f965ed0e"
        assert core.tree.driver_of(NET2) == "hv_netvsc"  # bound devices are not taken by new_id
        assert restore(root, NET) == "hv_netvsc"
        deadline = time.monotonic() + 5
        while core.dynamic_ids("uio_hv_generic") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert core.dynamic_ids("uio_hv_generic") == ()  # restore removed the id it added
        assert Sysfs(root).device(NET).net_interfaces == ["eth0"]


@pytest.mark.timeout(20)
def test_new_id_refuses_when_it_would_take_an_unbound_sibling(tmp_path: Path) -> None:
    """new_id's driver_attach binds EVERY unbound device of the class: a second NIC that was
    unbound would go to uio_hv_generic too. Refused (naming it) unless forced."""
    core = make(tmp_path, driver_override=False)
    root = core.tree.root
    core.add_device("network", NET2)
    with core, core.running():
        assert core.unbind("hv_netvsc", NET2) == 0
        with pytest.raises(GuardRailRefused, match=NET2) as exc:
            bind(root, NET)
        assert "new_id" in str(exc.value)
        assert core.dynamic_ids("uio_hv_generic") == ()  # nothing was written
        assert read_record(root, NET) is None
        assert core.tree.driver_of(NET) == "hv_netvsc" and core.tree.driver_of(NET2) is None
        assert bind(root, NET, force=True) == "uio1"
        assert core.tree.driver_of(NET2) == "uio_hv_generic"  # what the guard rail warned of


@pytest.mark.timeout(20)
def test_driver_override_path_ignores_unbound_siblings(core: DriverCore) -> None:
    """With driver_override only the named device is probed: an unbound sibling stays so."""
    root = core.tree.root
    core.add_device("network", NET2)
    assert core.unbind("hv_netvsc", NET2) == 0
    assert bind(root, NET) == "uio0"
    assert core.tree.driver_of(NET2) is None


@pytest.mark.timeout(20)
def test_bind_an_unbound_device_and_restore_leaves_it_unbound(core: DriverCore) -> None:
    root = core.tree.root
    assert bind(root, "fcopy") == "uio0"  # by class name
    assert read_record(root, FCOPY).previous_driver is None  # type: ignore[union-attr]
    assert restore(root, FCOPY) is None
    d = Sysfs(root).device(FCOPY)
    assert d.driver is None and d.driver_override is None and d.uio_name is None


@pytest.mark.timeout(30)
def test_restore_waits_for_its_drivers_probe(core: DriverCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a record restore writes drivers_probe last. "Released by uio_hv_generic"
    already holds once the unbind before it ran: returning then reported the device as
    unbound while the mock was about to probe it, and the next bind's drivers_probe merged
    with this one (seen as a bind timing out under load)."""
    root = core.tree.root
    bind(root, NET, timeout=10)
    record_path(root, NET).unlink()
    gate = threading.Event()
    probe = core.drivers_probe

    def slow_probe(name: str) -> int:
        gate.wait(10)
        return probe(name)

    monkeypatch.setattr(core, "drivers_probe", slow_probe)
    result: list[str | None] = []
    t = threading.Thread(target=lambda: result.append(restore(root, NET, timeout=10)))
    t.start()
    try:
        time.sleep(0.3)
        assert not result  # still waiting for the store of its drivers_probe
    finally:
        gate.set()
        t.join(15)
    assert result == ["hv_netvsc"]


@pytest.mark.timeout(20)
def test_bind_twice_devices_get_their_own_nodes(core: DriverCore) -> None:
    root = core.tree.root
    assert bind(root, NET, timeout=5) == "uio0"
    assert bind(root, FCOPY, timeout=5) == "uio1"
    restore(root, NET)
    assert bind(root, NET) == "uio0"  # the lowest free minor again


@pytest.mark.timeout(20)
def test_unbind_and_restore(core: DriverCore) -> None:
    root = core.tree.root
    bind(root, NET)
    assert unbind(root, NET) == "uio_hv_generic"
    d = Sysfs(root).device(NET)
    assert d.driver is None and d.driver_override == "uio_hv_generic"  # nothing rebinds behind you
    assert unbind(root, NET) is None
    assert restore(root, NET) == "hv_netvsc"


@pytest.mark.timeout(20)
def test_unbind_a_kernel_driver_remembers_it(core: DriverCore) -> None:
    root = core.tree.root
    core.tree.set_routes([Route("eth0", gateway="10.0.0.1")])
    with pytest.raises(GuardRailRefused, match="default route"):
        unbind(root, NET)
    assert unbind(root, NET, force=True) == "hv_netvsc"
    assert read_record(root, NET).previous_driver == "hv_netvsc"  # type: ignore[union-attr]
    assert restore(root, NET) == "hv_netvsc"


@pytest.mark.timeout(20)
def test_restore_without_a_record_lets_the_kernel_choose(core: DriverCore) -> None:
    root = core.tree.root
    bind(root, NET)
    record_path(root, NET).unlink()
    restore(root, NET)
    d = Sysfs(root).device(NET)
    deadline = time.monotonic() + 5
    while d.driver != "hv_netvsc" and time.monotonic() < deadline:  # drivers_probe picks hv_netvsc
        time.sleep(0.005)
    assert d.driver == "hv_netvsc"


# -- errors ---------------------------------------------------------------------------------------
def test_driver_not_loaded(tmp_path: Path) -> None:
    core = make(tmp_path, uio_loaded=False)
    with core, pytest.raises(DriverNotLoaded, match="modprobe uio_hv_generic"):
        bind(tmp_path, NET)
    assert read_record(tmp_path, NET) is None


def test_unknown_guid_names_the_nearest(tmp_path: Path) -> None:
    with make(tmp_path), pytest.raises(DeviceNotFound) as exc:
        bind(tmp_path, NET[:-2] + "f4")
    assert NET in exc.value.nearest and NET in str(exc.value)


@pytest.mark.timeout(20)
def test_timeout_when_nothing_answers(tmp_path: Path) -> None:
    """No mock kernel processes the writes: the wait ends in Timeout naming what is missing."""
    with make(tmp_path) as core:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as exc:
            bind(tmp_path, NET, timeout=0.3)
        assert time.monotonic() - t0 < 5
        assert "uio/uioN" in str(exc.value) and NET in str(exc.value) and exc.value.seconds == 0.3
        assert "hv_netvsc was bound again" in str(exc.value)
        core.process()  # the mock wakes up: the queued writes play out in order
        assert core.tree.driver_of(NET) == "hv_netvsc" and core.driver_override(NET) is None


@pytest.mark.timeout(20)
def test_failed_roll_back_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make(tmp_path):
        def broken(root: object, guid: str, *, timeout: float = 0) -> None:
            raise Timeout("the previous driver", timeout)

        monkeypatch.setattr(binding, "restore", broken)
        with pytest.raises(Timeout) as exc:
            bind(tmp_path, NET, timeout=0.2)
        assert f"run 'vmbus restore {NET}'" in str(exc.value)
        assert read_record(tmp_path, NET) is not None  # kept for that restore


@pytest.mark.timeout(20)
@pytest.mark.parametrize("gen", ["5.15", "6.6-lts"])
@pytest.mark.parametrize("override", [True, False], ids=["driver_override", "new_id"])
def test_old_kernel_refuses_unmonitored_and_bind_fails_fast(tmp_path: Path, gen: str,
                                                             override: bool) -> None:
    """The failed probe (-ENOTSUPP in the mock's dmesg) ends the bind at once, by both methods."""
    core = make(tmp_path, gen, driver_override=override)
    hb = core.add_device("heartbeat", monitored=False)
    with core, core.running():
        assert core.tree.driver_of(hb) == "hv_utils"
        t0 = time.monotonic()
        with pytest.raises(BindFailed) as exc:
            bind(tmp_path, hb, timeout=10.0)
        assert time.monotonic() - t0 < 5  # not the 10 s timeout
        msg = str(exc.value)
        assert exc.value.guid == hb and exc.value.driver == "uio_hv_generic"
        assert "524" in msg and "ENOTSUPP" in msg and "monitor id" in msg and ">= 6.10" in msg
        assert "hv_utils was bound again" in msg
        assert core.tree.driver_of(hb) == "hv_utils" and read_record(tmp_path, hb) is None
        assert core.driver_override(hb) is None


@pytest.mark.timeout(20)
def test_old_kernel_binds_a_monitored_channel(tmp_path: Path) -> None:
    """The fast failure reads only this bind's log lines: an earlier refusal does not count."""
    core = make(tmp_path, "5.15")
    hb = core.add_device("heartbeat", monitored=False)
    with core, core.running():
        with pytest.raises(BindFailed):
            bind(tmp_path, hb, timeout=5.0)
        assert bind(tmp_path, NET, timeout=5.0) == "uio0"


@pytest.mark.timeout(20)
def test_real_kernel_probe_failure_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real kernel the write returns after the probe: still unbound then means it failed.

    drivers_probe_store returns success when the probe failed (device_attach bound nothing),
    so the errno is not known; the error names the likely reason for a channel without a
    monitor id. (No driver core runs here, like a kernel whose probe refused the device.)
    """
    with make(tmp_path) as core:
        monkeypatch.setattr(binding, "is_real_root", lambda root: True)
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        assert core.unbind("hv_storvsc", SCSI) == 0  # monitored and unbound, for the 2nd case
        t0 = time.monotonic()
        with pytest.raises(BindFailed) as exc:
            bind(tmp_path, FCOPY, timeout=10.0)
        assert time.monotonic() - t0 < 5
        msg = str(exc.value)
        assert "still unbound" in msg and "drivers_probe" in msg and "monitor id" in msg
        assert "left unbound as before" in msg and read_record(tmp_path, FCOPY) is None
        with pytest.raises(BindFailed, match="see dmesg") as exc:
            bind(tmp_path, SCSI, force=True, timeout=10.0)
        assert "monitor id" not in str(exc.value)


@pytest.mark.timeout(20)
def test_device_vanishes_while_waiting(tmp_path: Path) -> None:
    with make(tmp_path) as core:
        threading.Timer(0.2, core.remove_device, args=(FCOPY,)).start()
        with pytest.raises(DeviceRescinded, match=FCOPY):
            wait_for_uio(tmp_path, FCOPY, timeout=5)


@pytest.mark.timeout(20)
def test_wait_for_uio_polls_until_the_node_appears(tmp_path: Path) -> None:
    with make(tmp_path) as core:
        core._override[core.tree.device(FCOPY).guid] = "uio_hv_generic"
        threading.Timer(0.1, core.drivers_probe, args=(FCOPY,)).start()
        assert wait_for_uio(tmp_path, FCOPY, timeout=5) == "uio0"


def test_not_permitted_checks_before_any_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make(tmp_path) as core:
        override = core.tree.device_dir(NET) / "driver_override"
        os.chmod(override, 0o444)
        as_unprivileged(monkeypatch)
        with pytest.raises(NotPermitted) as exc:
            bind(tmp_path, NET)
        assert exc.value.path == str(Sysfs(tmp_path).device(NET).path / "driver_override")
        assert NET in str(exc.value) and "run as root" in str(exc.value)
        os.chmod(core.tree.root / "sys/bus/vmbus/drivers/hv_netvsc/unbind", 0o400)
        os.chmod(override, 0o644)
        with pytest.raises(NotPermitted, match="hv_netvsc/unbind"):
            bind(tmp_path, NET)
        assert override.read_text() == "(null)\n"  # nothing was written
        assert read_record(tmp_path, NET) is None
        assert core.process() == 0


def test_real_root_needs_euid_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make(tmp_path):
        monkeypatch.setattr(binding, "is_real_root", lambda root: True)
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        with pytest.raises(NotPermitted, match="needs root"):
            bind(tmp_path, NET)
        with pytest.raises(NotPermitted, match="needs root"):
            unbind(tmp_path, NET, force=True)
        assert read_record(tmp_path, NET) is None
        assert Sysfs(tmp_path).device(NET).driver_override is None


# -- guard rails ----------------------------------------------------------------------------------
def test_storage_with_a_mounted_partition_is_refused(core: DriverCore) -> None:
    tree, root = core.tree, core.tree.root
    tree.add_block_device(SCSI, "sda", partitions=2)
    assert guard_rails(root, SCSI) == []
    tree.set_mounts([("/dev/sda2", "/boot efi", "vfat")])
    with pytest.raises(GuardRailRefused) as exc:
        bind(root, SCSI)
    assert "sda2 is mounted on /boot efi (vfat)" in str(exc.value) and "--force" in str(exc.value)
    assert read_record(root, SCSI) is None


def test_storage_matched_by_device_number(core: DriverCore) -> None:
    core.tree.add_block_device(SCSI, "sda")
    core.tree.set_mounts([Mount("/dev/root", "/", "ext4", dev="8:1")])  # the kernel's name for root=
    [why] = guard_rails(core.tree.root, SCSI)
    assert "sda1 is mounted on /" in why


def test_storage_behind_device_mapper_and_swap(core: DriverCore) -> None:
    tree, root = core.tree, core.tree.root
    disk = tree.add_block_device(SCSI, "sdb")
    dm = root / "sys/devices/virtual/block/dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dev").write_text("253:0\n")
    (dm / "dm/name").write_text("vg-root\n")
    (root / "sys/block/dm-0").symlink_to(os.path.relpath(dm, root / "sys/block"))
    (disk / "sdb1/holders").mkdir()
    (disk / "sdb1/holders/dm-0").symlink_to(os.path.relpath(dm, disk / "sdb1/holders"))
    tree.set_mounts([Mount("/dev/mapper/vg-root", "/", "xfs", dev="0:33")])
    (root / "proc/swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n/dev/sdb1 partition 1 0 -2\n")
    [why] = guard_rails(root, SCSI)
    assert "dm-0 is mounted on / (xfs)" in why and "sdb1 is in use as swap" in why


def test_block_links_with_absolute_targets_resolve_under_the_root(core: DriverCore) -> None:
    """A fake root copied from a real system has absolute links: resolve them inside the root."""
    tree, root = core.tree, core.tree.root
    real = tree.add_block_device(SCSI, "sdc")
    link = root / "sys/block/sdc"
    link.unlink()
    link.symlink_to("/" + str(real.relative_to(root)))
    tree.set_mounts([("/dev/sdc1", "/data")])
    assert "sdc1 is mounted on /data" in guard_rails(root, SCSI)[0]


def test_pci_passthrough_with_a_mounted_nvme_disk_is_refused(core: DriverCore) -> None:
    """The NVMe OS disk of newer Azure sizes sits below a VMBus PCI pass-through device (class
    ``pci``, not a storage class): the disk check applies to every class."""
    tree, root = core.tree, core.tree.root
    pci = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    core.add_device("pci", pci)
    assert guard_rails(root, pci) == []
    tree.add_block_device(pci, "nvme0n1", major=259, minor=0)
    tree.set_mounts([Mount("/dev/root", "/", "ext4", dev="259:1")])
    [why] = guard_rails(root, pci)
    assert "nvme0n1" in why and "mounted on /" in why
    with pytest.raises(GuardRailRefused):
        bind(root, pci)


def test_storage_force_overrides(core: DriverCore) -> None:
    core.tree.add_block_device(SCSI, "sda")
    core.tree.set_mounts([("/dev/sda1", "/")])
    assert bind(core.tree.root, SCSI, force=True) == "uio0"
    assert not (core.tree.root / "sys/block/sda").exists()  # storvsc let go of the disk


def test_network_default_route_is_refused(core: DriverCore) -> None:
    root = core.tree.root
    core.tree.set_routes([Route("eth0", "10.1.0.0", mask="255.255.0.0")])
    assert guard_rails(root, NET) == []
    core.tree.set_routes([Route("eth0", gateway="10.1.0.1")])
    with pytest.raises(GuardRailRefused, match="eth0 holds the default route"):
        bind(root, NET)


def test_network_ipv6_default_route_is_refused(core: DriverCore) -> None:
    root = core.tree.root
    z = "0" * 32
    (root / "proc/net/ipv6_route").write_text(
        f"{z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200       lo\n"  # the unreachable default
        f"{z} 00 {z} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n")
    [why] = guard_rails(root, NET)
    assert "eth0 holds the default route" in why


def test_network_ssh_session_interface(core: DriverCore, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, root = core.tree, core.tree.root
    core.add_device("network", NET2)  # eth1
    tree.set_routes([Route("eth1", gateway="192.168.1.1"), Route("eth0", "172.16.0.0", mask="255.240.0.0"),
                     Route("eth1", "192.168.1.0", mask="255.255.255.0")])
    monkeypatch.setenv("SSH_CONNECTION", "203.0.113.9 52311 172.16.4.2 22")
    with pytest.raises(GuardRailRefused, match="eth0 carries this SSH session"):
        bind(root, NET)
    monkeypatch.setenv("SSH_CONNECTION", "203.0.113.9 52311 192.168.1.5 22")
    assert guard_rails(root, NET) == []
    assert any("SSH" in r for r in guard_rails(root, NET2))


def test_network_ssh_over_ipv6(core: DriverCore, monkeypatch: pytest.MonkeyPatch) -> None:
    root = core.tree.root
    (root / "proc/net/if_inet6").write_text("20010db8000000000000000000000005 02 40 00 80     eth0\n")
    monkeypatch.setenv("SSH_CONNECTION", "2001:db8::9 52311 2001:db8::5 22")
    assert "eth0 carries this SSH session" in guard_rails(root, NET)[0]


def test_network_ssh_unknown_address_on_the_only_interface(core: DriverCore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "203.0.113.9 52311 100.64.0.7 22")
    [why] = guard_rails(core.tree.root, NET)
    assert "only one" in why and "100.64.0.7" in why
    core.add_device("network", NET2)
    assert guard_rails(core.tree.root, NET) == []  # another interface may carry it: not sure, allow


def test_unbound_network_device_has_no_interface_to_protect(core: DriverCore) -> None:
    core.tree.set_routes([Route("eth0", gateway="10.0.0.1")])
    unbind(core.tree.root, NET, force=True)
    assert guard_rails(core.tree.root, NET) == []


@pytest.mark.timeout(20)
def test_udev_wait_path(core: DriverCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pyudev monitor branch (real root with udev) re-checks on events or every 0.25 s,
    and falls back to polling where no monitor can be made: either way the node is found."""
    monkeypatch.setattr(binding, "_use_udev", lambda root: True)
    assert bind(core.tree.root, NET, timeout=10) == "uio0"
    restore(core.tree.root, NET)
    assert bind(core.tree.root, NET, timeout=10) == "uio0"


def test_resolve_stays_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/up").symlink_to("../../../../../..")
    (tmp_path / "a/abs").symlink_to("/a/b")
    (tmp_path / "a/loop").symlink_to("loop")
    assert guardrails._resolve(tmp_path, tmp_path / "a/up/a/b") == tmp_path / "a/b"
    assert guardrails._resolve(tmp_path, tmp_path / "a/abs") == tmp_path / "a/b"
    assert guardrails._resolve(tmp_path, tmp_path / "a/loop") is None
    assert guardrails._resolve(tmp_path, tmp_path / "a/missing") is None
    assert guardrails._resolve(tmp_path, Path("/elsewhere")) is None


def test_device_rescinded_before_the_first_write_is_not_a_missing_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device vanishes between lookup and the first write: rescinded, not 'modprobe'."""
    with make(tmp_path) as core:
        real = binding.guard_rails

        def vanish(root: object, guid: str) -> list[str]:
            found = real(root, guid)  # type: ignore[arg-type]
            core.remove_device(NET)
            return found

        monkeypatch.setattr(binding, "guard_rails", vanish)
        with pytest.raises(DeviceRescinded, match=NET):
            bind(tmp_path, NET, timeout=1.0)
