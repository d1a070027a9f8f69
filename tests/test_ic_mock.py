"""The IC services end to end through the mock: a Channel on a uio node, the rings, the mock
host process and the IC device models (pyvmbus.mock.ic_models)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmbus.ic import FcopyService, HeartbeatService, IcService, ShutdownRequest, ShutdownService
from pyvmbus.ic.messages import FCOPY_INSTANCE_GUID, CopyFlags
from pyvmbus.packet import Packet, PacketType

channel = pytest.importorskip("pyvmbus.channel")
binding = pytest.importorskip("pyvmbus.binding")
mock_mod = pytest.importorskip("pyvmbus.mock")


@pytest.fixture(scope="module")
def mock() -> Iterator[Any]:
    with mock_mod.MockVmbus() as m:
        yield m


def serve(mock: Any, guid: str, svc: IcService) -> Any:
    """A minimal Channel runner: answer in-band with the request's transaction id, then run
    the service's deferred actions."""
    binding.bind(mock.root, guid)
    ch = channel.Channel(mock.root, guid)

    def on_packet(ch: Any, pkt: Packet) -> None:
        if pkt.type != PacketType.DATA_INBAND:
            return
        resp = svc.handle(pkt.payload)
        if resp is not None:
            ch.send(resp, transaction_id=pkt.transaction_id)
        svc.run_pending()

    ch.on_packet(on_packet)
    ch.enable()
    return ch


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_heartbeat_through_mock(mock: Any) -> None:
    guid = mock.add_device("heartbeat")
    svc = HeartbeatService()
    ch = serve(mock, guid, svc)
    try:
        mock.command(guid, "interval", ms=20)
        wait(lambda: mock.command(guid, "stats")["acked"] >= 5)
        stats = mock.command(guid, "stats")
        assert stats["service_version"] == "3.0" and stats["errors"] == []
        assert svc.beats >= 5 and svc.stats.dropped == 0
    finally:
        ch.disable()


@pytest.mark.timeout(60)
def test_shutdown_through_mock(mock: Any) -> None:
    guid = mock.add_device("shutdown")
    got: list[ShutdownRequest] = []
    ch = serve(mock, guid, ShutdownService(got.append))
    try:
        wait(lambda: mock.command(guid, "stats")["state"] == "ready")
        mock.command(guid, "shutdown", flags=2, message="patching")
        mock.command(guid, "shutdown", flags=4)
        wait(lambda: len(mock.command(guid, "stats")["results"]) == 2)
        assert mock.command(guid, "stats")["results"] == [(2, "HV_S_OK"), (4, "HV_E_FAIL")]
        assert [r.message for r in got] == ["patching"]
    finally:
        ch.disable()


@pytest.mark.timeout(60)
def test_fcopy_through_mock(mock: Any, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy", instance=FCOPY_INSTANCE_GUID)
    ch = serve(mock, guid, FcopyService([tmp_path], fsync=False))
    try:
        data = os.urandom(200_000)
        mock.command(guid, "send_file", data=data, file_name="f.bin", dest=str(tmp_path / "d"),
                     flags=int(CopyFlags.CREATE_PATH))
        wait(lambda: mock.command(guid, "stats")["transfer"] in ("done", "failed"))
        assert mock.command(guid, "stats")["status"] == "HV_S_OK"
        assert (tmp_path / "d" / "f.bin").read_bytes() == data
        mock.command(guid, "send_file", data=data, file_name="g.bin", dest=str(tmp_path), cancel_after=4)
        wait(lambda: mock.command(guid, "stats")["transfer"] == "cancelled")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
        assert mock.command(guid, "stats")["errors"] == []
    finally:
        ch.disable()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strict", [False, True])
def test_any_vmbus_transaction_id_is_a_valid_ic_answer(strict: bool) -> None:
    """Hyper-V matches IC answers by the IC header; the kernel's fcopy daemon answers with
    VMBus transaction id all ones (VMBUS_RQST_ERROR). Accepted; with ``strict`` a warning."""
    with mock_mod.MockVmbus() as m:
        guid = m.add_device("heartbeat")
        svc = HeartbeatService()
        binding.bind(m.root, guid)
        ch = channel.Channel(m.root, guid)

        def on_packet(ch: Any, pkt: Packet) -> None:
            resp = svc.handle(pkt.payload)
            if resp is not None:
                ch.send(resp, transaction_id=0xFFFF_FFFF_FFFF_FFFF)

        ch.on_packet(on_packet)
        ch.enable()
        try:
            if strict:  # a model command needs the channel open
                assert m.command(guid, "strict", on=True) is True
            m.command(guid, "interval", ms=20)
            wait(lambda: m.command(guid, "stats")["acked"] >= 2)
            stats = m.command(guid, "stats")
            assert stats["errors"] == []
            assert bool(stats["warnings"]) == strict
            if strict:
                warning = stats["warnings"][0]
                assert "0xffffffffffffffff" in warning and "Hyper-V accepts it" in warning
        finally:
            ch.disable()


@pytest.mark.timeout(60)
def test_integration_devices_get_hyperv_fixed_instance_guids() -> None:
    """Hyper-V gives its IC devices the same instance GUID in every VM (lsvmbus -vv); the
    mock does too while the GUID is free, so tools that hard-code them (the kernel's fcopy
    daemon opens eb765408-...) find them. A second device of a class gets a random one."""
    from pyvmbus.classes import HYPERV_INSTANCE_GUIDS

    with mock_mod.MockVmbus() as m:
        got = {name: m.add_device(name) for name in ("heartbeat", "kvp", "shutdown", "timesync", "fcopy")}
        assert got == {name: HYPERV_INSTANCE_GUIDS[name] for name in got}
        assert str(got["fcopy"]) == "eb765408-105f-49b6-b4aa-c123b64d17d4" == str(FCOPY_INSTANCE_GUID)
        assert (m.root / "sys/bus/vmbus/devices/eb765408-105f-49b6-b4aa-c123b64d17d4").is_dir()
        second = m.add_device("heartbeat")
        assert second != HYPERV_INSTANCE_GUIDS["heartbeat"]
        echo = m.add_device("echo")
        assert echo not in HYPERV_INSTANCE_GUIDS.values()
