"""Key-value pair exchange IC (HV_KVP_GUID a9a0f4e7-5a45-4d96-b827-8a841e8c03e6; ICMSGTYPE 2).

The Data Exchange service, as drivers/hv/hv_kvp.c and tools/hv/hv_kvp_daemon.c together
speak it, in one sans-I/O service over the daemon's own pool files (:mod:`.kvp_pool`): the
host SETs and DELETEs keys (pool 0 for what Add-VMKvp pushes), GETs them, and ENUMERATEs a
pool index by index until the guest answers a non-zero status; pool 2 (auto) answers with
the intrinsic values (:class:`~.kvp_system.SystemInfo`); GET_IP_INFO / SET_IP_INFO go
through the daemon's helper scripts (:class:`~.kvp_system.KvpNetwork`). Negotiation offers
framework 3.0 / 1.0 and service 4.0 / 3.0 / 1.0 (hv_kvp.c). The kernel reads up to four
pages per message; a message of another type gets no answer (hv_kvp.c logs and drops it).

Statuses are the ones Linux answers with: HV_S_OK; HV_S_CONT (0x80070103) for a key that
is not there (GET, DELETE) and past the end of an enumeration; HV_E_FAIL when a GET_IP_INFO
finds no interface with that MAC address or a helper fails; HV_GUID_NOTFOUND when a
SET_IP_INFO names no known adapter. Where Linux has no answer because it never checks, the
host's input is refused and nothing changes on disk:

- HV_INVALIDARG for a pool outside 0..4 (the daemon indexes its pool table with it), a key
  or value size that is odd, zero (key) or larger than its field, a key or value that is not
  valid UTF-16 (the kernel drops unpaired surrogates), a key or value too long for a pool
  record once in UTF-8 (the kernel cuts them short, so two keys could collide), an unknown
  value_type (the daemon would store an uninitialised value) and a message too short for
  the fields its operation uses;
- HV_ERROR_NOT_SUPPORTED for an unknown operation (the daemon answers HV_S_OK and the
  kernel sends back whatever the buffer held), and for IP injection when the helper
  scripts are missing (the daemon guesses: DHCP off, no DNS).

Also unlike Linux: GET answers with the stored value (the daemon copies zero bytes of it,
and the kernel reads it from the wrong offset), and a set or delete holds the pool's lock
from its read to its write. Values in the pools are UTF-8; one that is not is sent with
U+FFFD in place of the bad bytes (the kernel fails the enumeration with HV_E_FAIL).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .framework import IcService
from .kvp_pool import DEFAULT_POOL_DIR, POOL_COUNT, KvpPoolError, KvpPools
from .kvp_system import KvpNetwork, SystemInfo
from .messages import (
    HV_E_FAIL,
    HV_ERROR_DISK_FULL,
    HV_ERROR_NOT_SUPPORTED,
    HV_INVALIDARG,
    HV_KVP_EXCHANGE_MAX_KEY_SIZE,
    HV_KVP_EXCHANGE_MAX_VALUE_SIZE,
    HV_S_CONT,
    HV_S_OK,
    ICMSG_HDR,
    KVP_VERSIONS,
    IcMsgType,
    KvpDelete,
    KvpEnumerate,
    KvpExchange,
    KvpIpAddrValue,
    KvpIpMsg,
    KvpOp,
    KvpPoolId,
    KvpValue,
    RegType,
    decode_utf16z,
    status_name,
)

__all__ = ["KvpEvent", "KvpService"]

log = logging.getLogger("pyvmbus.ic.kvp")

_KEY_UNITS = HV_KVP_EXCHANGE_MAX_KEY_SIZE // 2 - 2
"""hv_kvp.c converts a key for the host into at most 254 UTF-16 units (then the NUL)."""
_VALUE_UNITS = HV_KVP_EXCHANGE_MAX_VALUE_SIZE // 2 - 2
_OPS = {int(o) for o in KvpOp}


@dataclass(frozen=True, slots=True)
class KvpEvent:
    """What one host request did (passed to ``on_event`` after the answer).

    ``kind``: ``set``, ``deleted``, ``get``, ``enumerated`` (a pass over a pool ended;
    ``count`` records went), ``ip_get``, ``ip_set``, ``refused`` (bad input; ``reason``),
    ``missing`` (GET / DELETE of a key that is not there).
    """

    kind: str
    op: str
    pool: int
    status: int
    key: str = ""
    value: str = ""
    count: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "op": self.op, "pool": self.pool, "status": status_name(self.status),
                "key": self.key, "value": self.value, "count": self.count, "reason": self.reason}

    def __str__(self) -> str:
        text = f"kvp {self.kind}: {self.op} pool {self.pool}"
        if self.key:
            text += f" {self.key!r}"
        if self.kind == "set" or self.kind == "get":
            text += f" = {self.value[:80]!r}"
        if self.kind == "enumerated":
            text += f" ({self.count} record(s))"
        text += f" -> {status_name(self.status)}"
        return text + (f": {self.reason}" if self.reason else "")


class _Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _fit_utf16(text: str, units: int) -> bytes:
    """``text`` as UTF-16LE cut to ``units`` units, never between a surrogate pair."""
    raw = text.encode("utf-16-le")
    if len(raw) > 2 * units:
        cut = 2 * units
        if 0xD800 <= int.from_bytes(raw[cut - 2 : cut], "little") <= 0xDBFF:
            cut -= 2
        raw = raw[:cut]
    return raw


def _clip_list(text: str, units: int) -> str:
    """A ';' list cut to fit ``units`` - 1 UTF-16 units (at an item boundary when it can)."""
    if len(text.encode("utf-16-le")) <= 2 * (units - 1):
        return text
    cut = _fit_utf16(text, units - 1).decode("utf-16-le")
    at = cut.rfind(";")
    return cut[: at + 1] if at >= 0 else cut


class KvpService(IcService):
    """The guest end of KVP over the hv_kvp_daemon pool files in ``pools``.

    ``pools``: a :class:`KvpPools` or a directory (default /var/lib/hyperv; opened with
    :class:`KvpPools`, which refuses pools a running hv_kvp_daemon owns). ``system``: the
    intrinsic values (default: this system's). ``network``: GET/SET_IP_INFO (default:
    helper scripts from PATH, configuration files in the pool directory).
    ``publish_auto``: keep the intrinsic values the host last read in pool 2's file (the C
    daemon leaves it empty; tools that read the pools then see them too; other records in
    that file stay).
    ``on_event(KvpEvent)``: called after the answer.
    """

    service_name: ClassVar[str] = "kvp"
    class_name: ClassVar[str] = "kvp"
    message_type: ClassVar[int] = IcMsgType.KVPEXCHANGE
    service_versions: ClassVar[tuple[int, ...]] = KVP_VERSIONS
    max_request: ClassVar[int] = 4 * 4096
    """hv_kvp.c reads up to HV_HYP_PAGE_SIZE * 4 bytes per message."""

    def __init__(self, pools: KvpPools | str | os.PathLike[str] = DEFAULT_POOL_DIR, *,
                 system: SystemInfo | None = None, network: KvpNetwork | None = None,
                 publish_auto: bool = True, on_event: Callable[[KvpEvent], None] | None = None) -> None:
        super().__init__()
        self.pools = pools if isinstance(pools, KvpPools) else KvpPools(pools)
        self.system = system if system is not None else SystemInfo()
        self.network = network if network is not None else KvpNetwork(config_dir=self.pools.pool_dir)
        self.publish_auto = publish_auto
        self.on_event = on_event
        self.ops: Counter[str] = Counter()
        """Requests per operation name (and ``refused``)."""
        self.last_event: KvpEvent | None = None
        self._auto: list[tuple[str, str]] | None = None

    def close_pools(self) -> None:
        """Close the pool files (the service cannot serve afterwards)."""
        self.pools.close()

    # --- dispatch -----------------------------------------------------------------------

    def _message(self, buf: bytearray) -> bool:
        n = len(buf)
        if n < ICMSG_HDR + 2:
            self._set_status(buf, HV_INVALIDARG)
            self._event("refused", "?", -1, HV_INVALIDARG,
                        reason=f"KVP message of {n} bytes has no operation")
            return True
        op, pool = buf[ICMSG_HDR], buf[ICMSG_HDR + 1]
        name = KvpOp(op).name if op in _OPS else f"op {op}"
        self.ops[name] += 1
        try:
            if op not in _OPS:
                raise _Refusal(HV_ERROR_NOT_SUPPORTED, f"unknown KVP operation {op}")
            if op in (KvpOp.GET_IP_INFO, KvpOp.SET_IP_INFO):
                status = self._ip(buf, op)
            else:
                if pool >= POOL_COUNT:
                    raise _Refusal(HV_INVALIDARG, f"unknown pool {pool} (pools are 0..{POOL_COUNT - 1})")
                if op == KvpOp.SET:
                    status = self._set(buf, pool)
                elif op == KvpOp.GET:
                    status = self._get(buf, pool)
                elif op == KvpOp.DELETE:
                    status = self._delete(buf, pool)
                else:
                    status = self._enumerate(buf, pool)
        except _Refusal as r:
            self.ops["refused"] += 1
            status = r.status
            self._event("refused", name, pool, status, reason=r.reason)
        self._set_status(buf, status)
        return True

    def _event(self, kind: str, op: str, pool: int, status: int, **kw: object) -> None:
        ev = KvpEvent(kind, op, pool, status, **kw)  # type: ignore[arg-type]
        self.last_event = ev
        cb = self.on_event
        if cb is not None:
            self._defer(lambda: cb(ev))

    # --- reading the host's fields ------------------------------------------------------

    @staticmethod
    def _need(buf: bytearray, end: int, what: str) -> None:
        if len(buf) < end:
            raise _Refusal(HV_INVALIDARG, f"{what}: the message has {len(buf)} bytes, needs {end}")

    @staticmethod
    def _utf16(raw: bytes, what: str) -> str:
        try:
            return decode_utf16z(raw)
        except UnicodeDecodeError as exc:
            raise _Refusal(HV_INVALIDARG, f"{what} is not valid UTF-16 ({exc.reason})") from None

    def _key(self, buf: bytearray, size_at: int, key_at: int, what: str) -> str:
        self._need(buf, size_at + 4, what)
        (size,) = KvpValue.U32.unpack_from(buf, size_at)
        if size == 0 or size % 2 or size > HV_KVP_EXCHANGE_MAX_KEY_SIZE:
            raise _Refusal(HV_INVALIDARG, f"key_size {size}: a key is 2..{HV_KVP_EXCHANGE_MAX_KEY_SIZE} "
                           "bytes of UTF-16")
        self._need(buf, key_at + size, what)
        key = self._utf16(bytes(buf[key_at : key_at + size]), "the key")
        if not key:
            raise _Refusal(HV_INVALIDARG, "the key is empty")
        return key

    # --- SET / GET / DELETE -------------------------------------------------------------

    def _set(self, buf: bytearray, pool: int) -> int:
        base = ICMSG_HDR + KvpExchange.DATA_AT
        self._need(buf, base + 12, "SET")
        vtype, _ksize, vsize = KvpValue.HEAD.unpack_from(buf, base)
        key = self._key(buf, base + 4, base + KvpValue.KEY_AT, "SET")
        vat = base + KvpValue.VALUE_AT
        if vtype == RegType.REG_SZ:
            if vsize % 2 or vsize > HV_KVP_EXCHANGE_MAX_VALUE_SIZE:
                raise _Refusal(HV_INVALIDARG, f"value_size {vsize}: a value is "
                               f"0..{HV_KVP_EXCHANGE_MAX_VALUE_SIZE} bytes of UTF-16")
            self._need(buf, vat + vsize, "SET")
            value = self._utf16(bytes(buf[vat : vat + vsize]), "the value")
        elif vtype == RegType.REG_U32:
            self._need(buf, vat + 4, "SET")
            value = str(KvpValue.U32.unpack_from(buf, vat)[0])
        elif vtype == RegType.REG_U64:
            self._need(buf, vat + 8, "SET")
            value = str(KvpValue.U64.unpack_from(buf, vat)[0])
        else:
            raise _Refusal(HV_INVALIDARG, f"value_type {vtype} (REG_SZ 1, REG_U32 4, REG_U64 8)")
        try:
            self.pools.set(pool, key, value)
        except KvpPoolError as exc:
            raise _Refusal(HV_INVALIDARG, f"{exc}") from None
        except OSError as exc:
            status = HV_ERROR_DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else HV_E_FAIL
            raise _Refusal(status, f"writing pool {pool}: {exc}") from None
        self._event("set", "SET", pool, HV_S_OK, key=key, value=value)
        return HV_S_OK

    def _get(self, buf: bytearray, pool: int) -> int:
        base = ICMSG_HDR + KvpExchange.DATA_AT
        key = self._key(buf, base + 4, base + KvpValue.KEY_AT, "GET")
        try:
            raw = self.pools.get(pool, key)
        except KvpPoolError as exc:
            raise _Refusal(HV_INVALIDARG, str(exc)) from None
        except OSError as exc:
            raise _Refusal(HV_E_FAIL, f"reading pool {pool}: {exc}") from None
        if raw is None:
            self._event("missing", "GET", pool, HV_S_CONT, key=key)
            return HV_S_CONT
        value = raw.decode("utf-8", errors="replace")
        self._put_value(buf, base, value)
        self._event("get", "GET", pool, HV_S_OK, key=key, value=value)
        return HV_S_OK

    def _put_value(self, buf: bytearray, base: int, value: str) -> None:
        enc = _fit_utf16(value, _VALUE_UNITS)
        vat = base + KvpValue.VALUE_AT
        self._need(buf, vat + len(enc) + 2, "the answer")
        end = min(len(buf), vat + HV_KVP_EXCHANGE_MAX_VALUE_SIZE)
        buf[vat:end] = (enc + b"\0\0").ljust(end - vat, b"\0")[: end - vat]
        KvpValue.U32.pack_into(buf, base, RegType.REG_SZ)
        KvpValue.U32.pack_into(buf, base + 8, len(enc) + 2)

    def _delete(self, buf: bytearray, pool: int) -> int:
        base = ICMSG_HDR
        key = self._key(buf, base + KvpDelete.KEY_SIZE_AT, base + KvpDelete.KEY_AT, "DELETE")
        try:
            found = self.pools.delete(pool, key)
        except KvpPoolError as exc:
            raise _Refusal(HV_INVALIDARG, str(exc)) from None
        except OSError as exc:
            raise _Refusal(HV_E_FAIL, f"writing pool {pool}: {exc}") from None
        if not found:
            self._event("missing", "DELETE", pool, HV_S_CONT, key=key)
            return HV_S_CONT
        self._event("deleted", "DELETE", pool, HV_S_OK, key=key)
        return HV_S_OK

    # --- ENUMERATE ----------------------------------------------------------------------

    def _enumerate(self, buf: bytearray, pool: int) -> int:
        self._need(buf, ICMSG_HDR + KvpEnumerate.DATA_AT, "ENUMERATE")
        (index,) = KvpValue.U32.unpack_from(buf, ICMSG_HDR + KvpEnumerate.INDEX_AT)
        item: tuple[str, str] | None
        if pool == KvpPoolId.AUTO:
            if index == 0 or self._auto is None:
                self._auto = self.system.intrinsics()
                if self.publish_auto:
                    self._publish(self._auto)
            item = self._auto[index] if index < len(self._auto) else None
        else:
            try:
                records = self.pools.records(pool)
            except OSError as exc:
                raise _Refusal(HV_E_FAIL, f"reading pool {pool}: {exc}") from None
            item = (records[index].key_text, records[index].value_text) if index < len(records) else None
        if item is None:
            self._event("enumerated", "ENUMERATE", pool, HV_S_CONT, count=index)
            return HV_S_CONT
        key, value = item
        base = ICMSG_HDR + KvpEnumerate.DATA_AT
        kenc = _fit_utf16(key, _KEY_UNITS)
        kat = base + KvpValue.KEY_AT
        self._need(buf, base + KvpValue.VALUE_AT, "ENUMERATE")
        field = (kenc + b"\0\0").ljust(HV_KVP_EXCHANGE_MAX_KEY_SIZE, b"\0")
        buf[kat : kat + HV_KVP_EXCHANGE_MAX_KEY_SIZE] = field
        KvpValue.U32.pack_into(buf, base + 4, len(kenc) + 2)
        self._put_value(buf, base, value)
        return HV_S_OK

    def _publish(self, items: list[tuple[str, str]]) -> None:
        try:
            self.pools.pool(KvpPoolId.AUTO).merge(items)
        except (OSError, KvpPoolError) as exc:
            log.warning("could not write the intrinsic values into pool 2: %s", exc)

    # --- IP injection -------------------------------------------------------------------

    def _ip(self, buf: bytearray, op: int) -> int:
        name = KvpOp(op).name
        self._need(buf, ICMSG_HDR + KvpIpMsg.SIZE, name)
        at = ICMSG_HDR + KvpIpMsg.VALUE_AT
        try:
            req = KvpIpAddrValue.unpack_from(buf, at)
        except UnicodeDecodeError as exc:
            raise _Refusal(HV_INVALIDARG, f"an address field is not valid UTF-16 ({exc.reason})") from None
        if op == KvpOp.GET_IP_INFO:
            res = self.network.get_ip_info(req.adapter_id)
            if res.status == HV_S_OK and res.value is not None:
                v = res.value
                f = KvpIpAddrValue.FIELDS
                clipped = KvpIpAddrValue(
                    _clip_list(v.adapter_id, f["adapter_id"][1]), v.addr_family, v.dhcp_enabled,
                    _clip_list(v.ip_addr, f["ip_addr"][1]), _clip_list(v.sub_net, f["sub_net"][1]),
                    _clip_list(v.gate_way, f["gate_way"][1]), _clip_list(v.dns_addr, f["dns_addr"][1]))
                buf[at : at + KvpIpAddrValue.SIZE] = clipped.pack()
                self._event("ip_get", name, -1, HV_S_OK, key=req.adapter_id,
                            value=f"{v.ip_addr} dhcp={v.dhcp_enabled} via {res.ifname}")
            else:
                self._event("ip_get", name, -1, res.status, key=req.adapter_id, reason=res.reason)
            return res.status
        res = self.network.set_ip_info(req)
        self._event("ip_set", name, -1, res.status, key=req.adapter_id,
                    value=f"{req.ip_addr} dhcp={req.dhcp_enabled}"
                    + (f" on {res.ifname}" if res.ifname else ""),
                    reason=res.reason)
        return res.status
