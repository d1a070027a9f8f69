"""``vmbus ic ...`` and ``vmbus fcopy-daemon`` through click's CliRunner, against the mock bus.

Commands that need the host to act while they run use ``--root`` on a mock this module
owns: a helper thread waits until the command's channel is open and negotiated, then
makes the mock host send its requests; ``--count`` ends the command.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pyvmbus.cli import ic as cli_ic
from pyvmbus.cli import main
from pyvmbus.cli.schema import SCHEMAS
from pyvmbus.errors import ChannelClosed
from pyvmbus.ic import ShutdownAction
from pyvmbus.ic.messages import FCOPY_INSTANCE_GUID, CopyFlags
from pyvmbus.mock import MockVmbus
from pyvmbus.sysfs import Sysfs


@pytest.fixture(scope="module")
def mock() -> Iterator[MockVmbus]:
    with MockVmbus() as m:
        yield m


@pytest.fixture(autouse=True)
def never_power_off(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """No test may power anything off: record what would have run instead."""
    ran: list[list[str]] = []
    monkeypatch.setattr(cli_ic, "run_power_command", lambda argv: ran.append(list(argv)))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a test tried to run {args!r}")

    monkeypatch.setattr(cli_ic.subprocess, "run", refuse)
    return ran


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="vmbus", catch_exceptions=False)


def events(result: Result) -> list[dict[str, Any]]:
    """The JSON lines of a command; each must have exactly the keys its schema pins."""
    evs = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    for ev in evs:
        name = f"ic.{ev['service']}.summary" if ev["event"] == "summary" else f"ic.{ev['event']}"
        assert set(ev) == set(SCHEMAS[name]), f"{name}: {sorted(set(ev) ^ set(SCHEMAS[name]))}"
    return evs


def of(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == kind]


def wait(cond: Callable[[], bool], timeout: float = 15.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Host:
    """Makes the mock host act once the command under test has opened and negotiated."""

    def __init__(self, mock: MockVmbus, guid: str, act: Callable[[], None]) -> None:
        self.mock, self.guid, self.act = mock, guid, act
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def ready(self) -> bool:
        try:
            return bool(self.mock.command(self.guid, "stats")["state"] == "ready")
        except ChannelClosed:
            return False

    def _main(self) -> None:
        try:
            wait(self.ready, what="the command to open the channel")
            self.act()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


# -- help and registration -------------------------------------------------------------------


def test_commands_are_registered() -> None:
    r = run("--help")
    assert r.exit_code == 0 and " ic " in r.stdout and "fcopy-daemon" in r.stdout
    r = run("ic", "--help")
    for name in ("heartbeat", "shutdown", "timesync", "fcopy"):
        assert name in r.stdout
    assert "--allow-shutdown" in run("ic", "shutdown", "--help").stdout
    assert "--set-clock" in run("ic", "timesync", "--help").stdout
    assert "--dest-root" in run("fcopy-daemon", "--help").stdout


def test_bad_file_mode_is_a_usage_error() -> None:
    r = run("--mock", "ic", "fcopy", "--dest-root", "/tmp", "--file-mode", "9x")
    assert r.exit_code == 2 and "octal" in r.stderr


@pytest.mark.parametrize("argv", [["ic", "fcopy"], ["fcopy-daemon"]])
def test_fcopy_needs_an_explicit_dest_root(argv: list[str]) -> None:
    r = run("--mock", *argv, "--timeout", "1")
    assert r.exit_code == 2
    assert "give --dest-root DIR" in r.stderr and "--dest-root /" in r.stderr and "Traceback" not in r.stderr


def test_a_service_refuses_a_device_of_another_class() -> None:
    r = run("--mock", "--json", "ic", "heartbeat", "echo", "--timeout", "1")
    assert r.exit_code == 2 and r.stdout == ""
    err = json.loads(r.stderr)
    assert err["type"] == "WrongClass" and "is a echo device, not heartbeat" not in err["error"]
    assert "an echo device, not heartbeat" in err["error"] and "vmbus list" in err["error"]
    r = run("--mock", "fcopy-daemon", "--device", "timesync", "--dest-root", "/tmp", "--timeout", "1")
    assert r.exit_code == 2 and "a timesync device, not fcopy" in r.stderr


# -- the services ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_heartbeat_with_mock_counts_and_restores() -> None:
    r = run("--mock", "--json", "ic", "heartbeat", "--count", "1", "--timeout", "15")
    assert r.exit_code == 0, r.stderr
    evs = events(r)
    assert [e["event"] for e in evs[:3]] == ["bound", "enabled", "negotiated"]
    assert evs[2]["version"] == "3.0" and evs[0]["previous_driver"] == "hv_utils"
    assert of(evs, "restored")[0]["driver"] == "hv_utils"
    assert of(evs, "stopped")[0]["why"] == "count"
    assert of(evs, "summary")[0]["beats"] == 1


@pytest.mark.timeout(30)
def test_timesync_reports_the_offset_and_never_sets_the_clock_of_a_mock(mock: MockVmbus) -> None:
    guid = mock.add_device("timesync")
    host = Host(mock, guid, lambda: (mock.command(guid, "offset", ns=-2_000_000_000),
                                     mock.command(guid, "sync")))
    r = run("--root", str(mock.root), "--json", "ic", "timesync", guid, "--set-clock", "--count", "2",
            "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    evs = events(r)
    samples = of(evs, "sample")
    assert len(samples) == 2 and all(s["sync"] for s in samples) and samples[0]["format"] == "4.0"
    assert abs(samples[1]["offset_ns"] + 2_000_000_000) < 500_000_000
    assert samples[1]["host_time"].endswith("Z")
    not_set = of(evs, "clock_not_set")
    assert len(not_set) == 2 and "mock or --root" in not_set[0]["why"] and not of(evs, "clock_set")


@pytest.mark.timeout(30)
def test_shutdown_without_allow_shutdown_answers_but_does_nothing(
        mock: MockVmbus, never_power_off: list[list[str]]) -> None:
    guid = mock.add_device("shutdown")
    results: list[Any] = []

    def act() -> None:
        mock.command(guid, "shutdown", flags=0, message="bye")
        wait(lambda: len(mock.command(guid, "stats")["results"]) == 1, what="the answer")
        results.extend(mock.command(guid, "stats")["results"])
        mock.command(guid, "shutdown", flags=2)  # the second request ends the command (--count 2)

    host = Host(mock, guid, act)
    r = run("--root", str(mock.root), "--json", "ic", "shutdown", guid, "--count", "2", "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    assert results == [(0, "HV_S_OK")]  # answered as the kernel would
    req = of(events(r), "shutdown_request")
    assert [e["action"] for e in req] == ["poweroff", "reboot"] and req[0]["message"] == "bye"
    assert all(e["performed"] is False and "--allow-shutdown" in e["outcome"] for e in req)
    assert never_power_off == []


@pytest.mark.timeout(30)
def test_shutdown_allowed_but_on_a_mock_bus_still_does_nothing(
        mock: MockVmbus, never_power_off: list[list[str]]) -> None:
    guid = mock.add_device("shutdown")
    host = Host(mock, guid, lambda: mock.command(guid, "shutdown", flags=2))
    r = run("--root", str(mock.root), "--json", "ic", "shutdown", guid, "--allow-shutdown", "--count", "1",
            "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    req = of(events(r), "shutdown_request")[0]
    assert req["performed"] is False and "would run" in req["outcome"] and req["action"] == "reboot"
    assert never_power_off == []


@pytest.mark.timeout(30)
def test_shutdown_allowed_on_this_machine_runs_the_command_after_answering(
        mock: MockVmbus, never_power_off: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_ic, "acts_on_this_machine", lambda root: True)  # pretend; the command is faked
    guid = mock.add_device("shutdown")
    answered_before: list[int] = []

    def record(argv: list[str]) -> None:
        answered_before.append(len(mock.command(guid, "stats")["results"]))
        never_power_off.append(list(argv))

    monkeypatch.setattr(cli_ic, "run_power_command", record)
    host = Host(mock, guid, lambda: (mock.command(guid, "shutdown", flags=1),
                                     mock.command(guid, "shutdown", flags=4)))
    r = run("--root", str(mock.root), "--json", "ic", "shutdown", guid, "--allow-shutdown", "--count", "2",
            "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    assert never_power_off == [cli_ic.power_command(ShutdownAction.POWEROFF)]
    assert answered_before == [1]  # the host had its answer before the command ran
    assert of(events(r), "shutdown_request")[0]["performed"] is True
    assert of(events(r), "summary")[0]["accepted"] == 1  # hibernate refused: no --allow-hibernate


def test_power_command_prefers_systemctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_ic.shutil, "which", lambda name: "/bin/" + name if name == "shutdown" else None)
    assert cli_ic.power_command(ShutdownAction.REBOOT) == ["shutdown", "-r", "now"]
    monkeypatch.setattr(cli_ic.shutil, "which", lambda name: "/bin/" + name)
    assert cli_ic.power_command(ShutdownAction.POWEROFF) == ["systemctl", "poweroff"]
    assert not cli_ic.acts_on_this_machine(Path("/tmp"))


def _send(mock: MockVmbus, guid: str, **args: Any) -> Callable[[], None]:
    """Send one file; wait for its end unless the command's --count closed the channel first."""

    def finished() -> bool:
        try:
            return mock.command(guid, "stats")["transfer"] in ("done", "failed", "cancelled")
        except ChannelClosed:
            return True

    def act() -> None:
        mock.command(guid, "send_file", **args)
        wait(finished, what="the transfer")

    return act


@pytest.mark.timeout(40)
def test_fcopy_1_mib_arrives_byte_identical(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy")
    data = os.urandom(1024 * 1024)
    dest = tmp_path / "dest"
    dest.mkdir()
    host = Host(mock, guid, _send(mock, guid, data=data, file_name="one.bin", dest=str(dest / "sub"),
                                  flags=int(CopyFlags.CREATE_PATH)))
    r = run("--root", str(mock.root), "--json", "ic", "fcopy", guid, "--dest-root", str(dest),
            "--count", "1", "--timeout", "30")
    host.join()
    assert r.exit_code == 0, r.stderr
    assert (dest / "sub" / "one.bin").read_bytes() == data
    assert oct((dest / "sub" / "one.bin").stat().st_mode & 0o777) == oct(0o644 & ~_umask())
    done = [e for e in of(events(r), "fcopy") if e["kind"] == "completed"]
    assert len(done) == 1 and done[0]["size"] == len(data) and done[0]["status"] == "HV_S_OK"
    assert of(events(r), "summary")[0]["files_completed"] == 1
    assert mock.host_stats(guid)["open"] is False


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.timeout(30)
def test_fcopy_cancelled_copy_leaves_nothing(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy")
    host = Host(mock, guid, _send(mock, guid, data=os.urandom(300_000), file_name="c.bin",
                                  dest=str(tmp_path), cancel_after=5))
    r = run("--root", str(mock.root), "--json", "ic", "fcopy", guid, "--dest-root", str(tmp_path),
            "--no-fsync", "--count", "1", "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    assert os.listdir(tmp_path) == []
    ev = of(events(r), "fcopy")
    assert [e["kind"] for e in ev] == ["started", "cancelled"]


@pytest.mark.timeout(30)
def test_fcopy_refuses_escapes(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy")
    root = tmp_path / "root"
    root.mkdir()

    def act() -> None:
        for name, dest in (("../x.bin", str(root)), ("x.bin", str(root) + "/../x"), ("x.bin", str(tmp_path))):
            _send(mock, guid, data=b"data", file_name=name, dest=dest, flags=int(CopyFlags.CREATE_PATH))()

    host = Host(mock, guid, act)
    r = run("--root", str(mock.root), "--json", "ic", "fcopy", guid, "--dest-root", str(root),
            "--no-fsync", "--count", "3", "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    ev = of(events(r), "fcopy")
    assert [e["kind"] for e in ev] == ["refused"] * 3
    assert [e["status"] for e in ev] == ["HV_INVALIDARG", "HV_INVALIDARG", "HV_E_ACCESSDENIED"]
    assert sorted(os.listdir(tmp_path)) == ["root"] and os.listdir(root) == []


@pytest.mark.timeout(30)
def test_fcopy_text_output_and_wide_root_note(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy")
    host = Host(mock, guid, _send(mock, guid, data=b"hello", file_name="t.txt", dest=str(tmp_path)))
    r = run("--root", str(mock.root), "ic", "fcopy", guid, "--dest-root", "/", "--no-fsync", "--count", "1",
            "--timeout", "15")
    host.join()
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "t.txt").read_bytes() == b"hello"
    assert "destination root is /" in r.stderr
    assert "completed" in r.stdout and "negotiated fcopy version 1.1" in r.stdout


# -- the daemon --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fcopy_daemon_json_prints_the_events_on_stdout(tmp_path: Path) -> None:
    r = run("--mock", "fcopy-daemon", "--json", "--dest-root", str(tmp_path), "--timeout", "1")
    assert r.exit_code == 0, r.stderr
    kinds = [e["event"] for e in events(r)]
    assert kinds[:2] == ["bound", "enabled"] and kinds[-1] == "stopped"


@pytest.mark.timeout(40)
def test_fcopy_daemon_finds_the_well_known_device_and_restores(tmp_path: Path) -> None:
    with MockVmbus() as m:
        guid = m.add_device("fcopy")  # Hyper-V's fixed instance GUID by default
        assert str(guid) == FCOPY_INSTANCE_GUID
        other = m.add_device("fcopy")  # a second fcopy device: the well-known instance wins
        data = os.urandom(200_000)
        host = Host(m, guid, _send(m, guid, data=data, file_name="d.bin", dest=str(tmp_path)))
        r = run("--root", str(m.root), "fcopy-daemon", "--dest-root", str(tmp_path), "--no-fsync",
                "--count", "1", "--timeout", "30")
        host.join()
        assert r.exit_code == 0, r.stderr
        assert (tmp_path / "d.bin").read_bytes() == data
        assert "fcopy completed" in r.stderr and "INFO" in r.stderr  # logs, not events
        assert r.stdout == ""
        fs = Sysfs(m.root)
        assert fs.device(guid).driver is None and fs.device(other).driver is None  # given back


@pytest.mark.timeout(30)
def test_fcopy_daemon_logs_with_journal_priorities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    monkeypatch.setitem(__import__("sys").modules, "systemd.journal", None)  # python-systemd absent
    r = run("--mock", "fcopy-daemon", "--dest-root", str(tmp_path), "--timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln]
    assert lines and all(ln[:3] in ("<6>", "<4>") for ln in lines), lines
    assert any("fcopy daemon serving" in ln for ln in lines)


@pytest.mark.timeout(30)
def test_fcopy_daemon_without_a_device_exits_not_found() -> None:
    with MockVmbus(devices=["heartbeat"]) as m:
        r = run("--root", str(m.root), "fcopy-daemon", "--dest-root", "/tmp", "--timeout", "1")
    assert r.exit_code == 3
    assert "Guest Service Interface" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [["ic", "fcopy"], ["fcopy-daemon"]])
def test_fcopy_state_dir_option_wins_over_the_environment(argv: list[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVMBUS_FCOPY_STATE_DIR", str(tmp_path / "env"))
    with MockVmbus(devices=["fcopy"]) as m:
        r = run("--root", str(m.root), *argv, "--dest-root", str(tmp_path),
                "--state-dir", str(tmp_path / "opt"), "--timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "opt" / "lock").exists() and not (tmp_path / "env").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [["ic", "fcopy"], ["fcopy-daemon"]])
def test_fcopy_unusable_state_dir_is_one_line(argv: list[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    for state, says in ((shared, "writable by nobody else"), (tmp_path / "f" / "x", "no usable fcopy state")):
        (tmp_path / "f").touch()
        monkeypatch.setenv("PYVMBUS_FCOPY_STATE_DIR", str(state))
        with MockVmbus(devices=["fcopy"]) as m:
            r = run("--root", str(m.root), *argv, "--dest-root", str(tmp_path), "--timeout", "1")
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and says in lines[0] and "PYVMBUS_FCOPY_STATE_DIR" in lines[0]


@pytest.mark.timeout(30)
def test_fcopy_daemon_with_several_devices_lists_them_in_one_line() -> None:
    import uuid

    with MockVmbus() as m:  # two fcopy devices, neither at Hyper-V's fixed instance GUID
        for _ in range(2):
            m.add_device("fcopy", instance=str(uuid.uuid4()))
        guids = sorted(d.guid for d in Sysfs(m.root).devices())
        r = run("--root", str(m.root), "fcopy-daemon", "--dest-root", "/tmp", "--timeout", "1")
    assert r.exit_code == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ambiguous: 2 file-copy devices" in lines[0] and "--device" in lines[0]
    assert all(g in lines[0] for g in guids) and "Usage:" not in r.stderr


@pytest.mark.timeout(30)
def test_unknown_device_exits_not_found() -> None:
    r = run("--mock", "ic", "heartbeat", "nosuchdevice", "--timeout", "1")
    assert r.exit_code == 3


@pytest.mark.timeout(60)
def test_fcopy_daemon_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import select
    import signal
    import subprocess
    import sys

    script = Path(sys.executable).with_name("vmbus")
    cmd = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from pyvmbus.cli import main; sys.exit(main(prog_name='vmbus'))"]
    proc = subprocess.Popen([*cmd, "--mock", "fcopy-daemon", "--dest-root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    log: list[str] = []
    fd = proc.stderr.fileno()
    pending = bytearray()
    try:
        deadline = time.monotonic() + 30
        while not any("negotiated" in ln for ln in log):
            # Byte by byte, never select() + readline(): readline buffers the lines logged
            # in one burst ("fcopy IC version", then "negotiated"), and select then waits on
            # an empty pipe (a 30 s "stall" seen once under CPU load).
            assert time.monotonic() < deadline, f"no negotiation logged: {log}"
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                b = os.read(fd, 1)
                assert b, f"the daemon exited: {log} {pending!r}"
                pending += b
                if b == b"\n":
                    log.append(pending.decode())
                    pending = bytearray()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.extend(err.splitlines())
    assert proc.returncode == 0, log
    assert out == ""
    assert any("restored" in ln for ln in log) and any("stopped (SIGTERM)" in ln for ln in log), log
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(30)
def test_count_not_reached_before_timeout_exits_8_and_timeout_alone_exits_0() -> None:
    r = run("--mock", "ic", "shutdown", "--count", "1", "--timeout", "0.5")
    assert r.exit_code == 8 and "1 shutdown request(s)" in r.stderr
    assert "restored" in r.stdout  # cleaned up before failing
    r = run("--mock", "--json", "ic", "shutdown", "--timeout", "0.5")
    assert r.exit_code == 0 and of(events(r), "stopped")[0]["why"] == "timeout"
