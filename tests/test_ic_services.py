"""Heartbeat, shutdown and time sync against their host models, in-process (sans-I/O)."""

from __future__ import annotations

import struct

import pytest

from pyvmbus.ic import (
    HeartbeatService,
    ShutdownAction,
    ShutdownRequest,
    ShutdownService,
    TimeSample,
    TimesyncService,
    shutdown_status,
)
from pyvmbus.ic.messages import (
    HV_E_FAIL,
    HV_S_OK,
    WLTIMEDELTA,
    IcMsgType,
    ShutdownMsg,
    TimesyncData,
    TimesyncFlags,
    TimesyncRefData,
    build_message,
    version,
)
from pyvmbus.mock.ic_models import HeartbeatHost, HostState, ShutdownHost, TimesyncHost, pump


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# --- heartbeat ----------------------------------------------------------------------------------

def test_heartbeat_sequence() -> None:
    host, svc = HeartbeatHost(interval=None, seq_start=41), HeartbeatService()
    pump(host, svc)
    assert host.state is HostState.READY
    assert (host.framework_version, host.service_version) == (version(3, 0), version(3, 0))
    for _ in range(100):
        host.beat()
    assert pump(host, svc) == 100
    assert host.acked == 100 and host.stats.errors == []
    assert svc.beats == 100 and svc.last_seq == 140


def test_heartbeat_timer_and_misses() -> None:
    host, svc = HeartbeatHost(interval=0.5), HeartbeatService()
    pump(host, svc)
    for now in (10.0, 10.1, 10.5, 11.0):
        host.tick(now)
        pump(host, svc)
    assert host.acked == 3 and host.missed == 0
    host.tick(11.5)  # due, sent, but the guest does not answer this time
    assert host.next_request() is not None
    host.tick(12.0)  # still waiting: missed
    assert host.missed == 1


def test_heartbeat_golden_answer() -> None:
    req = h(
        "01000000 3c000000 0300 0000 0100 0300 0000 2800 00000000 07 03 0000"
        "ffffffffffffffff"
    ) + bytes(32)
    resp = HeartbeatService().handle(req)
    # seq_num wraps (u64 += 1); icflags T|RESP; everything else as received.
    assert resp == req[:25] + b"\x05" + req[26:28] + bytes(8) + bytes(32)


def test_heartbeat_reserved_area_not_required() -> None:
    req = build_message(IcMsgType.HEARTBEAT, struct.pack("<Q", 5))
    resp = HeartbeatService().handle(req)
    assert resp is not None and struct.unpack_from("<Q", resp, 28)[0] == 6


# --- shutdown -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("flags", "hibernate", "status", "action"),
    [
        (0, False, HV_S_OK, ShutdownAction.POWEROFF),
        (1, False, HV_S_OK, ShutdownAction.POWEROFF),
        (2, False, HV_S_OK, ShutdownAction.REBOOT),
        (3, False, HV_S_OK, ShutdownAction.REBOOT),
        (4, False, HV_E_FAIL, None),
        (5, False, HV_E_FAIL, None),
        (4, True, HV_S_OK, ShutdownAction.HIBERNATE),
        (5, True, HV_S_OK, ShutdownAction.HIBERNATE),
        (6, True, HV_E_FAIL, None),
        (7, False, HV_E_FAIL, None),
        (8, True, HV_E_FAIL, None),
        (0xFFFFFFFF, True, HV_E_FAIL, None),
    ],
)
def test_shutdown_table(flags: int, hibernate: bool, status: int, action: ShutdownAction | None) -> None:
    assert shutdown_status(flags, hibernate_supported=hibernate) == (status, action)
    got: list[ShutdownRequest] = []
    host, svc = ShutdownHost(), ShutdownService(got.append, hibernate_supported=hibernate)
    host.request(flags, reason_code=7, timeout_seconds=30, message="maintenance")
    pump(host, svc)
    assert host.results == [(flags, status)] and host.stats.errors == []
    if action is None:
        assert got == []
    else:
        assert got == [ShutdownRequest(action, bool(flags & 1), flags, 7, 30, "maintenance")]


def test_shutdown_action_runs_after_the_answer() -> None:
    calls: list[ShutdownRequest] = []
    svc = ShutdownService(calls.append)
    body = ShutdownMsg(0, 0, 2).pack()
    resp = svc.handle(build_message(IcMsgType.SHUTDOWN, body))
    assert resp is not None and struct.unpack_from("<I", resp, 20)[0] == HV_S_OK
    assert calls == [] and svc.pending == 1  # nothing happened while producing the answer
    assert svc.run_pending() == 1
    assert [c.action for c in calls] == [ShutdownAction.REBOOT]
    assert svc.run_pending() == 0


def test_shutdown_without_callback_records_only() -> None:
    svc = ShutdownService()
    resp = svc.handle(build_message(IcMsgType.SHUTDOWN, ShutdownMsg(0, 0, 0).pack()))
    assert resp is not None and svc.pending == 0
    assert [r.action for r in svc.requests] == [ShutdownAction.POWEROFF]


def test_shutdown_negotiates_newest() -> None:
    host, svc = ShutdownHost(), ShutdownService()
    pump(host, svc)
    assert svc.service_version == version(3, 2)


# --- timesync -----------------------------------------------------------------------------------

GUEST_NOW = 1_700_000_000_123_456_700  # Unix ns, a multiple of 100


class Counter:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def test_timesync_v3_format() -> None:
    host = TimesyncHost(clock=lambda: GUEST_NOW, offset_ns=5_000_000_000, service_versions=(version(1, 0),
                        version(3, 0)))
    svc = TimesyncService(clock=lambda: GUEST_NOW)
    pump(host, svc)  # negotiation, then the initial SYNC
    assert svc.service_version == version(3, 0) and not svc.ref_format
    assert host.acked == 1 and host.stats.errors == []
    sample = svc.last_sample
    assert sample == TimeSample(GUEST_NOW + 5_000_000_000, GUEST_NOW, TimesyncFlags.SYNC, False)
    assert sample.offset_ns == 5_000_000_000 and sample.sync


def test_timesync_v4_ref_format_adds_reference_delay() -> None:
    host_ref, guest_ref = Counter(10_000), Counter(10_000 + 1234)  # 123.4 us between send and handle
    host = TimesyncHost(clock=lambda: GUEST_NOW, offset_ns=-2_000_000_000, reference_counter=host_ref,
                        sync_on_ready=False)
    svc = TimesyncService(clock=lambda: GUEST_NOW, reference_counter=guest_ref)
    pump(host, svc)
    assert svc.service_version == version(4, 0) and svc.ref_format
    host.sample()
    pump(host, svc)
    sample = svc.last_sample
    assert sample is not None and sample.ref_format and not sample.sync
    assert sample.offset_ns == -2_000_000_000 + 123_400


def test_timesync_sync_sets_clock_only_through_callback() -> None:
    set_to: list[int] = []
    guest = Counter(GUEST_NOW)
    host = TimesyncHost(clock=lambda: GUEST_NOW, offset_ns=3_000_000_000, sync_on_ready=False)
    svc = TimesyncService(clock=guest, set_clock=set_to.append)
    pump(host, svc)
    host.sample()  # SAMPLE: a hint, never sets the clock
    pump(host, svc)
    assert set_to == []
    host.sync()
    req = host.next_request()
    assert req is not None
    resp = svc.handle(req)
    assert resp is not None and set_to == []  # not while answering
    guest.value += 1_000  # time passes before the deferred action runs
    svc.run_pending()
    assert set_to == [GUEST_NOW + 1_000 + 3_000_000_000]


def test_timesync_without_set_clock_never_sets() -> None:
    host, svc = TimesyncHost(), TimesyncService()
    pump(host, svc)
    assert svc.last_sample is not None and svc.last_sample.sync and svc.pending == 0


def test_timesync_on_sample_is_deferred() -> None:
    seen: list[TimeSample] = []
    host, svc = TimesyncHost(), TimesyncService(on_sample=seen.append)
    pump(host, svc)
    assert len(seen) == 1


def test_timesync_golden_v3() -> None:
    # parenttime = WLTIMEDELTA + 1 s, SAMPLE; the answer is the request echoed with T|RESP.
    ft = WLTIMEDELTA + 10_000_000
    assert TimesyncData(ft, 0, 0, 2).pack()[:8] == struct.pack("<Q", 0x019DB1DED53E8000 + 10_000_000)
    req = build_message(IcMsgType.TIMESYNC, TimesyncData(ft, 0, 0, 2).pack(), status=0x55)
    svc = TimesyncService(clock=lambda: 0)
    resp = svc.handle(req)
    assert resp == req[:25] + b"\x05" + req[26:]
    assert svc.last_sample is not None and svc.last_sample.offset_ns == 1_000_000_000


def test_timesync_length_checks_follow_version() -> None:
    v3 = TimesyncService()
    # Before negotiation the <= 3.0 format applies: 28 + 25 needed.
    assert v3.handle(build_message(IcMsgType.TIMESYNC, bytes(24))) is None
    assert v3.handle(build_message(IcMsgType.TIMESYNC, TimesyncData(WLTIMEDELTA).pack())) is not None
    v4 = TimesyncService()
    pump(TimesyncHost(sync_on_ready=False), v4)
    assert v4.ref_format
    assert v4.handle(build_message(IcMsgType.TIMESYNC, bytes(21))) is None
    ref = TimesyncRefData(WLTIMEDELTA, 0, TimesyncFlags.SAMPLE).pack()
    assert v4.handle(build_message(IcMsgType.TIMESYNC, ref)) is not None


def test_timesync_periodic_samples() -> None:
    host, svc = TimesyncHost(interval=5.0), TimesyncService()
    pump(host, svc)
    for now in (0.0, 4.9, 5.1, 10.2):
        host.tick(now)
        pump(host, svc)
    assert host.acked == 3 and host.stats.errors == []  # the SYNC, then two samples
