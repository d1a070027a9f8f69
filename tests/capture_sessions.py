"""Drive one short session with each mock device model, optionally captured (issue 12).

Used by tests/test_capture.py and by scripts/record_capture_fixtures.py, which records the
fixtures under tests/fixtures/capture/ with these same sessions.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvmbus.bus import Vmbus
from pyvmbus.channel import Channel
from pyvmbus.ic import (
    FcopyService,
    HeartbeatService,
    IcService,
    KvpService,
    ShutdownService,
    TimesyncService,
)
from pyvmbus.ic.kvp_pool import KvpPools
from pyvmbus.ic.kvp_system import KvpNetwork, SystemInfo
from pyvmbus.ic.messages import FCOPY_INSTANCE_GUID, CopyFlags
from pyvmbus.mock.models import ECHO_CLASS_GUID
from pyvmbus.packet import Packet, PacketType

__all__ = ["FCOPY_DEST", "INSTANCES", "MODELS", "Session", "drive", "ic_service"]

MODELS = ("echo", "null", "heartbeat", "shutdown", "timesync", "fcopy", "kvp")
"""Every device model of the mock (the replay model plays captures of these)."""
INSTANCES = {
    "echo": "6563686f-0000-4000-8000-000000000001",
    "null": "6563686f-0000-4000-8000-000000000002",
    "heartbeat": "6563686f-0000-4000-8000-000000000003",
    "shutdown": "6563686f-0000-4000-8000-000000000004",
    "timesync": "6563686f-0000-4000-8000-000000000005",
    "fcopy": FCOPY_INSTANCE_GUID,
    "kvp": "6563686f-0000-4000-8000-000000000007",
}
"""Fixed instance GUIDs, so the fixtures are stable."""
FCOPY_DEST = Path("/tmp/pyvmbus-capture-fixture")
"""Where the fcopy session's host sends its file (the guest's allowed root)."""
KVP_DIR = Path("/tmp/pyvmbus-capture-fixture-kvp")
"""The KVP session's pools and fake root (a fixed system: the same answers every time)."""


@dataclass
class Session:
    """What the guest saw: packets received (completions to requests included) and sent."""

    received: list[Packet] = field(default_factory=list)
    sent: list[tuple[bytes, int, int, int]] = field(default_factory=list)
    """(payload as sent, type, flags, transaction id)"""


def ic_service(model: str) -> IcService | None:
    if model == "heartbeat":
        return HeartbeatService()
    if model == "shutdown":
        return ShutdownService(lambda req: None)
    if model == "timesync":
        return TimesyncService()
    if model == "fcopy":
        return FcopyService([FCOPY_DEST], fsync=False)
    if model == "kvp":
        shutil.rmtree(KVP_DIR, ignore_errors=True)
        (KVP_DIR / "root" / "etc").mkdir(parents=True)
        (KVP_DIR / "root" / "etc" / "os-release").write_text('NAME="Debian"\nVERSION_ID="12"\n')
        uname = platform.uname_result("Linux", "guest", "6.1.0-26-amd64", "#1", "x86_64")
        system = SystemInfo(KVP_DIR / "root", fqdn="guest.example.com", uname=uname, addresses=list)
        net = KvpNetwork(path="", root=KVP_DIR / "root", config_dir=KVP_DIR / "pools",
                         proc=KVP_DIR / "root" / "proc", addresses=list)
        return KvpService(KvpPools(KVP_DIR / "pools"), system=system, network=net)
    return None


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("session did not finish in time")
        time.sleep(0.02)


def drive(mock: Any, model: str, capture: str | os.PathLike[str] | None = None,
          service: IcService | None = None, add: bool = True, guid: str | None = None) -> Session:
    """Offer (``add``) and bind the model's device, run its session on a Channel, disable.

    ``add=False``: ``guid`` is a device offered already; for the IC models that must be a
    replayed one (the session then waits for the capture to be played, not for commands)."""
    if add and model == "null":  # a model without a class of its own: offered as the echo class
        guid = str(mock.add_device(str(ECHO_CLASS_GUID), instance=INSTANCES[model], model="null"))
    elif add:
        guid = str(mock.add_device(model, instance=INSTANCES[model]))
    assert guid is not None
    bus = Vmbus(mock.root)
    bus.bind(guid)
    ch: Channel = bus.channel(guid) if capture is None else bus.channel(guid, capture=capture)
    ses = Session()
    if model == "fcopy":
        shutil.rmtree(FCOPY_DEST, ignore_errors=True)
        FCOPY_DEST.mkdir(parents=True)
    svc = service if service is not None else ic_service(model)

    def send(payload: bytes, **kw: Any) -> int:
        txid = ch.send(payload, **kw)
        ses.sent.append((payload, int(kw.get("packet_type", PacketType.DATA_INBAND)),
                         1 if kw.get("completion_requested") else 0, txid))
        return txid

    def on_packet(c: Channel, pkt: Packet) -> None:
        ses.received.append(pkt)
        if svc is not None and pkt.type == PacketType.DATA_INBAND:
            resp = svc.handle(pkt.payload)
            if resp is not None:
                send(resp, transaction_id=pkt.transaction_id)
            svc.run_pending()

    ch.on_packet(on_packet)
    ch.enable()
    try:
        if model == "echo":
            reply = ch.send_request(b"hello capture", timeout=5)
            ses.sent.append((b"hello capture", PacketType.DATA_INBAND, 1, 1))
            ses.received.append(Packet(PacketType.COMP, 0, 1, reply))
            send(b"in-band, no completion")
            _wait(lambda: len(ses.received) >= 2)
        elif model == "null":
            for i in range(3):
                send(f"packet {i}".encode())
            _wait(lambda: mock.host_stats(guid)["packets_in"] >= 3)
        elif not add:  # a replayed device: the capture drives; wait until it is all played
            _wait(lambda: mock.replay_report(guid)["pending"] == 0)
        else:
            _wait(lambda: mock.command(guid, "stats")["state"] == "ready")
            if model == "heartbeat":
                for n in (1, 2):
                    mock.command(guid, "beat")
                    _wait(lambda n=n: mock.command(guid, "stats")["acked"] >= n)
            elif model == "shutdown":
                mock.command(guid, "shutdown", flags=2, reason_code=0x80000000, timeout_seconds=30,
                             message="patching")
                _wait(lambda: mock.command(guid, "stats")["answered"] >= 2)
            elif model == "timesync":
                mock.command(guid, "interval", ms=0)
                mock.command(guid, "sample")
                _wait(lambda: mock.command(guid, "stats")["answered"] >= 2)
            elif model == "kvp":
                _wait(lambda: mock.command(guid, "stats")["idle"])
                mock.command(guid, "set", key="FixtureKey", value="fixture value")
                mock.command(guid, "get", key="FixtureKey")
                _wait(lambda: len(mock.command(guid, "stats")["results"]) >= 2
                      and mock.command(guid, "stats")["idle"])
            elif model == "fcopy":
                mock.command(guid, "send_file", data=b"fixture file\n" * 4, file_name="hello.txt",
                             dest=str(FCOPY_DEST / "in"), flags=int(CopyFlags.CREATE_PATH))
                _wait(lambda: mock.command(guid, "stats")["transfer"] in ("done", "failed"))
    finally:
        ch.disable()
        ch.stop_capture()
        if model == "fcopy":
            shutil.rmtree(FCOPY_DEST, ignore_errors=True)
        if isinstance(svc, KvpService):
            svc.close_pools()
            shutil.rmtree(KVP_DIR, ignore_errors=True)
    return ses
