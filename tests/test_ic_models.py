"""Host models: their own checks of the guest's answers, and the mock DeviceModel adapters
driven through a fake HostChannel (the ring's 8-byte padding included)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from pyvmbus.ic import FcopyService, HeartbeatService, IcService, ShutdownService, TimesyncService
from pyvmbus.ic.messages import HV_S_OK, CopyFlags, IcMsgType, build_message, version
from pyvmbus.mock.fcopy_model import FcopyModel
from pyvmbus.mock.ic_models import (
    HeartbeatHost,
    HeartbeatModel,
    HostState,
    IcModel,
    ShutdownHost,
    ShutdownModel,
    TimesyncModel,
    pump,
)
from pyvmbus.mock.models import HostChannel, model_class, model_for_class
from pyvmbus.packet import Packet, PacketType


def ready_heartbeat() -> tuple[HeartbeatHost, HeartbeatService]:
    host, svc = HeartbeatHost(interval=None), HeartbeatService()
    pump(host, svc)
    host.beat()
    return host, svc


def answer(host: HeartbeatHost, svc: HeartbeatService, mutate: Any) -> list[str]:
    req = host.next_request()
    assert req is not None
    resp = bytearray(svc.handle(req) or b"")
    mutate(resp)
    host.receive(bytes(resp))
    return host.stats.errors


def test_host_checks_flags() -> None:
    host, svc = ready_heartbeat()
    errs = answer(host, svc, lambda b: b.__setitem__(25, 1))
    assert errs and "icflags" in errs[0]


def test_host_checks_ic_transaction_id() -> None:
    host, svc = ready_heartbeat()
    errs = answer(host, svc, lambda b: b.__setitem__(24, b[24] ^ 0xFF))
    assert errs and "ictransaction_id" in errs[0]
    assert host.waiting  # still waiting for the real answer


def test_host_checks_pipe_header_and_length() -> None:
    host, svc = ready_heartbeat()
    errs = answer(host, svc, lambda b: b.__setitem__(0, 7))
    assert errs and "pipe header" in errs[0]
    host.beat()
    errs = answer(host, svc, lambda b: b.__delitem__(slice(-4, None)))
    assert "received length" in errs[-1]


def test_host_checks_seq() -> None:
    host, svc = ready_heartbeat()
    errs = answer(host, svc, lambda b: struct.pack_into("<Q", b, 28, 99))
    assert errs and "seq_num" in errs[0] and host.acked == 0


def test_unsolicited_and_timeout() -> None:
    host, _ = ready_heartbeat()
    host.receive(build_message(IcMsgType.HEARTBEAT, bytes(40)))
    assert "unsolicited" in host.stats.errors[0]
    assert host.next_request() is not None
    host.tick(100.0)
    host.tick(100.0 + HeartbeatHost.response_timeout + 1)
    assert not host.waiting and host.stats.unanswered == 1


def test_negotiation_dropped_fails_host() -> None:
    host = ShutdownHost()
    assert host.next_request() is not None
    host.no_answer()
    assert host.state is HostState.FAILED and host.next_request() is None
    host.restart()
    pump(host, ShutdownService())
    assert host.state.value == "ready"


# --- adapters ----------------------------------------------------------------------------------


class FakeChannel(HostChannel):
    """Collects what the model posts; the test plays the guest."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, int, int, int]] = []

    def send(self, payload: Any, type: int = PacketType.DATA_INBAND, flags: int = 0,
             transaction_id: int = 0) -> bool:
        self.out.append((bytes(payload), type, flags, transaction_id))
        return True

    def post(self, payload: Any, type: int = PacketType.DATA_INBAND, flags: int = 0,
             transaction_id: int = 0) -> None:
        self.send(payload, type, flags, transaction_id)


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def serve(model: IcModel[Any], chan: FakeChannel, svc: IcService) -> int:
    """Play the guest: answer every posted request as a Channel runner would."""
    n = 0
    while chan.out:
        payload, ptype, flags, xid = chan.out.pop(0)
        assert (ptype, flags) == (PacketType.DATA_INBAND, 0)
        resp = svc.handle(pad8(payload))  # the ring delivers the payload padded to 8
        if resp is not None:
            model.packet(chan, Packet(PacketType.DATA_INBAND, 0, xid, pad8(resp)))
        svc.run_pending()
        n += 1
    return n


def test_models_are_registered() -> None:
    pairs: list[tuple[str, type[IcModel[Any]]]] = [
        ("heartbeat", HeartbeatModel), ("shutdown", ShutdownModel),
        ("timesync", TimesyncModel), ("fcopy", FcopyModel),
    ]
    for name, cls in pairs:
        assert model_class(name) is cls
        assert model_for_class(name, None) is cls
        assert cls.monitored is False


def test_heartbeat_model() -> None:
    model, chan, svc = HeartbeatModel(), FakeChannel(), HeartbeatService()
    model.opened(chan)
    serve(model, chan, svc)
    model.command(chan, "interval", {"ms": 100})
    for i in range(5):
        model.tick(chan, 1.0 + i * 0.15)
        serve(model, chan, svc)
    stats = model.command(chan, "stats", {})
    assert stats["state"] == "ready" and stats["service_version"] == "3.0"
    assert stats["acked"] == 5 and stats["errors"] == []
    model.command(chan, "beat", {})
    serve(model, chan, svc)
    assert model.command(chan, "stats", {})["acked"] == 6


def test_shutdown_model() -> None:
    got: list[Any] = []
    model, chan, svc = ShutdownModel(), FakeChannel(), ShutdownService(got.append)
    model.opened(chan)
    serve(model, chan, svc)
    model.command(chan, "shutdown", {"flags": 2, "message": "bye"})
    serve(model, chan, svc)
    stats = model.command(chan, "stats", {})
    assert stats["results"] == [(2, "HV_S_OK")] and stats["errors"] == []
    assert [r.message for r in got] == ["bye"]


def test_timesync_model_v4_and_v3_padding() -> None:
    model, chan, svc = TimesyncModel(), FakeChannel(), TimesyncService()
    model.opened(chan)
    assert serve(model, chan, svc) == 2  # negotiate, then the initial SYNC
    model.command(chan, "offset", {"ns": 7_000_000_000})
    model.command(chan, "sample", {})
    serve(model, chan, svc)
    stats = model.command(chan, "stats", {})
    assert stats["ref_format"] and stats["acked"] == 2 and stats["errors"] == []
    assert svc.last_sample is not None and abs(svc.last_sample.offset_ns - 7_000_000_000) < 500_000_000
    # A 3.0 host: 25-byte bodies, padded to 56 by the ring.
    model.host.offer_service = (version(3, 0),)
    model.opened(chan)
    svc3 = TimesyncService()
    serve(model, chan, svc3)
    assert not svc3.ref_format and svc3.samples == 1


def test_fcopy_model(tmp_path: Path) -> None:
    model, chan, svc = FcopyModel(), FakeChannel(), FcopyService([tmp_path])
    model.opened(chan)
    serve(model, chan, svc)
    data = os.urandom(100_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    args = {"source": str(src), "file_name": "copy.bin", "dest": str(tmp_path / "d"),
            "flags": int(CopyFlags.CREATE_PATH)}
    model.command(chan, "send_file", args)
    serve(model, chan, svc)
    stats = model.command(chan, "stats", {})
    assert stats["transfer"] == "done" and stats["status"] == "HV_S_OK", stats
    assert (tmp_path / "d" / "copy.bin").read_bytes() == data
    args = {"data": data, "file_name": "c2", "dest": str(tmp_path), "cancel_after": 3}
    model.command(chan, "send_file", args)
    serve(model, chan, svc)
    assert model.command(chan, "stats", {})["transfer"] == "cancelled"
    assert not (tmp_path / "c2").exists()


def test_model_accepts_any_vmbus_transaction_id_and_warns_only_when_strict() -> None:
    """Hyper-V matches an IC answer by its IC header: a different VMBus transaction id is
    a valid answer (no error); ``strict`` turns it into a warning. A completion packet is
    still an error: ICs answer in-band."""
    for strict in (False, True):
        model, chan, svc = HeartbeatModel(), FakeChannel(), HeartbeatService()
        model.command(chan, "strict", {"on": strict})
        model.opened(chan)
        payload, _, _, xid = chan.out.pop(0)
        resp = svc.handle(payload)
        assert resp is not None
        model.packet(chan, Packet(PacketType.DATA_INBAND, 0, 0xFFFF_FFFF_FFFF_FFFF, resp))
        stats = model.command(chan, "stats", {})
        assert stats["errors"] == [] and stats["answered"] == 1 and stats["state"] == "ready"
        assert [("transaction id" in w) for w in stats["warnings"]] == ([True] if strict else [])
        model.packet(chan, Packet(PacketType.COMP, 0, xid, b""))
        errors = model.command(chan, "stats", {})["errors"]
        assert any("type 0xb" in e for e in errors)
    assert HV_S_OK == 0


def test_host_rejects_versions_not_offered() -> None:
    host = ShutdownHost(service_versions=(version(3, 0),))
    req = host.next_request()
    assert req is not None
    resp = bytearray(req)
    resp[25] = 5
    struct.pack_into("<HHIHHHH", resp, 28, 1, 1, 0, 3, 0, 9, 9)  # claims service 9.9
    host.receive(bytes(resp))
    assert host.state is HostState.FAILED and "not among those offered" in host.stats.errors[0]


def test_fcopy_sender_no_answer_and_busy(tmp_path: Path) -> None:
    from pyvmbus.mock.fcopy_model import FcopySender

    host = FcopySender()
    pump(host, FcopyService([tmp_path]))
    host.send_file(b"abc", "f", str(tmp_path))
    try:
        host.send_file(b"abc", "g", str(tmp_path))
    except RuntimeError as exc:
        assert "in progress" in str(exc)
    else:
        raise AssertionError("a second transfer was accepted")
    assert host.next_request() is not None
    host.no_answer()
    assert host.transfer_state == "failed" and host.failed_op == "start"


def test_model_commands(tmp_path: Path) -> None:
    model, chan, svc = FcopyModel(), FakeChannel(), FcopyService([tmp_path])
    model.opened(chan)
    serve(model, chan, svc)
    model.command(chan, "send_file", {"data": bytes(50_000), "file_name": "f", "dest": str(tmp_path)})
    # Answer START and one fragment, then cancel on demand.
    for _ in range(2):
        payload, _, _, xid = chan.out.pop(0)
        model.packet(chan, Packet(PacketType.DATA_INBAND, 0, xid, svc.handle(payload) or b""))
    model.command(chan, "cancel", {})
    serve(model, chan, svc)
    assert model.command(chan, "stats", {})["transfer"] == "cancelled"
    assert list(tmp_path.iterdir()) == []
    try:
        model.command(chan, "nope", {})
    except KeyError as exc:
        assert "no command" in str(exc)
    else:
        raise AssertionError("unknown command accepted")
    tmodel, tsvc = TimesyncModel(), TimesyncService()
    tmodel.opened(chan)
    serve(tmodel, chan, tsvc)
    tmodel.command(chan, "interval", {"ms": 0})
    tmodel.command(chan, "sync", {})
    serve(tmodel, chan, tsvc)
    assert tsvc.samples == 2 and tmodel.host.interval is None
