"""Capture and replay (issue 12): pcapng round trips, tshark with the Lua dissector, replay diffs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from capture_sessions import MODELS, Session, drive
from pyvmbus.bus import Vmbus
from pyvmbus.capture import (
    LINKTYPE,
    CaptureError,
    CaptureWriter,
    Direction,
    RecordKind,
    read_capture,
    write_capture,
)
from pyvmbus.cli import main
from pyvmbus.cli.schema import EVENT_COMMON, SCHEMAS
from pyvmbus.errors import ChannelClosed, DeviceRescinded
from pyvmbus.ic import HeartbeatService
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.replay import ReplayMismatch
from pyvmbus.packet import PacketType

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "capture"
LUA = REPO / "contrib" / "wireshark" / "vmbus.lua"


def fixture(model: str) -> Path:
    """The recorded session of ``model`` (gzip-compressed when it was big)."""
    plain = FIXTURES / f"{model}.pcapng"
    return plain if plain.exists() else FIXTURES / f"{model}.pcapng.gz"


def test_there_is_a_fixture_for_every_model() -> None:
    assert all(fixture(m).exists() for m in MODELS)
    assert all(p.stat().st_size < 32 * 1024 for p in FIXTURES.iterdir())  # small files


@pytest.fixture(scope="module")
def mock() -> Iterator[MockVmbus]:
    with MockVmbus() as m:
        yield m


def _pad(payload: bytes) -> bytes:
    return payload + bytes(-(16 + len(payload)) % 8)


# -- capture -> read back -> same packets -------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", MODELS)
def test_capture_of_every_model_round_trips(tmp_path: Path, model: str) -> None:
    path = tmp_path / f"{model}.pcapng"
    with MockVmbus() as m:
        ses: Session = drive(m, model, capture=path)
    cap = read_capture(path)
    assert [i.link_type for i in cap.interfaces] == [LINKTYPE]
    events = [r.event["event"] for r in cap.events()]
    assert events[0] == "opened" and "post_started" in events and events[-1] == "closed"
    assert cap.records[-1].event["reason"] == "disabled"
    opened = cap.records[0].event
    assert opened["device"] == cap.devices()[0] and opened["tx_ring_size"] > 0
    rx = [r.packet for r in cap.packets() if r.direction is Direction.HOST_TO_GUEST]
    tx = [r.packet for r in cap.packets() if r.direction is Direction.GUEST_TO_HOST]
    assert [(p.type, p.flags, p.transaction_id, p.payload) for p in rx] == \
        [(p.type, p.flags, p.transaction_id, p.payload) for p in ses.received]
    assert [(p.type, p.flags, p.transaction_id, p.payload) for p in tx] == \
        [(t, f, txid, _pad(pl)) for pl, t, f, txid in ses.sent]
    # signals only guest->host, interrupts only host->guest; numbers in file order
    assert all(r.direction is Direction.GUEST_TO_HOST for r in cap.records if r.kind is RecordKind.SIGNAL)
    assert all(r.direction is Direction.HOST_TO_GUEST for r in cap.records if r.kind is RecordKind.INTERRUPT)
    assert [r.number for r in cap.records] == list(range(1, len(cap.records) + 1))
    assert [r.seq for r in cap.records] == list(range(1, len(cap.records) + 1))


def test_rewritten_capture_is_identical(tmp_path: Path) -> None:
    cap = read_capture(FIXTURES / "heartbeat.pcapng")
    out = tmp_path / "copy.pcapng"
    write_capture(out, cap.interfaces, cap.records)
    again = read_capture(out)
    assert again.records == cap.records and again.interfaces == cap.interfaces


def test_bad_capture_files_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "x.pcapng"
    bad.write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(20))
    with pytest.raises(CaptureError, match="not a pcapng file"):
        read_capture(bad)
    good = (FIXTURES / "echo.pcapng").read_bytes()
    bad.write_bytes(good[:-10])
    with pytest.raises(CaptureError, match="truncated or corrupt"):
        read_capture(bad)
    with pytest.raises(CaptureError, match="cannot read it"):
        read_capture(tmp_path / "missing.pcapng")
    # a record whose pseudo-header is not ours
    cap = read_capture(FIXTURES / "echo.pcapng")
    raw = bytearray(good)
    pos = raw.find(b"VB\x01")
    raw[pos:pos + 2] = b"XX"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CaptureError, match="pseudo-header magic"):
        read_capture(bad)
    assert cap.records


def test_gzip_captures_are_read_and_bombs_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    from pyvmbus import capture

    good = (FIXTURES / "echo.pcapng").read_bytes()
    gz = tmp_path / "echo.pcapng.gz"
    # two gzip members, as `cat a.gz b.gz` makes: read whole, as gzip.decompress does
    gz.write_bytes(gzip.compress(good[:100]) + gzip.compress(good[100:]))
    assert read_capture(gz).records == read_capture(FIXTURES / "echo.pcapng").records
    # more than the limit once decompressed: refused, before it all sits in memory
    monkeypatch.setattr(capture, "_MAX_GUNZIP", len(good) - 1)
    with pytest.raises(CaptureError, match=r"once decompressed \(a gzip bomb\?\)"):
        read_capture(gz)
    gz.write_bytes(gzip.compress(good)[:-12])  # truncated
    with pytest.raises(CaptureError, match="cannot be decompressed"):
        read_capture(gz)


@pytest.mark.timeout(60)
def test_subchannels_get_their_own_interface(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("echo")
    bus = Vmbus(mock.root)
    bus.bind(guid)
    path = tmp_path / "sub.pcapng"
    ch = bus.channel(guid, capture=path)
    ch.enable()
    try:
        mock.offer_subchannels(str(guid), 2)
        subs = ch.open_subchannels(2)
        assert subs[1].send_request(b"sub two", timeout=5) == _pad(b"sub two")
    finally:
        ch.disable()
        ch.stop_capture()
    cap = read_capture(path)
    assert len(cap.interfaces) == 3
    opened = [r for r in cap.events() if r.event["event"] == "opened"]
    assert sorted(r.subchannel for r in opened) == [0, 1, 2]
    pkts = [r for r in cap.packets() if r.subchannel == subs[1].subchannel_index]
    assert [(r.direction, r.packet.type) for r in pkts] == [
        (Direction.GUEST_TO_HOST, PacketType.DATA_INBAND), (Direction.HOST_TO_GUEST, PacketType.COMP)]
    assert pkts[0].relid == subs[1].relid and pkts[0].interface != 0
    closed = [r for r in cap.events() if r.event["event"] == "closed"]
    assert len(closed) == 3
    # and replayed: the host offers the two subchannels, their sessions play
    with MockVmbus() as m:
        rguid = m.add_device(replay=path)
        rbus = Vmbus(m.root)
        rbus.bind(str(rguid))
        rch = rbus.channel(str(rguid))
        rch.enable()
        try:
            rsubs = rch.open_subchannels(2, timeout=10)
            assert rsubs[1].send_request(b"sub two", timeout=5) == _pad(b"sub two")
        finally:
            rch.disable()
        report = m.replay_check(str(rguid))
    assert report["matched"] == 1 and report["played"] == 1


@pytest.mark.timeout(60)
def test_a_failing_capture_file_does_not_stop_the_channel(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("echo")
    bus = Vmbus(mock.root)
    bus.bind(guid)
    writer = CaptureWriter(tmp_path / "broken.pcapng")
    ch = bus.channel(guid, capture=writer)
    ch.enable()
    try:
        assert ch.send_request(b"one", timeout=5) == _pad(b"one")
        writer._file.close()  # the disk goes away under the capture
        assert ch.send_request(b"two", timeout=5) == _pad(b"two")
        writer.flush()  # the write fails here: logged, capture stopped, nothing raised
        assert not writer.live
        assert ch.send_request(b"three", timeout=5) == _pad(b"three")
    finally:
        ch.disable()


@pytest.mark.timeout(60)
def test_rescind_is_recorded(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("echo")
    bus = Vmbus(mock.root)
    bus.bind(guid)
    path = tmp_path / "rescind.pcapng"
    ch = bus.channel(guid, capture=path)
    ch.enable()
    mock.rescind(str(guid))
    assert ch.run(timeout=10) == "rescinded"
    ch.stop_capture()
    names = [r.event.get("reason", r.event["event"]) for r in read_capture(path).events()]
    assert names[-2:] == ["rescind", "rescinded"]
    # replayed: the host rescinds the device at the same point
    with MockVmbus() as m:
        rguid = str(m.add_device(replay=path))
        rbus = Vmbus(m.root)
        rbus.bind(rguid)
        rch = rbus.channel(rguid)
        try:
            rch.enable()
        except (ChannelClosed, DeviceRescinded) as exc:
            # The replayed rescind comes the recorded delay after the open; a loaded machine
            # can take longer than that to finish enable(): a rescind then, as on Hyper-V.
            assert isinstance(exc, DeviceRescinded) or rch.close_reason == "rescinded", exc
        else:
            assert rch.run(timeout=10) == "rescinded"
        report = m.replay_check(rguid)
    assert report["played"] == 1


# -- tshark with the Lua dissector --------------------------------------------------------------

def _tshark() -> str:
    """tshark, or a skip that says why it cannot run our Lua dissector here."""
    exe = shutil.which("tshark")
    if exe is None:
        pytest.skip("tshark is not installed (Debian: apt-get install tshark; .ci/run installs it)")
    version = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=30).stdout
    if "without Lua" in version:
        pytest.skip("this tshark was built without Lua: it cannot load contrib/wireshark/vmbus.lua")
    if os.geteuid() == 0:
        # Wireshark before 4.2 runs user Lua scripts as root only when init.lua says so
        # (Debian's package does: run_user_scripts_when_superuser = true).
        for init in (Path("/usr/share/wireshark/init.lua"), Path("/usr/local/share/wireshark/init.lua")):
            if init.is_file() and "run_user_scripts_when_superuser = false" in init.read_text():
                pytest.skip(f"tshark runs no user Lua as root here ({init}: "
                            "run_user_scripts_when_superuser = false): run the tests as a normal user")
    return exe


def _fields(path: Path, *fields: str) -> list[list[str]]:
    cmd = [_tshark(), "-X", f"lua_script:{LUA}", "-r", str(path), "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert "Lua" not in out.stderr, out.stderr  # a dissector error shows up there
    return [line.split("\t") for line in out.stdout.splitlines()]


@pytest.mark.timeout(120)
def test_tshark_decodes_a_capture_made_through_the_mock(mock: MockVmbus, tmp_path: Path) -> None:
    path = tmp_path / "echo.pcapng"
    drive(mock, "echo", capture=path, add=False, guid=str(mock.add_device("echo")))
    rows = _fields(path, "vmbus.kind", "vmbus.direction", "vmbus.pkt.type", "vmbus.pkt.offset8",
                   "vmbus.pkt.len8", "vmbus.pkt.flags", "vmbus.pkt.trans_id", "vmbus.pkt.payload",
                   "vmbus.event.name", "vmbus.relid")
    cap = read_capture(path)
    assert len(rows) == len(cap.records)
    relid = str(cap.records[0].relid)
    assert all(r[9] == relid for r in rows)
    pkts = [r for r in rows if r[0] == "1"]
    # the request: DATA_INBAND, offset8 2, len8 (16+13+3)/8 = 4, completion requested, txid 1
    assert pkts[0][1:8] == ["0", "0x0006", "2", "4", "0x0001", "1", (b"hello capture" + bytes(3)).hex()]
    assert pkts[1][1:7] == ["1", "0x000b", "2", "4", "0x0000", "1"]
    assert [r[8] for r in rows if r[0] == "2"] == ["opened", "post_started", "closed"]


@pytest.mark.timeout(120)
def test_tshark_decodes_the_integration_services() -> None:
    hb = _fields(FIXTURES / "heartbeat.pcapng", "vmbus.direction", "vmbus.ic.msgtype", "vmbus.ic.flags",
                 "vmbus.ic.negotiate.message_version", "vmbus.ic.heartbeat.seq_num",
                 "vmbus.ic.framework_version")
    ic = [r for r in hb if r[1]]
    assert [r[1] for r in ic] == ["0", "0", "1", "1", "1", "1"]
    assert ic[0][3] == "1.0,3.0" and ic[1][3] == "3.0" and ic[1][2] == "0x05"
    assert [r[4] for r in ic[2:]] == ["0", "1", "1", "2"]  # the guest answers seq + 1
    sd = _fields(FIXTURES / "shutdown.pcapng", "vmbus.ic.shutdown.flags", "vmbus.ic.shutdown.message",
                 "vmbus.ic.shutdown.reason_code", "vmbus.ic.shutdown.timeout_seconds")
    assert ["0x00000002", "patching", "0x80000000", "30"] in sd
    ts = _fields(FIXTURES / "timesync.pcapng", "vmbus.ic.msgtype", "vmbus.ic.timesync.parenttime",
                 "vmbus.ic.timesync.vmreferencetime", "vmbus.ic.timesync.flags")
    cap = read_capture(FIXTURES / "timesync.pcapng")
    sample = next(r.packet.payload for r in cap.packets() if r.packet.payload[12] == 4)
    parent = struct.unpack_from("<Q", sample, 28)[0]
    assert any(r[0] == "4" and r[1] == str(parent) and r[3] in ("0x02", "0x01") for r in ts)
    fc = _fields(FIXTURES / "fcopy.pcapng", "vmbus.ic.fcopy.operation", "vmbus.ic.fcopy.file_name",
                 "vmbus.ic.fcopy.path_name", "vmbus.ic.fcopy.size", "vmbus.ic.fcopy.file_size")
    assert ["0", "hello.txt", "/tmp/pyvmbus-capture-fixture/in", "", "52"] in fc
    assert ["1", "", "", "52", ""] in fc
    kvp = _fields(fixture("kvp"), "vmbus.direction", "vmbus.ic.kvp.operation", "vmbus.ic.kvp.pool",
                  "vmbus.ic.kvp.key", "vmbus.ic.kvp.value", "vmbus.ic.status")
    assert ["1", "1", "0", "FixtureKey", "fixture value", "0x00000000"] in kvp  # the host's SET
    assert ["0", "0", "0", "FixtureKey", "fixture value", "0x00000000"] in kvp  # the guest's GET answer
    assert ["0", "3", "2", "FullyQualifiedDomainName", "guest.example.com", "0x00000000"] in kvp


@pytest.mark.timeout(120)
def test_tshark_verbose_shows_the_pseudo_header() -> None:
    out = subprocess.run([_tshark(), "-X", f"lua_script:{LUA}", "-r", str(FIXTURES / "echo.pcapng"), "-V",
                          "-c", "3"], capture_output=True, text=True, timeout=60, check=True).stdout
    for text in ("Pseudo-header", "Magic: VB", "Record kind: packet (1)", "Direction: guest->host (0)",
                 "Packet type: DATA_INBAND (0x0006)", "Transaction id: 1", "Completion requested: True"):
        assert text in out, text


# -- replay -----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", MODELS)
def test_replay_against_the_same_client_passes(model: str) -> None:
    path = fixture(model)
    with MockVmbus() as m:
        guid = m.add_device(replay=path)
        assert str(guid) == read_capture(path).devices()[0]
        drive(m, model, add=False, guid=str(guid))
        report = m.replay_check(str(guid))
    assert report["ok"] and report["matched"] == report["expected"] > 0
    assert report["played"] > 0 or model == "null"  # the null host never answers


class _OffByOne(HeartbeatService):
    """A broken heartbeat: answers seq + 2."""

    def handle(self, payload: bytes) -> bytes | None:
        resp = super().handle(payload)
        if resp is not None and resp[12] == 1:
            buf = bytearray(resp)
            struct.pack_into("<Q", buf, 28, struct.unpack_from("<Q", buf, 28)[0] + 1)
            return bytes(buf)
        return resp


@pytest.mark.timeout(60)
def test_replay_against_a_changed_client_fails_with_a_readable_diff() -> None:
    with MockVmbus() as m:
        guid = m.add_device(replay=FIXTURES / "heartbeat.pcapng")
        drive(m, "heartbeat", add=False, guid=str(guid), service=_OffByOne())
        with pytest.raises(ReplayMismatch) as info:
            m.replay_check(str(guid))
    text = str(info.value)
    assert "2 difference(s)" in text
    assert "record 8 (guest->host, subchannel 0): payload byte 28 is 0x02, expected 0x01" in text
    assert "expected DATA_INBAND flags=0x0 txid=2 len=72 payload" in text and "got      DATA_INBAND" in text
    assert "record 11" in text


@pytest.mark.timeout(60)
def test_variable_bytes_marked_in_a_comment_or_by_argument(tmp_path: Path) -> None:
    cap = read_capture(FIXTURES / "heartbeat.pcapng")
    edited = [replace(r, comment="pyvmbus-vary: 28:36") if r.number in (8, 11) else r for r in cap.records]
    path = tmp_path / "vary.pcapng"
    write_capture(path, cap.interfaces, edited)
    with MockVmbus() as m:
        guid = m.add_device(replay=path)
        drive(m, "heartbeat", add=False, guid=str(guid), service=_OffByOne())
        assert m.replay_check(str(guid))["ok"]
    with MockVmbus() as m:
        guid = m.add_device(replay=FIXTURES / "heartbeat.pcapng", vary={8: "28:36", 11: [(28, 36)]})
        drive(m, "heartbeat", add=False, guid=str(guid), service=_OffByOne())
        assert m.replay_check(str(guid))["ok"]


@pytest.mark.timeout(60)
def test_replay_reports_what_the_guest_never_sent() -> None:
    with MockVmbus() as m:
        guid = m.add_device(replay=FIXTURES / "echo.pcapng")
        report = m.replay_report(str(guid))
    assert not report["ok"]
    assert "subchannel 0 session 1 (record 3) was never opened" in report["diffs"]


def test_replay_of_a_device_not_in_the_capture_is_a_clear_error() -> None:
    from pyvmbus.errors import UsageError

    with MockVmbus() as m, pytest.raises(UsageError, match="has no channel of device 1234"):
        m.add_device("12345678-0000-0000-0000-000000000000", replay=FIXTURES / "echo.pcapng")


# -- the command line -------------------------------------------------------------------------------

def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), prog_name="vmbus", catch_exceptions=False)


def test_capture_show_text_and_json() -> None:
    res = _run("capture", "show", str(FIXTURES / "echo.pcapng"))
    assert res.exit_code == 0, res.output
    assert "sent      request (completion requested): DATA_INBAND(6) flags=0x1 txid=1 len=16" in res.output
    assert "packet    COMP(11) flags=0x0 txid=1 len=16" in res.output
    assert "closed    reason: disabled" in res.output
    res = _run("capture", "show", str(FIXTURES / "heartbeat.pcapng"), "--json")
    events = [json.loads(line) for line in res.output.splitlines()]
    assert len(events) == len(read_capture(FIXTURES / "heartbeat.pcapng").records)
    for ev in events:
        schema = SCHEMAS[f"capture.{ev['event']}"]
        assert set(ev) == set(schema), ev
        assert set(EVENT_COMMON) <= set(schema)
    res = _run("capture", "show", str(FIXTURES / "heartbeat.pcapng"), "--packets-only", "--json")
    assert {json.loads(line)["event"] for line in res.output.splitlines()} == {
        "opened", "post_started", "packet", "sent", "closed"}


def test_capture_show_of_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"nope")
    res = CliRunner().invoke(main, ["capture", "show", str(tmp_path / "x")], prog_name="vmbus")
    assert res.exit_code != 0 and "truncated block header" in res.output


@pytest.mark.timeout(60)
def test_enable_capture_option(tmp_path: Path) -> None:
    path = tmp_path / "cli.pcapng"
    res = _run("--mock", "enable", "echo", "--send", "68656c6c6f", "--count", "1", "--timeout", "10",
               "--capture", str(path))
    assert res.exit_code == 0, res.output
    pkts = [r.packet for r in read_capture(path).packets()]
    assert [(p.type, p.payload) for p in pkts] == [(6, _pad(b"hello")), (11, _pad(b"hello"))]


@pytest.mark.timeout(60)
def test_mock_serve_replay_prints_the_verdict(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["mock", "serve", "--replay", str(FIXTURES / "echo.pcapng"), "--timeout",
                                    "0.5", "--root", str(tmp_path / "root"), "--json"], prog_name="vmbus")
    events = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    verdict = next(e for e in events if e["event"] == "replay")
    assert set(verdict) == set(SCHEMAS["mock.replay"])
    assert not verdict["ok"] and "was never opened" in verdict["diffs"][0]
    assert res.exit_code == 1


@pytest.mark.timeout(60)
def test_replay_plays_a_transfer_page_packet_written_by_hand(tmp_path: Path) -> None:
    """A capture edited (here: written) by hand: the host sends a transfer-page packet with
    its ranges, the guest must answer "ack"."""
    from pyvmbus.capture import Interface, Record
    from pyvmbus.mock.models import ECHO_CLASS_GUID
    from pyvmbus.packet import encode_transfer_pages

    dev = "6563686f-0000-4000-8000-0000000000aa"
    extra = encode_transfer_pages(7, [(100, 0), (28, 4096)])
    payload = b"rndis...".ljust(16, b"\0")

    def pkt(ptype: int, body: bytes, txid: int, hdr: bytes = b"") -> bytes:
        off = 16 + len(hdr)
        return struct.pack("<HHHHQ", ptype, off // 8, (off + len(body)) // 8, 0, txid) + hdr + body

    def ev(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj).encode()

    rows = [(RecordKind.EVENT, Direction.LOCAL, ev({"event": "opened", "device": dev, "subchannel": 0,
                                                     "class_guid": str(ECHO_CLASS_GUID), "monitor_id": 0})),
            (RecordKind.EVENT, Direction.LOCAL, ev({"event": "post_started"})),
            (RecordKind.PACKET, Direction.HOST_TO_GUEST,
             pkt(PacketType.DATA_USING_XFER_PAGES, payload, 42, extra)),
            (RecordKind.PACKET, Direction.GUEST_TO_HOST,
             pkt(PacketType.DATA_INBAND, b"ack".ljust(8, b"\0"), 9)),
            (RecordKind.EVENT, Direction.LOCAL, ev({"event": "closed", "reason": "disabled"}))]
    records = [Record(i + 1, 0, 1_000_000 * i, k, d, 1, 0, i + 1, data)
               for i, (k, d, data) in enumerate(rows)]
    path = tmp_path / "hand.pcapng"
    write_capture(path, [Interface(0, f"vmbus:{dev}")], records)
    with MockVmbus() as m:
        guid = m.add_device(replay=path)
        bus = Vmbus(m.root)
        bus.bind(str(guid))
        ch = bus.channel(str(guid))
        got = []

        @ch.on_packet
        def _(c: Any, p: Any) -> None:
            got.append(p)
            c.send(b"ack")

        ch.enable()
        try:
            deadline = 50
            while m.replay_report(str(guid))["pending"] and deadline:
                deadline -= 1
                ch.poll(0.1)
        finally:
            ch.disable()
        report = m.replay_check(str(guid))
    assert report["played"] == 1 and report["matched"] == 1
    assert got[0].type == PacketType.DATA_USING_XFER_PAGES and got[0].transaction_id == 42
    assert got[0].transfer_pages is not None and got[0].transfer_pages.pageset_id == 7
    assert [(r.byte_count, r.byte_offset) for r in got[0].transfer_pages.ranges] == [(100, 0), (28, 4096)]


@pytest.mark.timeout(60)
def test_one_writer_for_two_devices_and_a_capture_started_while_open(mock: MockVmbus, tmp_path: Path) -> None:
    bus = Vmbus(mock.root)
    a, b = str(mock.add_device("echo")), str(mock.add_device("echo"))
    for g in (a, b):
        bus.bind(g)
    path = tmp_path / "two.pcapng"
    with CaptureWriter(path) as writer:
        cha = bus.channel(a, capture=writer)
        chb = bus.channel(b)
        cha.enable()
        chb.enable()
        try:
            assert chb.send_request(b"not recorded", timeout=5)
            chb.capture(writer)  # open already: its "opened" record is written now
            assert cha.send_request(b"from a", timeout=5) == _pad(b"from a")
            assert chb.send_request(b"from b", timeout=5) == _pad(b"from b")
        finally:
            cha.disable()
            chb.disable()
            cha.stop_capture()
            chb.stop_capture()
        assert writer.live  # a writer passed in stays open for its owner
    cap = read_capture(path)
    assert cap.devices() == [a, b] and len(cap.interfaces) == 2
    sent = {(r.interface, r.packet.payload) for r in cap.packets() if r.direction is Direction.GUEST_TO_HOST}
    assert sent == {(0, _pad(b"from a")), (1, _pad(b"from b"))}
    with pytest.raises(ValueError, match="2 devices"):
        from pyvmbus.mock.replay import build_script

        build_script(cap)


@pytest.mark.timeout(120)
def test_tshark_decodes_transfer_page_and_gpa_direct_headers(tmp_path: Path) -> None:
    from pyvmbus.capture import Interface, Record
    from pyvmbus.packet import encode_gpa_direct, encode_transfer_pages

    def pkt(ptype: int, hdr: bytes, body: bytes) -> bytes:
        off = 16 + len(hdr)
        return struct.pack("<HHHHQ", ptype, off // 8, (off + len(body)) // 8, 1, 77) + hdr + body

    xfer = encode_transfer_pages(3, [(1514, 0), (60, 2048)], sender_owns_set=1)
    gpa = encode_gpa_direct([(5000, 100, [0x1234, 0x1235]), (8, 0, [0xABC])])
    rows = [pkt(PacketType.DATA_USING_XFER_PAGES, xfer, bytes(8)),
            pkt(PacketType.DATA_USING_GPA_DIRECT, gpa, bytes(16))]
    path = tmp_path / "hdrs.pcapng"
    write_capture(path, [Interface(0, "vmbus:x")], [
        Record(i + 1, 0, i, RecordKind.PACKET, Direction.HOST_TO_GUEST, 9, 0, i + 1, data)
        for i, data in enumerate(rows)])
    out = _fields(path, "vmbus.pkt.type", "vmbus.pkt.offset8", "vmbus.xfer.pageset_id",
                  "vmbus.xfer.sender_owns_set", "vmbus.xfer.range_count", "vmbus.xfer.range.byte_count",
                  "vmbus.xfer.range.byte_offset", "vmbus.gpa.range_count", "vmbus.gpa.range.len",
                  "vmbus.gpa.range.offset", "vmbus.gpa.range.pfn")
    assert out[0][:7] == ["0x0007", str((16 + len(xfer)) // 8), "3", "1", "2", "1514,60", "0,2048"]
    assert out[1][0] == "0x0009" and out[1][7:] == ["2", "5000,8", "100,0", "0x0000000000001234,"
                                                     "0x0000000000001235,0x0000000000000abc"]


@pytest.mark.timeout(60)
def test_a_comment_added_by_editcap_marks_variable_bytes(tmp_path: Path) -> None:
    """A file re-written by Wireshark's editcap still reads, and its packet comment counts."""
    editcap = shutil.which("editcap")
    if editcap is None:
        pytest.skip("editcap is not installed (Debian: it comes with tshark, package wireshark-common)")
    path = tmp_path / "hb.pcapng"
    subprocess.run([editcap, "-a", "8:pyvmbus-vary: 28:36", "-a", "11:pyvmbus-vary: 28:36",
                    str(FIXTURES / "heartbeat.pcapng"), str(path)], check=True, timeout=30)
    cap = read_capture(path)
    assert [(r.number, r.comment) for r in cap.records if r.comment] == [
        (8, "pyvmbus-vary: 28:36"), (11, "pyvmbus-vary: 28:36")]
    original = read_capture(FIXTURES / "heartbeat.pcapng")
    assert [r.data for r in cap.records] == [r.data for r in original.records]
    with MockVmbus() as m:
        guid = m.add_device(replay=path)
        drive(m, "heartbeat", add=False, guid=str(guid), service=_OffByOne())
        assert m.replay_check(str(guid))["ok"]


@pytest.mark.timeout(60)
def test_capture_with_asyncio_dispatch(mock: MockVmbus, tmp_path: Path) -> None:
    import asyncio

    guid = str(mock.add_device("echo"))
    bus = Vmbus(mock.root)
    bus.bind(guid)
    path = tmp_path / "aio.pcapng"
    ch = bus.channel(guid, capture=path)

    async def main() -> list[bytes]:
        async with ch.enabled():
            return list(await asyncio.gather(*(ch.request(f"req {i}".encode(), timeout=5) for i in range(8))))

    replies = asyncio.run(main())
    ch.stop_capture()
    assert replies == [_pad(f"req {i}".encode()) for i in range(8)]
    cap = read_capture(path)
    tx = [r.packet for r in cap.packets() if r.direction is Direction.GUEST_TO_HOST]
    rx = [r.packet for r in cap.packets() if r.direction is Direction.HOST_TO_GUEST]
    assert sorted(p.payload for p in tx) == sorted(replies) and len(rx) == 8
    first_tx = {p.transaction_id: r.number for r, p in ((r, r.packet) for r in cap.packets())
                if r.direction is Direction.GUEST_TO_HOST}
    for r in cap.packets():  # every completion comes after its request in the file
        if r.direction is Direction.HOST_TO_GUEST:
            assert r.number > first_tx[r.packet.transaction_id]


@pytest.mark.timeout(90)
def test_a_program_that_exits_with_the_channel_open_keeps_its_capture(tmp_path: Path) -> None:
    import sys
    import textwrap

    path = tmp_path / "exit.pcapng"
    script = textwrap.dedent(f"""
        import sys
        from pyvmbus import Vmbus
        from pyvmbus.mock import MockVmbus
        mock = MockVmbus().start()
        guid = mock.add_device("echo")
        bus = Vmbus(mock.root)
        bus.bind(guid)
        ch = bus.channel(guid, capture={str(path)!r})
        ch.enable()
        ch.send_request(b"before exit", timeout=5)
        sys.exit(0)  # never disabled, never stop_capture()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=80)
    assert [r.packet.payload for r in read_capture(path).packets()] == [_pad(b"before exit")] * 2
