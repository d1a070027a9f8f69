"""Golden byte vectors for every IC layout.

The expected bytes are hex literals written by hand from the offsets in
include/linux/hyperv.h and include/uapi/linux/hyperv.h (KMCL_AND_IC.md section 3, SPEC.md
section 6), never produced by pyvmbus: a layout bug shared by the guest services and the host
models still fails here.
"""

from __future__ import annotations

import pytest

from pyvmbus.ic import messages as m
from pyvmbus.ic.messages import (
    DoFcopy,
    FcopyHdr,
    HeartbeatMsg,
    IcMsgHdr,
    IcNegotiate,
    PipeHeader,
    ShutdownMsg,
    StartFcopy,
    TimesyncData,
    TimesyncRefData,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def test_constants() -> None:
    assert m.ICMSG_HDR == 28
    assert m.IC_VERSION_NEGOTIATION_MAX_VER_COUNT == 100
    assert m.UTIL_FW_VERSION == 0x00030000
    assert m.UTIL_WS2K8_FW_VERSION == 0x00010000
    assert m.WIN8_SRV_VERSION == 0x00010001
    assert m.WLTIMEDELTA == 116444736000000000
    assert m.DATA_FRAGMENT == 6144
    assert m.W_MAX_PATH == 260
    assert (m.HV_S_OK, m.HV_E_FAIL, m.HV_S_CONT) == (0, 0x80004005, 0x80070103)
    assert (m.HV_ERROR_NOT_SUPPORTED, m.HV_ERROR_MACHINE_LOCKED) == (0x80070032, 0x800704F7)
    assert (m.HV_ERROR_DEVICE_NOT_CONNECTED, m.HV_INVALIDARG) == (0x8007048F, 0x80070057)
    assert (m.HV_GUID_NOTFOUND, m.HV_ERROR_ALREADY_EXISTS) == (0x80041002, 0x80070050)
    assert m.HV_ERROR_DISK_FULL == 0x80070070
    assert m.HV_E_ACCESSDENIED == 0x80070005
    assert [int(t) for t in m.IcMsgType] == [0, 1, 2, 3, 4, 5, 7]
    assert (m.IcFlags.TRANSACTION, m.IcFlags.REQUEST, m.IcFlags.RESPONSE) == (1, 2, 4)
    assert [int(o) for o in m.FcopyOp] == [0, 1, 2, 3]
    assert (m.CopyFlags.OVER_WRITE, m.CopyFlags.CREATE_PATH) == (1, 2)
    assert (m.TimesyncFlags.PROBE, m.TimesyncFlags.SYNC, m.TimesyncFlags.SAMPLE) == (0, 1, 2)
    assert m.FW_VERSIONS == (0x30000, 0x10000)
    assert m.SD_VERSIONS == (0x30002, 0x30001, 0x30000, 0x10000)
    assert m.TS_VERSIONS == (0x40000, 0x30000, 0x10000)
    assert m.HB_VERSIONS == (0x30000, 0x10000)


def test_sizes() -> None:
    assert PipeHeader.STRUCT.size == PipeHeader.SIZE == 8
    assert IcMsgHdr.STRUCT.size == IcMsgHdr.SIZE == 20
    assert IcNegotiate.STRUCT.size == IcNegotiate.SIZE == 8
    assert HeartbeatMsg.STRUCT.size == HeartbeatMsg.SIZE == 40
    assert ShutdownMsg.STRUCT.size == ShutdownMsg.SIZE == 2060
    assert TimesyncData.STRUCT.size == TimesyncData.SIZE == 25
    assert TimesyncRefData.STRUCT.size == TimesyncRefData.SIZE == 22
    assert FcopyHdr.STRUCT.size == FcopyHdr.SIZE == 36
    assert StartFcopy.STRUCT.size == StartFcopy.SIZE == 1088
    assert DoFcopy.STRUCT.size == DoFcopy.FIXED == 52
    assert DoFcopy.SIZE == 6196
    assert m.negotiate_pkt_size(2, 3) == 28 + 8 + 20


def test_pipe_header() -> None:
    raw = h("01000000 2c000000")
    assert PipeHeader(1, 0x2C).pack() == raw
    assert PipeHeader.unpack_from(raw) == PipeHeader(1, 0x2C)


def test_icmsg_hdr() -> None:
    # icverframe 3.0 @0, icmsgtype 1 @4, icvermsg 3.1 @6, icmsgsize 0x28 @10,
    # status 0x80004005 @12, ictransaction_id 0x7a @16, icflags 5 @17, reserved @18.
    raw = h("0300 0000  0100  0300 0100  2800  05400080  7a  05  0000")
    hdr = IcMsgHdr(0x30000, 1, 0x30001, 0x28, 0x80004005, 0x7A, 5)
    assert hdr.pack() == raw
    assert IcMsgHdr.unpack_from(raw, 0) == hdr
    # Single-field offsets the services rewrite in place (from the start of the message).
    at = (IcMsgHdr.MSGTYPE_AT, IcMsgHdr.MSGSIZE_AT, IcMsgHdr.STATUS_AT, IcMsgHdr.FLAGS_AT)
    assert at == (12, 18, 20, 25)


def test_whole_heartbeat_message() -> None:
    body = HeartbeatMsg(0x0102030405060708).pack()
    assert body == h("0807060504030201") + bytes(32)
    msg = m.build_message(1, body, framework_version=0x30000, message_version=0x30000, transaction_id=9)
    assert msg == h(
        "01000000 3c000000"  # pipe: flags 1, msgsize 20 + 40
        "0300 0000 0100 0300 0000 2800 00000000 09 03 0000"  # 3.0, type 1, 3.0, size 40, ok, tid 9, T|R
        "0807060504030201"
    ) + bytes(32)
    assert HeartbeatMsg.unpack_from(msg) == HeartbeatMsg(0x0102030405060708)
    assert HeartbeatMsg.SEQ_NUM_AT == 28


def test_negotiate() -> None:
    neg = IcNegotiate((0x10000, 0x30000), (0x30002,))
    raw = h("0200 0100 00000000  0100 0000  0300 0000  0300 0200")
    assert neg.pack() == raw
    assert IcNegotiate.unpack_from(raw, 0) == neg
    assert (IcNegotiate.COUNTS_AT, IcNegotiate.DATA_AT) == (28, 36)


def test_shutdown_msg() -> None:
    text = "hi".encode("utf-16-le").ljust(2048, b"\0")
    msg = ShutdownMsg(0x11223344, 30, 3, text)
    raw = h("44332211 1e000000 03000000 6800 6900") + bytes(2044)
    assert len(raw) == 2060
    assert msg.pack() == raw
    assert ShutdownMsg.unpack_from(raw, 0) == msg
    assert msg.message == "hi"


def test_timesync_data() -> None:
    msg = TimesyncData(0x0102030405060708, 0x1112131415161718, 0x2122232425262728, 1)
    raw = h("0807060504030201 1817161514131211 2827262524232221 01")
    assert msg.pack() == raw
    assert TimesyncData.unpack_from(raw, 0) == msg


def test_timesync_ref_data() -> None:
    msg = TimesyncRefData(0x0102030405060708, 0x1112131415161718, 2, 1, 3)
    raw = h("0807060504030201 1817161514131211 02 01 03 000000")
    assert msg.pack() == raw
    assert TimesyncRefData.unpack_from(raw, 0) == msg


def test_fcopy_hdr() -> None:
    msg = FcopyHdr(3, bytes(range(16)), bytes(range(16, 32)))
    raw = h("03000000 000102030405060708090a0b0c0d0e0f 101112131415161718191a1b1c1d1e1f")
    assert msg.pack() == raw
    assert FcopyHdr.unpack_from(raw, 0) == msg


def test_start_fcopy() -> None:
    expected = bytearray(1088)  # operation 0 @0, service ids zero @4..36
    expected[36 : 36 + 10] = h("6100 2e00 7400 7800 7400")  # file_name "a.txt" @36, u16[260]
    expected[556 : 556 + 8] = h("2f00 7400 6d00 7000")  # path_name "/tmp" @556, u16[260]
    expected[1076:1080] = h("03000000")  # copy_flags @1076
    expected[1080:1088] = h("0200000001000000")  # file_size @1080
    msg = StartFcopy("a.txt", "/tmp", 3, 0x100000002)
    assert msg.pack() == bytes(expected)
    assert StartFcopy.unpack_from(bytes(expected), 0) == msg


def test_start_fcopy_full_width_name_has_no_nul() -> None:
    name = "n" * 260
    raw = StartFcopy(name, "/", 0, 0).pack()
    assert raw[36:556] == h("6e00") * 260
    assert StartFcopy.unpack_from(raw, 0).file_name == name
    with pytest.raises(ValueError):
        StartFcopy("n" * 261, "/", 0, 0).pack()


def test_do_fcopy_has_pad_before_offset() -> None:
    # uapi hv_do_fcopy (packed): hdr 36, u32 pad @36, u64 offset @40, u32 size @48, data @52.
    expected = bytearray(6196)
    expected[0:4] = h("01000000")
    expected[40:48] = h("0807060504030201")
    expected[48:52] = h("03000000")
    expected[52:55] = h("aabbcc")
    msg = DoFcopy(0x0102030405060708, h("aabbcc"))
    assert msg.pack() == bytes(expected)
    assert msg.pack(full=False) == bytes(expected[:55])
    assert DoFcopy.unpack_from(bytes(expected), 0) == msg
    with pytest.raises(ValueError):
        DoFcopy(0, bytes(6145)).pack()


def test_utf16_names() -> None:
    raw = m.encode_utf16z("Grüße 😀", 16)
    assert raw == h("4700 7200 fc00 df00 6500 2000 3dd8 00de") + bytes(16)
    assert m.decode_utf16z(raw) == "Grüße 😀"
    with pytest.raises(UnicodeDecodeError):
        m.decode_utf16z(h("00d8 4100 0000"))  # lone high surrogate


def test_time_conversion() -> None:
    assert m.filetime_to_unix_ns(116444736000000000) == 0
    assert m.filetime_to_unix_ns(116444736000000001) == 100
    assert m.unix_ns_to_filetime(1_000_000_000) == 116444736010000000


def test_versions_and_names() -> None:
    assert m.version(3, 2) == 0x30002
    assert m.version_str(0x40000) == "4.0"
    assert m.status_name(0x80070050) == "HV_ERROR_ALREADY_EXISTS"
    assert m.status_name(0x12345678) == "0x12345678"
