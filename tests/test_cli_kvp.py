"""``vmbus ic kvp`` and ``vmbus kvp get|set|delete|list`` through click's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pyvmbus.cli import main
from pyvmbus.cli.kvp import render_kvp_event
from pyvmbus.cli.schema import SCHEMAS
from pyvmbus.errors import ChannelClosed
from pyvmbus.ic.kvp_pool import pool_path
from pyvmbus.mock import MockVmbus

REC = 2560


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="vmbus", catch_exceptions=False)


def lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def read_pool(path: Path) -> list[tuple[str, str]]:
    data = path.read_bytes()
    return [(data[i : i + 512].split(b"\0")[0].decode(), data[i + 512 : i + REC].split(b"\0")[0].decode())
            for i in range(0, len(data) - REC + 1, REC)]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockVmbus]:
    with MockVmbus(devices=["kvp"]) as m:
        yield m


def wait(cond: Callable[[], bool], timeout: float = 20.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- vmbus kvp ... ---------------------------------------------------------------------------


def test_kvp_set_get_list_delete(tmp_path: Path) -> None:
    d = str(tmp_path / "pools")
    r = run("kvp", "list", "--pool-dir", d)
    assert r.exit_code == 0 and r.stdout == "" and "no records in any pool" in r.stderr
    r = run("--json", "kvp", "set", "Role", "web ☃", "--pool-dir", d)
    assert r.exit_code == 0
    (row,) = lines(r)
    assert set(row) == set(SCHEMAS["kvp.set"]) and row == {"pool": 1, "key": "Role", "value": "web ☃",
                                                           "created": True}
    assert run("kvp", "set", "Role", "db", "--pool-dir", d).stdout.strip() == "updated 'Role' in pool 1"
    assert run("kvp", "set", "HostThing", "x", "--pool", "0", "--pool-dir", d).exit_code == 0
    assert read_pool(pool_path(d, 1)) == [("Role", "db")]
    assert read_pool(pool_path(d, 0)) == [("HostThing", "x")]
    r = run("kvp", "get", "Role", "--pool-dir", d)
    assert r.exit_code == 0 and r.stdout == "db\n"
    r = run("kvp", "list", "--json", "--pool-dir", d)
    rows = lines(r)
    assert all(set(x) == set(SCHEMAS["kvp.record"]) for x in rows)
    assert rows == [{"pool": 0, "key": "HostThing", "value": "x"}, {"pool": 1, "key": "Role", "value": "db"}]
    text = run("kvp", "list", "--pool", "1", "--pool-dir", d).stdout
    assert "Role" in text and "HostThing" not in text
    r = run("--json", "kvp", "delete", "Role", "--pool-dir", d)
    assert r.exit_code == 0 and lines(r) == [{"pool": 1, "key": "Role", "deleted": True}]
    assert set(lines(r)[0]) == set(SCHEMAS["kvp.delete"])
    assert read_pool(pool_path(d, 1)) == []


def test_kvp_missing_keys_and_bad_input(tmp_path: Path) -> None:
    d = str(tmp_path)
    r = run("kvp", "get", "nope", "--pool-dir", d)
    assert r.exit_code == 1 and "no key 'nope' in any pool" in r.stderr and "Traceback" not in r.stderr
    r = run("--json", "kvp", "delete", "nope", "--pool", "3", "--pool-dir", d)
    assert r.exit_code == 1 and json.loads(r.stderr)["type"] == "KvpKeyNotFound"
    r = run("kvp", "set", "k" * 600, "v", "--pool-dir", d)
    assert r.exit_code == 2 and "at most 511" in r.stderr
    r = run("kvp", "set", "k", "v", "--pool", "5", "--pool-dir", d)
    assert r.exit_code == 2 and "--pool" in r.stderr
    assert not any(pool_path(d, n).exists() and pool_path(d, n).stat().st_size for n in range(5))


def test_kvp_unusable_pool_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = run("kvp", "set", "k", "v", "--pool-dir", str(tmp_path / "file" / "sub"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"vmbus: error: cannot use the KVP pool {tmp_path}/file/sub: Not a directory"


def test_kvp_commands_use_the_root(tmp_path: Path) -> None:
    assert run("--root", str(tmp_path), "kvp", "set", "a", "b").exit_code == 0
    assert read_pool(pool_path(tmp_path / "var/lib/hyperv", 1)) == [("a", "b")]


# -- vmbus ic kvp ------------------------------------------------------------------------------


def test_ic_kvp_serves_the_host(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("kvp")
    pools = tmp_path / "pools"
    assert run("kvp", "set", "guest-key", "hello", "--pool-dir", str(pools)).exit_code == 0
    errors: list[BaseException] = []
    first: dict[str, Any] = {}

    def host() -> None:
        try:
            def idle_ready() -> bool:
                try:
                    st = mock.command(guid, "stats")
                except ChannelClosed:
                    return False
                first.update(st)
                return bool(st["state"] == "ready" and st["idle"])

            wait(idle_ready, what="the first enumeration")
            mock.command(guid, "set", key="FromHost", value="42")
            mock.command(guid, "fault", fault="bad_utf16")
            mock.command(guid, "set_ip", adapter_id="{f8615163-df3e-46c5-913f-f2d2f965ed0e}",
                         ip_addr="10.9.9.9", sub_net="255.0.0.0")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=host, daemon=True)
    t.start()
    scripts = tmp_path / "scripts"  # helpers that must never run from a mock bus
    scripts.mkdir()
    for name in ("hv_get_dhcp_info", "hv_get_dns_info", "hv_set_ifconfig"):
        (scripts / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/RAN\n")
        (scripts / name).chmod(0o755)
    # 5 enumeration passes, the SET, the refused fault, the SET_IP_INFO.
    r = run("--root", str(mock.root), "--json", "ic", "kvp", guid, "--pool-dir", str(pools),
            "--kvp-scripts", str(scripts), "--count", "8", "--timeout", "60")
    t.join(20)
    assert not errors and r.exit_code == 0, r.stderr
    evs = lines(r)
    for ev in evs:
        name = f"ic.{ev['service']}.summary" if ev["event"] == "summary" else f"ic.{ev['event']}"
        assert set(ev) == set(SCHEMAS[name]), name
    kvp = [e for e in evs if e["event"] == "kvp"]
    assert [e["kind"] for e in kvp] == ["enumerated"] * 5 + ["set", "refused", "ip_set"]
    assert kvp[7]["status"] == "HV_GUID_NOTFOUND" and kvp[7]["pool"] is None
    assert not (tmp_path / "RAN").exists()
    assert [e["count"] for e in kvp[:5]] == [0, 1, 10, 0, 0]
    assert kvp[5]["key"] == "FromHost" and kvp[5]["status"] == "HV_S_OK" and kvp[5]["pool"] == 0
    assert kvp[6]["status"] == "HV_INVALIDARG" and "UTF-16" in kvp[6]["reason"]
    summary = evs[-1]
    assert summary["service"] == "kvp" and summary["sets"] == 2 and summary["refused"] == 1
    assert read_pool(pool_path(pools, 0)) == [("FromHost", "42")]
    assert first["errors"] == [] and first["enumerations"][1] == [("guest-key", "hello")]
    texts = [render_kvp_event(e) for e in kvp]
    assert "set        pool 0 'FromHost' = '42' -> HV_S_OK" in texts[5]
    assert "refused    SET pool 0" in texts[6]


def test_ic_kvp_refuses_pools_a_daemon_owns(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("kvp")
    pools = tmp_path / "pools"
    pools.mkdir()
    pool_path(pools, 0).write_bytes(b"")
    script = textwrap.dedent(f"""
        import ctypes, time
        ctypes.CDLL(None).prctl(15, b"hypervkvpd", 0, 0, 0)
        f = open({str(pool_path(pools, 0))!r}, "rb")
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        r = run("--root", str(mock.root), "ic", "kvp", guid, "--pool-dir", str(pools), "--timeout", "5")
    finally:
        p.kill()
        p.wait(timeout=10)
    assert r.exit_code == 1
    assert f"hypervkvpd (pid {p.pid}) is running and owns the KVP pools" in r.stderr
    assert "Traceback" not in r.stderr


def test_systemd_unit_runs_the_command_and_conflicts_with_the_c_daemon() -> None:
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "pyvmbus-kvp.service").read_text()
    keys: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            keys.setdefault(k, []).append(v)
    (exec_start,) = keys["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == "vmbus" and argv[1:3] == ["ic", "kvp"]
    assert run(*argv[1:], "--help").exit_code == 0  # every option it passes exists
    assert set(keys["Conflicts"][0].split()) >= {"hv-kvp-daemon.service", "hypervkvpd.service"}
    assert keys["StateDirectory"] == ["hyperv"] and keys["ProtectSystem"] == ["strict"]
    families = keys["RestrictAddressFamilies"][0].split()
    assert {"AF_NETLINK", "AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
