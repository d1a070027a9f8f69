"""IC framework: version negotiation as vmbus_prep_negotiate_resp, and what every service does
with malformed input (the kernel's status, or no answer; never an exception)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmbus.ic import (
    FcopyService,
    HeartbeatService,
    IcService,
    ShutdownService,
    TimesyncService,
    prep_negotiate_response,
)
from pyvmbus.ic.fcopy import PART_PATTERN
from pyvmbus.ic.messages import (
    HV_E_FAIL,
    HV_S_OK,
    IcMsgType,
    IcNegotiate,
    build_message,
    version,
)
from pyvmbus.mock.fcopy_model import FcopySender
from pyvmbus.mock.ic_models import HeartbeatHost, HostState, ShutdownHost, TimesyncHost, pump


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


V10, V11, V20, V30, V31, V32, V40 = (version(1, 0), version(1, 1), version(2, 0), version(3, 0),
                                     version(3, 1), version(3, 2), version(4, 0))

# A host's negotiate request, by hand: framework 1.0, 3.0 and service 1.0, 3.0 offered.
NEGOTIATE_REQ = h(
    "01000000 2c000000"  # pipe header: flags 1, msgsize 20 + 24
    "0000 0000 0000 0000 0000 1800 00000000 01 03 0000"  # type 0, icmsgsize 24, tid 1, T|REQ
    "0200 0200 00000000"  # 2 framework, 2 service versions
    "0100 0000 0300 0000 0100 0000 0300 0000"
)
NEGOTIATE_RESP = h(
    "01000000 2c000000"  # echoed untouched
    "0000 0000 0000 0000 0000 1000 00000000 01 05 0000"  # icmsgsize 0x10, status untouched, T|RESP
    "0100 0100 00000000"  # counts 1/1
    "0300 0000 0300 0000 0100 0000 0300 0000"  # [0] fw 3.0, [1] srv 3.0, rest as received
)


def negotiate_msg(fw: list[int], srv: list[int], *, nf: int | None = None, nm: int | None = None,
                  status: int = 0) -> bytearray:
    body = bytearray(IcNegotiate(tuple(fw), tuple(srv)).pack())
    if nf is not None or nm is not None:
        struct.pack_into("<HH", body, 0, len(fw) if nf is None else nf, len(srv) if nm is None else nm)
    return bytearray(build_message(IcMsgType.NEGOTIATE, bytes(body), status=status))


def test_negotiate_golden() -> None:
    svc = HeartbeatService()
    assert svc.handle(NEGOTIATE_REQ) == NEGOTIATE_RESP
    assert (svc.framework_version, svc.service_version) == (V30, V30)


def test_guest_order_wins() -> None:
    # The host lists oldest first; the guest walks its own list (newest first).
    buf = negotiate_msg([V10, V30], [V10, V31, V32, V30])
    res = prep_negotiate_response(buf, (V30, V10), (V32, V31, V30, V10))
    assert (res.found, res.framework_version, res.service_version) == (True, V30, V32)
    assert struct.unpack_from("<HHIHHHH", buf, 28) == (1, 1, 0, 3, 0, 3, 2)


def test_only_old_framework() -> None:
    buf = negotiate_msg([V10], [V10])
    res = prep_negotiate_response(buf, (V30, V10), (V30, V10))
    assert (res.found, res.framework_version, res.service_version) == (True, V10, V10)


def test_no_common_framework() -> None:
    req = negotiate_msg([V20], [V30], status=0x12345678)
    svc = HeartbeatService()
    resp = svc.handle(req)
    assert resp is not None and len(resp) == len(req)
    assert struct.unpack_from("<HH", resp, 28) == (0, 0)
    # icversion_data[0] / [1] hold the raw counts as majors (the kernel's variables).
    assert resp[36:44] == h("0100 0000 0100 0000")
    assert struct.unpack_from("<I", resp, 20)[0] == 0x12345678  # hv_util leaves the status
    assert resp[25] == 5
    assert svc.service_version is None and not svc.negotiated


def test_no_common_service_version() -> None:
    buf = negotiate_msg([V30], [V20, V20, V20])
    res = prep_negotiate_response(buf, (V30, V10), (V30, V10))
    assert not res.found
    assert struct.unpack_from("<HHIHHHH", buf, 28) == (0, 0, 0, 3, 0, 3, 0)  # [0] = fw, [1] = (count, 0)


def test_counts_over_100() -> None:
    versions = [V30] * 101
    for nf, nm in ((101, 1), (1, 101)):
        buf = negotiate_msg(versions[:nf], versions[:nm])
        n = len(buf)
        res = prep_negotiate_response(buf, (V30,), (V30,))
        assert not res.found and len(buf) == n
        assert struct.unpack_from("<HH", buf, 28) == (0, 0)
        assert struct.unpack_from("<HHHH", buf, 36) == (nf, 0, nm, 0)
    # Exactly 100 is allowed.
    buf = negotiate_msg([V20] * 99 + [V30], [V30] * 100)
    assert prep_negotiate_response(buf, (V30,), (V30,)).found


def test_counts_beyond_buffer() -> None:
    # Claims 3 + 3 versions but carries 2 + 2: 28 + 8 + 24 > 52.
    buf = negotiate_msg([V10, V30], [V10, V30], nf=3, nm=3)
    res = prep_negotiate_response(buf, (V30,), (V30,))
    assert not res.found
    assert struct.unpack_from("<HH", buf, 28) == (0, 0)


@pytest.mark.parametrize("n", [28, 29, 31])
def test_negotiate_too_short_for_counts(n: int) -> None:
    # < 28 + 4: the kernel changes nothing, but hv_util still answers (flags set).
    req = NEGOTIATE_REQ[:n]
    resp = HeartbeatService().handle(req)
    assert resp is not None
    assert resp == req[:25] + b"\x05" + req[26:]


@pytest.mark.parametrize("n", [32, 35, 36, 39, 40, 43])
def test_negotiate_short_body_clipped(n: int) -> None:
    req = NEGOTIATE_REQ[:n]
    resp = HeartbeatService().handle(req)
    assert resp is not None and len(resp) == n
    assert struct.unpack_from("<H", resp, 18)[0] == 0x10
    assert struct.unpack_from("<HH", resp, 28) == (0, 0)
    expect_data = h("0200 0000 0200 0000")[: max(0, n - 36)]  # raw counts as majors, clipped
    assert resp[36:] == expect_data


def test_fcopy_negotiate_sets_status(tmp_path: Path) -> None:
    svc = FcopyService([tmp_path])
    ok = svc.handle(negotiate_msg([V30], [V11], status=0x12345678))
    assert ok is not None and struct.unpack_from("<I", ok, 20)[0] == HV_S_OK
    bad = svc.handle(negotiate_msg([V10], [V11], status=0))
    assert bad is not None and struct.unpack_from("<I", bad, 20)[0] == HV_E_FAIL
    assert svc.service_version == V11  # the failed renegotiation did not overwrite it


@pytest.mark.parametrize(
    ("host", "service"),
    [
        (lambda: HeartbeatHost(framework_versions=(V20,)), HeartbeatService),
        (lambda: ShutdownHost(service_versions=(V20, V40)), ShutdownService),
        (lambda: TimesyncHost(service_versions=(V20,)), TimesyncService),
    ],
)
def test_hosts_see_failed_negotiation(host: object, service: type[IcService]) -> None:
    hst = host()  # type: ignore[operator]
    svc = service()
    assert pump(hst, svc) == 1
    assert hst.state is HostState.FAILED and hst.stats.errors == []
    assert hst.next_request() is None


def test_fcopy_host_fails_without_framework_3(tmp_path: Path) -> None:
    hst = FcopySender(framework_versions=(V10,))
    pump(hst, FcopyService([tmp_path]))
    assert hst.state is HostState.FAILED


# --- malformed input, every service ---------------------------------------------------------

def make_services(root: Path) -> list[IcService]:
    return [HeartbeatService(), ShutdownService(), TimesyncService(), FcopyService([root])]


def test_short_and_long_messages_get_no_answer(tmp_path: Path) -> None:
    for svc in make_services(tmp_path):
        assert svc.handle(b"") is None
        assert svc.handle(bytes(27)) is None
        assert svc.handle(bytes(svc.max_request + 1)) is None
        assert svc.stats.dropped == 3 and svc.stats.errors == 0


@pytest.mark.parametrize("msgtype", [2, 5, 6, 8, 0xFFFF])
def test_unknown_type_gets_e_fail(tmp_path: Path, msgtype: int) -> None:
    for svc in make_services(tmp_path):
        req = build_message(msgtype, bytes(64), status=0)
        resp = svc.handle(req)
        assert resp is not None and len(resp) == len(req)
        assert struct.unpack_from("<I", resp, 20)[0] == HV_E_FAIL
        assert resp[25] == 5
        assert resp[:20] + resp[24:25] + resp[26:] == req[:20] + req[24:25] + req[26:]


def test_own_type_body_too_short_gets_no_answer(tmp_path: Path) -> None:
    cases = [
        (HeartbeatService(), IcMsgType.HEARTBEAT, 8),
        (ShutdownService(), IcMsgType.SHUTDOWN, 2060),
        (TimesyncService(), IcMsgType.TIMESYNC, 25),
        (FcopyService([tmp_path]), IcMsgType.FCOPY, 36),
    ]
    for svc, msgtype, need in cases:
        assert svc.handle(build_message(msgtype, bytes(need - 1))) is None
        assert svc.handle(build_message(msgtype, bytes(need))) is not None


def test_internal_error_answers_e_fail() -> None:
    class Broken(HeartbeatService):
        def _message(self, buf: bytearray) -> bool:
            raise RuntimeError("bug")

    svc = Broken()
    resp = svc.handle(build_message(IcMsgType.HEARTBEAT, bytes(40)))
    assert resp is not None and struct.unpack_from("<I", resp, 20)[0] == HV_E_FAIL
    assert svc.stats.errors == 1 and "bug" in svc.stats.last_error


# --- fuzz -------------------------------------------------------------------------------------

_types = st.sampled_from([0, 1, 3, 4, 7, 2, 9])


@st.composite
def ic_messages(draw: st.DrawFn) -> bytes:
    """Random bytes, or a framed message of a plausible type with a random body."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    msgtype = draw(_types)
    if msgtype == 0:
        nf = draw(st.integers(0, 110))
        nm = draw(st.integers(0, 110))
        vs = draw(st.lists(st.sampled_from([0x10000, 0x30000, 0x30002, 0x40000, 0x10001, 0x20000]),
                           max_size=12))
        body = struct.pack("<HHI", nf, nm, 0) + b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in vs)
    elif msgtype == 7:
        op = draw(st.integers(0, 5))
        body = struct.pack("<I", op) + draw(st.binary(max_size=1300))
    else:
        body = draw(st.binary(max_size=2100))
    cut = draw(st.integers(0, len(body) + 28))
    return build_message(msgtype, body, status=draw(st.sampled_from([0, 0x80004005])))[: 28 + cut]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(ic_messages(), min_size=1, max_size=6))
def test_fuzz_never_crashes(tmp_path: Path, msgs: list[bytes]) -> None:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    for svc in make_services(root):
        for msg in msgs:
            resp = svc.handle(msg)
            assert resp is None or (len(resp) == len(msg) and resp[25] == 5)
            assert svc.stats.errors == 0, svc.stats.last_error
            svc.run_pending()
        svc.close()
    # Nothing escaped the root and no partial file survived close().
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert not [p for p in root.rglob("*") if PART_PATTERN.fullmatch(p.name)]


@settings(max_examples=300, deadline=None)
@given(
    fw=st.lists(st.sampled_from([V10, V20, V30]), max_size=5),
    srv=st.lists(st.sampled_from([V10, V30, V31, V32, V40]), max_size=5),
)
def test_negotiation_invariants(fw: list[int], srv: list[int]) -> None:
    ours_fw, ours_srv = (V30, V10), (V32, V31, V30, V10)
    buf = negotiate_msg(fw, srv)
    n = len(buf)
    res = prep_negotiate_response(buf, ours_fw, ours_srv)
    assert len(buf) == n
    counts = struct.unpack_from("<HH", buf, 28)
    want_fw = next((v for v in ours_fw if v in fw), None)
    want_srv = next((v for v in ours_srv if v in srv), None)
    if want_fw is not None and want_srv is not None:
        assert res.found and counts == (1, 1)
        assert (res.framework_version, res.service_version) == (want_fw, want_srv)
    else:
        assert not res.found and counts == (0, 0)
