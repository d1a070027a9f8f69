"""Wire formats of the Hyper-V integration services (ICs), declared once.

Every message is a frozen dataclass with one ``struct.Struct`` (``STRUCT``, little-endian,
no padding: the C structs are ``__packed``). Why dataclass + ``struct`` rather than
``ctypes.LittleEndianStructure``: ``struct`` packs straight into and out of any buffer
(the ring's ``bytes``, a ``bytearray`` response) without an intermediate object per field,
the format string *is* the layout (one line to review against the C header), and frozen
dataclasses give typed, hashable values that mypy checks. The guest services
(``pyvmbus.ic.*``) and the host models (``pyvmbus.mock.ic_models``) both use these classes,
so the tests pin each layout with hand-written golden bytes: a layout bug both sides share
still fails.

Sources: include/linux/hyperv.h (vmbuspipe_hdr, icmsg_hdr, icmsg_negotiate, heartbeat,
shutdown, timesync), include/uapi/linux/hyperv.h (fcopy, KVP, HV_* status codes,
UTIL_FW_VERSION), tools/hv/hv_fcopy_uio_daemon.c, drivers/hv/hv_kvp.c (KVP versions).
``hv_do_fcopy`` follows the real uapi header (torvalds/linux
include/uapi/linux/hyperv.h, packed), which has a ``u32 pad`` between the header and
``offset``: offset at +40, size at +48, data at +52, 6196 bytes in all. The KMCL sheet's
layout without ``pad`` is wrong. ``HV_ERROR_DISK_FULL`` = 0x80070070 is in that same header.

Versions are ints packed as ``major << 16 | minor``, as the kernel's tables hold them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, TypeAlias

__all__ = [
    "ADDR_FAMILY_IPV4",
    "ADDR_FAMILY_IPV6",
    "ADDR_FAMILY_NONE",
    "Buffer",
    "HV_KVP_EXCHANGE_MAX_KEY_SIZE",
    "HV_KVP_EXCHANGE_MAX_VALUE_SIZE",
    "HV_KVP_MSG_SIZE",
    "KVP_VERSIONS",
    "KvpDelete",
    "KvpEnumerate",
    "KvpExchange",
    "KvpHdr",
    "KvpIpAddrValue",
    "KvpIpMsg",
    "KvpOp",
    "KvpPoolId",
    "KvpValue",
    "MAX_ADAPTER_ID_SIZE",
    "MAX_GATEWAY_SIZE",
    "MAX_IP_ADDR_SIZE",
    "RegType",
    "CopyFlags",
    "DATA_FRAGMENT",
    "FCOPY_INSTANCE_GUID",
    "FW_VERSIONS",
    "FcopyHdr",
    "FcopyOp",
    "HB_VERSIONS",
    "HV_E_ACCESSDENIED",
    "HV_E_FAIL",
    "HV_ERROR_ALREADY_EXISTS",
    "HV_ERROR_DEVICE_NOT_CONNECTED",
    "HV_ERROR_DISK_FULL",
    "HV_ERROR_MACHINE_LOCKED",
    "HV_ERROR_NOT_SUPPORTED",
    "HV_GUID_NOTFOUND",
    "HV_INVALIDARG",
    "HV_S_CONT",
    "HV_S_OK",
    "HeartbeatMsg",
    "ICMSG_HDR",
    "IC_VERSION_NEGOTIATION_MAX_VER_COUNT",
    "IcFlags",
    "IcMsgHdr",
    "IcMsgType",
    "IcNegotiate",
    "PIPE_FLAG_DATA",
    "PipeHeader",
    "SD_VERSIONS",
    "ShutdownFlags",
    "ShutdownMsg",
    "StartFcopy",
    "DoFcopy",
    "TS_VERSIONS",
    "TimesyncData",
    "TimesyncFlags",
    "TimesyncRefData",
    "UTIL_FW_VERSION",
    "UTIL_WS2K8_FW_VERSION",
    "WIN8_SRV_VERSION",
    "WLTIMEDELTA",
    "W_MAX_PATH",
    "build_message",
    "decode_utf16z",
    "encode_utf16z",
    "filetime_to_unix_ns",
    "negotiate_pkt_size",
    "status_name",
    "unix_ns_to_filetime",
    "version",
    "version_str",
]

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Anything a message can be read from (a ring payload, a response being built)."""


def version(major: int, minor: int) -> int:
    """Pack a version the way the kernel's version tables do: ``major << 16 | minor``."""
    return (major & 0xFFFF) << 16 | (minor & 0xFFFF)


def version_str(v: int) -> str:
    """``0x30001`` -> ``"3.1"``."""
    return f"{v >> 16}.{v & 0xFFFF}"


# --- constants --------------------------------------------------------------------------

UTIL_FW_VERSION = version(3, 0)
UTIL_WS2K8_FW_VERSION = version(1, 0)
WIN8_SRV_VERSION = version(1, 1)
"""The fcopy service version (hv_fcopy_uio_daemon.c)."""

FW_VERSIONS: tuple[int, ...] = (UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION)
"""Framework versions hv_util.c offers, newest first."""
SD_VERSIONS: tuple[int, ...] = (version(3, 2), version(3, 1), version(3, 0), version(1, 0))
TS_VERSIONS: tuple[int, ...] = (version(4, 0), version(3, 0), version(1, 0))
HB_VERSIONS: tuple[int, ...] = (version(3, 0), version(1, 0))
KVP_VERSIONS: tuple[int, ...] = (version(4, 0), version(3, 0), version(1, 0))
"""hv_kvp.c: WIN8 4.0, WIN7 3.0, WS2008 1.0 (with framework 3.0 / 1.0)."""

IC_VERSION_NEGOTIATION_MAX_VER_COUNT = 100
ICMSG_HDR = 28
"""sizeof(vmbuspipe_hdr) + sizeof(icmsg_hdr): where every message body starts."""

PIPE_FLAG_DATA = 1
"""vmbuspipe_hdr.flags a host puts on a data message (OpenVMM PIPE_PACKET_TYPE_DATA)."""

W_MAX_PATH = 260
DATA_FRAGMENT = 6 * 1024
FCOPY_INSTANCE_GUID = "eb765408-105f-49b6-b4aa-c123b64d17d4"
"""The instance GUID hv_fcopy_uio_daemon.c hard-codes for the fcopy device."""

WLTIMEDELTA = 116444736000000000
"""100 ns intervals from 1601-01-01 (Windows FILETIME epoch) to 1970-01-01."""

# Status codes (include/uapi/linux/hyperv.h). HRESULT-style u32.
HV_S_OK = 0x00000000
HV_E_FAIL = 0x80004005
HV_S_CONT = 0x80070103
HV_ERROR_NOT_SUPPORTED = 0x80070032
HV_ERROR_MACHINE_LOCKED = 0x800704F7
HV_ERROR_DEVICE_NOT_CONNECTED = 0x8007048F
HV_INVALIDARG = 0x80070057
HV_GUID_NOTFOUND = 0x80041002
HV_ERROR_ALREADY_EXISTS = 0x80070050
HV_ERROR_DISK_FULL = 0x80070070
HV_E_ACCESSDENIED = 0x80070005
"""HRESULT_FROM_WIN32(ERROR_ACCESS_DENIED). Not in the Linux headers: pyvmbus's fcopy uses it
to refuse a destination outside the allowed roots, so the host shows "Access is denied"."""

_STATUS_NAMES = {
    HV_S_OK: "HV_S_OK",
    HV_E_FAIL: "HV_E_FAIL",
    HV_S_CONT: "HV_S_CONT",
    HV_ERROR_NOT_SUPPORTED: "HV_ERROR_NOT_SUPPORTED",
    HV_ERROR_MACHINE_LOCKED: "HV_ERROR_MACHINE_LOCKED",
    HV_ERROR_DEVICE_NOT_CONNECTED: "HV_ERROR_DEVICE_NOT_CONNECTED",
    HV_INVALIDARG: "HV_INVALIDARG",
    HV_GUID_NOTFOUND: "HV_GUID_NOTFOUND",
    HV_ERROR_ALREADY_EXISTS: "HV_ERROR_ALREADY_EXISTS",
    HV_ERROR_DISK_FULL: "HV_ERROR_DISK_FULL",
    HV_E_ACCESSDENIED: "HV_E_ACCESSDENIED",
}


def status_name(status: int) -> str:
    """A readable name for a status code (hex for unknown ones)."""
    return _STATUS_NAMES.get(status, f"{status:#010x}")


class IcMsgType(IntEnum):
    """icmsg_hdr.icmsgtype (ICMSGTYPE_*). 6 is not defined."""

    NEGOTIATE = 0
    HEARTBEAT = 1
    KVPEXCHANGE = 2
    SHUTDOWN = 3
    TIMESYNC = 4
    VSS = 5
    FCOPY = 7


class IcFlags(IntFlag):
    """icmsg_hdr.icflags (ICMSGHDRFLAG_*)."""

    TRANSACTION = 1
    REQUEST = 2
    RESPONSE = 4


class ShutdownFlags(IntFlag):
    """shutdown_msg_data.flags: 0 shut down, 2 reboot, 4 hibernate; 1 ORed in = force."""

    SHUTDOWN = 0
    FORCE = 1
    REBOOT = 2
    HIBERNATE = 4


class TimesyncFlags(IntFlag):
    """ictimesync flags (ICTIMESYNCFLAG_*): SYNC is a hard request, SAMPLE a hint."""

    PROBE = 0
    SYNC = 1
    SAMPLE = 2


class FcopyOp(IntEnum):
    """enum hv_fcopy_op."""

    START_FILE_COPY = 0
    WRITE_TO_FILE = 1
    COMPLETE_FCOPY = 2
    CANCEL_FCOPY = 3


class CopyFlags(IntFlag):
    """hv_start_fcopy.copy_flags."""

    NONE = 0
    OVER_WRITE = 1
    CREATE_PATH = 2


def filetime_to_unix_ns(filetime: int) -> int:
    """Windows FILETIME (100 ns since 1601) -> Unix ns, as the kernel's reftime_to_ns."""
    return (filetime - WLTIMEDELTA) * 100


def unix_ns_to_filetime(ns: int) -> int:
    """Unix ns -> Windows FILETIME (100 ns since 1601)."""
    return ns // 100 + WLTIMEDELTA


def encode_utf16z(text: str, units: int = W_MAX_PATH) -> bytes:
    """``text`` as UTF-16LE in a fixed array of ``units`` u16, NUL-padded (ValueError if too long)."""
    raw = text.encode("utf-16-le")
    if len(raw) > 2 * units:
        raise ValueError(f"{text[:40]!r}...: {len(raw) // 2} UTF-16 units, the field holds {units}")
    return raw.ljust(2 * units, b"\0")


def decode_utf16z(raw: Buffer) -> str:
    """A fixed UTF-16LE array up to its first NUL unit (or all of it): UnicodeDecodeError if invalid."""
    mv = memoryview(raw).cast("B")
    end = len(mv) & ~1
    for i in range(0, end, 2):
        if mv[i] == 0 and mv[i + 1] == 0:
            end = i
            break
    return bytes(mv[:end]).decode("utf-16-le")


# --- the framing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PipeHeader:
    """struct vmbuspipe_hdr {u32 flags; u32 msgsize;}: 8 bytes; Linux echoes it untouched."""

    flags: int = PIPE_FLAG_DATA
    msgsize: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    SIZE: ClassVar[int] = 8

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.flags, self.msgsize)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> PipeHeader:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class IcMsgHdr:
    """struct icmsg_hdr: 20 bytes at offset 8 of every IC message.

    +0 icverframe (u16 major, u16 minor), +4 icmsgtype u16, +6 icvermsg (u16 major, u16 minor),
    +10 icmsgsize u16, +12 status u32, +16 ictransaction_id u8, +17 icflags u8, +18 reserved[2].
    """

    framework_version: int
    msgtype: int
    message_version: int
    msgsize: int
    status: int
    transaction_id: int
    flags: int
    reserved: bytes = b"\0\0"

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHHHHHIBB2s")
    SIZE: ClassVar[int] = 20
    OFFSET: ClassVar[int] = 8
    """Where the header sits in a message (after the pipe header)."""
    # Single fields the guest rewrites in place (offsets from the start of the message).
    MSGSIZE_AT: ClassVar[int] = 8 + 10
    STATUS_AT: ClassVar[int] = 8 + 12
    FLAGS_AT: ClassVar[int] = 8 + 17
    MSGTYPE_AT: ClassVar[int] = 8 + 4
    U16: ClassVar[struct.Struct] = struct.Struct("<H")
    U32: ClassVar[struct.Struct] = struct.Struct("<I")

    def pack(self) -> bytes:
        fw, mv = self.framework_version, self.message_version
        return self.STRUCT.pack(
            fw >> 16, fw & 0xFFFF, self.msgtype, mv >> 16, mv & 0xFFFF, self.msgsize,
            self.status, self.transaction_id, self.flags, self.reserved,
        )

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = OFFSET) -> IcMsgHdr:
        fmaj, fmin, mtype, mmaj, mmin, size, status, tid, flags, res = cls.STRUCT.unpack_from(buf, offset)
        return cls(version(fmaj, fmin), mtype, version(mmaj, mmin), size, status, tid, flags, res)


def negotiate_pkt_size(framework_count: int, message_count: int) -> int:
    """ICMSG_NEGOTIATE_PKT_SIZE: 28 + 8 + 4 * (framework_count + message_count)."""
    return ICMSG_HDR + IcNegotiate.SIZE + 4 * (framework_count + message_count)


@dataclass(frozen=True, slots=True)
class IcNegotiate:
    """struct icmsg_negotiate at offset 28: u16 icframe_vercnt, u16 icmsg_vercnt, u32 reserved,
    then ic_version icversion_data[] (u16 major, u16 minor each): framework versions first,
    service versions after them. ``SIZE`` is the fixed part (8 bytes)."""

    framework_versions: tuple[int, ...]
    message_versions: tuple[int, ...]
    reserved: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHI")
    SIZE: ClassVar[int] = 8
    VERSION: ClassVar[struct.Struct] = struct.Struct("<HH")
    """One ic_version (major, minor)."""
    COUNTS: ClassVar[struct.Struct] = struct.Struct("<HH")
    """icframe_vercnt, icmsg_vercnt: all the kernel needs before it validates."""
    COUNTS_AT: ClassVar[int] = ICMSG_HDR
    DATA_AT: ClassVar[int] = ICMSG_HDR + 8

    def pack(self) -> bytes:
        out = bytearray(
            self.STRUCT.pack(len(self.framework_versions), len(self.message_versions), self.reserved)
        )
        for v in (*self.framework_versions, *self.message_versions):
            out += self.VERSION.pack(v >> 16, v & 0xFFFF)
        return bytes(out)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> IcNegotiate:
        """Parse the counts and as many versions as they announce (struct.error if short)."""
        nf, nm, reserved = cls.STRUCT.unpack_from(buf, offset)
        vs = [version(*cls.VERSION.unpack_from(buf, offset + 8 + 4 * i)) for i in range(nf + nm)]
        return cls(tuple(vs[:nf]), tuple(vs[nf:]), reserved)


# --- service bodies (all at offset ICMSG_HDR) -------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartbeatMsg:
    """struct heartbeat_msg_data {u64 seq_num; u32 reserved[8];}: 40 bytes.

    The guest needs only ``seq_num`` (28 + 8 bytes): the host may not fill the reserved area.
    """

    seq_num: int
    reserved: bytes = bytes(32)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q32s")
    SIZE: ClassVar[int] = 40
    SEQ_NUM: ClassVar[struct.Struct] = struct.Struct("<Q")
    SEQ_NUM_AT: ClassVar[int] = ICMSG_HDR + 0

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.seq_num, self.reserved)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> HeartbeatMsg:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class ShutdownMsg:
    """struct shutdown_msg_data {u32 reason_code; u32 timeout_seconds; u32 flags;
    u8 display_message[2048];}: 2060 bytes."""

    reason_code: int
    timeout_seconds: int
    flags: int
    display_message: bytes = bytes(2048)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<III2048s")
    SIZE: ClassVar[int] = 2060

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.reason_code, self.timeout_seconds, self.flags, self.display_message)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> ShutdownMsg:
        return cls(*cls.STRUCT.unpack_from(buf, offset))

    @property
    def message(self) -> str:
        """The display message, best effort: Windows fills it as UTF-16LE, NUL-terminated."""
        raw = self.display_message
        end = next((i for i in range(0, len(raw) - 1, 2) if raw[i] == 0 and raw[i + 1] == 0), len(raw) & ~1)
        return raw[:end].decode("utf-16-le", errors="replace")


@dataclass(frozen=True, slots=True)
class TimesyncData:
    """struct ictimesync_data {u64 parenttime; u64 childtime; u64 roundtriptime; u8 flags;}:
    25 bytes; service versions <= 3.0. Times are FILETIME (100 ns since 1601)."""

    parenttime: int
    childtime: int = 0
    roundtriptime: int = 0
    flags: int = TimesyncFlags.SAMPLE

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQB")
    SIZE: ClassVar[int] = 25

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.parenttime, self.childtime, self.roundtriptime, self.flags)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> TimesyncData:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class TimesyncRefData:
    """struct ictimesync_ref_data {u64 parenttime; u64 vmreferencetime; u8 flags;
    char leapflags; char stratum; u8 reserved[3];}: 22 bytes; service version 4.0.

    ``vmreferencetime`` is the guest's Hyper-V reference counter (100 ns units) when the
    host took ``parenttime``; the guest adds the counter's advance since then.
    """

    parenttime: int
    vmreferencetime: int
    flags: int = TimesyncFlags.SAMPLE
    leapflags: int = 0
    stratum: int = 0
    reserved: bytes = b"\0\0\0"

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQBBB3s")
    SIZE: ClassVar[int] = 22

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.parenttime, self.vmreferencetime, self.flags, self.leapflags, self.stratum, self.reserved
        )

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> TimesyncRefData:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class FcopyHdr:
    """struct hv_fcopy_hdr {u32 operation; uuid_le service_id0; uuid_le service_id1;}: 36 bytes
    (the service ids are unused)."""

    operation: int
    service_id0: bytes = bytes(16)
    service_id1: bytes = bytes(16)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I16s16s")
    SIZE: ClassVar[int] = 36

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.operation, self.service_id0, self.service_id1)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> FcopyHdr:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class StartFcopy:
    """struct hv_start_fcopy (packed): hdr (36), u16 file_name[260] @36, u16 path_name[260] @556,
    u32 copy_flags @1076, u64 file_size @1080: 1088 bytes. Names are UTF-16LE, NUL-terminated
    unless they fill all 260 units."""

    file_name: str
    path_name: str
    copy_flags: int
    file_size: int
    hdr: FcopyHdr = FcopyHdr(FcopyOp.START_FILE_COPY)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I16s16s520s520sIQ")
    SIZE: ClassVar[int] = 1088

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.hdr.operation, self.hdr.service_id0, self.hdr.service_id1,
            encode_utf16z(self.file_name), encode_utf16z(self.path_name), self.copy_flags, self.file_size,
        )

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> StartFcopy:
        """UnicodeDecodeError if a name is not valid UTF-16."""
        op, s0, s1, fname, pname, flags, size = cls.STRUCT.unpack_from(buf, offset)
        return cls(decode_utf16z(fname), decode_utf16z(pname), flags, size, FcopyHdr(op, s0, s1))


@dataclass(frozen=True, slots=True)
class DoFcopy:
    """struct hv_do_fcopy (packed): hdr (36), u32 pad @36, u64 offset @40, u32 size @48,
    u8 data[6144] @52: 6196 bytes. ``STRUCT`` is the fixed part (52 bytes); ``data`` holds the
    ``size`` valid bytes. ``pack()`` zero-fills the array to its full 6144 bytes, as a C
    sender of the whole struct does."""

    offset: int
    data: bytes
    pad: int = 0
    hdr: FcopyHdr = FcopyHdr(FcopyOp.WRITE_TO_FILE)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I16s16sIQI")
    FIXED: ClassVar[int] = 52
    DATA_AT: ClassVar[int] = 52
    SIZE: ClassVar[int] = 52 + DATA_FRAGMENT

    def pack(self, *, full: bool = True) -> bytes:
        if len(self.data) > DATA_FRAGMENT:
            raise ValueError(f"fragment of {len(self.data)} bytes; at most {DATA_FRAGMENT}")
        head = self.STRUCT.pack(
            self.hdr.operation, self.hdr.service_id0, self.hdr.service_id1, self.pad, self.offset,
            len(self.data),
        )
        tail = bytes(DATA_FRAGMENT - len(self.data)) if full else b""
        return head + self.data + tail

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> DoFcopy:
        op, s0, s1, pad, off, size = cls.STRUCT.unpack_from(buf, offset)
        start = offset + cls.DATA_AT
        if size > DATA_FRAGMENT or start + size > len(buf):
            raise ValueError(f"hv_do_fcopy.size={size} does not fit the message")
        return cls(off, bytes(buf[start : start + size]), pad, FcopyHdr(op, s0, s1))


def build_message(
    msgtype: int,
    body: bytes,
    *,
    framework_version: int = 0,
    message_version: int = 0,
    flags: int = IcFlags.TRANSACTION | IcFlags.REQUEST,
    status: int = HV_S_OK,
    transaction_id: int = 0,
    pipe_flags: int = PIPE_FLAG_DATA,
) -> bytes:
    """A whole IC message as a host sends it: pipe header (msgsize = 20 + body), icmsg_hdr
    (icmsgsize = body length), body."""
    hdr = IcMsgHdr(framework_version, msgtype, message_version, len(body), status, transaction_id, flags)
    return PipeHeader(pipe_flags, IcMsgHdr.SIZE + len(body)).pack() + hdr.pack() + body


# --- KVP (data exchange): include/uapi/linux/hyperv.h --------------------------------------

HV_KVP_EXCHANGE_MAX_KEY_SIZE = 512
"""Bytes of a key on the wire (UTF-16LE) and in a pool record (UTF-8), NUL included."""
HV_KVP_EXCHANGE_MAX_VALUE_SIZE = 2048
"""Bytes of a value on the wire (UTF-16LE) and in a pool record (UTF-8), NUL included."""
MAX_ADAPTER_ID_SIZE = 128
MAX_IP_ADDR_SIZE = 1024
MAX_GATEWAY_SIZE = 512
"""u16 units of the hv_kvp_ipaddr_value string fields."""
ADDR_FAMILY_NONE = 0
ADDR_FAMILY_IPV4 = 1
ADDR_FAMILY_IPV6 = 2


class KvpOp(IntEnum):
    """enum hv_kvp_exchg_op (hv_kvp_hdr.operation)."""

    GET = 0
    SET = 1
    DELETE = 2
    ENUMERATE = 3
    GET_IP_INFO = 4
    SET_IP_INFO = 5


class KvpPoolId(IntEnum):
    """enum hv_kvp_exchg_pool: which pool file (/var/lib/hyperv/.kvp_pool_N) a request is about."""

    EXTERNAL = 0
    """Written by the host (Add-VMKvp / AddKvpItems)."""
    GUEST = 1
    """Written by the guest's own tools (cloud-init, the Azure agent); read by the host."""
    AUTO = 2
    """The intrinsic values (FullyQualifiedDomainName, OSName, ...), made up by the guest."""
    AUTO_EXTERNAL = 3
    AUTO_INTERNAL = 4


class RegType(IntEnum):
    """hv_kvp_exchg_msg_value.value_type: REG_SZ (UTF-16 string), REG_U32, REG_U64."""

    REG_SZ = 1
    REG_U32 = 4
    REG_U64 = 8


@dataclass(frozen=True, slots=True)
class KvpHdr:
    """struct hv_kvp_hdr {u8 operation; u8 pool; u16 pad;}: 4 bytes at offset 28, unioned
    with ``int error`` (the daemon's status on its way back; on the wire the status is in
    icmsg_hdr)."""

    operation: int
    pool: int
    pad: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<BBH")
    SIZE: ClassVar[int] = 4

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.operation, self.pool, self.pad)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> KvpHdr:
        return cls(*cls.STRUCT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class KvpValue:
    """struct hv_kvp_exchg_msg_value (packed): u32 value_type @0, u32 key_size @4,
    u32 value_size @8, u8 key[512] @12, u8 value[2048] @524 (unioned with u32 / u64):
    2572 bytes. Sizes are bytes; strings are UTF-16LE, the NUL counted in the size."""

    value_type: int
    key_size: int
    value_size: int
    key: bytes = bytes(HV_KVP_EXCHANGE_MAX_KEY_SIZE)
    value: bytes = bytes(HV_KVP_EXCHANGE_MAX_VALUE_SIZE)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<III512s2048s")
    SIZE: ClassVar[int] = 2572
    KEY_AT: ClassVar[int] = 12
    VALUE_AT: ClassVar[int] = 524
    HEAD: ClassVar[struct.Struct] = struct.Struct("<III")
    """value_type, key_size, value_size."""
    U32: ClassVar[struct.Struct] = struct.Struct("<I")
    U64: ClassVar[struct.Struct] = struct.Struct("<Q")

    @classmethod
    def text(cls, key: str, value: str | int = "", value_type: int = RegType.REG_SZ) -> KvpValue:
        """A value as a host sends it: UTF-16LE strings with their NUL counted in the sizes;
        ``value`` an int for REG_U32 / REG_U64 (value_size 4 / 8). ValueError if too long."""
        k = (key + "\0").encode("utf-16-le")
        if len(k) > HV_KVP_EXCHANGE_MAX_KEY_SIZE:
            raise ValueError(f"key {key[:40]!r}: {len(k)} bytes as UTF-16, "
                             f"at most {HV_KVP_EXCHANGE_MAX_KEY_SIZE}")
        if value_type == RegType.REG_U32:
            v = cls.U32.pack(int(value))
        elif value_type == RegType.REG_U64:
            v = cls.U64.pack(int(value))
        else:
            v = (str(value) + "\0").encode("utf-16-le")
        if len(v) > HV_KVP_EXCHANGE_MAX_VALUE_SIZE:
            raise ValueError(f"value: {len(v)} bytes as UTF-16, at most {HV_KVP_EXCHANGE_MAX_VALUE_SIZE}")
        return cls(int(value_type), len(k), len(v), k.ljust(HV_KVP_EXCHANGE_MAX_KEY_SIZE, b"\0"),
                   v.ljust(HV_KVP_EXCHANGE_MAX_VALUE_SIZE, b"\0"))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.value_type, self.key_size, self.value_size, self.key, self.value)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> KvpValue:
        return cls(*cls.STRUCT.unpack_from(buf, offset))

    @property
    def key_text(self) -> str:
        """The key up to its NUL (UnicodeDecodeError if not valid UTF-16)."""
        return decode_utf16z(self.key[: min(self.key_size, HV_KVP_EXCHANGE_MAX_KEY_SIZE)])

    @property
    def value_text(self) -> str:
        """A REG_SZ value up to its NUL (UnicodeDecodeError if not valid UTF-16)."""
        return decode_utf16z(self.value[: min(self.value_size, HV_KVP_EXCHANGE_MAX_VALUE_SIZE)])


@dataclass(frozen=True, slots=True)
class KvpExchange:
    """struct hv_kvp_msg for GET and SET: hv_kvp_hdr (4) then hv_kvp_exchg_msg_value @4:
    2576 bytes (value_type @4, key_size @8, value_size @12, key @16, value @528)."""

    hdr: KvpHdr
    data: KvpValue

    SIZE: ClassVar[int] = KvpHdr.SIZE + KvpValue.SIZE
    DATA_AT: ClassVar[int] = 4

    def pack(self) -> bytes:
        return self.hdr.pack() + self.data.pack()

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> KvpExchange:
        return cls(KvpHdr.unpack_from(buf, offset), KvpValue.unpack_from(buf, offset + cls.DATA_AT))


@dataclass(frozen=True, slots=True)
class KvpEnumerate:
    """struct hv_kvp_msg for ENUMERATE: hv_kvp_hdr (4), u32 index @4, hv_kvp_exchg_msg_value @8:
    2580 bytes (value_type @8, key_size @12, value_size @16, key @20, value @532). The host
    asks for index 0, 1, ... of a pool and stops at the first non-zero status."""

    hdr: KvpHdr
    index: int
    data: KvpValue = KvpValue(0, 0, 0)

    SIZE: ClassVar[int] = KvpHdr.SIZE + 4 + KvpValue.SIZE
    INDEX_AT: ClassVar[int] = 4
    DATA_AT: ClassVar[int] = 8

    def pack(self) -> bytes:
        return self.hdr.pack() + KvpValue.U32.pack(self.index) + self.data.pack()

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> KvpEnumerate:
        (index,) = KvpValue.U32.unpack_from(buf, offset + cls.INDEX_AT)
        return cls(KvpHdr.unpack_from(buf, offset), index, KvpValue.unpack_from(buf, offset + cls.DATA_AT))


@dataclass(frozen=True, slots=True)
class KvpDelete:
    """struct hv_kvp_msg for DELETE: hv_kvp_hdr (4), u32 key_size @4, u8 key[512] @8: 520 bytes."""

    hdr: KvpHdr
    key_size: int
    key: bytes = bytes(HV_KVP_EXCHANGE_MAX_KEY_SIZE)

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I512s")
    SIZE: ClassVar[int] = KvpHdr.SIZE + 4 + HV_KVP_EXCHANGE_MAX_KEY_SIZE
    KEY_SIZE_AT: ClassVar[int] = 4
    KEY_AT: ClassVar[int] = 8

    @classmethod
    def text(cls, pool: int, key: str) -> KvpDelete:
        k = (key + "\0").encode("utf-16-le")
        if len(k) > HV_KVP_EXCHANGE_MAX_KEY_SIZE:
            raise ValueError(f"key {key[:40]!r}: {len(k)} bytes as UTF-16, "
                             f"at most {HV_KVP_EXCHANGE_MAX_KEY_SIZE}")
        return cls(KvpHdr(KvpOp.DELETE, pool), len(k), k.ljust(HV_KVP_EXCHANGE_MAX_KEY_SIZE, b"\0"))

    def pack(self) -> bytes:
        return self.hdr.pack() + self.STRUCT.pack(self.key_size, self.key)

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> KvpDelete:
        return cls(KvpHdr.unpack_from(buf, offset), *cls.STRUCT.unpack_from(buf, offset + cls.KEY_SIZE_AT))


@dataclass(frozen=True, slots=True)
class KvpIpAddrValue:
    """struct hv_kvp_ipaddr_value (packed): u16 adapter_id[128] @0, u8 addr_family @256,
    u8 dhcp_enabled @257, u16 ip_addr[1024] @258, u16 sub_net[1024] @2306,
    u16 gate_way[512] @4354, u16 dns_addr[1024] @5378: 7426 bytes. Strings are UTF-16LE,
    lists separated by ';'."""

    adapter_id: str = ""
    addr_family: int = ADDR_FAMILY_NONE
    dhcp_enabled: int = 0
    ip_addr: str = ""
    sub_net: str = ""
    gate_way: str = ""
    dns_addr: str = ""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<256sBB2048s2048s1024s2048s")
    SIZE: ClassVar[int] = 7426
    FIELDS: ClassVar[dict[str, tuple[int, int]]] = {
        "adapter_id": (0, MAX_ADAPTER_ID_SIZE),
        "ip_addr": (258, MAX_IP_ADDR_SIZE),
        "sub_net": (2306, MAX_IP_ADDR_SIZE),
        "gate_way": (4354, MAX_GATEWAY_SIZE),
        "dns_addr": (5378, MAX_IP_ADDR_SIZE),
    }
    """String field -> (offset, u16 units)."""
    ADDR_FAMILY_AT: ClassVar[int] = 256
    DHCP_AT: ClassVar[int] = 257

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            encode_utf16z(self.adapter_id, MAX_ADAPTER_ID_SIZE), self.addr_family, self.dhcp_enabled,
            encode_utf16z(self.ip_addr, MAX_IP_ADDR_SIZE), encode_utf16z(self.sub_net, MAX_IP_ADDR_SIZE),
            encode_utf16z(self.gate_way, MAX_GATEWAY_SIZE), encode_utf16z(self.dns_addr, MAX_IP_ADDR_SIZE),
        )

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> KvpIpAddrValue:
        """UnicodeDecodeError if a string is not valid UTF-16."""
        aid, fam, dhcp, ip, sn, gw, dns = cls.STRUCT.unpack_from(buf, offset)
        return cls(decode_utf16z(aid), fam, dhcp, decode_utf16z(ip), decode_utf16z(sn),
                   decode_utf16z(gw), decode_utf16z(dns))


@dataclass(frozen=True, slots=True)
class KvpIpMsg:
    """struct hv_kvp_ip_msg (packed): u8 operation, u8 pool, hv_kvp_ipaddr_value @2 (no pad:
    unlike hv_kvp_msg the address block starts at body offset 2): 7428 bytes. GET_IP_INFO
    and SET_IP_INFO travel in this form."""

    operation: int
    pool: int
    value: KvpIpAddrValue = KvpIpAddrValue()

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<BB")
    SIZE: ClassVar[int] = 2 + KvpIpAddrValue.SIZE
    VALUE_AT: ClassVar[int] = 2

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.operation, self.pool) + self.value.pack()

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = ICMSG_HDR) -> KvpIpMsg:
        op, pool = cls.STRUCT.unpack_from(buf, offset)
        return cls(op, pool, KvpIpAddrValue.unpack_from(buf, offset + cls.VALUE_AT))


HV_KVP_MSG_SIZE = KvpHdr.SIZE + KvpIpAddrValue.SIZE
"""sizeof(struct hv_kvp_msg): the header and the largest body member (the IP block), 7430."""
