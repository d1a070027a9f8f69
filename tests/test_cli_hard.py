"""Issue 10 section 4: each bad invocation that gave a traceback or a hang, one test each.

Every bad value is refused with one line and the documented exit code, before anything
changes; every wait honours the --timeout it was given. The property-based sweep over
argument lists and corrupted trees is tests/test_cli_fuzz.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pyvmbus import binding
from pyvmbus.cli import main
from pyvmbus.cli.errors import EXIT_CODES, EXIT_SYSFS
from pyvmbus.cli.params import MAX_PAYLOAD, max_payload, read_payload
from pyvmbus.errors import AmbiguousDevice, DeviceNotFound, MalformedSysfs
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.sysfs_tree import SysfsTree
from pyvmbus.sysfs import UIO_DRIVER, Sysfs, devices_dir, parse_int, read_attr

HB = "abcd0001-079e-403c-b352-a1921ee207ee"
ECHO = "abcd0002-4cfa-4a6a-9e1b-e2a4b1a0b3c4"
NET = "f0000003-df3e-46c5-913f-f2d2f965ed0e"

_SCRIPT = Path(sys.executable).with_name("vmbus")
VMBUS = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from pyvmbus.cli import main; sys.exit(main(prog_name='vmbus'))"]


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="vmbus", catch_exceptions=False, env=env)


def one_line(result: Result) -> str:
    """The error: one line, no traceback (click's usage errors: the last line)."""
    text = result.stderr.strip()
    assert "Traceback" not in text, text
    if result.exit_code == 2 and text.startswith("Usage:"):
        return text.splitlines()[-1]
    assert text.count("\n") == 0, f"not one line: {text!r}"
    return text


@pytest.fixture(scope="module")
def mock() -> Iterator[MockVmbus]:
    """heartbeat and echo share the GUID prefix abcd000; network is alone."""
    with MockVmbus(devices=()) as m:
        m.add_device("heartbeat", instance=HB)
        m.add_device("echo", instance=ECHO)
        m.add_device("network", instance=NET)
        yield m


@pytest.fixture
def rw(mock: MockVmbus) -> Iterator[MockVmbus]:
    yield mock
    for dev in Sysfs(mock.root).devices():
        if dev.driver == UIO_DRIVER or binding.read_record(mock.root, dev.guid) is not None:
            binding.restore(mock.root, dev.guid, timeout=10)


# -- --send ---------------------------------------------------------------------------------------
def test_send_payload_limits_in_the_parser(tmp_path: Path) -> None:
    assert max_payload(4096) == 4096 - 32  # 16 descriptor + 8 trailer + 1 free, padded to 8
    assert max_payload(1 << 30) == MAX_PAYLOAD
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="larger than the largest VMBus packet payload"):
        read_payload(f"@{big}")
    exact = tmp_path / "exact"
    exact.write_bytes(b"y" * MAX_PAYLOAD)
    assert len(read_payload(f"@{exact}")) == MAX_PAYLOAD
    with pytest.raises(ValueError, match="larger than"):
        read_payload("00" * (MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="cannot read"):
        read_payload(f"@{tmp_path}")
    with pytest.raises(ValueError, match="NUL"):
        read_payload("@a\0b")


@pytest.mark.timeout(60)
def test_send_at_dev_zero_is_refused_without_reading_it(tmp_path: Path) -> None:
    """Today's code read /dev/zero until memory ran out (3.2 GB); now at most one packet."""
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    p = subprocess.run([*VMBUS, "--root", str(tmp_path), "enable", "echo", "--send", "@/dev/zero"],
                       capture_output=True, text=True, timeout=30, preexec_fn=limit_memory)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "larger than the largest VMBus packet payload" in p.stderr


@pytest.mark.timeout(60)
def test_send_larger_than_a_packet_is_a_usage_error(rw: MockVmbus, tmp_path: Path) -> None:
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (5 << 20))
    r = run("--root", str(rw.root), "enable", ECHO, "--send", f"@{huge}", "--timeout", "5")
    assert r.exit_code == 2 and "larger than the largest VMBus packet" in one_line(r)
    assert Sysfs(rw.root).device(ECHO).driver != UIO_DRIVER


@pytest.mark.timeout(60)
def test_send_larger_than_the_ring_is_refused_before_sending(rw: MockVmbus, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000)  # under a packet's 524,264, over the echo ring's size
    before = Sysfs(rw.root).device(ECHO).driver
    r = run("--root", str(rw.root), "--json", "enable", ECHO, "--send", f"@{big}", "--timeout", "5")
    assert r.exit_code == 2, r.stderr
    err = json.loads(r.stderr)
    assert err["type"] == "PayloadTooLarge" and "cannot fit in the ring" in err["error"]
    assert "nothing was sent" in err["error"]
    events = [json.loads(line)["event"] for line in r.stdout.splitlines()]
    assert "sent" not in events and "restored" in events
    assert Sysfs(rw.root).device(ECHO).driver == before
    assert binding.read_record(rw.root, ECHO) is None


# -- seconds ---------------------------------------------------------------------------------------
_TIMED = [
    ("bind", "X", "--timeout"),
    ("unbind", "X", "--timeout"),
    ("restore", "X", "--timeout"),
    ("enable", "X", "--timeout"),
    ("enable", "X", "--reply-timeout"),
    ("ring", "X", "--interval"),
    ("watch", None, "--interval"),
    ("watch", None, "--timeout"),
    ("mock serve", None, "--timeout"),
    ("ic heartbeat", "X", "--timeout"),
    ("ic heartbeat", "X", "--reoffer-timeout"),
    ("fcopy-daemon", None, "--timeout"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e23", "1e309", " NaN "])
@pytest.mark.parametrize(("command", "device", "option"), _TIMED)
def test_seconds_must_be_finite_and_bounded(tmp_path: Path, command: str, device: str | None, option: str,
                                            value: str) -> None:
    argv = ["--root", str(tmp_path), *command.split()]
    if device:
        argv.append(device)
    if command == "fcopy-daemon":
        argv += ["--dest-root", str(tmp_path)]
    if command == "ring":
        argv.append("--watch")
    r = run(*argv, option, value)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    line = one_line(r)
    assert option in line and ("not a number of seconds" in line or "not in the range" in line), line
    assert list(tmp_path.iterdir()) == []


def test_seconds_help_shows_the_range() -> None:
    r = run("enable", "--help")
    assert "0<x<=1000000" in " ".join(r.stdout.split()).replace(".0", "")


# -- --root ----------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("root", ["x" * 5000, "/tmp/" + "y" * 300, "a\0b", ""])
def test_unusable_root_is_a_usage_error(root: str) -> None:
    r = run("--root", root, "list")
    assert r.exit_code == 2 and "--root" in one_line(r)
    if "\0" not in root and root:  # the environment holds no NUL, and "" means unset
        r = run("list", env={"VMBUS_ROOT": root})
        assert r.exit_code == 2 and "--root" in one_line(r)
    r = run("mock", "fault", "echo", "rescind", "--root", root)
    assert r.exit_code == 2


# -- malformed sysfs --------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    t = SysfsTree(tmp_path, "6.18")
    t.add_device("heartbeat", HB, monitored=True)
    t.add_device("network", NET)
    return t


@pytest.mark.parametrize(("attr", "value", "commands"), [
    ("id", "abc", ("list", "show")),
    ("state", "three", ("show",)),
    ("id", "9" * 5000, ("list", "show")),
    ("id", "1_0", ("list",)),
    ("vendor", "", None),
    ("class_id", "{not-a-guid}", ("show",)),
])
@pytest.mark.timeout(30)
def test_malformed_device_attribute_is_one_clear_error(tree: SysfsTree, attr: str, value: str,
                                                       commands: tuple[str, ...] | None) -> None:
    path = tree.device_dir(HB) / attr
    os.chmod(path, 0o644)
    path.write_text(value + "\n")
    if commands is None:  # an empty file reads as "no value now", as a failing show() does
        assert read_attr(path) is None
        return
    for command in commands:
        argv = ["--root", str(tree.root), command] + ([] if command == "list" else [HB])
        r = run(*argv)
        assert r.exit_code == EXIT_SYSFS, (command, r.stderr)
        line = one_line(r)
        assert str(devices_dir(tree.root) / HB / attr) in line and "malformed sysfs" in line, line
        assert repr(value[:60])[:20] in line


@pytest.mark.timeout(30)
def test_malformed_channel_attribute_and_library_callers(tree: SysfsTree) -> None:
    dev = Sysfs(tree.root).device(HB)
    relid = dev.relid
    tree.set_ring_allocated(HB, relid, 0x4000)
    mask = tree.channel_dir(HB, relid) / "in_mask"
    os.chmod(mask, 0o644)
    mask.write_text("zz\n")
    shown = devices_dir(tree.root) / HB / "channels" / str(relid) / "in_mask"
    r = run("--root", str(tree.root), "ring", HB)
    assert r.exit_code == EXIT_SYSFS and str(shown) in one_line(r) and "'zz'" in one_line(r)
    with pytest.raises(MalformedSysfs) as exc:
        _ = dev.channel(relid).in_mask
    assert isinstance(exc.value, ValueError)  # what parse_int raised before: callers keep working
    assert exc.value.path == str(shown) and exc.value.value == "zz"
    with pytest.raises(MalformedSysfs, match="a number"):
        parse_int("0x", "somewhere")
    assert parse_int("007") == 7 and parse_int("0x10") == 16 and parse_int("-1") == -1


@pytest.mark.timeout(30)
def test_directory_where_an_attribute_belongs(tree: SysfsTree) -> None:
    path = tree.device_dir(HB) / "id"
    path.unlink()
    path.mkdir()
    r = run("--root", str(tree.root), "show", HB)
    assert r.exit_code == EXIT_SYSFS and "a directory where a sysfs attribute belongs" in one_line(r)


@pytest.mark.timeout(30)
def test_huge_attribute_is_not_read_whole(tree: SysfsTree) -> None:
    path = tree.device_dir(HB) / "modalias"
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.truncate(50 << 20)  # 50 MB of NULs, sparse
    with pytest.raises(MalformedSysfs, match="at most"):
        read_attr(path)


@pytest.mark.timeout(30)
def test_device_entry_that_is_not_a_directory(tree: SysfsTree) -> None:
    stray = tree.devices_dir / "abcd0003-0000-4000-8000-000000000000"
    stray.write_text("not a device\n")
    r = run("--root", str(tree.root), "--json", "list")
    assert r.exit_code == 0, r.stderr
    listed = [d["guid"] for d in json.loads(r.stdout)["devices"]]
    assert stray.name not in listed and HB in listed
    r = run("--root", str(tree.root), "show", stray.name)
    assert r.exit_code == 3 and "Traceback" not in r.stderr


# -- ambiguous names ----------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_ambiguous_prefix_lists_the_candidates(mock: MockVmbus) -> None:
    r = run("--root", str(mock.root), "show", "abcd")
    assert r.exit_code == 3
    line = one_line(r)
    assert "'abcd' is ambiguous: it matches 2 devices with that prefix" in line
    assert f"{HB} (heartbeat)" in line and f"{ECHO} (" in line and "give more of the GUID" in line
    assert "no VMBus device" not in line
    r = run("--root", str(mock.root), "--json", "show", "abcd000")
    err = json.loads(r.stderr)
    assert err["type"] == "AmbiguousDevice" and err["exit_code"] == 3
    with pytest.raises(AmbiguousDevice) as exc:
        Sysfs(mock.root).device("ABCD")
    assert set(exc.value.candidates) == {HB, ECHO} and isinstance(exc.value, DeviceNotFound)
    assert run("--root", str(mock.root), "show", "abcd0001").exit_code == 0


def test_exit_code_table_names_the_new_errors() -> None:
    by_name = {row.name: row for row in EXIT_CODES}
    assert MalformedSysfs in by_name["bad-sysfs"].errors
    assert AmbiguousDevice in by_name["not-found"].errors
    doc = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert "| 13 | bad-sysfs |" in doc and "`AmbiguousDevice`" in doc


# -- waits that outlived --timeout --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_watch_interval_longer_than_timeout_ends_at_the_timeout(mock: MockVmbus) -> None:
    t0 = time.monotonic()
    r = run("--root", str(mock.root), "--json", "watch", "--poll", "--interval", "120", "--timeout", "0.5")
    elapsed = time.monotonic() - t0
    assert r.exit_code == 0, r.stderr
    assert elapsed < 60, f"watch ran {elapsed:.1f} s for --timeout 0.5"  # a hang, not a speed check


@pytest.mark.timeout(60)
def test_ic_after_a_host_crash_does_not_wait_out_a_restore() -> None:
    """The runner used to spend bind_timeout (10 s) restoring a driver on a crashed host."""
    with MockVmbus(devices=["heartbeat"]) as m:
        guid = str(Sysfs(m.root).device("heartbeat").guid)

        def crash_once_open() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and Sysfs(m.root).device(guid).driver != UIO_DRIVER:
                time.sleep(0.01)
            time.sleep(0.2)
            m.fault(guid, "crash")

        t = threading.Thread(target=crash_once_open, daemon=True)
        t.start()
        t0 = time.monotonic()
        r = run("--root", str(m.root), "--json", "ic", "heartbeat", "--timeout", "30")
        elapsed = time.monotonic() - t0
        t.join(5)
    assert r.exit_code == 9, r.stderr
    notes = [json.loads(x) for x in r.stdout.splitlines() if '"note"' in x]
    assert any("the host is gone" in n["message"] for n in notes)
    assert elapsed < 8, f"{elapsed:.1f} s: the restore waited for a host that is gone"


# -- mock fault ------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_mock_fault_without_permission_says_permission(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sys" / "bus" / "vmbus").mkdir(parents=True)
    sock_path = tmp_path / "run" / "mock" / "serve.sock"
    sock_path.parent.mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)

    def denied(self: socket.socket, address: object) -> None:  # connect() on a root-owned 0755 socket
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    try:
        r = run("mock", "fault", "echo", "rescind", "--root", str(tmp_path))
    finally:
        server.close()
    assert r.exit_code == 4, r.stderr
    line = one_line(r)
    assert "permission denied" in line and str(sock_path) in line and "not served" not in line


@pytest.mark.timeout(60)
def test_enable_timeout_bounds_the_sends_too(rw: MockVmbus) -> None:
    """heartbeat never completes a request: two sends used to take 2 x --reply-timeout (10 s)
    whatever --timeout said, since the clock started after on_post_started."""
    t0 = time.monotonic()
    r = run("--root", str(rw.root), "--json", "enable", HB, "--send", "00", "--send", "00",
            "--timeout", "0.5")
    elapsed = time.monotonic() - t0
    assert r.exit_code == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["event"] == "stopped" and events[-1]["why"] == "timeout"
    assert sum(e["event"] == "sent" for e in events) == 1  # the second was never sent
    assert elapsed < 5, f"{elapsed:.1f} s for --timeout 0.5"
    r = run("--root", str(rw.root), "enable", HB, "--send", "00", "--timeout", "0.5", "--count", "50")
    assert r.exit_code == 8 and "50 packets" in one_line(r)
    r = run("--root", str(rw.root), "enable", HB, "--send", "00", "--reply-timeout", "0.3", "--timeout", "30")
    assert r.exit_code == 8 and "completion" in one_line(r)  # --reply-timeout still fails the run


@pytest.mark.timeout(30)
def test_unreadable_directories_are_malformed_not_oserror(tree: SysfsTree) -> None:
    channels = tree.device_dir(HB) / "channels"
    shutil.rmtree(channels)
    os.symlink("channels", channels)  # ELOOP
    r = run("--root", str(tree.root), "show", HB)
    assert r.exit_code == EXIT_SYSFS and "unreadable directory" in one_line(r)
    driver = tree.device_dir(NET) / "driver"
    driver.unlink(missing_ok=True)
    driver.write_text("hv_netvsc\n")  # a file where the kernel's link belongs
    r = run("--root", str(tree.root), "show", NET)
    assert r.exit_code == EXIT_SYSFS and "not a link to a driver" in one_line(r)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv", [
    ["--root", "/tmp/a\0b", "list"],
    ["mock", "serve", "--root", "/tmp/a\0b", "--timeout", "0.1"],
    ["mock", "fault", "echo", "rescind", "--root", "/tmp/a\0b"],
    ["--mock", "ic", "fcopy", "--dest-root", "/tmp\0x", "--timeout", "0.1"],
    ["--mock", "fcopy-daemon", "--dest-root", "/tmp\0x", "--timeout", "0.1"],
    ["--mock", "enable", "echo", "--send", "@/tmp\0x", "--timeout", "0.1"],
    ["--mock", "enable", "echo", "--capture", "/tmp/a\0b", "--timeout", "0.1"],
    ["capture", "show", "/tmp/a\0b"],
    ["mock", "serve", "--replay", "/tmp/a\0b", "--timeout", "0.1"],
    ["--mock", "kvp", "list", "--pool-dir", "/tmp/a\0b"],
])
def test_nul_in_any_path_option_is_a_usage_error(argv: list[str]) -> None:
    r = run(*argv)
    assert r.exit_code == 2 and "NUL" in one_line(r)


@pytest.mark.timeout(30)
def test_a_long_device_name_is_shortened_in_the_error(mock: MockVmbus) -> None:
    r = run("--root", str(mock.root), "show", "x" * 100_000)
    assert r.exit_code == 3 and len(one_line(r)) < 400


@pytest.mark.timeout(60)
def test_capture_show_of_dev_zero_is_refused_without_reading_it_all() -> None:
    """read_capture read its whole input: /dev/zero ran the process out of memory."""
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    p = subprocess.run([*VMBUS, "capture", "show", "/dev/zero"], capture_output=True, text=True,
                       timeout=30, preexec_fn=limit_memory)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "not a regular file" in p.stderr
