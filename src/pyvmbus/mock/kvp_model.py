"""Host side of KVP (Data Exchange) for the mock and for in-process tests.

:class:`KvpHost` speaks the host end as Hyper-V does: a negotiation (framework 1.0 / 3.0,
service 1.0 / 3.0 / 4.0 offered oldest first), then one request at a time. After the
negotiation it enumerates every pool (0..4, the auto pool with the intrinsic values
among them) the way the host walks a pool: index 0, 1, ... until the guest answers a
non-zero status. On demand it sets, gets and deletes keys (pool 0 by default, where
Add-VMKvp puts them), asks for an adapter's IP configuration or injects one, and sends the
faults a broken or hostile host could: an oversized key, a key or value that is not UTF-16,
an unknown pool, an unknown operation, an unknown value type, a truncated message.

Messages are built with the :mod:`pyvmbus.ic.messages` classes the guest's
:class:`~pyvmbus.ic.kvp.KvpService` parses. :class:`KvpModel` is the mock device model
(``MockVmbus.add_device("kvp")``); its commands are listed on the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..ic.messages import (
    HV_KVP_EXCHANGE_MAX_KEY_SIZE,
    HV_KVP_EXCHANGE_MAX_VALUE_SIZE,
    HV_KVP_MSG_SIZE,
    HV_S_OK,
    ICMSG_HDR,
    IcMsgType,
    KvpDelete,
    KvpEnumerate,
    KvpExchange,
    KvpHdr,
    KvpIpAddrValue,
    KvpIpMsg,
    KvpOp,
    KvpPoolId,
    KvpValue,
    RegType,
    status_name,
    version,
)
from .ic_models import HostRequest, IcHost, IcModel
from .models import register_model

__all__ = ["FAULTS", "KvpHost", "KvpModel"]

FAULTS = ("oversized_key", "oversized_value", "bad_utf16", "bad_utf16_value", "unknown_pool",
          "unknown_op", "bad_value_type", "truncated", "empty_key")
"""What :meth:`KvpHost.fault` can send."""


def _pad(body: bytes) -> bytes:
    """A body as the host sends it: the whole ``struct hv_kvp_msg`` (7430 bytes)."""
    return body.ljust(HV_KVP_MSG_SIZE, b"\0")


class KvpHost(IcHost):
    """Sans-I/O KVP host. ``results`` holds one dict per answered request (op, pool, key,
    status, and the value a GET or the IP block a GET_IP_INFO brought back);
    ``enumerations`` the records of the last pass over each pool."""

    message_type = IcMsgType.KVPEXCHANGE
    default_service_versions = (version(1, 0), version(3, 0), version(4, 0))

    def __init__(self, *, enumerate_on_ready: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.enumerate_on_ready = enumerate_on_ready
        self.results: list[dict[str, Any]] = []
        self.enumerations: dict[int, list[tuple[str, str]]] = {}
        self.enumerating: dict[int, list[tuple[str, str]]] = {}
        self.passes = 0
        """Finished passes over a pool."""

    # --- requests -----------------------------------------------------------------------

    def _send(self, kind: str, body: bytes, on: Callable[[int, bytes], dict[str, Any]] | None = None,
              *, front: bool = False) -> None:
        def answered(req: HostRequest, status: int, data: bytes) -> None:
            res = {"op": kind, "status": status, "status_name": status_name(status)}
            if on is not None:
                res.update(on(status, data))
            self.results.append(res)

        req = HostRequest(kind, lambda: body, self.message_type, answered)
        if front:
            self._queue.appendleft(req)
        else:
            self._queue.append(req)

    def set(self, key: str, value: str | int = "", *, pool: int = KvpPoolId.EXTERNAL,
            value_type: int = RegType.REG_SZ) -> None:
        """Queue a SET (Add-VMKvp / ModifyKvpItems)."""
        data = KvpValue.text(key, value, value_type)
        body = KvpExchange(KvpHdr(KvpOp.SET, pool), data).pack()
        self._send("SET", _pad(body), lambda st, d: {"pool": pool, "key": key, "value": value})

    def get(self, key: str, *, pool: int = KvpPoolId.EXTERNAL) -> None:
        """Queue a GET; the result carries the value the guest sent back."""
        body = KvpExchange(KvpHdr(KvpOp.GET, pool), KvpValue.text(key)).pack()

        def parse(status: int, data: bytes) -> dict[str, Any]:
            out: dict[str, Any] = {"pool": pool, "key": key}
            if status == HV_S_OK:
                v = KvpValue.unpack_from(data, ICMSG_HDR + KvpExchange.DATA_AT)
                out["value"] = self._text(v.value[: v.value_size], "GET value")
                out["value_type"] = v.value_type
            return out

        self._send("GET", _pad(body), parse)

    def delete(self, key: str, *, pool: int = KvpPoolId.EXTERNAL) -> None:
        """Queue a DELETE (RemoveKvpItems)."""
        self._send("DELETE", _pad(KvpDelete.text(pool, key).pack()), lambda st, d: {"pool": pool, "key": key})

    def enumerate(self, pool: int) -> None:
        """Walk ``pool`` from index 0 until the guest answers a non-zero status."""
        self.enumerating[pool] = []
        self._enum_index(pool, 0, front=False)

    def enumerate_all(self) -> None:
        for pool in KvpPoolId:
            self.enumerate(pool)

    def _enum_index(self, pool: int, index: int, *, front: bool) -> None:
        body = KvpEnumerate(KvpHdr(KvpOp.ENUMERATE, pool), index).pack()

        def parse(status: int, data: bytes) -> dict[str, Any]:
            got = self.enumerating.setdefault(pool, [])
            if status != HV_S_OK:
                self.enumerations[pool] = got
                self.enumerating.pop(pool, None)
                self.passes += 1
                return {"pool": pool, "index": index, "count": len(got)}
            v = KvpValue.unpack_from(data, ICMSG_HDR + KvpEnumerate.DATA_AT)
            if v.value_type != RegType.REG_SZ:
                self._error(f"ENUMERATE pool {pool} #{index}: value_type {v.value_type}, Linux sends REG_SZ")
            for size, limit, what in ((v.key_size, HV_KVP_EXCHANGE_MAX_KEY_SIZE, "key_size"),
                                      (v.value_size, HV_KVP_EXCHANGE_MAX_VALUE_SIZE, "value_size")):
                if size < 2 or size % 2 or size > limit:
                    self._error(f"ENUMERATE pool {pool} #{index}: {what} {size}")
            key = self._text(v.key[: v.key_size], "key")
            value = self._text(v.value[: v.value_size], "value")
            got.append((key, value))
            self._enum_index(pool, index + 1, front=True)  # the host finishes one pool first
            return {"pool": pool, "index": index, "key": key, "value": value}

        self._send("ENUMERATE", _pad(body), parse, front=front)

    def get_ip(self, adapter_id: str) -> None:
        """Queue a GET_IP_INFO for the adapter with MAC address ``adapter_id`` ("00:15:5D:...")."""
        body = KvpIpMsg(KvpOp.GET_IP_INFO, 0, KvpIpAddrValue(adapter_id)).pack()

        def parse(status: int, data: bytes) -> dict[str, Any]:
            out: dict[str, Any] = {"adapter_id": adapter_id}
            if status == HV_S_OK:
                try:
                    v = KvpIpAddrValue.unpack_from(data, ICMSG_HDR + KvpIpMsg.VALUE_AT)
                except UnicodeDecodeError as exc:
                    self._error(f"GET_IP_INFO answer is not UTF-16: {exc}")
                else:
                    out.update(addr_family=v.addr_family, dhcp_enabled=v.dhcp_enabled, ip_addr=v.ip_addr,
                               sub_net=v.sub_net, gate_way=v.gate_way, dns_addr=v.dns_addr)
            return out

        self._send("GET_IP_INFO", _pad(body), parse)

    def set_ip(self, value: KvpIpAddrValue) -> None:
        """Queue a SET_IP_INFO (adapter_id is the VMBus device id of the NIC, "{guid}")."""
        body = KvpIpMsg(KvpOp.SET_IP_INFO, 0, value).pack()
        self._send("SET_IP_INFO", _pad(body), lambda st, d: {"adapter_id": value.adapter_id})

    def fault(self, name: str, *, pool: int = KvpPoolId.EXTERNAL) -> None:
        """Queue a malformed request (one of :data:`FAULTS`)."""
        good = KvpValue.text("fault-key", "fault-value")
        hdr = KvpHdr(KvpOp.SET, pool)
        if name == "oversized_key":
            key = ("K" * 300 + "\0").encode("utf-16-le")
            raw = bytearray(KvpExchange(hdr, replace(good, key_size=len(key), key=key[:512])).pack())
            KvpValue.U32.pack_into(raw, KvpExchange.DATA_AT + 4, len(key))  # 602 > 512
            payload = bytes(raw)
        elif name == "oversized_value":
            payload = KvpExchange(hdr, replace(good, value_size=4096)).pack()
        elif name == "bad_utf16":
            key = b"b\0a\0d\0" + b"\x00\xd8" + b"x\0\0\0"  # an unpaired high surrogate
            payload = KvpExchange(hdr, replace(good, key_size=len(key), key=key.ljust(512, b"\0"))).pack()
        elif name == "bad_utf16_value":
            value = b"v\0" + b"\x00\xdc" + b"\0\0"  # an unpaired low surrogate
            bad = replace(good, value_size=len(value), value=value.ljust(2048, b"\0"))
            payload = KvpExchange(hdr, bad).pack()
        elif name == "unknown_pool":
            payload = KvpExchange(KvpHdr(KvpOp.SET, 7), good).pack()
        elif name == "unknown_op":
            payload = KvpExchange(KvpHdr(9, pool), good).pack()
        elif name == "bad_value_type":
            payload = KvpExchange(hdr, replace(good, value_type=3)).pack()
        elif name == "empty_key":
            payload = KvpExchange(hdr, replace(good, key_size=2, key=bytes(512))).pack()
        elif name == "truncated":
            self._send("fault:truncated", KvpExchange(hdr, good).pack()[:40], lambda st, d: {"fault": name})
            return
        else:
            raise ValueError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
        self._send(f"fault:{name}", _pad(payload), lambda st, d: {"fault": name, "pool": pool})

    # --- checks -------------------------------------------------------------------------

    def _text(self, raw: bytes, what: str) -> str:
        end = next((i for i in range(0, len(raw) - 1, 2) if raw[i] == 0 and raw[i + 1] == 0), None)
        if end is None:
            self._error(f"{what} from the guest is not NUL-terminated within its size")
            end = len(raw) & ~1
        try:
            return raw[:end].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            self._error(f"{what} from the guest is not valid UTF-16: {exc}")
            return raw[:end].decode("utf-16-le", errors="replace")

    def _on_ready(self) -> None:
        if self.enumerate_on_ready:
            self.enumerate_all()

    def last(self, op: str | None = None) -> dict[str, Any] | None:
        """The last result (of ``op``, if given)."""
        return next((r for r in reversed(self.results) if op is None or r["op"] == op), None)

    @property
    def idle(self) -> bool:
        """Nothing queued or outstanding."""
        return not self.waiting and not self._queue

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "idle": self.idle,
            "passes": self.passes,
            "results": list(self.results),
            "enumerations": {int(k): list(v) for k, v in self.enumerations.items()},
        }


@register_model
class KvpModel(IcModel[KvpHost]):
    """KVP host. Commands: ``set`` (key, value="", pool=0, value_type=1), ``get`` (key, pool=0),
    ``delete`` (key, pool=0), ``enumerate`` (pool; or all pools without one), ``get_ip``
    (adapter_id: a MAC address), ``set_ip`` (adapter_id: "{guid}", ip_addr, sub_net,
    gate_way, dns_addr, dhcp_enabled=0, addr_family=1), ``fault`` (fault: one of
    :data:`FAULTS`, pool=0); ``stats`` shows ``results``, ``enumerations`` and ``idle``.
    After the negotiation the host enumerates every pool once."""

    name = "kvp"
    class_name = "kvp"

    def make_host(self) -> KvpHost:
        return KvpHost()

    def host_command(self, name: str, args: dict[str, Any]) -> Any:
        host = self.host
        pool = int(args.get("pool", KvpPoolId.EXTERNAL))
        if name == "set":
            vt = int(args.get("value_type", RegType.REG_SZ))
            value = args.get("value", "")
            host.set(str(args["key"]), value if vt != RegType.REG_SZ else str(value), pool=pool,
                     value_type=vt)
        elif name == "get":
            host.get(str(args["key"]), pool=pool)
        elif name == "delete":
            host.delete(str(args["key"]), pool=pool)
        elif name == "enumerate":
            if "pool" in args:
                host.enumerate(pool)
            else:
                host.enumerate_all()
        elif name == "get_ip":
            host.get_ip(str(args["adapter_id"]))
        elif name == "set_ip":
            host.set_ip(KvpIpAddrValue(
                str(args["adapter_id"]), int(args.get("addr_family", 1)), int(args.get("dhcp_enabled", 0)),
                str(args.get("ip_addr", "")), str(args.get("sub_net", "")), str(args.get("gate_way", "")),
                str(args.get("dns_addr", ""))))
        elif name == "fault":
            host.fault(str(args["fault"]), pool=pool)
        else:
            return super().host_command(name, args)
        return None
