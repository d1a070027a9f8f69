"""KVP (Data Exchange): wire layouts, the hv_kvp_daemon pool files, the service through the
host model in-process and through the mock, every operation and every fault.

Golden bytes and the pool-file reader here are written from include/uapi/linux/hyperv.h and
the format description of tools/hv/hv_kvp_daemon.c (struct kvp_record: char key[512], char
value[2048], UTF-8 C strings, records back to back, no header), never from pyvmbus code.
"""

from __future__ import annotations

import fcntl
import os
import platform
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmbus.ic import SERVICES, KvpEvent, KvpService
from pyvmbus.ic import messages as m
from pyvmbus.ic.kvp_pool import (
    KvpDaemonRunning,
    KvpPoolError,
    KvpPoolFile,
    KvpPools,
    KvpPoolUnavailable,
    check_no_daemon,
    pool_path,
)
from pyvmbus.ic.kvp_system import INTRINSIC_KEYS, IfAddress, KvpNetwork, SystemInfo, parse_os_release
from pyvmbus.ic.messages import (
    HV_E_FAIL,
    HV_ERROR_NOT_SUPPORTED,
    HV_GUID_NOTFOUND,
    HV_INVALIDARG,
    HV_S_CONT,
    HV_S_OK,
    KvpDelete,
    KvpEnumerate,
    KvpExchange,
    KvpHdr,
    KvpIpAddrValue,
    KvpIpMsg,
    KvpOp,
    KvpValue,
    RegType,
)
from pyvmbus.ic.runner import IcRunner
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.ic_models import HostState, pump
from pyvmbus.mock.kvp_model import FAULTS, KvpHost


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# --- an independent reader and writer of the pool format ----------------------------------

REC = 512 + 2048


def read_pool_file(path: Path) -> list[tuple[str, str]]:
    """struct kvp_record {char key[512]; char value[2048];} back to back; C strings in UTF-8."""
    data = path.read_bytes()
    out = []
    for i in range(len(data) // REC):
        rec = data[i * REC : (i + 1) * REC]
        key, value = rec[:512], rec[512:]
        assert b"\0" in key and b"\0" in value, f"record {i} is not NUL-terminated"
        out.append((key.split(b"\0", 1)[0].decode("utf-8"), value.split(b"\0", 1)[0].decode("utf-8")))
    return out


def c_record(key: str, value: str, garbage: bytes = b"") -> bytes:
    """A record as the C daemon leaves it: NUL after the string, maybe stale bytes after that."""
    k = key.encode() + b"\0"
    v = value.encode() + b"\0" + garbage
    return k.ljust(512, b"\0") + v.ljust(2048, b"\0")[:2048]


# --- fixtures ---------------------------------------------------------------------------------

FAKE_UNAME = platform.uname_result("Linux", "guest", "6.8.0-45-generic", "#1", "x86_64")


def fake_addresses() -> list[IfAddress]:
    return [
        IfAddress("lo", socket.AF_INET, "127.0.0.1", "255.0.0.0", loopback=True),
        IfAddress("eth0", socket.AF_INET, "10.0.0.4", "255.255.255.0"),
        IfAddress("eth0", socket.AF_INET6, "fe80::215:5dff:fe01:203", "ffff:ffff:ffff:ffff::"),
        IfAddress("eth1", socket.AF_INET, "192.168.7.9", "255.255.0.0"),
    ]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A fake / with os-release and two NICs in /sys/class/net."""
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc/os-release").write_text('# c\nNAME="Ubuntu"\nVERSION_ID="24.04"\nPRETTY_NAME="x \\"y\\""\n')
    for name, mac, dev in (("eth0", "00:15:5d:01:02:03", "{f8615163-df3e-46c5-913f-f2d2f965ed0e}"),
                           ("eth1", "00:15:5d:0a:0b:0c", "{aaaaaaaa-df3e-46c5-913f-f2d2f965ed0e}")):
        d = r / "sys/class/net" / name
        (d / "device").mkdir(parents=True)
        (d / "address").write_text(mac + "\n")
        (d / "device/device_id").write_text(dev + "\n")
    proc = r / "proc/net"
    proc.mkdir(parents=True)
    (proc / "route").write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n")
    (proc / "ipv6_route").write_text(
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n")
    return r


@pytest.fixture()
def scripts(tmp_path: Path) -> Path:
    d = tmp_path / "scripts"
    d.mkdir()
    log = tmp_path / "set_ifconfig.log"
    for name, body in (
        ("hv_get_dns_info", 'echo 10.0.0.53\necho 10.0.0.54\n'),
        ("hv_get_dhcp_info", 'echo "Enabled"\n'),
        ("hv_set_ifconfig", f'echo "$@" >> {log}\ncat "$1" "$2" >> {log}\n'),
    ):
        p = d / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(0o755)
    return d


def make_service(tmp_path: Path, root: Path, scripts: Path | None, events: list[KvpEvent] | None = None,
                 ) -> KvpService:
    pools = KvpPools(tmp_path / "pools")
    system = SystemInfo(root, fqdn="guest.example.com", uname=FAKE_UNAME, addresses=fake_addresses)
    net = KvpNetwork(scripts_dir=scripts, path="" if scripts is None else None, root=root,
                     config_dir=tmp_path / "pools", proc=root / "proc", addresses=fake_addresses)
    if scripts is None:
        net.scripts = dict.fromkeys(net.scripts)  # none on this machine either
    return KvpService(pools, system=system, network=net, on_event=None if events is None else events.append)


@pytest.fixture()
def svc(tmp_path: Path, root: Path, scripts: Path) -> Iterator[KvpService]:
    s = make_service(tmp_path, root, scripts)
    yield s
    s.close_pools()


def run(host: KvpHost, service: KvpService) -> None:
    pump(host, service)
    assert host.idle
    assert host.stats.errors == []


# --- wire layouts -----------------------------------------------------------------------------


def test_kvp_constants_and_sizes() -> None:
    assert (m.HV_KVP_EXCHANGE_MAX_KEY_SIZE, m.HV_KVP_EXCHANGE_MAX_VALUE_SIZE) == (512, 2048)
    assert [int(o) for o in KvpOp] == [0, 1, 2, 3, 4, 5]
    assert [int(p) for p in m.KvpPoolId] == [0, 1, 2, 3, 4]
    assert (RegType.REG_SZ, RegType.REG_U32, RegType.REG_U64) == (1, 4, 8)
    assert m.KVP_VERSIONS == (0x40000, 0x30000, 0x10000)
    assert (m.MAX_ADAPTER_ID_SIZE, m.MAX_IP_ADDR_SIZE, m.MAX_GATEWAY_SIZE) == (128, 1024, 512)
    assert KvpHdr.STRUCT.size == KvpHdr.SIZE == 4
    assert KvpValue.STRUCT.size == KvpValue.SIZE == 2572
    assert KvpExchange.SIZE == 2576 and KvpEnumerate.SIZE == 2580 and KvpDelete.SIZE == 520
    assert m.KvpIpAddrValue.STRUCT.size == 7426 and KvpIpMsg.SIZE == 7428
    assert m.HV_KVP_MSG_SIZE == 7430
    assert SERVICES["kvp"] is KvpService


def test_kvp_hdr_and_value_golden() -> None:
    assert KvpHdr(3, 2).pack() == h("03 02 0000")
    v = KvpValue.text("ab", "c")
    raw = v.pack()
    # value_type 1 @0, key_size 6 @4 ("ab" + NUL in UTF-16), value_size 4 @8, key @12, value @524.
    assert raw[:12] == h("01000000 06000000 04000000")
    assert raw[12:18] == h("6100 6200 0000") and raw[18:524] == bytes(506)
    assert raw[524:528] == h("6300 0000") and raw[528:] == bytes(2044)
    u32 = KvpValue.text("k", 0xDEADBEEF, RegType.REG_U32).pack()
    assert u32[:12] == h("04000000 04000000 04000000") and u32[524:528] == h("efbeadde")
    u64 = KvpValue.text("k", 1 << 40, RegType.REG_U64).pack()
    assert u64[:12] == h("08000000 04000000 08000000") and u64[524:532] == h("0000000000010000")


def test_kvp_message_offsets_golden() -> None:
    ex = KvpExchange(KvpHdr(KvpOp.SET, 0), KvpValue.text("K", "V")).pack()
    # hdr @0; value_type @4, key_size @8, value_size @12, key @16, value @528 (body offsets).
    assert ex[:16] == h("01 00 0000 01000000 04000000 04000000")
    assert ex[16:20] == h("4b00 0000") and ex[528:532] == h("5600 0000")
    en = KvpEnumerate(KvpHdr(KvpOp.ENUMERATE, 2), 7).pack()
    assert en[:8] == h("03 02 0000 07000000") and len(en) == 2580
    de = KvpDelete.text(1, "K").pack()
    assert de[:12] == h("02 01 0000 04000000 4b000000") and len(de) == 520
    ip = KvpIpMsg(KvpOp.GET_IP_INFO, 0, KvpIpAddrValue("A", 3, 1, "1", "2", "3", "4")).pack()
    # operation @0, pool @1, adapter_id @2, addr_family @258, dhcp @259, ip @260, subnet @2308,
    # gateway @4356, dns @5380 (no pad after the two header bytes).
    assert ip[:4] == h("04 00 4100") and ip[258:260] == h("03 01")
    assert (ip[260:262], ip[2308:2310], ip[4356:4358], ip[5380:5382]) == (b"1\0", b"2\0", b"3\0", b"4\0")
    assert KvpIpMsg.unpack_from(ip, 0).value.dns_addr == "4"


def test_whole_kvp_message_and_answer_offsets(svc: KvpService) -> None:
    """A host ENUMERATE of pool 2, index 5 (OSName), as bytes on the wire, and where the
    guest's answer puts the key and value (28 + 8 + 12 = 48 and 28 + 8 + 524 = 560)."""
    body = KvpEnumerate(KvpHdr(KvpOp.ENUMERATE, 2), 5).pack()
    msg = m.build_message(m.IcMsgType.KVPEXCHANGE, body, framework_version=0x30000,
                          message_version=0x40000, transaction_id=3)
    assert msg[:36] == h(
        "01000000 280a0000"  # pipe: flags 1, msgsize 20 + 2580 (0xa28)
        "0300 0000 0200 0400 0000 140a 00000000 03 03 0000"  # 3.0, type 2, 4.0, 2580, ok, tid 3, T|R
        "03 02 0000 05000000")  # ENUMERATE, pool 2, pad, index 5
    resp = svc.handle(msg)
    assert resp is not None and len(resp) == len(msg)
    assert resp[20:24] == h("00000000") and resp[25] == 5  # status HV_S_OK, icflags T|RESP
    assert resp[36:40] == h("01000000")  # value_type REG_SZ
    assert resp[40:44] == KvpValue.U32.pack(2 * (len("OSName") + 1))  # key_size with the NUL
    assert resp[48 : 48 + 14] == "OSName\0".encode("utf-16-le")
    value = "Ubuntu\0".encode("utf-16-le")
    assert resp[44:48] == KvpValue.U32.pack(len(value)) and resp[560 : 560 + len(value)] == value


# --- the pool files ------------------------------------------------------------------------------


def test_pool_files_read_back_by_an_independent_reader(tmp_path: Path) -> None:
    with KvpPools(tmp_path) as pools:
        for n in range(5):
            assert pool_path(tmp_path, n).exists()
            assert oct(os.stat(pool_path(tmp_path, n)).st_mode & 0o777) == "0o644"
        assert pools.set(0, "alpha", "1") is True
        assert pools.set(0, "βeta", "ünïcode ☃") is True
        assert pools.set(0, "alpha", "2") is False  # modify in place, keeps its slot
        assert pools.set(1, "k" * 511, "v" * 2047)
        assert pools.delete(0, "nope") is False
    assert read_pool_file(pool_path(tmp_path, 0)) == [("alpha", "2"), ("βeta", "ünïcode ☃")]
    assert os.path.getsize(pool_path(tmp_path, 0)) == 2 * 2560
    assert read_pool_file(pool_path(tmp_path, 1)) == [("k" * 511, "v" * 2047)]
    raw = pool_path(tmp_path, 0).read_bytes()
    assert raw[: len(b"alpha\0")] == b"alpha\0" and raw[512:514] == b"2\0"


def test_pool_limits_are_clear_errors(tmp_path: Path) -> None:
    with KvpPools(tmp_path) as pools:
        with pytest.raises(KvpPoolError, match="at most 511"):
            pools.set(0, "k" * 512, "v")
        with pytest.raises(KvpPoolError, match="at most 2047"):
            pools.set(0, "k", "é" * 1024)
        with pytest.raises(KvpPoolError, match="empty"):
            pools.set(0, "", "v")
        with pytest.raises(KvpPoolError, match="pool 5 does not exist"):
            pools.set(5, "k", "v")
        assert pools.records(0) == []


def test_files_written_by_another_process_are_picked_up(tmp_path: Path) -> None:
    pools = KvpPools(tmp_path)
    pools.set(0, "mine", "1")
    assert [r.key_text for r in pools.records(0)] == ["mine"]
    # Another process rewrites the pool the C daemon's way (fcntl write lock, truncate,
    # write, stale bytes after the NULs), and cloud-init appends to pool 1 under flock.
    script = textwrap.dedent(f"""
        import fcntl, os
        def rec(k, v, junk=b""):
            return (k + b"\\0").ljust(512, b"\\0") + (v + b"\\0" + junk).ljust(2048, b"\\0")
        fd = os.open({str(pool_path(tmp_path, 0))!r}, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, rec(b"mine", b"2", b"STALE") + rec(b"theirs", b"x"), 0)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        with open({str(pool_path(tmp_path, 1))!r}, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(rec(b"CLOUD_INIT|1|start", b'{{"msg":"hi"}}'))
            fcntl.flock(f, fcntl.LOCK_UN)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert [(r.key_text, r.value_text) for r in pools.records(0)] == [("mine", "2"), ("theirs", "x")]
    assert pools.get(0, "theirs") == b"x"
    assert [(r.key_text, r.value_text) for r in pools.records(1)] == [("CLOUD_INIT|1|start", '{"msg":"hi"}')]
    # A trailing partial record (a writer caught mid-way without locking) is ignored.
    with open(pool_path(tmp_path, 0), "ab") as f:
        f.write(b"half")
    assert len(pools.records(0)) == 2
    pools.set(0, "new", "y")
    assert read_pool_file(pool_path(tmp_path, 0)) == [("mine", "2"), ("theirs", "x"), ("new", "y")]
    pools.close()


def test_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    path = pool_path(tmp_path, 0)
    path.write_bytes(c_record("a", "1"))
    old = time.time() - 10
    os.utime(path, (old, old))  # ctime stays now: the first read cannot be trusted yet
    f = KvpPoolFile(path)
    f.records()
    f.records()
    assert f.reads == 2
    time.sleep(1.1)  # now the ctime lies more than a second back: one more read, then trusted
    f.records()
    assert f.records() == f.records() and f.reads == 3
    with open(path, "r+b") as g:  # a change: seen at once
        g.write(b"b")
    assert [r.key_text for r in f.records()] == ["b"] and f.reads == 4
    f.close()


_WRITER = textwrap.dedent("""
    import sys
    from pyvmbus.ic.kvp_pool import KvpPools
    pool_dir, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pools = KvpPools(pool_dir, check_daemon=False)
    for i in range(count):
        pools.set(1, f"{tag}-{i % 40}", f"{tag} value {i} " + "x" * (i % 300))
        if i % 7 == 0:
            pools.set(1, "shared", f"{tag}:{i}")
        if i % 11 == 0:
            pools.delete(1, f"{tag}-{(i * 3) % 40}")
    pools.set(1, f"{tag}-done", str(count))
""")


def test_two_processes_thousands_of_updates_never_corrupt_a_pool(tmp_path: Path) -> None:
    count = 2500
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag, str(count)])
             for tag in ("A", "B")]
    # A third party reads (daemon-style fcntl lock) all along and must always see whole records.
    path = pool_path(tmp_path, 1)
    deadline = time.monotonic() + 100
    reads = 0
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers did not finish"
        if path.exists():
            with open(path, "rb") as f:
                fcntl.lockf(f, fcntl.LOCK_SH)
                data = f.read()
                fcntl.lockf(f, fcntl.LOCK_UN)
            assert len(data) % REC == 0
            reads += 1
        time.sleep(0.005)
    assert [p.wait(timeout=10) for p in procs] == [0, 0]
    records = read_pool_file(path)
    keys = [k for k, _ in records]
    assert len(keys) == len(set(keys)), "a key appears twice"
    final = dict(records)
    # Each tag's keys have one writer, so their end state is known exactly: replay it.
    expected: dict[str, str] = {}
    for tag in ("A", "B"):
        for i in range(count):
            expected[f"{tag}-{i % 40}"] = f"{tag} value {i} " + "x" * (i % 300)
            if i % 11 == 0:
                expected.pop(f"{tag}-{(i * 3) % 40}", None)
        expected[f"{tag}-done"] = str(count)
    shared = final.pop("shared")
    last_shared = max(i for i in range(count) if i % 7 == 0)
    assert shared in (f"A:{last_shared}", f"B:{last_shared}")
    assert final == expected
    assert reads > 0


_DAEMON_STYLE = textwrap.dedent("""
    # hv_kvp_daemon's way, fcntl lock only: read the pool, change one record, truncate, write.
    import fcntl, os, sys
    path, count = sys.argv[1], int(sys.argv[2])
    def rec(k, v):
        return (k + b"\\0").ljust(512, b"\\0") + (v + b"\\0").ljust(2048, b"\\0")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for i in range(count):
        fcntl.lockf(fd, fcntl.LOCK_EX)
        data = os.pread(fd, 1 << 24, 0)
        recs = [data[j : j + 2560] for j in range(0, len(data) - 2559, 2560)]
        key = b"D-%d" % (i % 20)
        new = rec(key, b"D value %d" % i)
        for j, r in enumerate(recs):
            if r[:512].split(b"\\0")[0] == key:
                recs[j] = new
                break
        else:
            recs.append(new)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"".join(recs), 0)
        fcntl.lockf(fd, fcntl.LOCK_UN)
""")

_CLOUD_INIT_STYLE = textwrap.dedent("""
    # cloud-init's KVP reporter: append records under flock only.
    import fcntl, sys
    path, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        with open(path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write((b"C-%d" % i).ljust(512, b"\\0") + (b"C value %d" % i).ljust(2048, b"\\0"))
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
""")


@pytest.mark.parametrize("other", ["hv_kvp_daemon", "cloud-init"])
def test_concurrent_with_the_daemons_and_cloud_inits_writers(tmp_path: Path, other: str) -> None:
    count = 1500
    theirs = 400
    script = _DAEMON_STYLE if other == "hv_kvp_daemon" else _CLOUD_INIT_STYLE
    path = pool_path(tmp_path, 1)
    path.write_bytes(b"")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "P", str(count)]),
             subprocess.Popen([sys.executable, "-c", script, str(path), str(theirs)])]
    assert [p.wait(timeout=100) for p in procs] == [0, 0]
    records = read_pool_file(path)
    final = dict(records)
    assert len(final) == len(records), "a key appears twice"
    expected: dict[str, str] = {}
    for i in range(count):
        expected[f"P-{i % 40}"] = f"P value {i} " + "x" * (i % 300)
        if i % 11 == 0:
            expected.pop(f"P-{(i * 3) % 40}", None)
    expected["P-done"] = str(count)
    last_shared = max(i for i in range(count) if i % 7 == 0)
    expected["shared"] = f"P:{last_shared}"
    if other == "hv_kvp_daemon":
        for i in range(theirs):
            expected[f"D-{i % 20}"] = f"D value {i}"
    else:
        for i in range(theirs):
            expected[f"C-{i}"] = f"C value {i}"
    assert final == expected


def test_refuses_pools_a_running_daemon_holds(tmp_path: Path) -> None:
    pool_path(tmp_path, 0).write_bytes(b"")
    script = textwrap.dedent(f"""
        import ctypes, sys, time
        ctypes.CDLL(None).prctl(15, b"hv_kvp_daemon", 0, 0, 0)
        f = open({str(pool_path(tmp_path, 0))!r}, "rb")
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        with pytest.raises(KvpDaemonRunning, match=r"hv_kvp_daemon \(pid \d+\) is running") as ei:
            KvpPools(tmp_path)
        assert ei.value.pid == p.pid
        check_no_daemon(tmp_path / "elsewhere")  # other pools: fine
    finally:
        p.kill()
        p.wait(timeout=10)
    KvpPools(tmp_path).close()


# --- intrinsic values -------------------------------------------------------------------------


def test_intrinsic_values_from_the_running_system() -> None:
    info = SystemInfo()
    values = dict(info.intrinsics())
    assert [k for k, _ in info.intrinsics()] == list(INTRINSIC_KEYS)
    un = os.uname()
    assert values["OSBuildNumber"] == un.release
    assert values["OSVersion"] == un.release.split("-")[0]
    assert values["ProcessorArchitecture"] == un.machine
    assert values["IntegrationServicesVersion"] == "3.1"
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        text = None
    if text is not None:  # independent reading of NAME= / VERSION_ID=
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
        assert values["OSName"] == fields.get("NAME", un.sysname).strip().strip('"')
        assert values["OSMajorVersion"] == fields.get("VERSION_ID", "").strip().strip('"')
    canon = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM, 0,
                               socket.AI_CANONNAME)[0][3]
    assert values["FullyQualifiedDomainName"] == canon
    for fam, key in ((socket.AF_INET, "NetworkAddressIPv4"), (socket.AF_INET6, "NetworkAddressIPv6")):
        for addr in filter(None, values[key].split(";")):
            socket.inet_pton(fam, addr)
            assert addr not in ("127.0.0.1", "::1")


def test_os_release_parsing_as_the_daemon() -> None:
    assert parse_os_release('NAME="Fedora Linux"\n#NAME=x\nVERSION_ID=40\nX=a\\"b\'c\n') == {
        "NAME": "Fedora Linux", "VERSION_ID": "40", "X": 'a"bc'}


def test_fake_system(root: Path) -> None:
    info = SystemInfo(root, fqdn="g", uname=FAKE_UNAME, addresses=fake_addresses)
    assert dict(info.intrinsics()) == {
        "FullyQualifiedDomainName": "g", "IntegrationServicesVersion": "3.1",
        "NetworkAddressIPv4": "10.0.0.4;192.168.7.9", "NetworkAddressIPv6": "fe80::215:5dff:fe01:203",
        "OSBuildNumber": "6.8.0-45-generic", "OSName": "Ubuntu", "OSMajorVersion": "24.04",
        "OSMinorVersion": "", "OSVersion": "6.8.0", "ProcessorArchitecture": "x86_64"}


# --- the service, in-process against the host model -----------------------------------------


def test_negotiates_and_enumerates_every_pool(svc: KvpService, tmp_path: Path) -> None:
    svc.pools.set(1, "guest-key", "guest value")
    host = KvpHost()
    run(host, svc)
    assert host.state is HostState.READY
    assert (host.framework_version, host.service_version) == (0x30000, 0x40000)
    assert host.enumerations[1] == [("guest-key", "guest value")]
    assert host.enumerations[0] == host.enumerations[3] == host.enumerations[4] == []
    assert host.enumerations[2] == svc.system.intrinsics()
    # The auto pool's file holds what the host read, for tools that read the pools.
    assert read_pool_file(pool_path(tmp_path / "pools", 2)) == svc.system.intrinsics()
    done = [r for r in host.results if r["op"] == "ENUMERATE" and r["status"] != HV_S_OK]
    assert {r["status"] for r in done} == {HV_S_CONT} and len(done) == 5


def test_set_get_delete_in_pool_0(svc: KvpService, tmp_path: Path) -> None:
    events: list[KvpEvent] = []
    svc.on_event = events.append
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.set("VmRole", "web ☃ 𝄞")
    host.set("Count", 4294967295, value_type=RegType.REG_U32)
    host.set("Big", 1 << 63, value_type=RegType.REG_U64)
    host.get("VmRole")
    host.get("Missing")
    host.delete("Count")
    host.delete("Count")
    host.enumerate(0)
    run(host, svc)
    st = [(r["op"], r["status"]) for r in host.results]
    assert st == [("SET", 0), ("SET", 0), ("SET", 0), ("GET", 0), ("GET", HV_S_CONT), ("DELETE", 0),
                  ("DELETE", HV_S_CONT), ("ENUMERATE", 0), ("ENUMERATE", 0), ("ENUMERATE", HV_S_CONT)]
    assert host.results[3]["value"] == "web ☃ 𝄞" and host.results[3]["value_type"] == RegType.REG_SZ
    assert read_pool_file(pool_path(tmp_path / "pools", 0)) == [("VmRole", "web ☃ 𝄞"),
                                                                ("Big", str(1 << 63))]
    assert host.enumerations[0] == [("VmRole", "web ☃ 𝄞"), ("Big", "9223372036854775808")]
    kinds = [e.kind for e in events]
    assert kinds == ["set", "set", "set", "get", "missing", "deleted", "missing", "enumerated"]
    assert events[1].value == "4294967295" and "set: SET pool 0 'VmRole'" in str(events[0])


@pytest.mark.parametrize("fault", FAULTS)
def test_faults_get_the_expected_status_and_change_nothing(svc: KvpService, tmp_path: Path,
                                                           fault: str) -> None:
    svc.pools.set(0, "keep", "me")
    before = [pool_path(tmp_path / "pools", n).read_bytes() for n in range(5)]
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.fault(fault)
    run(host, svc)
    expected = HV_ERROR_NOT_SUPPORTED if fault == "unknown_op" else HV_INVALIDARG
    assert host.results[-1]["status"] == expected, host.results[-1]
    assert [pool_path(tmp_path / "pools", n).read_bytes() for n in range(5)] == before
    assert svc.ops["refused"] == 1 and svc.last_event is not None and svc.last_event.kind == "refused"
    assert svc.stats.errors == 0


def test_unknown_pool_for_every_pool_operation(svc: KvpService) -> None:
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.get("k", pool=5)
    host.delete("k", pool=200)
    host.enumerate(9)
    run(host, svc)
    assert [r["status"] for r in host.results] == [HV_INVALIDARG] * 3


def test_long_values_are_cut_for_the_host_like_the_kernel(svc: KvpService) -> None:
    svc.pools.set(1, "k" * 300, "v" * 1500)
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.enumerate(1)
    run(host, svc)
    ((key, value),) = host.enumerations[1]
    assert key == "k" * 254 and value == "v" * 1022


def test_other_message_types_and_short_messages(svc: KvpService) -> None:
    assert svc.handle(m.build_message(m.IcMsgType.HEARTBEAT, bytes(40))) is not None  # framework: E_FAIL
    short = m.build_message(m.IcMsgType.KVPEXCHANGE, b"\x01")
    resp = svc.handle(short)
    assert resp is not None and m.IcMsgHdr.unpack_from(resp).status == HV_INVALIDARG


# --- IP injection ---------------------------------------------------------------------------


def test_get_ip_info_through_the_helper_scripts(svc: KvpService) -> None:
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.get_ip("00:15:5D:01:02:03")
    host.get_ip("00:15:5D:FF:FF:FF")
    run(host, svc)
    ok, missing = host.results
    assert ok["status"] == HV_S_OK
    assert ok["ip_addr"] == "10.0.0.4;fe80::215:5dff:fe01:203"
    assert ok["sub_net"] == "255.255.255.0;/64"
    assert ok["addr_family"] == 3 and ok["dhcp_enabled"] == 1
    assert ok["dns_addr"] == "10.0.0.53;10.0.0.54;"
    assert ok["gate_way"] == "10.0.0.1;fe80::1;"
    assert missing["status"] == HV_E_FAIL


def test_set_ip_info_writes_the_files_and_runs_hv_set_ifconfig(svc: KvpService, tmp_path: Path) -> None:
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.set_ip(KvpIpAddrValue("{f8615163-df3e-46c5-913f-f2d2f965ed0e}", 3, 0,
                               "10.0.0.9;2001:db8::9", "255.255.255.0;64", "10.0.0.1", "8.8.8.8;1.1.1.1"))
    host.set_ip(KvpIpAddrValue("{00000000-0000-0000-0000-000000000000}", 1, 0, "10.0.0.9", "255.0.0.0"))
    host.set_ip(KvpIpAddrValue("{f8615163-df3e-46c5-913f-f2d2f965ed0e}", 1, 0, "not-an-ip", "255.0.0.0"))
    run(host, svc)
    assert [r["status"] for r in host.results] == [HV_S_OK, HV_GUID_NOTFOUND, HV_INVALIDARG]
    log = (tmp_path / "set_ifconfig.log").read_text()
    pools = tmp_path / "pools"
    assert f"{pools}/ifcfg-eth0 {pools}/eth0.nmconnection" in log
    ifcfg = (pools / "ifcfg-eth0").read_text()
    for line in ("HWADDR=00:15:5D:01:02:03", "DEVICE=eth0", "BOOTPROTO=none", "IPADDR0=10.0.0.9",
                 "IPV6ADDR=2001:0db8:0000:0000:0000:0000:0000:0009", "NETMASK0=255.255.255.0",
                 "IPV6NETMASK=64", "GATEWAY=10.0.0.1", "DNS1=8.8.8.8", "DNS2=1.1.1.1"):
        assert line in ifcfg.splitlines(), line
    nm = (pools / "eth0.nmconnection").read_text()
    for line in ("interface-name=eth0", "mac-address=00:15:5D:01:02:03", "address1=10.0.0.9/24",
                 "method=manual", "gateway=10.0.0.1", "dns=8.8.8.8,1.1.1.1", "address1=2001:db8::9/64"):
        assert line in nm.splitlines(), line
    assert log.count("ifcfg-eth0 ") == 1  # the refused ones ran nothing


def test_ip_injection_without_the_helper_scripts(tmp_path: Path, root: Path) -> None:
    svc = make_service(tmp_path, root, None)
    host = KvpHost(enumerate_on_ready=False)
    run(host, svc)
    host.get_ip("00:15:5D:01:02:03")
    host.set_ip(KvpIpAddrValue("{f8615163-df3e-46c5-913f-f2d2f965ed0e}", 1, 1))
    run(host, svc)
    assert [r["status"] for r in host.results] == [HV_ERROR_NOT_SUPPORTED, HV_ERROR_NOT_SUPPORTED]
    assert not (tmp_path / "pools" / "ifcfg-eth0").exists()
    svc.close_pools()


def test_value_struct_roundtrip() -> None:
    v = KvpValue.text("key", "value")
    assert KvpValue.unpack_from(v.pack()) == v
    assert (v.key_text, v.value_text) == ("key", "value")
    assert struct.calcsize("<III512s2048s") == KvpValue.SIZE


# --- through the mock: MockVmbus.add_device("kvp") and the runner ------------------------------


@pytest.mark.timeout(90)
def test_kvp_through_the_mock_and_the_runner(tmp_path: Path, root: Path, scripts: Path) -> None:
    svc = make_service(tmp_path, root, scripts)
    svc.pools.set(1, "from-guest", "hello")
    with MockVmbus() as mock:
        guid = mock.add_device("kvp")
        stop = threading.Event()
        runner = IcRunner(mock.root, guid, svc, stop_event=stop)
        t = threading.Thread(target=runner.run, kwargs={"timeout": 60}, daemon=True)
        t.start()

        def stats() -> dict[str, object]:
            deadline = time.monotonic() + 30
            while True:
                try:
                    st = mock.command(guid, "stats")
                    if st["state"] == "ready" and st["idle"]:
                        return dict(st)
                except Exception:
                    pass
                assert time.monotonic() < deadline, "the KVP host did not finish"
                time.sleep(0.05)

        st = stats()
        assert st["passes"] == 5 and st["errors"] == []
        enums = st["enumerations"]
        assert isinstance(enums, dict) and enums[1] == [("from-guest", "hello")]
        assert [k for k, _ in enums[2]] == list(INTRINSIC_KEYS)
        mock.command(guid, "set", key="HostKey", value="pushed")
        mock.command(guid, "get", key="HostKey")
        mock.command(guid, "fault", fault="unknown_pool")
        mock.command(guid, "delete", key="nothing")
        st = stats()
        results = st["results"]
        assert isinstance(results, list)
        assert [(r["op"], r["status"]) for r in results[-4:]] == [
            ("SET", HV_S_OK), ("GET", HV_S_OK), ("fault:unknown_pool", HV_INVALIDARG), ("DELETE", HV_S_CONT)]
        assert results[-3]["value"] == "pushed"
        assert read_pool_file(pool_path(tmp_path / "pools", 0)) == [("HostKey", "pushed")]
        # A rescind and re-offer: the runner waits, binds and enables again, the new host
        # negotiates and enumerates again, and finds what the old one set.
        mock.rescind(guid)
        deadline = time.monotonic() + 20
        while runner.result.rescinds < 1:
            assert time.monotonic() < deadline, "the runner did not see the rescind"
            time.sleep(0.05)
        mock.reoffer(guid)
        deadline = time.monotonic() + 20
        while runner.result.enables < 2:
            assert time.monotonic() < deadline, "the runner did not enable again"
            time.sleep(0.05)
        st = stats()
        enums = st["enumerations"]
        assert isinstance(enums, dict) and enums[0] == [("HostKey", "pushed")] and st["errors"] == []
        stop.set()
        t.join(30)
        assert not t.is_alive()
    assert runner.result.answered >= 20 and runner.result.why == "stopped"
    assert runner.result.rescinds == 1 and runner.result.enables == 2
    svc.close_pools()


def test_a_pool_file_replaced_or_removed_is_reopened(tmp_path: Path) -> None:
    pools = KvpPools(tmp_path)
    pools.set(0, "a", "1")
    new = tmp_path / "new"
    new.write_bytes(c_record("b", "2"))
    os.replace(new, pool_path(tmp_path, 0))  # a tool renamed a new file over the pool
    assert [r.key_text for r in pools.records(0)] == ["b"]
    pools.set(0, "c", "3")
    assert read_pool_file(pool_path(tmp_path, 0)) == [("b", "2"), ("c", "3")]
    os.unlink(pool_path(tmp_path, 0))
    assert pools.records(0) == []
    pools.set(0, "d", "4")
    assert read_pool_file(pool_path(tmp_path, 0)) == [("d", "4")]
    assert pools.pool(0).reopens == 2
    pools.close()


def test_auto_pool_file_keeps_other_records(svc: KvpService, tmp_path: Path) -> None:
    svc.pools.set(2, "SomethingElse", "kept")
    host = KvpHost()
    run(host, svc)
    assert read_pool_file(pool_path(tmp_path / "pools", 2)) == [("SomethingElse", "kept"),
                                                                *svc.system.intrinsics()]
    assert host.enumerations[2] == svc.system.intrinsics()  # the host sees the intrinsic values


def test_read_only_pools_of_another_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pools owned by root, 0644, read by another user (``vmbus kvp list`` as a user): the
    read-write open is refused, so the pool is read through a read-only descriptor."""
    with KvpPools(tmp_path) as pools:
        pools.set(1, "k", "v")
    real_open = os.open

    def as_other_user(path: object, flags: int, *args: object) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("pyvmbus.ic.kvp_pool.os.open", as_other_user)
    with KvpPools(tmp_path, create=False, check_daemon=False) as pools:
        assert pools.get(1, "k") == b"v" and [r.key for r in pools.records(1)] == [b"k"]
        assert not pools.pool(1).writable
        with pytest.raises(KvpPoolUnavailable, match=r"not writable for this user .*run as root"):
            pools.set(1, "k", "w")
    with pytest.raises(KvpPoolUnavailable, match="Permission denied") as ei:
        KvpPools(tmp_path / "new", check_daemon=False)  # creating needs write access
    assert ei.value.errno == 13
    monkeypatch.undo()
    assert read_pool_file(pool_path(tmp_path, 1)) == [("k", "v")]


def test_foreign_records_that_fill_their_fields_survive_updates(tmp_path: Path) -> None:
    full = b"F" * 512 + b"V" * 2048  # no NUL at all: what a careless writer can leave
    pool_path(tmp_path, 1).write_bytes(full + c_record("x", "1") + c_record("y", "2"))
    with KvpPools(tmp_path) as pools:
        assert pools.records(1)[0].key == b"F" * 512
        pools.set(1, "y", "3")  # rewrites only that record
        pools.delete(1, "x")  # shifts the records after it
        pools.set(1, "z", "4")  # appends
        pools.pool(1).merge([("y", "3"), ("w", "5")])
    data = pool_path(tmp_path, 1).read_bytes()
    assert data[:REC] == full
    assert read_pool_file_bytes(data[REC:]) == [("y", "3"), ("z", "4"), ("w", "5")]


def read_pool_file_bytes(data: bytes) -> list[tuple[str, str]]:
    """The independent reader's rule on bytes: 2560-byte records, C strings in UTF-8."""
    out = []
    for i in range(0, len(data) - REC + 1, REC):
        key, value = data[i : i + 512], data[i + 512 : i + REC]
        out.append((key.split(b"\0")[0].decode(), value.split(b"\0")[0].decode()))
    return out


@pytest.mark.timeout(120)
def test_every_operation_and_fault_through_the_mock(tmp_path: Path, root: Path, scripts: Path) -> None:
    svc = make_service(tmp_path, root, scripts)
    pools_dir = tmp_path / "pools"
    with MockVmbus() as mock:
        guid = mock.add_device("kvp")
        stop = threading.Event()
        runner = IcRunner(mock.root, guid, svc, stop_event=stop)
        t = threading.Thread(target=runner.run, kwargs={"timeout": 100}, daemon=True)
        t.start()

        def settle() -> list[dict[str, object]]:
            deadline = time.monotonic() + 30
            while True:
                try:
                    st = mock.command(guid, "stats")
                    if st["state"] == "ready" and st["idle"]:
                        assert st["errors"] == []
                        return list(st["results"])
                except AssertionError:
                    raise
                except Exception:
                    pass
                assert time.monotonic() < deadline, "the KVP host did not finish"
                time.sleep(0.02)

        try:
            settle()
            mock.command(guid, "set", key="A", value="1")
            mock.command(guid, "set", key="N", value=7, value_type=RegType.REG_U32)
            mock.command(guid, "get", key="A")
            mock.command(guid, "delete", key="N")
            mock.command(guid, "enumerate", pool=0)
            mock.command(guid, "get_ip", adapter_id="00:15:5D:01:02:03")
            mock.command(guid, "set_ip", adapter_id="{f8615163-df3e-46c5-913f-f2d2f965ed0e}",
                         ip_addr="10.0.0.9", sub_net="255.255.255.0", gate_way="10.0.0.1",
                         dns_addr="10.0.0.53")
            res = settle()[-8:]
            assert [(r["op"], r["status"]) for r in res] == [
                ("SET", 0), ("SET", 0), ("GET", 0), ("DELETE", 0), ("ENUMERATE", 0), ("ENUMERATE", HV_S_CONT),
                ("GET_IP_INFO", 0), ("SET_IP_INFO", 0)]
            assert res[2]["value"] == "1" and res[6]["ip_addr"] == "10.0.0.4;fe80::215:5dff:fe01:203"
            assert (pools_dir / "ifcfg-eth0").exists()
            before = [pool_path(pools_dir, n).read_bytes() for n in range(5)]
            for fault in FAULTS:
                mock.command(guid, "fault", fault=fault)
            res = settle()[-len(FAULTS):]
            assert [r["fault"] for r in res] == list(FAULTS)
            for r in res:
                expected = HV_ERROR_NOT_SUPPORTED if r["fault"] == "unknown_op" else HV_INVALIDARG
                assert r["status"] == expected, r
            assert [pool_path(pools_dir, n).read_bytes() for n in range(5)] == before
            assert read_pool_file(pool_path(pools_dir, 0)) == [("A", "1")]
        finally:
            stop.set()
            t.join(30)
    assert not t.is_alive() and runner.result.why == "stopped"
    svc.close_pools()


def test_get_ip_info_takes_aliases_but_not_other_interfaces(root: Path, scripts: Path) -> None:
    addrs = [*fake_addresses(), IfAddress("eth0:1", socket.AF_INET, "10.0.1.4", "255.255.255.0"),
             IfAddress("eth01", socket.AF_INET, "172.16.0.1", "255.255.0.0")]
    net = KvpNetwork(scripts_dir=scripts, root=root, proc=root / "proc", addresses=lambda: addrs)
    res = net.get_ip_info("00:15:5D:01:02:03")
    assert res.status == HV_S_OK and res.value is not None and res.ifname == "eth0"
    assert res.value.ip_addr == "10.0.0.4;fe80::215:5dff:fe01:203;10.0.1.4"
    assert res.value.sub_net == "255.255.255.0;/64;255.255.255.0"
