"""The uio transport: both node types, map sizes, 4-byte semantics, EIO / EOF, ring files."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from conftest import until
from pyvmbus import binding, uio
from pyvmbus.errors import DeviceNotFound, DeviceRescinded, HostCrashed, VmbusError
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.guest import RawGuest
from pyvmbus.sysfs import Sysfs, mock_ring_call
from pyvmbus.uio import MOCK_ACK, MOCK_OK, UioDevice, connect_unix


def _fake_uio_sysfs(root: Path, name: str, sizes: list[int]) -> None:
    for k, size in enumerate(sizes):
        d = root / "sys" / "class" / "uio" / name / "maps" / f"map{k}"
        d.mkdir(parents=True)
        (d / "name").write_text(["txrx_rings", "int_page", "monitor_page"][k] + "\n")
        (d / "size").write_text(f"0x{size:016x}\n")


def test_kernel_transport_on_a_character_device(tmp_path: Path) -> None:
    """A character device takes the kernel path: mmap at k * PAGE_SIZE, 4-byte read/write.

    /dev/zero stands in for /dev/uioN: it maps, reads zeros (count 0) and swallows writes.
    (Only map 0: a shared mapping of /dev/zero at a page offset is past its end.)
    """
    (tmp_path / "dev").mkdir()
    os.symlink("/dev/zero", tmp_path / "dev" / "uio0")
    _fake_uio_sysfs(tmp_path, "uio0", [2 * 0x5000])
    with UioDevice.open(tmp_path, "uio0", "g") as dev:
        assert dev.kind == "kernel"
        assert [(m.index, m.name, m.size) for m in dev.maps] == [(0, "txrx_rings", 0xA000)]
        ring = dev.map("txrx_rings").array
        assert len(ring) == 0xA000
        ring[0xA000 - 1] = 7  # writable, shared
        assert dev.wait(1.0) == 0
        assert dev.read_event() == 0
        dev.irqcontrol(True)
        assert select.select([dev.fileno()], [], [], 0)[0]
    dev.close()  # idempotent


def test_kernel_maps_sit_at_k_pages_and_their_in_page_offset(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Map k is read at k * PAGE_SIZE of the node, and a region that does not start on a
    page boundary (sysfs ``addr`` & ~PAGE_MASK: the 4 KiB int page kzalloc'd inside a
    64 KiB page on older 64K kernels) starts that far into its mapping.

    A regular file stands in for the character device (it is told to count as one), so
    the bytes each map shows can be checked.
    """
    page = uio.PAGE_SIZE
    node = tmp_path / "dev" / "uio0"
    node.parent.mkdir()
    image = bytearray(3 * page + page)
    for k in range(3):
        image[k * page : (k + 1) * page] = bytes([0x10 + k]) * page
    image[2 * page + 0x800 : 2 * page + 0x804] = b"INT!"  # the int page at +0x800 of map 2's page
    node.write_bytes(image)
    _fake_uio_sysfs(tmp_path, "uio0", [page, 4096, 4096])
    maps = tmp_path / "sys" / "class" / "uio" / "uio0" / "maps"
    (maps / "map0" / "addr").write_text("0x00000001a0000000\n")  # page-aligned: no skew
    (maps / "map2" / "addr").write_text(f"0x{0xFFFF888012340000 + 0x800:016x}\n")
    monkeypatch.setattr(uio.stat, "S_ISCHR", lambda mode: True)
    with UioDevice.open(tmp_path, "uio0", "g") as dev:
        assert dev.kind == "kernel"
        m0, m1, m2 = (dev.maps[k].array for k in range(3))
        assert len(m0) == page and set(m0.tobytes()) == {0x10}
        assert len(m1) == 4096 and set(m1.tobytes()) == {0x11}  # no addr file: at the start
        assert len(m2) == 4096 and m2[:4].tobytes() == b"INT!" and m2[4] == 0x12
        m2[8] = 0x99  # writes land in the node's memory, at the skewed place
    assert node.read_bytes()[2 * page + 0x808] == 0x99


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound):
        UioDevice.open(tmp_path, "uio0")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "uio0").write_text("")
    with pytest.raises(DeviceNotFound):  # no maps in sysfs
        UioDevice.open(tmp_path, "uio0")
    _fake_uio_sysfs(tmp_path, "uio0", [8192])
    with pytest.raises(VmbusError, match="neither a character device"):
        UioDevice.open(tmp_path, "uio0")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("kernel", "what", "ring"), [
    ("6.10", "fcopy", 0x4000),       # pref_ring_size as is
    ("6.18", "fcopy", 0x5000),       # VMBUS_RING_SIZE adds the header page
    ("6.10", "echo", 0x11000),       # HV_UNKNOWN
    ("5.15", "echo", 0x200000),      # always 2 MiB before 6.10
    ("6.18", "network", 0x200000),
    ("openhcl", "network", 0x11000),  # uio_hv_generic.ring_size=0x11000, no GPADL buffers
    ("openhcl", "fcopy", 0x11000),
])
def test_map_sizes_per_class_and_generation(kernel: str, what: str, ring: int) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device(what)
        name = binding.bind(mock.root, guid, force=True)
        with UioDevice.open(mock.root, name, guid) as dev:
            sizes = {m.name.split(":")[0]: m.size for m in dev.maps}
            assert sizes["txrx_rings"] == 2 * ring
            assert sizes["int_page"] == sizes["monitor_page"] == 4096
            nic_maps = (what == "network" or kernel == "5.15") and kernel != "openhcl"
            assert ("recv" in sizes) == nic_maps
            if nic_maps:
                assert sizes["recv"] == 31 << 20 and sizes["send"] == 16 << 20
                assert dev.map("recv:").size == 31 << 20


@pytest.mark.timeout(30)
def test_wire_is_exactly_4_byte_reads_and_writes() -> None:
    """A raw client: the handshake, then 4-byte events; writes are exactly 4 bytes or EINVAL."""
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        name = mock.bind_uio(guid)
        assert name is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        connect_unix(sock, mock.root / "dev" / name)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 8)
        assert msg[:4] == MOCK_OK and len(fds) == 3 + 1  # 3 maps + the write socket
        for fd in fds[:3]:
            os.close(fd)
        wsock = socket.socket(fileno=fds[3])
        wsock.settimeout(5)
        sock.send(MOCK_ACK)
        relid = mock.kernel_state(guid)["relid"]

        def in_mask() -> int:
            return int(mock.kernel_state(guid)["channels"][relid]["in_mask"])

        def write(data: bytes) -> int:
            wsock.send(data)
            status = wsock.recv(16)
            assert len(status) == 4
            return int(struct.unpack("=I", status)[0])

        assert write(struct.pack("=i", 0)) == 0  # mask; applied before the answer
        assert in_mask() == 1
        assert write(b"\x01\x00\x00") == errno.EINVAL  # uio_write: exactly 4 bytes
        assert write(struct.pack("=q", 1)) == errno.EINVAL
        assert mock.kernel_state(guid)["einval"] == 2
        assert in_mask() == 1
        assert any("-EINVAL" in line for line in mock.kernel_log())
        sock.send(struct.pack("=i", 1))  # on the node socket: asynchronous irqcontrol
        assert until(lambda: in_mask() == 0)
        mock.command(guid, "send", payload=b"x" * 8)
        event = sock.recv(64)
        assert len(event) == 4 and struct.unpack("=I", event)[0] == 1
        wsock.close()
        sock.close()


@pytest.mark.timeout(30)
def test_wait_timeout_fileno_and_event_count() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            t0 = time.monotonic()
            assert g.dev.wait(0.05) is None  # a timeout is None, not an exception
            assert time.monotonic() - t0 >= 0.04
            assert g.dev.read_event() is None
            g.unmask_all()
            mock.command(guid, "send", payload=b"a")
            assert select.select([g.dev.fileno()], [], [], 5)[0]
            assert g.dev.read_event() == 1
            assert g.primary.read() is not None
            g.unmask_all()
            mock.command(guid, "send", payload=b"b")
            assert g.dev.wait(5) == 2  # cumulative


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", ["6.18", "5.15", "openhcl"])
def test_eio_after_rescind(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        name = binding.bind(mock.root, guid)
        dev = UioDevice.open(mock.root, name, guid)
        mock.rescind(guid)
        with pytest.raises(DeviceRescinded) as info:
            dev.wait(5)
        assert not isinstance(info.value, HostCrashed)
        assert dev.rescinded
        with pytest.raises(DeviceRescinded):
            dev.irqcontrol(True)
        with pytest.raises(DeviceRescinded):
            dev.wait(0)
        dev.close()
        dev_dir = mock.root / "sys" / "bus" / "vmbus" / "devices" / guid
        if kernel != "openhcl":  # unregistered (6fd28941447b): node and device vanish
            assert not (mock.root / "dev" / name).exists()
            assert not dev_dir.exists()
            with pytest.raises(DeviceNotFound):
                UioDevice.open(mock.root, name, guid)
        else:  # OpenHCL's tree lacks the unregister: it keeps the device; opens fail
            assert (mock.root / "dev" / name).exists()
            assert dev_dir.exists()
            with pytest.raises(DeviceRescinded):
                UioDevice.open(mock.root, name, guid)


@pytest.mark.timeout(30)
def test_write_after_rescind_is_eio() -> None:
    """The kernel closed its end after EIO: a write finds the EIO message, not a crash."""
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        dev = UioDevice.open(mock.root, binding.bind(mock.root, guid), guid)
        mock.rescind(guid)
        time.sleep(0.05)
        with pytest.raises(DeviceRescinded) as info:
            for _ in range(100):
                dev.irqcontrol(True)
                time.sleep(0.01)
        assert not isinstance(info.value, HostCrashed)
        dev.close()


@pytest.mark.timeout(30)
def test_host_crash_is_host_crashed() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        name = binding.bind(mock.root, guid)
        dev = UioDevice.open(mock.root, name, guid)
        mock.fault(guid, "crash")
        assert not mock.alive
        with pytest.raises(HostCrashed) as info:
            dev.wait(5)
        assert isinstance(info.value, DeviceRescinded)  # handled like a rescind
        with pytest.raises(HostCrashed):  # a second open: no lock (this process holds it)
            UioDevice.open(mock.root, name, guid, exclusive=False)
        dev.close()
        with pytest.raises(HostCrashed):  # the lock went with the close
            UioDevice.open(mock.root, name, guid)
        with pytest.raises(HostCrashed):
            mock.host_stats(guid)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", ["6.18", "6.10", "openhcl"])
def test_ring_file_maps_the_same_memory_as_map0(kernel: str) -> None:
    """hv_uio_ring_mmap: ENODEV until the channel is opened (the primary's ring file exists
    from probe on), EINVAL (vm_iomap_memory) for more than the real pair, and st_size as
    the generation reports it: a fixed 4 MiB before 65995e97a1ca (6.10, openhcl)."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        name = binding.bind(mock.root, guid)
        ring_path = mock.root / "sys" / "bus" / "vmbus" / "devices" / guid / "channels" / "1" / "ring"
        assert ring_path.stat().st_mode & 0o777 == 0o600
        st_size = Sysfs(mock.root).device(guid).channel(1).ring_file_size
        with UioDevice.open(mock.root, name, guid) as dev:
            map0 = dev.map("txrx_rings")
            assert st_size == (4 << 20 if kernel in ("6.10", "openhcl") else map0.size)
            ring = dev.map_ring_file(ring_path, map0.size)
            assert len(ring) == map0.size
            ring[4096 + 100] = 0x5A
            assert map0.array[4096 + 100] == 0x5A
            with pytest.raises(VmbusError):
                dev.map_ring_file(ring_path, 1000)  # not a page multiple
            if st_size != map0.size:  # sizing the map from st_size: the kernel says EINVAL
                with pytest.raises(VmbusError, match="EINVAL"):
                    dev.map_ring_file(ring_path)
                assert any("-EINVAL (vm_iomap_memory)" in line for line in mock.kernel_log())
            else:
                assert len(dev.map_ring_file(ring_path)) == map0.size


@pytest.mark.timeout(30)
def test_ring_file_mmap_is_enodev_while_the_channel_is_not_open() -> None:
    """The primary's ring file appears at probe; the channel opens at the first open() of
    /dev/uioN and closes at the last close: outside that, hv_uio_ring_mmap says ENODEV."""
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        name = binding.bind(mock.root, guid)
        ring_path = mock.root / "sys" / "bus" / "vmbus" / "devices" / guid / "channels" / "1" / "ring"
        assert ring_path.exists()  # from probe on
        size = 2 * 0x11000  # HV_UNKNOWN's ring on the default generation
        status, _, fd = mock_ring_call(ring_path, b"MMAP", size)
        assert status == errno.ENODEV and fd is None  # bound, never opened
        with UioDevice.open(mock.root, name, guid) as dev:
            assert dev.map("txrx_rings").size == size
            assert len(dev.map_ring_file(ring_path, size)) == size  # opened: fine
        assert ring_path.exists()  # the last close closed the channel; the file stays
        status, _, fd = mock_ring_call(ring_path, b"MMAP", size)
        assert status == errno.ENODEV and fd is None


@pytest.mark.timeout(30)
def test_last_close_loses_ring_state_and_opens_share() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo", monitored=True)
        name = binding.bind(mock.root, guid)
        a = RawGuest(mock.root, guid)
        a.primary.tx.write(b"not signalled")
        assert a.primary.tx.write_index != 0
        b = UioDevice.open(mock.root, name, guid, exclusive=False)  # a second open: nothing reset
        assert a.primary.tx.write_index != 0
        assert mock.kernel_state(guid)["opencount"] == 2
        a.close()
        b.close()
        deadline = time.monotonic() + 5
        while mock.kernel_state(guid)["opencount"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mock.host_stats(guid)["open"] is False
        with RawGuest(mock.root, guid) as c:  # reopened: hv_ringbuffer_init again
            assert c.primary.tx.write_index == 0
            assert c.primary.tx.feature_bits == 1 and c.primary.rx.feature_bits == 1


@pytest.mark.timeout(30)
def test_long_root_path(tmp_path: Path) -> None:
    """A root too deep for sun_path (107 bytes) still works (through /proc/self/fd)."""
    root = tmp_path / ("d" * 60) / ("e" * 60)
    with MockVmbus(root=root) as mock:
        guid = mock.add_device("echo")
        name = binding.bind(mock.root, guid)
        assert len(os.fsencode(mock.root / "dev" / name)) > 107
        with RawGuest(mock.root, guid) as g:
            g.primary.send(b"ping", transaction_id=9)
            pkt = g.recv(5)
            assert pkt is not None and pkt.transaction_id == 9
    assert root.exists()  # a root of the caller's is left in place


def test_errno_translation_of_kernel_transport(tmp_path: Path) -> None:
    """EIO from a real node's read or write is DeviceRescinded (simulated with a fake transport)."""
    (tmp_path / "dev").mkdir()
    os.symlink("/dev/zero", tmp_path / "dev" / "uio0")
    _fake_uio_sysfs(tmp_path, "uio0", [8192])
    dev = UioDevice.open(tmp_path, "uio0", "guid-x")
    transport = dev._transport
    assert transport is not None

    def eio(*_: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    transport.read_blocking = eio  # type: ignore[method-assign]
    with pytest.raises(DeviceRescinded, match="guid-x"):
        dev.wait(None)
    with pytest.raises(DeviceRescinded):
        dev.irqcontrol(False)
    dev.close()


def test_kernel_write_einval_after_unregister_is_rescinded(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """uio_write returns EINVAL (not EIO) once uio_unregister_device cleared idev->info, which
    newest kernels do on a rescind (vmbus_device_unregister) and every kernel on an unbind:
    on the kernel path, where the write is always 4 bytes, that is DeviceRescinded."""
    (tmp_path / "dev").mkdir()
    os.symlink("/dev/zero", tmp_path / "dev" / "uio0")
    _fake_uio_sysfs(tmp_path, "uio0", [8192])
    dev = UioDevice.open(tmp_path, "uio0", "guid-x")
    assert dev.kind == "kernel"

    def einval(fd: int, data: bytes) -> int:
        assert len(data) == 4
        raise OSError(errno.EINVAL, "Invalid argument")

    with monkeypatch.context() as m:
        m.setattr(uio.os, "write", einval)
        with pytest.raises(DeviceRescinded, match="unregistered"):
            dev.irqcontrol(True)
    assert dev.rescinded
    with pytest.raises(DeviceRescinded):
        dev.wait(0)
    dev.close()


@pytest.mark.timeout(10)
def test_mock_transport_write_times_out_in_the_kernel_not_in_python() -> None:
    """The irqcontrol socket is blocking with SO_RCVTIMEO: no poll per call, and a mock
    kernel that never answers still ends in TimeoutError (the status it sends is read)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t = object.__new__(uio._MockTransport)
    t.wsock, t.timeout, t.fds = ours, 0.05, []
    t.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t.wlock = threading.Lock()
    try:
        uio._kernel_timeouts(ours, t.timeout)
        assert ours.gettimeout() is None  # Python does not poll
        kernel.send(struct.pack("=I", 0))  # the status of the write below, already queued
        t.write(1)
        assert kernel.recv(16) == struct.pack("=i", 1)
        kernel.send(struct.pack("=I", errno.EINVAL))
        with pytest.raises(OSError) as err:
            t.write(0)
        assert err.value.errno == errno.EINVAL
        with pytest.raises(TimeoutError, match="did not apply irqcontrol"):
            t.write(1)  # nobody answers
    finally:
        t.close()
        kernel.close()
