"""What a closed channel leaves behind: nothing (issue 10, section 3).

- disable() and every close path unmap and close at once: no mapping of the ring file and
  no fd of the node survive them, even while the Channel (or a view of its rings) is still
  referenced -- on a real kernel a live mapping keeps the uio file open, and the host
  channel closes only when the last reference goes (hv_uio_release);
- views handed out stay readable and read a detached copy (the ring as it was at the
  close); writes to them reach nobody;
- the mock's release is synchronous with the client's close, as the real close() is: an
  enable right after a disable finds fresh rings;
- a mock root whose process died is reported as such (exit 10), not listed.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import bound_monitored_echo, mock_of_generation
from pyvmbus import ChannelClosed
from pyvmbus.bus import Vmbus
from pyvmbus.channel import Channel
from pyvmbus.cli import main
from pyvmbus.lifecycle import ChannelState
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS
from pyvmbus.mock.sysfs_tree import mock_liveness
from pyvmbus.sysfs import Sysfs

S = ChannelState


mock = pytest.fixture(scope="module", params=list(GENERATIONS), name="mock")(mock_of_generation)
device = pytest.fixture(name="device")(bound_monitored_echo)


def ring_marker(guid: str) -> str:
    """What names the mock's ring memory of ``guid`` in /proc/self/maps and /proc/self/fd
    (its backing file under run/mock/rings, unlinked once published: "... (deleted)")."""
    return f"/rings/{guid}."


def mappings_of(marker: str) -> list[str]:
    """Lines of /proc/self/maps that map the ring memory ``marker`` names."""
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if marker in line]


def fds_of(marker: str) -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if marker in os.readlink(f"/proc/self/fd/{name}"):
                out.append(int(name))
        except OSError:
            continue
    return out


def wait_closed(ch: Channel, reasons: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ch.state is not S.DISABLED or not reasons:
        assert time.monotonic() < deadline, ch.state
        time.sleep(0.002)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["disable", "corrupt", "rescind"])
def test_every_close_unmaps_and_closes_at_once(mock: MockVmbus, device: str, how: str) -> None:
    """Was: the maps (and the fds Python's mmap dup'd) stayed until garbage collection."""
    marker = ring_marker(device)
    gc.disable()  # nothing may depend on the collector running
    try:
        ch = Vmbus(mock.root).channel(device)
        reasons: list[str] = []
        ch.on_closed(lambda c, why: reasons.append(why))
        ch.enable()
        assert ch.send_request(b"hello", timeout=10)
        tx, rx = ch.tx_ring, ch.rx_ring  # views handed out, kept past the close
        assert tx is not None and rx is not None
        assert mappings_of(marker) and ch.state is S.RUNNING
        if how == "disable":
            ch.disable()
        elif how == "corrupt":
            mock.fault(device, "header", ring="rx", field="write_index", value=7)
        else:
            mock.rescind(device)
        wait_closed(ch, reasons)
        assert mappings_of(marker) == [], "the ring is still mapped after the close"
        assert fds_of(marker) == [], "an fd of the ring memory is still open after the close"
        # The views kept read the detached copy: the ring as it was at the close.
        assert tx.write_index == tx.read_index != 0
        if how == "corrupt":
            assert rx.write_index == 7
        before = tx.write_index
        tx.write(b"into the void")  # private memory: reaches nobody, and nothing faults
        assert tx.write_index != before
        assert mappings_of(marker) == []
        del tx, rx, ch
    finally:
        gc.enable()
    if how == "rescind":
        mock.reoffer(device)


@pytest.mark.timeout(60)
def test_views_of_a_closed_device_read_a_snapshot(mock: MockVmbus, device: str) -> None:
    from pyvmbus.uio import UioDevice

    info = Sysfs(mock.root).device(device)
    assert info.uio_name is not None
    dev = UioDevice.open(mock.root, info.uio_name, device=device)
    arr = dev.map("txrx_rings").array
    arr[4096 + 100] = 42  # the TX data area: nobody reads it while nothing is published
    dev.close()
    assert arr[4096 + 100] == 42  # the snapshot
    arr[4096 + 100] = 7  # writable, private
    assert arr[4096 + 100] == 7
    dev.close()  # idempotent


@pytest.mark.timeout(120)
def test_enable_right_after_disable_finds_fresh_rings(mock: MockVmbus, device: str) -> None:
    """Was: the mock released asynchronously, so an enable right after a disable sometimes
    shared the old open (old ring contents, no fresh open for the host)."""
    ch = Vmbus(mock.root).channel(device)
    for i in range(20):
        ch.enable()
        tx, rx = ch.tx_ring, ch.rx_ring
        assert tx is not None and rx is not None
        assert (tx.write_index, tx.read_index, rx.write_index, rx.read_index) == (0, 0, 0, 0), i
        assert ch.send_request(b"round %d" % i, timeout=10)
        ch.disable()
        assert mock.kernel_state(device)["opencount"] == 0


@pytest.mark.timeout(60)
def test_send_on_a_kept_channel_after_close_is_a_clear_error(mock: MockVmbus, device: str) -> None:
    ch = Vmbus(mock.root).channel(device)
    ch.enable()
    ch.disable()
    with pytest.raises(ChannelClosed, match="disabled"):
        ch.send(b"x")


@pytest.mark.timeout(90)
def test_list_on_a_dead_mock_root_says_so(tmp_path: Path) -> None:
    """Was: after 'vmbus mock serve' was killed, 'vmbus list' on its root still showed its
    devices (exit 0)."""
    root = tmp_path / "bus"
    proc = subprocess.Popen([sys.executable, "-m", "pyvmbus", "--json", "mock", "serve", "--root", str(root),
                             "--device", "echo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and json.loads(line).get("event") != "serving":
            line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        live = mock_liveness(root)
        assert live is not None and live[0]
        r = CliRunner().invoke(main, ["--root", str(root), "--json", "list"], prog_name="vmbus")
        assert r.exit_code == 0 and json.loads(r.stdout)["devices"], r.output
        os.killpg(proc.pid, signal.SIGKILL)  # serve and its mock process: no cleanup at all
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The mock process (its own session) sees its parent gone and exits.
    deadline = time.monotonic() + 30
    while (live := mock_liveness(root)) is not None and live[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live is not None and not live[0]
    assert (root / "sys" / "bus" / "vmbus" / "devices").is_dir()  # the leftovers are there
    r = CliRunner().invoke(main, ["--root", str(root), "list"], prog_name="vmbus")
    assert r.exit_code == 10, r.output
    assert "mock root whose process" in r.stderr and "is gone" in r.stderr
    assert r.stderr.count("\n") == 1
