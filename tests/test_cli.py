"""The ``vmbus`` command through click's CliRunner with argv, against the mock bus.

Read-only commands share one module-scoped mock (``ro``); commands that bind, unbind or
enable share another (``rw``) and put every device back after each test; tests that
destroy a device (rescind) get a mock of their own. Every test talks to the mock process,
so every test has a timeout.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pyvmbus import binding
from pyvmbus import ring as ring_mod
from pyvmbus.cli import main
from pyvmbus.cli.schema import SCHEMAS
from pyvmbus.cli.state import MOCK_DEVICES
from pyvmbus.mock import MockVmbus
from pyvmbus.sysfs import UIO_DRIVER, Sysfs


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="vmbus", catch_exceptions=False, env=env)


def lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def one(result: Result) -> dict[str, Any]:
    objs = lines(result)
    assert len(objs) == 1, result.stdout
    return objs[0]


def keys(obj: dict[str, Any], schema: str) -> None:
    assert set(obj) == set(SCHEMAS[schema]), f"{schema}: {sorted(set(obj) ^ set(SCHEMAS[schema]))}"


def check_event(ev: dict[str, Any], prefix: str) -> None:
    name = f"{prefix}.{ev['event']}"
    if prefix == "watch" and ev["event"] != "watching":
        name = "watch.action"
    keys(ev, name)


def err_line(result: Result) -> str:
    text = result.stderr.strip()
    assert text.count("\n") == 0, f"not one line: {text!r}"
    assert "Traceback" not in text
    return text


@pytest.fixture(scope="module")
def ro() -> Iterator[MockVmbus]:
    with MockVmbus(devices=MOCK_DEVICES) as mock:
        yield mock


@pytest.fixture(scope="module")
def rw_mock() -> Iterator[MockVmbus]:
    with MockVmbus(devices=MOCK_DEVICES) as mock:
        yield mock


@pytest.fixture
def rw(rw_mock: MockVmbus) -> Iterator[MockVmbus]:
    """The shared mutable mock; every device is given back its driver afterwards."""
    yield rw_mock
    fs = Sysfs(rw_mock.root)
    for dev in fs.devices():
        orphaned = dev.driver is None and dev.device_class.name in ("heartbeat", "timesync", "shutdown")
        if dev.driver == UIO_DRIVER or orphaned or binding.read_record(rw_mock.root, dev.guid) is not None:
            binding.restore(rw_mock.root, dev.guid, timeout=10)


def guid(mock: MockVmbus, query: str) -> str:
    from pyvmbus.cli.state import resolve_device

    return str(resolve_device(Sysfs(mock.root), query).guid)


# -- global options -----------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_help_version_and_usage_errors(tmp_path: Path) -> None:
    r = run("--help")
    assert r.exit_code == 0 and "enable" in r.stdout and "_VMBUS_COMPLETE" in r.stdout
    assert run("-h").exit_code == 0
    r = run("--version")
    assert r.exit_code == 0 and "vmbus" in r.stdout
    r = run("--root", str(tmp_path), "--mock", "list")
    assert r.exit_code == 2 and "exclude each other" in r.stderr
    r = run("--kernel", "6.10", "list")
    assert r.exit_code == 2 and "--kernel only applies with --mock" in r.stderr
    r = run("--mock", "--kernel", "9.99", "list")
    assert r.exit_code == 2
    assert run("nosuchcommand").exit_code == 2


@pytest.mark.timeout(30)
def test_no_vmbus_under_root_suggests_mock(tmp_path: Path) -> None:
    r = run("--root", str(tmp_path), "list")
    assert r.exit_code == 10
    assert "mock serve --root" in err_line(r) and "--mock" in r.stderr
    r = run("--json", "--root", str(tmp_path), "list")
    err = json.loads(r.stderr)
    keys(err, "error")
    assert err["exit_code"] == 10 and err["type"] == "NoVmbus"


@pytest.mark.timeout(30)
@pytest.mark.skipif(Path("/sys/bus/vmbus").exists(), reason="this machine has a VMBus")
def test_no_hyperv_here_suggests_mock() -> None:
    r = run("list")
    assert r.exit_code == 10
    assert "not a Hyper-V or Azure guest" in err_line(r) and "--mock" in r.stderr


@pytest.mark.timeout(60)
def test_mock_option_lists_the_standard_devices_and_kernel() -> None:
    r = run("--mock", "--json", "list")
    assert r.exit_code == 0, r.output
    data = one(r)
    keys(data, "list")
    assert sorted(d["class"] for d in data["devices"]) == sorted(MOCK_DEVICES)
    root = data["root"]
    assert not os.path.exists(root), "the --mock bus must be gone after the command"
    # --kernel 5.15: the ring file is the old fixed size, and -v logs the mock start
    r = run("-v", "--mock", "--kernel", "5.15", "ring", "echo")
    assert r.exit_code == 0, r.output
    assert "starting a mock VMBus (kernel 5.15)" in r.stderr


@pytest.mark.timeout(30)
def test_env_root_and_json_after_the_command(ro: MockVmbus) -> None:
    r = run("list", "--json", env={"VMBUS_ROOT": str(ro.root)})
    assert r.exit_code == 0, r.output
    assert one(r)["root"] == str(ro.root)
    # VMBUS_ROOT from the environment gives way to --mock instead of clashing with it
    r = run("--mock", "list", env={"VMBUS_ROOT": "/nonexistent"})
    assert r.exit_code == 0, r.output


# -- list / show ----------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_list_text_and_json(ro: MockVmbus) -> None:
    r = run("--root", str(ro.root), "list")
    assert r.exit_code == 0, r.output
    head, *rows = r.stdout.splitlines()
    assert head.split() == ["INSTANCE", "CLASS", "RELID", "DRIVER", "UIO", "MONITORED"]
    assert len(rows) == len(MOCK_DEVICES)
    assert any("echo" in row and "yes" in row for row in rows)
    data = one(run("--root", str(ro.root), "--json", "list"))
    keys(data, "list")
    for row in data["devices"]:
        keys(row, "list.device")
    by = {d["class"]: d for d in data["devices"]}
    assert by["heartbeat"]["driver"] == "hv_utils" and by["heartbeat"]["monitored"] is False
    assert by["network"]["monitored"] is True and by["network"]["monitor_id"] is not None
    assert [d["relid"] for d in data["devices"]] == sorted(d["relid"] for d in data["devices"])


@pytest.mark.timeout(30)
def test_show_every_spelling_of_a_device(ro: MockVmbus) -> None:
    g = guid(ro, "heartbeat")
    for spelling in (g, g.upper(), "{" + g + "}", g[:8], "heartbeat", "HEARTBEAT"):
        r = run("--root", str(ro.root), "--json", "show", spelling)
        assert r.exit_code == 0, (spelling, r.output)
        assert one(r)["guid"] == g


@pytest.mark.timeout(30)
def test_show_text_and_json_schema(ro: MockVmbus) -> None:
    r = run("--root", str(ro.root), "show", "heartbeat")
    assert r.exit_code == 0, r.output
    text = r.stdout
    for section in ("attributes (sysfs):", "channels:", "uio:", "ring state", "signalling the host: fd-write",
                    "why:", "guard rails"):
        assert section in text
    d = one(run("--root", str(ro.root), "show", "--json", "echo"))
    keys(d, "show")
    for ch in d["channels"]:
        keys(ch, "show.channel")
    keys(d["signal"], "show.signal")
    for side in ("tx", "rx"):
        keys(d["ring"][side], "ring.side")
    assert d["ring"]["engine"] == ring_mod.ENGINE
    assert f"engine: {ring_mod.ENGINE} (" in text
    assert d["class"] == "echo" and d["monitored"] is True
    assert d["signal"]["mechanism"] == "monitor-page"
    assert d["signal"]["int_page_word_offset"] == 2048 + 4 * (d["relid"] // 32)
    assert d["attributes"]["id"] == str(d["relid"])
    assert d["uio"] is None and d["bind_record"] is None and d["guard_rails"] == []
    hb = one(run("--root", str(ro.root), "--json", "show", "heartbeat"))
    keys(hb["signal"], "show.signal")
    assert hb["signal"]["int_page_word_offset"] is None
    assert hb["signal"]["mechanism"] == "fd-write" and "6.10" in hb["signal"]["notes"][0]


@pytest.mark.timeout(30)
def test_unknown_and_ambiguous_devices_name_the_nearest(ro: MockVmbus) -> None:
    r = run("--root", str(ro.root), "show", "heartbeet")
    assert r.exit_code == 3
    assert "nearest: heartbeat" in err_line(r)
    r = run("--root", str(ro.root), "show", "ech")
    assert r.exit_code == 3 and "echo" in err_line(r)
    r = run("--root", str(ro.root), "show", "00000000-0000-0000-0000-000000000000")
    assert r.exit_code == 3 and "no VMBus device" in err_line(r)
    r = run("--root", str(ro.root), "show", "ab")  # too short a prefix
    assert r.exit_code == 3 and "4 hex digits" in err_line(r)
    r = run("--root", str(ro.root), "show", "not-a-guid-!")
    assert r.exit_code == 3
    r = run("--root", str(ro.root), "--json", "show", "nope")
    err = json.loads(r.stderr)
    keys(err, "error")
    assert err["type"] == "DeviceNotFound" and err["exit_code"] == 3 and r.stdout == ""


@pytest.mark.timeout(30)
def test_shell_completion_of_devices(ro: MockVmbus) -> None:
    from click.shell_completion import ShellComplete

    comp = ShellComplete(main, {}, "vmbus", "_VMBUS_COMPLETE")
    words = [c.value for c in comp.get_completions(["--root", str(ro.root), "show"], "h")]
    assert words == ["heartbeat"]
    words = [c.value for c in comp.get_completions(["--root", str(ro.root), "enable"], "")]
    assert guid(ro, "echo") in words and "echo" in words and "fcopy" in words
    assert [c.value for c in comp.get_completions(["--mock", "show"], "ti")] == ["timesync"]
    assert [c.value for c in comp.get_completions(["mock", "serve", "--device"], "ec")] == ["echo"]
    # and through the environment, as the shell calls it
    env = {"_VMBUS_COMPLETE": "bash_complete", "COMP_WORDS": f"vmbus --root {ro.root} show fc",
           "COMP_CWORD": "4"}
    r = CliRunner().invoke(main, [], prog_name="vmbus", env=env)
    assert "fcopy" in r.stdout
    r = run(env={"_VMBUS_COMPLETE": "bash_source"})
    assert "complete" in r.stdout and "_VMBUS_COMPLETE" in r.stdout


# -- ring -------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_ring_from_sysfs(ro: MockVmbus) -> None:
    r = run("--root", str(ro.root), "ring", "heartbeat")
    assert r.exit_code == 0, r.output
    assert "tx guest->host" in r.stdout and "OCCUPANCY" in r.stdout and "source: sysfs" in r.stdout
    d = one(run("--root", str(ro.root), "--json", "ring", "heartbeat"))
    keys(d, "ring")
    keys(d["tx"], "ring.side")
    for ch in d["channels"]:
        keys(ch, "show.channel")
    assert d["source"] == "sysfs" and d["tx"]["pending_send_size"] is None
    assert d["tx"]["data_size"] == d["tx"]["bytes_used"] + d["tx"]["bytes_free"] > 0
    # an unbound device has no ring allocated: the kernel shows nothing, and we say why
    d = one(run("--root", str(ro.root), "--json", "ring", "fcopy"))
    assert d["tx"]["read_index"] is None and "not allocated" in d["note"]


@pytest.mark.timeout(30)
def test_ring_watch_refreshes(ro: MockVmbus) -> None:
    r = run("--root", str(ro.root), "--json", "ring", "heartbeat", "--watch", "--interval", "0.02",
            "--count", "3")
    assert r.exit_code == 0, r.output
    objs = lines(r)
    assert len(objs) == 3
    for o in objs:
        keys(o, "ring")
    r = run("--root", str(ro.root), "ring", "heartbeat", "--watch", "--interval", "0.02", "--count", "2")
    assert r.exit_code == 0 and r.stdout.count("tx guest->host") == 2


@pytest.mark.timeout(30)
def test_ring_map_needs_uio(ro: MockVmbus) -> None:
    r = run("--root", str(ro.root), "ring", "--map", "heartbeat")
    assert r.exit_code == 7
    assert "bind" in err_line(r) and "--map" in r.stderr


@pytest.mark.timeout(30)
def test_ring_map_of_a_bound_device(rw: MockVmbus) -> None:
    assert run("--root", str(rw.root), "bind", "echo").exit_code == 0
    d = one(run("--root", str(rw.root), "--json", "ring", "--map", "echo"))
    keys(d, "ring")
    keys(d["rx"], "ring.side")
    assert d["source"] == "map" and d["tx"]["feature_bits"] is not None
    assert d["tx"]["pending_send_size"] == 0 and "was not open" in d["note"]
    r = run("--root", str(rw.root), "ring", "--map", "--watch", "--count", "2", "--interval", "0.02", "echo")
    assert r.exit_code == 0 and r.stdout.count("source: map") == 2


# -- bind / unbind / restore ------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_bind_restore_round_trip(rw: MockVmbus) -> None:
    root = str(rw.root)
    g = guid(rw, "heartbeat")
    r = run("--root", root, "bind", "heartbeat", "--timeout", "10")
    assert r.exit_code == 0, r.output
    assert "was: hv_utils" in r.stdout and "vmbus restore" in r.stdout
    d = one(run("--root", root, "--json", "bind", g))
    keys(d, "bind")
    assert d["already"] is True and d["uio"].startswith("uio") and d["previous_driver"] == "hv_utils"
    d = one(run("--root", root, "--json", "show", "heartbeat"))
    assert d["uio"] is not None and d["bind_record"]["previous_driver"] == "hv_utils"
    keys(d["uio"], "show.uio")
    assert "already bound" in run("--root", root, "bind", g[:6]).stdout
    d = one(run("--root", root, "--json", "restore", "heartbeat", "--timeout", "10"))
    keys(d, "restore")
    assert d["driver"] == "hv_utils"
    r = run("--root", root, "restore", "heartbeat")
    assert r.exit_code == 0 and "now bound to hv_utils" in r.stdout


@pytest.mark.timeout(90)
def test_unbind_and_restore(rw: MockVmbus) -> None:
    root = str(rw.root)
    r = run("--root", root, "unbind", "timesync", "--timeout", "10")
    assert r.exit_code == 0 and "released" in r.stdout and "hv_utils" in r.stdout
    d = one(run("--root", root, "--json", "unbind", "timesync"))
    keys(d, "unbind")
    assert d["previous_driver"] is None
    assert "was not bound" in run("--root", root, "unbind", "timesync").stdout
    d = one(run("--root", root, "--json", "restore", "timesync"))
    assert d["driver"] == "hv_utils"


@pytest.mark.timeout(30)
def test_guard_rail_refuses_then_force(rw: MockVmbus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    root = str(rw.root)
    iface = Sysfs(rw.root).device("network").net_interfaces[0]
    route = rw.root / "proc" / "net" / "route"
    saved = route.read_text()
    default = f"{iface}\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0"
    route.write_text(saved.splitlines()[0] + "\n" + default + "\n")
    try:
        r = run("--root", root, "bind", "network")
        assert r.exit_code == 6
        line = err_line(r)
        assert "default route" in line and "--force" in line
        r = run("--root", root, "unbind", "network")
        assert r.exit_code == 6
        d = one(run("--root", root, "--json", "show", "network"))
        assert d["guard_rails"] and "default route" in d["guard_rails"][0]
        assert "guard rails (binding needs --force)" in run("--root", root, "show", "network").stdout
        r = run("--root", root, "bind", "network", "--force")
        assert r.exit_code == 0, r.output
        assert run("--root", root, "restore", "network").exit_code == 0
        r = run("--root", root, "unbind", "network", "--force")
        assert r.exit_code == 0, r.output
        assert run("--root", root, "restore", "network").exit_code == 0
    finally:
        route.write_text(saved)


@pytest.mark.timeout(30)
def test_driver_not_loaded_says_modprobe(rw: MockVmbus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sysfs, "driver_loaded", lambda self, name: False)
    r = run("--root", str(rw.root), "bind", "fcopy")
    assert r.exit_code == 5
    assert "modprobe uio_hv_generic" in err_line(r)


@pytest.mark.timeout(30)
def test_not_permitted_says_udev_rules(rw: MockVmbus, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(binding.os, "access", lambda path, mode, **kw: mode != os.W_OK and real(path, mode))
    r = run("--root", str(rw.root), "bind", "fcopy")
    assert r.exit_code == 4
    line = err_line(r)
    assert "run as root, or install udev/90-pyvmbus.rules and join the vmbus group" in line


@pytest.mark.timeout(30)
def test_bind_failed_and_plain_permission_errors(rw: MockVmbus, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    monkeypatch.setattr(binding, "_write", lambda path, text, guid, action: errno.EINVAL)
    r = run("--root", str(rw.root), "bind", "fcopy")
    assert r.exit_code == 11 and "dmesg" in err_line(r)
    monkeypatch.undo()

    def denied(fs: Sysfs) -> list[dict[str, Any]]:
        raise PermissionError(13, "Permission denied", "/dev/uio0")

    monkeypatch.setattr("pyvmbus.cli.commands.list_devices", denied)
    r = run("--root", str(rw.root), "list")
    assert r.exit_code == 4 and "/dev/uio0" in err_line(r) and "vmbus group" in r.stderr


@pytest.mark.timeout(30)
def test_interrupt_and_tracebacks_with_vv(ro: MockVmbus, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(fs: Sysfs) -> list[dict[str, Any]]:
        raise KeyboardInterrupt

    monkeypatch.setattr("pyvmbus.cli.commands.list_devices", interrupted)
    r = run("--root", str(ro.root), "list")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    r = run("-vv", "--root", str(ro.root), "show", "nope")
    assert r.exit_code == 3 and "Traceback" in r.stderr and "vmbus: error:" in r.stderr


@pytest.mark.timeout(60)
def test_bind_refused_on_an_old_kernel() -> None:
    # binding.py notices the failed probe (ENOTSUPP) instead of waiting out the timeout
    r = run("--mock", "--kernel", "5.15", "bind", "heartbeat", "--timeout", "1")
    assert r.exit_code == 11
    line = err_line(r)
    assert "ENOTSUPP" in line and "monitor id" in line and "kernel >= 6.10" in line


# -- enable ---------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_enable_sends_and_restores(rw: MockVmbus, tmp_path: Path) -> None:
    f = tmp_path / "payload.bin"
    f.write_bytes(b"from a file")
    r = run("--root", str(rw.root), "--json", "enable", "echo", "--send", "68 65:6c6c6f", "--send",
            f"@{f}", "--send", "0x00ff", "--count", "3", "--timeout", "10", "--reply-timeout", "5",
            "--preview", "4")
    assert r.exit_code == 0, r.output
    evs = lines(r)
    for ev in evs:
        check_event(ev, "enable")
    names = [e["event"] for e in evs]
    assert names[:4] == ["bound", "opened", "started", "post_started"]
    assert names[-3:] == ["closed", "restored", "stopped"]
    replies = [e for e in evs if e["event"] == "reply"]
    assert [bytes.fromhex(e["payload_hex"]) for e in replies] == [b"hell", b"from", b"\x00\xff\x00\x00"]
    assert [e["length"] for e in replies] == [8, 16, 8]
    assert evs[-1]["why"] == "count" and evs[-1]["replies"] == 3
    assert evs[-2]["driver"] is None  # echo had no driver before
    assert Sysfs(rw.root).device(guid(rw, "echo")).driver is None


@pytest.mark.timeout(30)
def test_enable_no_wait_prints_packets_as_text(rw: MockVmbus) -> None:
    r = run("--root", str(rw.root), "enable", "echo", "--send", "616263", "--no-wait", "--count", "1",
            "--timeout", "10")
    assert r.exit_code == 0, r.output
    out = r.stdout
    for word in ("bound", "opened", "started", "post-started", "sent      packet", "packet    DATA_INBAND(6)",
                 "61 62 63 00 00 00 00 00  |abc.....|", "closed    reason: disabled", "restored",
                 "stopped   (count)"):
        assert word in out, word
    assert "Ctrl-C to stop" in r.stdout and r.stderr == ""


@pytest.mark.timeout(30)
def test_enable_already_bound_device_is_left_bound(rw: MockVmbus) -> None:
    root = str(rw.root)
    assert run("--root", root, "bind", "heartbeat").exit_code == 0
    r = run("--root", root, "--json", "enable", "heartbeat", "--timeout", "0.5", "--force")
    assert r.exit_code == 0, r.output
    evs = lines(r)
    names = [e["event"] for e in evs]
    assert "bound" not in names and "restored" not in names
    assert any(e["event"] == "packet" for e in evs)  # the host's negotiate request
    assert evs[-1]["why"] == "timeout"
    assert Sysfs(rw.root).device("heartbeat").driver == UIO_DRIVER


@pytest.mark.timeout(30)
def test_enable_count_not_reached_times_out(rw: MockVmbus) -> None:
    r = run("--root", str(rw.root), "enable", "echo", "--count", "2", "--timeout", "0.3")
    assert r.exit_code == 8
    assert "2 packets" in err_line(r) and "--timeout" in r.stderr
    assert Sysfs(rw.root).device(guid(rw, "echo")).driver is None  # restored all the same


@pytest.mark.timeout(30)
def test_enable_reply_timeout(rw: MockVmbus) -> None:
    r = run("--root", str(rw.root), "enable", "heartbeat", "--send", "00", "--reply-timeout", "0.3")
    assert r.exit_code == 8 and "completion" in err_line(r)
    assert "restored" in r.stdout
    assert Sysfs(rw.root).device("heartbeat").driver == "hv_utils"


@pytest.mark.timeout(30)
def test_enable_bad_send_values(rw: MockVmbus, tmp_path: Path) -> None:
    r = run("--root", str(rw.root), "enable", "echo", "--send", "xyz")
    assert r.exit_code == 2 and "not hex" in r.stderr
    r = run("--root", str(rw.root), "enable", "echo", "--send", f"@{tmp_path / 'missing'}")
    assert r.exit_code == 2 and "cannot read" in r.stderr
    r = run("--root", str(rw.root), "enable", "echo", "--count", "0")
    assert r.exit_code == 2


@pytest.mark.timeout(60)
def test_enable_host_rescind_exits_with_host_error() -> None:
    with MockVmbus(devices=["echo"]) as mock:
        g = guid(mock, "echo")
        def rescind_once_open() -> None:
            deadline = time.monotonic() + 20
            while mock.kernel_state(g).get("opencount", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            mock.rescind(g)

        t = threading.Thread(target=rescind_once_open)
        t.start()
        try:
            r = run("--root", str(mock.root), "--json", "enable", "echo", "--timeout", "20")
        finally:
            t.join()  # its call to the mock must end before the mock does
        assert r.exit_code == 9
        assert "rescinded" in err_line(r)
        evs = lines(r)
        assert {"event": "closed", "reason": "rescinded"}.items() <= evs[-3].items() or \
            any(e["event"] == "closed" and e["reason"] == "rescinded" for e in evs)
        assert evs[-1]["why"] == "closed"


@pytest.mark.timeout(60)
def test_enable_corrupt_ring_and_host_crash() -> None:
    with MockVmbus(devices=["echo"]) as mock:
        g = guid(mock, "echo")
        mock.fault(g, "corrupt")
        r = run("--root", str(mock.root), "--json", "enable", "echo", "--send", "00", "--no-wait",
                "--timeout", "20")
        assert r.exit_code == 9
        assert "ring corrupt" in err_line(r)
        closed = [e for e in lines(r) if e["event"] == "closed"]
        assert closed and closed[0]["reason"].startswith("corrupt")

        def crash_once_open() -> None:
            deadline = time.monotonic() + 20
            while mock.kernel_state(g).get("opencount", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            mock.fault(g, "crash")

        t = threading.Thread(target=crash_once_open)
        t.start()
        try:
            r = run("--root", str(mock.root), "enable", "echo", "--timeout", "20")
        finally:
            t.join()
        assert r.exit_code == 9
        assert "gone" in err_line(r) or "crash" in r.stderr
        assert "closed    reason: host crashed" in r.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["show", "shutdown"], ["unbind", "shutdown"], ["restore", "shutdown"],
                                  ["bind", "fcopy"]])
def test_one_shot_commands_under_mock(argv: list[str]) -> None:
    r = run("--mock", "--json", *argv)
    assert r.exit_code == 0, r.output
    keys(one(r), argv[0])


# -- demo -------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_demo_in_process_text_and_json() -> None:
    t0 = time.monotonic()
    r = run("demo")
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 < 15
    for word in ("pyvmbus demo", "reply", "hello, vmbus", "packet    DATA_INBAND", "restored", "stopped"):
        assert word in r.stdout
    r = run("--kernel", "6.10", "demo", "--json")
    assert r.exit_code == 0, r.output
    evs = lines(r)
    keys(evs[0], "demo.demo")
    assert evs[0]["kernel"] == "6.10"
    for ev in evs[1:]:
        check_event(ev, "enable")
    assert evs[-1]["why"] == "count" and evs[-1]["replies"] == 3 and evs[-1]["packets"] == 4


# -- watch ------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_watch_reports_bind_and_unbind(rw: MockVmbus) -> None:
    g = guid(rw, "fcopy")

    def churn() -> None:
        time.sleep(0.4)
        binding.bind(rw.root, g, timeout=10)
        time.sleep(0.3)  # longer than a poll interval: the snapshots see both states
        binding.restore(rw.root, g, timeout=10)

    t = threading.Thread(target=churn)
    t.start()
    try:
        r = run("--root", str(rw.root), "--json", "watch", "--poll", "--interval", "0.01", "--count", "4",
                "--timeout", "10")
    finally:
        t.join()
    assert r.exit_code == 0, r.output
    evs = lines(r)
    for ev in evs:
        check_event(ev, "watch")
    assert evs[0]["event"] == "watching" and evs[0]["source"] == "poll"
    acts = [(e["event"], e["subsystem"]) for e in evs[1:]]
    assert acts == [("add", "uio"), ("bind", "vmbus"), ("remove", "uio"), ("unbind", "vmbus")]
    assert all(e["device"] == g and e["class"] == "fcopy" for e in evs[1:])


@pytest.mark.timeout(60)
def test_watch_text_add_remove_and_timeout(rw: MockVmbus) -> None:
    added: list[str] = []

    def churn() -> None:
        time.sleep(0.3)
        added.append(str(rw.add_device("kvp")))
        time.sleep(0.2)
        rw.remove_device(added[0])

    t = threading.Thread(target=churn)
    t.start()
    try:
        r = run("--root", str(rw.root), "watch", "--timeout", "2")
    finally:
        t.join()
    assert r.exit_code == 0, r.output
    assert "watching VMBus and uio devices" in r.stdout
    assert f"add     vmbus  {added[0]}" in r.stdout and f"remove  vmbus  {added[0]}" in r.stdout
    r = run("--mock", "watch", "--timeout", "0.2")
    assert r.exit_code == 0 and r.stdout.count("\n") == 1


# -- mock serve -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_mock_serve_in_process_with_timeout(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    r = run("--json", "mock", "serve", "--root", str(root), "--device", "Echo", "--device", "heartbeat",
            "--kernel", "6.10", "--timeout", "0.3")
    assert r.exit_code == 0, r.output
    serving, stopped = lines(r)
    keys(serving, "mock.serving")
    keys(stopped, "mock.stopped")
    assert serving["root"] == str(root) and serving["kernel"] == "6.10"
    assert sorted(d["class"] for d in serving["devices"]) == ["echo", "heartbeat"]
    assert stopped["why"] == "timeout" and not root.exists()
    r = run("--kernel", "6.15", "mock", "serve", "--timeout", "0.2")
    assert r.exit_code == 0 and "kernel 6.15" in r.stdout and "--root" in r.stdout
    r = run("--root", str(root), "mock", "serve", "--timeout", "0.2", "--json")  # the global --root
    assert r.exit_code == 0 and lines(r)[0]["root"] == str(root) and not root.exists()


@pytest.mark.timeout(30)
def test_mock_serve_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("mine")
    r = run("mock", "serve", "--root", str(tmp_path))
    assert r.exit_code == 2 and "not empty" in r.stderr
    assert (tmp_path / "x").exists()
    r = run("mock", "serve", "--device", "toaster")
    assert r.exit_code == 2 and "not a device class" in r.stderr
    assert run("mock", "--help").exit_code == 0


# -- plug-ins ---------------------------------------------------------------------------------------
def test_cli_ic_plugs_in_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import click

    from pyvmbus.cli.commands import _register_plugins

    seen: list[click.Group] = []
    fake = types.ModuleType("pyvmbus.cli.ic")
    fake.register = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyvmbus.cli.ic", fake)
    group = click.Group("g")
    _register_plugins(group)
    assert seen == [group]


@pytest.mark.timeout(30)
def test_mock_integration_devices_have_hyperv_instance_guids() -> None:
    """`vmbus --mock` offers the IC devices at Hyper-V's fixed instance GUIDs, so a script
    that names /sys/bus/vmbus/devices/<guid> the way it would on Hyper-V works unchanged."""
    from pyvmbus.classes import HYPERV_INSTANCE_GUIDS

    r = run("--mock", "list", "--json")
    assert r.exit_code == 0, r.output
    by_class = {d["class"]: d["guid"] for d in one(r)["devices"]}
    ics = [c for c in by_class if c in HYPERV_INSTANCE_GUIDS]
    assert ics, by_class
    for c in ics:
        assert by_class[c] == str(HYPERV_INSTANCE_GUIDS[c])
