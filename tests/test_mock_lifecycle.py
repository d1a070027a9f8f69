"""MockVmbus as a context manager: start, defaults, errors, and cleaning up after itself
(on errors, after a crash, and when its owner dies without closing it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmbus.errors import DeviceNotFound, HostCrashed
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.models import ECHO_CLASS_GUID
from pyvmbus.sysfs import Sysfs


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of someone else's still "exists"; ours are reaped by MockVmbus
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.timeout(30)
def test_cleans_up_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), MockVmbus() as mock:
        root, pid = mock.root, mock.pid
        assert root.is_dir() and pid is not None and mock.alive
        mock.add_device("echo")
        raise RuntimeError("boom")
    assert not root.exists()
    assert pid is not None and _gone(pid)
    mock.close()  # idempotent


@pytest.mark.timeout(30)
def test_cleans_up_after_a_crash() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        root, pid = mock.root, mock.pid
        mock.fault(guid, "crash")
        assert not mock.alive
        with pytest.raises(HostCrashed, match="on purpose"):
            mock.add_device("echo")
    assert not root.exists()
    assert pid is not None and _gone(pid)


_ORPHAN = """
import os, sys
from pyvmbus.mock import MockVmbus
m = MockVmbus().start()
m.add_device("echo")
print(m.root, m.pid, flush=True)
os._exit(0)  # die without closing anything
"""


@pytest.mark.timeout(30)
def test_the_mock_process_cleans_up_when_its_owner_dies() -> None:
    out = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True, timeout=20,
                         check=True)
    root_text, pid_text = out.stdout.split()
    root, pid = Path(root_text), int(pid_text)
    deadline = time.monotonic() + 10
    while (root.exists() or not _gone(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not root.exists()
    assert _gone(pid)


_SLEEPER = """
import time
from pyvmbus.mock import MockVmbus
m = MockVmbus().start()
print(m.root, m.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_sigterm_to_the_whole_process_group_leaves_nothing_behind() -> None:
    """``timeout``, service managers and test runners signal the whole group: the owner
    dies at once, so the mock process must clean up on its own."""
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        root_text, pid_text = proc.stdout.readline().split()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    root, pid = Path(root_text), int(pid_text)
    deadline = time.monotonic() + 10
    while (root.exists() or not _gone(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not root.exists()
    assert _gone(pid)


@pytest.mark.timeout(30)
def test_devices_relids_and_default_monitoring() -> None:
    with MockVmbus(devices=["network", "heartbeat", "echo", "fcopy"]) as mock:
        sysfs = Sysfs(mock.root)
        devs = {d.device_class.name if d.device_class.name != "unknown" else "echo": d
                for d in sysfs.devices()}
        assert sorted(d.relid for d in devs.values()) == [1, 2, 3, 4]
        assert devs["network"].monitored and devs["echo"].monitored
        assert not devs["heartbeat"].monitored and not devs["fcopy"].monitored
        assert devs["echo"].class_guid == ECHO_CLASS_GUID
        assert devs["network"].driver == "hv_netvsc"
        assert devs["heartbeat"].driver == "hv_utils"
        assert devs["echo"].driver is None  # no kernel driver knows the class
        quiet = mock.add_device("echo", monitored=False,
                                instance="{0A0B0C0D-0000-4000-8000-000000000001}")
        assert quiet == "0a0b0c0d-0000-4000-8000-000000000001"
        assert not sysfs.device(quiet).monitored
        with pytest.raises(ValueError, match="already offered"):
            mock.add_device("echo", instance=quiet)
        assert mock.generation.name == "6.18"
        assert "MockVmbus kernel=6.18" in repr(mock)


def test_usage_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel generation"):
        MockVmbus(kernel="2.6")
    mock = MockVmbus()
    with pytest.raises(RuntimeError, match="not started"):
        _ = mock.root
    with pytest.raises(RuntimeError, match="not running"):
        mock.add_device("echo")
    mock.close()


@pytest.mark.timeout(30)
def test_unknown_device_errors_carry_the_guid() -> None:
    with MockVmbus() as mock:
        with pytest.raises(DeviceNotFound) as info:
            mock.rescind("12345678-1234-1234-1234-123456789abc")
        assert info.value.query == "12345678-1234-1234-1234-123456789abc"
        with pytest.raises(ValueError, match="rescind it first"):
            mock.reoffer(mock.add_device("echo"))


@pytest.mark.timeout(60)
def test_the_mock_process_can_profile_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PYVMBUS_MOCK_PROFILE=<prefix>: the mock's loop runs under cProfile and its stats are
    in <prefix>.<pid> once it stopped (a debugging aid, documented in docs/performance.md)."""
    import pstats

    from pyvmbus import binding
    from pyvmbus.mock.guest import RawGuest
    from pyvmbus.mock.kernel import PROFILE_ENV
    from pyvmbus.packet import PacketType

    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "mock"))
    with MockVmbus() as mock:
        pid = mock.pid
        guid = mock.add_device("echo", monitored=False)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            g.primary.send(b"ping", PacketType.DATA_INBAND, 1, 1)
            assert g.recv(5) is not None
    stats = pstats.Stats(str(tmp_path / f"mock.{pid}"))
    assert any(func[2] == "drain" for func in stats.stats)  # type: ignore[attr-defined]
