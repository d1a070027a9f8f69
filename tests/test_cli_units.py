"""The CLI's pure parts: error mapping, formatting, --send parsing, watch diffs, the pinned schema."""

from __future__ import annotations

import pytest

from pyvmbus import errors
from pyvmbus.cli.enable import parse_send
from pyvmbus.cli.errors import EXIT_CODES, NoVmbus, PayloadTooLarge, WrongClass, error_line, exit_code
from pyvmbus.cli.output import bar, packet_event, render_event, table, type_name
from pyvmbus.cli.schema import SCHEMAS
from pyvmbus.cli.watch import DevSnap, WatchEvent, diff, event_from_udev
from pyvmbus.packet import Packet

G = "0b609730-1b14-457f-881b-bc9d246510c4"

IC_SUMMARY = "event t device service requests answered dropped negotiations unknown_types errors"
# A changed key is a changed contract: update this pin, docs/cli.md and the changelog together.
PINNED = {
    "error": "error type exit_code",
    "list": "root devices",
    "list.device": "guid class class_guid relid driver uio monitored monitor_id",
    "show": "guid path class class_guid class_description relid state state_name monitored monitor_id "
            "driver driver_override numa_node vendor device_type channel_vp_mapping net_interfaces "
            "attributes channels uio ring signal bind_record guard_rails",
    "show.channel": "relid subchannel_id cpu monitor_id in_mask out_mask read_avail write_avail events "
                    "interrupts intr_in_full intr_out_empty out_full_first out_full_total ring_file "
                    "ring_file_size",
    "show.uio": "name node driver_name version event maps",
    "show.signal": "mechanism relid monitor_id int_page_word_offset int_page_bit_mask monitor_pending_offset "
                   "monitor_bit_mask reason notes subchannels",
    "ring": "device class source state channel_open driver uio uio_events channels note tx rx violations",
    "ring.side": "read_index write_index interrupt_mask bytes_used bytes_free data_size occupancy "
                 "pending_send_size feature_bits",
    "bind": "device class driver uio node previous_driver already",
    "unbind": "device class previous_driver",
    "restore": "device class driver",
    "enable.bound": "event t device uio previous_driver",
    "enable.opened": "event t device relid monitor_id",
    "enable.started": "event t device",
    "enable.post_started": "event t device",
    "enable.sent": "event t device length transaction_id completion_requested",
    "enable.reply": "event t device request_length length payload_hex",
    "enable.packet": "event t device type type_name flags transaction_id length payload_hex",
    "enable.processing_complete": "event t device count",
    "enable.closed": "event t device reason",
    "enable.restored": "event t device driver",
    "enable.note": "event t device message",
    "enable.stopped": "event t device why packets replies",
    "demo.demo": "event t root kernel device",
    "watch.watching": "event t root source",
    "watch.action": "event t subsystem name device class driver",
    "mock.serving": "event t root kernel pid devices",
    "mock.stopped": "event t why",
    "mock.fault": "event t device class kind relid args",
    "mock fault": "device class kind relid args",
    "ic.bound": "event t device uio previous_driver",
    "ic.enabled": "event t device relid attempt",
    "ic.negotiated": "event t device service framework version",
    "ic.negotiation_failed": "event t device service offered",
    "ic.closed": "event t device reason",
    "ic.waiting": "event t device what timeout",
    "ic.action_failed": "event t device error",
    "ic.restored": "event t device driver",
    "ic.note": "event t device message",
    "ic.stopped": "event t device why packets answered",
    "ic.shutdown_request": "event t device action flags force reason_code timeout_seconds message command "
                           "performed outcome",
    "ic.sample": "event t device offset_ns host_ns host_time sync format flags",
    "ic.clock_set": "event t device step_ns",
    "ic.clock_not_set": "event t device why",
    "ic.fcopy": "event t device kind path size status reason",
    "ic.heartbeat.summary": IC_SUMMARY + " beats last_seq",
    "ic.shutdown.summary": IC_SUMMARY + " accepted",
    "ic.timesync.summary": IC_SUMMARY + " samples last_offset_ns",
    "ic.fcopy.summary": IC_SUMMARY + " files_completed bytes_written",
    "ic.kvp": "event t device kind op pool key value status count reason",
    "ic.kvp.summary": IC_SUMMARY + " sets gets deletes enumerates ip_requests refused pool_dir",
    "kvp.record": "pool key value",
    "kvp.set": "pool key value created",
    "kvp.delete": "pool key deleted",
    "mock.replay": "event t device source ok expected matched played pending diffs ring_sizes",
    "capture.opened": "event t record relid subchannel device monitor_id class class_guid "
                      "tx_ring_size rx_ring_size",
    "capture.post_started": "event t record relid subchannel",
    "capture.rescind": "event t record relid subchannel",
    "capture.closed": "event t record relid subchannel reason",
    "capture.packet": "event t record relid subchannel type type_name flags transaction_id length "
                      "payload_hex offset8 len8",
    "capture.sent": "event t record relid subchannel type type_name flags transaction_id length "
                    "payload_hex offset8 len8 completion_requested",
    "capture.signal": "event t record relid subchannel count",
    "capture.interrupt": "event t record relid subchannel count",
    "capture.malformed": "event t record relid subchannel error",
}


def test_schema_is_pinned() -> None:
    assert {k: sorted(v) for k, v in SCHEMAS.items()} == {k: sorted(v.split()) for k, v in PINNED.items()}
    assert all(note for keys in SCHEMAS.values() for note in keys.values())


# -- exit codes -----------------------------------------------------------------------------------
def test_exit_code_table_is_consistent() -> None:
    codes = [row.code for row in EXIT_CODES]
    assert len(codes) == len(set(codes))
    names = [row.name for row in EXIT_CODES]
    assert len(names) == len(set(names))
    for row in EXIT_CODES:
        assert row.meaning
        for cls in row.errors:
            assert issubclass(cls, errors.VmbusError)
            assert cls.__name__ in errors.__all__ or cls in (NoVmbus, WrongClass, PayloadTooLarge)


@pytest.mark.parametrize(("exc", "code"), [
    (errors.DeviceNotFound("x"), 3),
    (errors.InvalidGuid("x", "bad"), 3),
    (errors.NotPermitted("/dev/uio0", "open"), 4),
    (errors.DriverNotLoaded("uio_hv_generic", "/sys/x"), 5),
    (errors.GuardRailRefused(G, "the disk is mounted"), 6),
    (errors.AlreadyBound(G, "uio_hv_generic"), 7),
    (errors.InvalidState(G, "running", "enable"), 7),
    (errors.Timeout("a thing", 1.0), 8),
    (errors.DeviceRescinded(G), 9),
    (errors.HostCrashed(G), 9),
    (errors.RingCorrupt("len8", 0, "zero"), 9),
    (errors.ChannelClosed(G, "rescinded"), 9),
    (NoVmbus("/"), 10),
    (errors.BindFailed(G, "uio_hv_generic", "EINVAL"), 11),
    (errors.RingFull(10, 5), 1),
    (errors.VmbusError("other"), 1),
])
def test_exit_code_of_each_error(exc: BaseException, code: int) -> None:
    assert exit_code(exc) == code


def test_error_line_adds_the_fix_once_and_stays_one_line() -> None:
    line = error_line(errors.DeviceRescinded(G, "gone"))
    assert "rediscover" in line and "vmbus list" not in line  # the message has its own fix
    line = error_line(errors.InvalidState(G, "running", "enable"))
    assert line.endswith("; check 'vmbus show DEVICE'")
    line = error_line(errors.VmbusError("two\nlines"))
    assert line == "two lines"
    line = error_line(errors.GuardRailRefused(G, "x"))
    assert line.count("--force") == 1
    assert "not a Hyper-V" in error_line(NoVmbus("/"))
    assert "mock serve --root /tmp/r" in error_line(NoVmbus("/tmp/r"))


# -- formatting -------------------------------------------------------------------------------------
def test_formatting_helpers() -> None:
    assert type_name(6) == "DATA_INBAND" and type_name(0x2A) == "0x2a"
    assert bar(0.0, 4) == "[----]" and bar(1.0, 4) == "[####]" and bar(0.0001, 4) == "[#---]"
    assert bar(2.0, 2) == "[##]" and bar(-1, 2) == "[--]"
    assert table(("A", "BB"), [(1, None), (True, "x")], right=(0,)).splitlines() == [
        "  A  BB", "  1  -", "yes  x"]


def test_render_every_event() -> None:
    pkt = Packet(type=11, flags=0, transaction_id=9, payload=b"hi\x00" * 10, extra_header=b"")
    ev = packet_event(G, pkt, 4)
    assert ev["payload_hex"] == "68690068" and ev["type_name"] == "COMP" and ev["length"] == 30
    texts = [render_event({**e, "t": 1.5, "device": G}, 4) for e in (
        ev,
        {"event": "reply", "request_length": 2, "length": 8, "payload_hex": "6869"},
        {"event": "reply", "request_length": 2, "length": 0, "payload_hex": ""},
        {"event": "sent", "length": 2, "transaction_id": None, "completion_requested": True},
        {"event": "sent", "length": 2, "transaction_id": 4, "completion_requested": False},
        {"event": "bound", "uio": "uio0", "previous_driver": None},
        {"event": "opened", "relid": 3, "monitor_id": None},
        {"event": "opened", "relid": 3, "monitor_id": 5},
        {"event": "started"}, {"event": "post_started"},
        {"event": "processing_complete", "count": 2},
        {"event": "closed", "reason": "rescinded"},
        {"event": "restored", "driver": "hv_utils"},
        {"event": "stopped", "why": "count", "packets": 1, "replies": 0},
        {"event": "note", "message": "hello"},
        {"event": "bind", "subsystem": "vmbus", "name": G, "class": "fcopy", "driver": "uio_hv_generic"},
        {"event": "add", "subsystem": "uio", "name": "uio0", "class": None, "driver": None},
        {"event": "something", "x": 1},
    )]
    assert texts[0].startswith("   1.500  packet    COMP(11) flags=0x0 txid=9 len=30  "
                               "68 69 00 68 ...  |hi.h|")
    assert "(empty)" in texts[2] and "txid" not in texts[3] and "txid=4" in texts[4]
    assert "was: no driver" in texts[5] and "not monitored" in texts[6] and "monitor_id 5" in texts[7]
    assert "reason: rescinded" in texts[11] and "-> hv_utils" in texts[12]
    assert f"bind    vmbus  {G}  (fcopy, driver uio_hv_generic)" in texts[15]
    assert f"add     uio    uio0  (device {G})" in texts[16]
    assert "something" in texts[17] and "x=1" in texts[17]


# -- --send -----------------------------------------------------------------------------------------
def test_parse_send(tmp_path: object) -> None:
    from pathlib import Path

    p = Path(str(tmp_path)) / "f"
    p.write_bytes(b"\x00\x01")
    assert parse_send("68656c6c6f") == b"hello"
    assert parse_send("0x68 65:6C") == b"hel"
    assert parse_send("") == b""
    assert parse_send(f"@{p}") == b"\x00\x01"
    with pytest.raises(ValueError, match="not hex"):
        parse_send("6")
    with pytest.raises(ValueError, match="cannot read"):
        parse_send(f"@{p}.missing")


# -- watch ------------------------------------------------------------------------------------------
def acts(events: list[WatchEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.action, e.subsystem, e.driver) for e in events]


def test_diff_follows_kernel_order() -> None:
    hb = DevSnap("heartbeat", "hv_utils", None)
    assert diff({G: hb}, {G: hb}) == []
    assert acts(diff({}, {G: hb})) == [("add", "vmbus", None), ("bind", "vmbus", "hv_utils")]
    bound = DevSnap("heartbeat", "uio_hv_generic", "uio0")
    assert acts(diff({G: hb}, {G: bound})) == [
        ("unbind", "vmbus", "hv_utils"), ("add", "uio", None), ("bind", "vmbus", "uio_hv_generic")]
    assert acts(diff({G: bound}, {})) == [
        ("remove", "uio", None), ("unbind", "vmbus", "uio_hv_generic"), ("remove", "vmbus", None)]
    unbound = DevSnap("heartbeat", None, None)
    assert acts(diff({G: bound}, {G: unbound})) == [
        ("remove", "uio", None), ("unbind", "vmbus", "uio_hv_generic")]
    ev = diff({G: hb}, {G: bound})[1]
    assert (ev.name, ev.device, ev.cls) == ("uio0", G, "heartbeat")
    assert set(ev.as_dict(1.23456)) == set(SCHEMAS["watch.action"]) and ev.as_dict(1.23456)["t"] == 1.235


def test_event_from_udev() -> None:
    base = f"/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0004:00/VMBUS:00/{G}"
    ev = event_from_udev("bind", "vmbus", base, "uio_hv_generic", "heartbeat")
    assert ev == WatchEvent("bind", "vmbus", G, G, "heartbeat", "uio_hv_generic")
    ev = event_from_udev("remove", "uio", f"{base}/uio/uio3", None)
    assert ev is not None and (ev.name, ev.device) == ("uio3", G)
    ev = event_from_udev("add", "uio", "/sys/devices/virtual/uio/uio9", None)
    assert ev is not None and ev.device is None
    ev = event_from_udev("add", "vmbus", "/sys/devices/VMBUS:00/not-a-guid", None)
    assert ev is not None and ev.device is None
    assert event_from_udev("add", "net", "/sys/class/net/eth0", None) is None
