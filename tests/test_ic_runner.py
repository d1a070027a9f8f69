"""pyvmbus.ic.runner: each IC service end to end through the mock host models, and the
runner's own rules (answer before acting, rescind and re-offer, restore, stop)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmbus.bus import Vmbus
from pyvmbus.errors import ChannelClosed, DeviceRescinded, HostCrashed, InvalidState
from pyvmbus.ic import FcopyService, HeartbeatService, ShutdownRequest, ShutdownService, TimesyncService
from pyvmbus.ic.messages import (
    FCOPY_INSTANCE_GUID,
    CopyFlags,
    IcMsgType,
    IcNegotiate,
    ShutdownMsg,
    build_message,
    version,
)
from pyvmbus.ic.runner import IcRunner, RunnerEvent, RunResult, run_service
from pyvmbus.mock import MockVmbus
from pyvmbus.packet import Packet, PacketType


@pytest.fixture(scope="module")
def mock() -> Iterator[MockVmbus]:
    with MockVmbus() as m:
        yield m


def wait(cond: Callable[[], bool], timeout: float = 10.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def host_ready(mock: MockVmbus, guid: str) -> Callable[[], bool]:
    """True once the guest opened the channel and the host's negotiation succeeded."""

    def ready() -> bool:
        try:
            return bool(mock.command(guid, "stats")["state"] == "ready")
        except ChannelClosed:
            return False

    return ready


class Background:
    """Runs an IcRunner on a thread; join() returns its result or re-raises its error."""

    def __init__(self, runner: IcRunner, timeout: float = 20.0) -> None:
        self.runner = runner
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(timeout,), daemon=True)
        self.thread.start()

    def _main(self, timeout: float) -> None:
        try:
            self.result = self.runner.run(timeout)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 15.0) -> RunResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the runner did not stop"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def stop_and_join(bg: Background) -> RunResult:
    bg.runner.stop()
    return bg.join()


# -- each service end to end -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_heartbeat_end_to_end_binds_and_restores(mock: MockVmbus) -> None:
    guid = mock.add_device("heartbeat")
    bus = Vmbus(mock.root)
    assert bus.device(guid).driver == "hv_utils"
    svc = HeartbeatService()
    events: list[RunnerEvent] = []
    bg = Background(IcRunner(bus, guid, svc, on_event=events.append, until=lambda: svc.beats >= 5))
    wait(host_ready(mock, guid), what="negotiation")
    mock.command(guid, "interval", ms=20)
    res = bg.join()
    assert res.why == "until" and res.bound_here and res.restored_driver == "hv_utils"
    assert res.answered == res.packets >= 6 and res.unanswered == 0 and res.action_errors == 0
    assert bus.device(guid).driver == "hv_utils"
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["bound", "enabled", "negotiated"] and kinds[-2:] == ["restored", "stopped"]
    neg = events[2].data
    assert neg == {"service": "heartbeat", "framework": "3.0", "version": "3.0"}
    assert svc.beats >= 5 and svc.stats.dropped == 0


@pytest.mark.timeout(30)
def test_shutdown_end_to_end_callback_gets_accepted_requests(mock: MockVmbus) -> None:
    guid = mock.add_device("shutdown")
    got: list[ShutdownRequest] = []
    svc = ShutdownService(got.append)
    bg = Background(IcRunner(mock.root, guid, svc))
    try:
        wait(host_ready(mock, guid), what="negotiation")
        for flags in (0, 2, 4, 7):
            mock.command(guid, "shutdown", flags=flags, reason_code=0x80000000, timeout_seconds=30,
                         message="maintenance" if flags == 2 else "")
        wait(lambda: len(mock.command(guid, "stats")["results"]) == 4, what="4 answers")
        assert mock.command(guid, "stats")["results"] == [
            (0, "HV_S_OK"), (2, "HV_S_OK"), (4, "HV_E_FAIL"), (7, "HV_E_FAIL")]
    finally:
        stop_and_join(bg)
    assert [r.action.value for r in got] == ["poweroff", "reboot"]
    assert got[1].message == "maintenance" and got[1].timeout_seconds == 30
    assert got[0].reason_code == 0x80000000


@pytest.mark.timeout(30)
def test_shutdown_statuses_seen_by_the_host(mock: MockVmbus) -> None:
    guid = mock.add_device("shutdown")
    svc = ShutdownService(None, hibernate_supported=False)
    bg = Background(IcRunner(mock.root, guid, svc))
    try:
        wait(host_ready(mock, guid), what="negotiation")
        for flags in (1, 3, 5, 8):
            mock.command(guid, "shutdown", flags=flags)
        wait(lambda: len(mock.command(guid, "stats")["results"]) == 4, what="4 answers")
        stats = mock.command(guid, "stats")
        assert stats["results"] == [(1, "HV_S_OK"), (3, "HV_S_OK"), (5, "HV_E_FAIL"), (8, "HV_E_FAIL")]
        assert stats["service_version"] == "3.2" and stats["errors"] == []
    finally:
        stop_and_join(bg)


@pytest.mark.timeout(30)
def test_timesync_reports_the_offset(mock: MockVmbus) -> None:
    guid = mock.add_device("timesync")
    samples: list[Any] = []
    svc = TimesyncService(on_sample=samples.append,
                          reference_counter=lambda: time.monotonic_ns() // 100)
    bg = Background(IcRunner(mock.root, guid, svc))
    try:
        wait(host_ready(mock, guid), what="negotiation")
        wait(lambda: len(samples) >= 1, what="the SYNC after negotiation")
        assert samples[0].sync and samples[0].ref_format  # 4.0 format: the host offers up to 4.0
        mock.command(guid, "offset", ns=3_000_000_000)
        mock.command(guid, "sample")
        wait(lambda: len(samples) >= 2, what="a sample")
        assert not samples[1].sync
        assert abs(samples[1].offset_ns - 3_000_000_000) < 500_000_000
        assert mock.command(guid, "stats")["errors"] == []
    finally:
        stop_and_join(bg)


@pytest.mark.timeout(30)
def test_timesync_sets_the_clock_only_through_the_callback_on_sync(mock: MockVmbus) -> None:
    guid = mock.add_device("timesync")
    set_to: list[int] = []
    svc = TimesyncService(set_clock=set_to.append)
    bg = Background(IcRunner(mock.root, guid, svc))
    try:
        wait(lambda: len(set_to) == 1, what="the first SYNC")
        mock.command(guid, "sample")
        mock.command(guid, "sync")
        wait(lambda: len(set_to) == 2, what="the second SYNC")
        assert svc.samples == 3  # the SAMPLE between them did not set the clock
        assert abs(set_to[1] - time.time_ns()) < 1_000_000_000
    finally:
        stop_and_join(bg)


def _send_file(mock: MockVmbus, guid: str, **args: Any) -> dict[str, Any]:
    mock.command(guid, "send_file", **args)
    wait(lambda: mock.command(guid, "stats")["transfer"] in ("done", "failed", "cancelled"),
         timeout=20, what="the transfer")
    stats: dict[str, Any] = mock.command(guid, "stats")
    return stats


@pytest.mark.timeout(60)
def test_fcopy_10_mib_arrives_byte_identical(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy", instance=FCOPY_INSTANCE_GUID)
    svc = FcopyService([tmp_path], fsync=False)
    bg = Background(IcRunner(mock.root, guid, svc), timeout=50)
    try:
        wait(host_ready(mock, guid), what="negotiation")
        data = os.urandom(10 * 1024 * 1024)
        src = tmp_path / "source.bin"
        src.write_bytes(data)
        stats = _send_file(mock, guid, source=str(src), file_name="big.bin", dest=str(tmp_path / "in"),
                           flags=int(CopyFlags.CREATE_PATH))
        assert stats["transfer"] == "done" and stats["status"] == "HV_S_OK", stats
        assert (tmp_path / "in" / "big.bin").read_bytes() == data
        assert stats["errors"] == []
    finally:
        res = stop_and_join(bg)
    assert svc.files_completed == 1 and res.answered == res.packets


@pytest.mark.timeout(30)
def test_fcopy_cancel_and_refusals_leave_nothing(mock: MockVmbus, tmp_path: Path) -> None:
    guid = mock.add_device("fcopy")
    root = tmp_path / "root"
    root.mkdir()
    svc = FcopyService([root], fsync=False)
    bg = Background(IcRunner(mock.root, guid, svc))
    try:
        wait(host_ready(mock, guid), what="negotiation")
        data = os.urandom(100_000)
        stats = _send_file(mock, guid, data=data, file_name="c.bin", dest=str(root), cancel_after=3)
        assert stats["transfer"] == "cancelled" and stats["status"] == "HV_S_OK"
        stats = _send_file(mock, guid, data=data, file_name="x.bin", dest=str(root / ".." / "escape"),
                           flags=int(CopyFlags.CREATE_PATH))
        assert stats["transfer"] == "failed" and stats["status"] == "HV_INVALIDARG"
        stats = _send_file(mock, guid, data=data, file_name="../x.bin", dest=str(root))
        assert stats["transfer"] == "failed" and stats["status"] == "HV_INVALIDARG"
        stats = _send_file(mock, guid, data=data, file_name="x.bin", dest=str(tmp_path))
        assert stats["transfer"] == "failed" and stats["failed_op"] == "start"
        assert os.listdir(root) == [] and sorted(os.listdir(tmp_path)) == ["root"]
    finally:
        stop_and_join(bg)


@pytest.mark.timeout(30)
def test_fcopy_announced_gib_with_ten_bytes_sent_fails_and_leaves_nothing(mock: MockVmbus,
                                                                           tmp_path: Path) -> None:
    guid = mock.add_device("fcopy")
    svc = FcopyService([tmp_path], fsync=False)
    bg = Background(IcRunner(mock.root, guid, svc))
    try:
        wait(host_ready(mock, guid), what="negotiation")
        gib = 1 << 30
        stats = _send_file(mock, guid, file_name="holes.bin", dest=str(tmp_path), file_size=gib,
                           fragments=[(gib - 10, b"0123456789")])
        assert stats["transfer"] == "failed" and stats["failed_op"] == "complete", stats
        assert stats["status"] == "HV_E_FAIL" and os.listdir(tmp_path) == []
    finally:
        stop_and_join(bg)
    assert svc.files_completed == 0


@pytest.mark.timeout(30)
def test_fcopy_partial_file_removed_when_the_runner_stops_mid_copy(
        mock: MockVmbus, tmp_path_factory: pytest.TempPathFactory) -> None:
    guid = mock.add_device("fcopy")
    dest = tmp_path_factory.mktemp("dest")
    src = tmp_path_factory.mktemp("src") / "big.bin"
    src.write_bytes(os.urandom(32 * 1024 * 1024))
    svc = FcopyService([dest], fsync=False)
    bg = Background(IcRunner(mock.root, guid, svc))
    wait(host_ready(mock, guid), what="negotiation")
    mock.command(guid, "send_file", source=str(src), file_name="p.bin", dest=str(dest))
    wait(lambda: svc.bytes_written > 0, what="the first fragments")
    mock.fault(guid, "stall")  # the host stops mid-way: the copy stays open
    assert svc.active and len(os.listdir(dest)) == 1  # the temporary file
    stop_and_join(bg)
    assert os.listdir(dest) == []
    assert svc.last_event is not None and svc.last_event.kind == "failed"


# -- the runner's rules ------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_rescind_waits_for_the_reoffer_and_serves_again(mock: MockVmbus) -> None:
    guid = mock.add_device("heartbeat")
    svc = HeartbeatService()
    events: list[RunnerEvent] = []
    runner = IcRunner(mock.root, guid, svc, on_event=events.append)
    bg = Background(runner, timeout=35)
    try:
        wait(host_ready(mock, guid), what="negotiation")
        mock.command(guid, "beat")
        wait(lambda: svc.beats >= 1, what="a beat")
        mock.rescind(guid)
        wait(lambda: any(e.kind == "waiting" for e in events), what="the runner to wait")
        time.sleep(0.3)
        mock.reoffer(guid)
        wait(lambda: runner.result.enables >= 2, what="the re-enable")
        wait(host_ready(mock, guid), what="the second negotiation")
        mock.command(guid, "beat")
        wait(lambda: svc.beats >= 2, what="a beat after the re-offer")
    finally:
        res = stop_and_join(bg)
    assert res.rescinds == 1 and res.enables == 2 and res.restored_driver == "hv_utils"
    kinds = [e.kind for e in events]
    assert kinds.count("bound") == 2 and kinds.count("negotiated") == 2
    assert ("closed", "rescinded") in [(e.kind, e.data.get("reason")) for e in events]
    assert Vmbus(mock.root).device(guid).driver == "hv_utils"


@pytest.mark.timeout(30)
def test_rescind_without_reoffer_gives_up_after_reoffer_timeout(mock: MockVmbus) -> None:
    guid = mock.add_device("heartbeat")
    svc = HeartbeatService()
    events: list[RunnerEvent] = []
    bg = Background(IcRunner(mock.root, guid, svc, on_event=events.append, reoffer_timeout=0.5))
    wait(host_ready(mock, guid), what="negotiation")
    mock.rescind(guid)
    with pytest.raises(DeviceRescinded, match=r"did not offer it again within 0\.5 s"):
        bg.join()
    assert any(e.kind == "note" and "nothing to restore" in e.data["message"] for e in events)


@pytest.mark.timeout(30)
def test_stop_event_from_another_thread_stops_promptly(mock: MockVmbus) -> None:
    guid = mock.add_device("heartbeat")
    stop = threading.Event()
    out: list[RunResult] = []
    t = threading.Thread(target=lambda: out.append(run_service(mock.root, guid, HeartbeatService(),
                                                               stop_event=stop)))
    t.start()
    wait(host_ready(mock, guid), what="negotiation")
    t0 = time.monotonic()
    stop.set()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 3.0
    assert out[0].why == "stopped" and out[0].restored_driver == "hv_utils"


@pytest.mark.timeout(30)
def test_timeout_ends_the_run_cleanly(mock: MockVmbus) -> None:
    guid = mock.add_device("heartbeat")
    t0 = time.monotonic()
    res = run_service(mock.root, guid, HeartbeatService(), timeout=0.6)
    assert res.why == "timeout" and 0.5 < time.monotonic() - t0 < 5


@pytest.mark.timeout(30)
def test_no_bind_requires_a_bound_device(mock: MockVmbus) -> None:
    guid = mock.add_device("heartbeat")
    with pytest.raises(InvalidState, match="bind it first"):
        run_service(mock.root, guid, HeartbeatService(), bind=False, timeout=5)
    bus = Vmbus(mock.root)
    bus.bind(guid)
    try:
        res = run_service(mock.root, guid, HeartbeatService(), bind=False, timeout=0.3)
        assert not res.bound_here and res.restored_driver is None
        assert bus.device(guid).driver == "uio_hv_generic"  # not ours to give back
    finally:
        bus.restore(guid)


@pytest.mark.timeout(40)
def test_host_crash_is_an_error() -> None:
    with MockVmbus() as m:
        guid = m.add_device("heartbeat")
        Vmbus(m.root).bind(guid)
        bg = Background(IcRunner(m.root, guid, HeartbeatService(), bind=False))
        wait(host_ready(m, guid), what="negotiation")
        m.fault(guid, "crash")
        with pytest.raises(HostCrashed):
            bg.join()


# -- dispatch rules, with a stand-in channel ----------------------------------------------------


class FakeChannel:
    """Records sends; what the runner's on_packet needs of a Channel."""

    relid = 1

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []

    def send(self, payload: bytes, *, transaction_id: int) -> int:
        self.sent.append((bytes(payload), transaction_id))
        return transaction_id


def _negotiate(fw: tuple[int, ...], srv: tuple[int, ...]) -> bytes:
    return build_message(IcMsgType.NEGOTIATE, IcNegotiate(fw, srv).pack())


def test_actions_run_after_the_answer_and_a_failing_one_is_reported() -> None:
    fake = FakeChannel()
    order: list[str] = []

    def on_shutdown(req: ShutdownRequest) -> None:
        order.append(f"action after {len(fake.sent)} send(s)")
        raise RuntimeError("systemctl missing")

    svc = ShutdownService(on_shutdown)
    events: list[RunnerEvent] = []
    runner = IcRunner("/nonexistent", "shutdown", svc, on_event=events.append)
    neg = _negotiate((version(3, 0),), (version(3, 2),))
    req = build_message(IcMsgType.SHUTDOWN, ShutdownMsg(0, 0, 0, b"\0" * 2048).pack(),
                        framework_version=version(3, 0), message_version=version(3, 2))
    for i, msg in enumerate((neg, req)):
        runner._on_packet(fake, Packet(PacketType.DATA_INBAND, 0, 40 + i, msg))  # type: ignore[arg-type]
    assert [t for _, t in fake.sent] == [40, 41]
    assert order == ["action after 2 send(s)"]
    kinds = [e.kind for e in events]
    assert kinds == ["negotiated", "action_failed"]
    assert "systemctl missing" in events[1].data["error"]
    assert runner.result.action_errors == 1 and runner.result.answered == 2


def test_negotiation_failure_and_foreign_packets() -> None:
    fake = FakeChannel()
    events: list[RunnerEvent] = []
    runner = IcRunner("/nonexistent", "heartbeat", HeartbeatService(), on_event=events.append)
    neg = _negotiate((version(9, 0),), (version(9, 0),))
    runner._on_packet(fake, Packet(PacketType.DATA_INBAND, 0, 1, neg))  # type: ignore[arg-type]
    runner._on_packet(fake, Packet(PacketType.COMP, 0, 2, b"\0" * 8))  # type: ignore[arg-type]
    runner._on_packet(fake, Packet(PacketType.DATA_INBAND, 0, 3, b"short"))  # type: ignore[arg-type]
    assert [e.kind for e in events] == ["negotiation_failed"]
    assert len(fake.sent) == 1  # the failed negotiation is still answered (counts 0/0)
    assert IcNegotiate.COUNTS.unpack_from(fake.sent[0][0], IcNegotiate.COUNTS_AT) == (0, 0)
    assert runner.result.ignored == 1 and runner.result.unanswered == 1 and runner.result.packets == 2


def test_runner_sends_answer_as_is_and_still_calls_an_overridden_handle() -> None:
    neg = _negotiate((version(3, 0),), (version(3, 0),))
    raw: list[object] = []

    class Raw(FakeChannel):
        def send(self, payload: bytes, *, transaction_id: int) -> int:
            raw.append(payload)
            return super().send(payload, transaction_id=transaction_id)

    runner = IcRunner("/nonexistent", "heartbeat", HeartbeatService())
    runner._on_packet(Raw(), Packet(PacketType.DATA_INBAND, 0, 7, neg))  # type: ignore[arg-type]
    assert isinstance(raw[0], bytearray)  # answer(): no copy to bytes on the way

    class Custom(HeartbeatService):
        def handle(self, request: bytes | bytearray | memoryview) -> bytes | None:
            resp = super().handle(request)
            return None if resp is None else resp[:-1] + b"!"

    fake = FakeChannel()
    runner = IcRunner("/nonexistent", "heartbeat", Custom())
    runner._on_packet(fake, Packet(PacketType.DATA_INBAND, 0, 8, neg))  # type: ignore[arg-type]
    assert bytes(fake.sent[0][0]).endswith(b"!") and fake.sent[0][1] == 8
