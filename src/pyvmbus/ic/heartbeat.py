"""Heartbeat IC (HV_HEART_BEAT_GUID 57164f39-9115-4e78-ab55-382f3bd5422d; ICMSGTYPE 1).

The host sends a request about every two seconds; the guest answers with ``seq_num + 1`` in
place, so the host knows the guest is alive (hv_util.c heartbeat_onchannelcallback).
"""

from __future__ import annotations

from typing import ClassVar

from .framework import IcService
from .messages import HB_VERSIONS, ICMSG_HDR, HeartbeatMsg, IcMsgType

__all__ = ["HeartbeatService"]

_U64 = (1 << 64) - 1


class HeartbeatService(IcService):
    """Answers every heartbeat with ``seq_num + 1`` (mod 2**64, as the kernel's u64 += 1).

    A heartbeat shorter than 28 + 8 bytes gets no answer (the reserved area is not required:
    the host may not fill it).
    """

    service_name: ClassVar[str] = "heartbeat"
    class_name: ClassVar[str] = "heartbeat"
    message_type: ClassVar[int] = IcMsgType.HEARTBEAT
    service_versions: ClassVar[tuple[int, ...]] = HB_VERSIONS

    def __init__(self) -> None:
        super().__init__()
        self.beats = 0
        self.last_seq: int | None = None
        """The last sequence number the host sent."""

    def _message(self, buf: bytearray) -> bool:
        if len(buf) < ICMSG_HDR + HeartbeatMsg.SEQ_NUM.size:
            self._drop(f"heartbeat of {len(buf)} bytes, needs {ICMSG_HDR + HeartbeatMsg.SEQ_NUM.size}")
            return False
        (seq,) = HeartbeatMsg.SEQ_NUM.unpack_from(buf, HeartbeatMsg.SEQ_NUM_AT)
        HeartbeatMsg.SEQ_NUM.pack_into(buf, HeartbeatMsg.SEQ_NUM_AT, (seq + 1) & _U64)
        self.last_seq = seq
        self.beats += 1
        return True
