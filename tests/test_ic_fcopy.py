"""File copy: the guest service against the host's sender, in-process, on real files."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmbus.ic import FcopyEvent, FcopyService
from pyvmbus.ic.fcopy import PART_PATTERN
from pyvmbus.ic.messages import (
    DATA_FRAGMENT,
    HV_E_ACCESSDENIED,
    HV_E_FAIL,
    HV_ERROR_ALREADY_EXISTS,
    HV_ERROR_DISK_FULL,
    HV_INVALIDARG,
    HV_S_OK,
    CopyFlags,
    DoFcopy,
    FcopyHdr,
    FcopyOp,
    IcMsgType,
    StartFcopy,
    build_message,
)
from pyvmbus.mock.fcopy_model import FcopySender
from pyvmbus.mock.ic_models import pump


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "in"
    r.mkdir()
    return r


def setup(root: Path, **kw: object) -> tuple[FcopySender, FcopyService]:
    host, svc = FcopySender(), FcopyService([root], **kw)  # type: ignore[arg-type]
    pump(host, svc)
    return host, svc


def leftovers(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def status_of(resp: bytes | None) -> int:
    assert resp is not None
    return int(struct.unpack_from("<I", resp, 20)[0])


def fc(body: bytes) -> bytes:
    return build_message(IcMsgType.FCOPY, body)


def test_ten_mib_arrives_identical(root: Path) -> None:
    data = os.urandom(10 << 20)
    host, svc = setup(root)
    host.send_file(data, "big.bin", str(root))
    n = pump(host, svc)
    assert host.transfer_state == "done" and host.stats.errors == []
    assert n == 1 + -(-len(data) // DATA_FRAGMENT) + 1
    assert (root / "big.bin").read_bytes() == data
    assert leftovers(root) == ["big.bin"]
    assert svc.files_completed == 1 and svc.bytes_written == len(data)


def test_empty_and_odd_sizes(root: Path) -> None:
    host, svc = setup(root)
    for size in (0, 1, DATA_FRAGMENT, DATA_FRAGMENT + 1):
        data = os.urandom(size)
        host.send_file(data, f"f{size}", str(root))
        pump(host, svc)
        assert host.transfer_state == "done"
        assert (root / f"f{size}").read_bytes() == data


def test_cancel_midway_leaves_nothing(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(os.urandom(100_000), "part.bin", str(root), cancel_after=5)
    pump(host, svc)
    assert host.transfer_state == "cancelled" and host.status == HV_S_OK
    assert host.fragments_sent == 5
    assert leftovers(root) == [] and not svc.active


def test_cancel_on_demand(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(os.urandom(50_000), "x", str(root))
    for _ in range(3):
        req = host.next_request()
        assert req is not None
        host.receive(svc.handle(req) or b"")
    assert len(leftovers(root)) == 1  # the temporary file, under a hidden name
    host.cancel()
    pump(host, svc)
    assert host.transfer_state == "cancelled" and leftovers(root) == []


def test_cancel_without_copy_is_ok(root: Path) -> None:
    _, svc = setup(root)
    assert status_of(svc.handle(fc(FcopyHdr(FcopyOp.CANCEL_FCOPY).pack()))) == HV_S_OK


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("x", "{root}/../escape"),
        ("x", "{root}/a/../../escape"),
        ("../x", "{root}"),
        ("..", "{root}"),
        (".", "{root}"),
        ("", "{root}"),
        ("a/b", "{root}"),
        ("x", "relative/dir"),
        ("x", ""),
        ("n" * 256, "{root}"),
    ],
)
def test_bad_names_refused(root: Path, name: str, path: str) -> None:
    host, svc = setup(root)
    host.send_file(b"data", name, path.format(root=root), flags=CopyFlags.CREATE_PATH)
    pump(host, svc)
    assert host.transfer_state == "failed" and host.failed_op == "start"
    assert host.status == HV_INVALIDARG
    assert leftovers(root.parent) == ["in"]


def test_outside_roots_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    host, svc = setup(root)
    for dest in (str(tmp_path / "other"), "/etc", "/", str(tmp_path)):
        host.send_file(b"data", "x", dest, flags=CopyFlags.CREATE_PATH | CopyFlags.OVER_WRITE)
        pump(host, svc)
        assert host.status == HV_E_ACCESSDENIED, dest
    assert leftovers(tmp_path) == ["in", "other"]


def test_symlink_below_root_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    host, svc = setup(root)
    for dest in (root / "link", root / "link" / "sub"):
        host.send_file(b"data", "x", str(dest), flags=CopyFlags.CREATE_PATH)
        pump(host, svc)
        assert host.status == HV_E_ACCESSDENIED
    assert leftovers(outside) == []


def test_symlinked_file_is_replaced_not_followed(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    (root / "f").symlink_to(target)
    host, svc = setup(root)
    host.send_file(b"new", "f", str(root), flags=CopyFlags.OVER_WRITE)
    pump(host, svc)
    assert host.transfer_state == "done"
    assert target.read_bytes() == b"keep"
    assert not (root / "f").is_symlink() and (root / "f").read_bytes() == b"new"


def test_root_given_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    host, svc = FcopySender(), FcopyService([tmp_path / "alias"])
    pump(host, svc)
    for dest in (tmp_path / "alias", real):
        host.send_file(b"abc", "f", str(dest), flags=CopyFlags.OVER_WRITE)
        pump(host, svc)
        assert host.transfer_state == "done", dest
    assert (real / "f").read_bytes() == b"abc"


def test_existing_file_without_overwrite(root: Path) -> None:
    (root / "f").write_bytes(b"old")
    host, svc = setup(root)
    host.send_file(b"new", "f", str(root))
    pump(host, svc)
    assert host.status == HV_ERROR_ALREADY_EXISTS and host.failed_op == "start"
    assert (root / "f").read_bytes() == b"old" and leftovers(root) == ["f"]


def test_overwrite_replaces_only_when_whole(root: Path) -> None:
    (root / "f").write_bytes(b"old")
    data = os.urandom(3 * DATA_FRAGMENT)
    host, svc = setup(root)
    host.send_file(data, "f", str(root), flags=CopyFlags.OVER_WRITE)
    for _ in range(3):  # START and two fragments
        host.receive(svc.handle(host.next_request() or b"") or b"")
    assert (root / "f").read_bytes() == b"old"
    pump(host, svc)
    assert (root / "f").read_bytes() == data and leftovers(root) == ["f"]


def test_file_appearing_during_copy(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(b"new", "f", str(root))
    host.receive(svc.handle(host.next_request() or b"") or b"")  # START ok
    (root / "f").write_bytes(b"theirs")
    pump(host, svc)
    assert host.status == HV_ERROR_ALREADY_EXISTS and host.failed_op == "complete"
    assert (root / "f").read_bytes() == b"theirs" and leftovers(root) == ["f"]


def test_create_path(root: Path) -> None:
    host, svc = setup(root)
    dest = root / "a" / "b" / "c"
    host.send_file(b"x", "f", str(dest))
    pump(host, svc)
    assert host.status == HV_E_FAIL and leftovers(root) == []
    host.send_file(b"x", "f", str(dest) + "/", flags=CopyFlags.CREATE_PATH)
    pump(host, svc)
    assert host.transfer_state == "done" and (dest / "f").read_bytes() == b"x"
    assert oct((root / "a").stat().st_mode & 0o777) == oct(0o755 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_path_through_a_file_fails(root: Path) -> None:
    (root / "file").write_bytes(b"")
    host, svc = setup(root)
    host.send_file(b"x", "f", str(root / "file"), flags=CopyFlags.CREATE_PATH)
    pump(host, svc)
    assert host.status == HV_E_FAIL


def test_unicode_names(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(b"x", "Grüße 😀.txt", str(root / "Ünï"), flags=CopyFlags.CREATE_PATH)
    pump(host, svc)
    assert (root / "Ünï" / "Grüße 😀.txt").read_bytes() == b"x"


def test_invalid_utf16_refused(root: Path) -> None:
    _, svc = setup(root)
    raw = bytearray(StartFcopy("x", str(root), 0, 1).pack())
    raw[36:38] = b"\x00\xd8"  # lone high surrogate
    assert status_of(svc.handle(fc(bytes(raw)))) == HV_INVALIDARG


def test_offset_beyond_file_size(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(os.urandom(10_000), "f", str(root), file_size=5_000)
    pump(host, svc)
    assert host.status == HV_INVALIDARG and host.failed_op == "write"
    assert leftovers(root) == [] and not svc.active


def test_fewer_bytes_than_announced(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(os.urandom(1000), "f", str(root), file_size=2000)
    pump(host, svc)
    assert host.status == HV_E_FAIL and host.failed_op == "complete"
    assert leftovers(root) == []


def test_malformed_write_messages(root: Path) -> None:
    _, svc = setup(root)
    start = fc(StartFcopy("f", str(root), 0, 100_000).pack())
    assert status_of(svc.handle(start)) == HV_S_OK
    # size above the fragment: refused, the copy abandoned.
    bad = bytearray(DoFcopy(0, b"x").pack())
    struct.pack_into("<I", bad, 48, DATA_FRAGMENT + 1)
    assert status_of(svc.handle(fc(bytes(bad)))) == HV_INVALIDARG
    assert not svc.active and leftovers(root) == []
    # size larger than the bytes present.
    assert status_of(svc.handle(start)) == HV_S_OK
    short = DoFcopy(0, bytes(100)).pack(full=False)[:-1]
    assert status_of(svc.handle(fc(short))) == HV_INVALIDARG
    # WRITE shorter than its fixed part.
    assert status_of(svc.handle(start)) == HV_S_OK
    assert status_of(svc.handle(fc(DoFcopy(0, b"").pack(full=False)[:50]))) == HV_INVALIDARG
    assert leftovers(root) == []


def test_start_too_short(root: Path) -> None:
    _, svc = setup(root)
    assert status_of(svc.handle(fc(StartFcopy("f", str(root), 0, 1).pack()[:-1]))) == HV_INVALIDARG


def test_ops_without_a_copy(root: Path) -> None:
    _, svc = setup(root)
    assert status_of(svc.handle(fc(DoFcopy(0, b"x").pack()))) == HV_E_FAIL
    assert status_of(svc.handle(fc(FcopyHdr(FcopyOp.COMPLETE_FCOPY).pack()))) == HV_E_FAIL
    assert status_of(svc.handle(fc(FcopyHdr(9).pack()))) == HV_E_FAIL


def test_new_start_abandons_the_old_copy(root: Path) -> None:
    _, svc = setup(root)
    assert status_of(svc.handle(fc(StartFcopy("a", str(root), 0, 10).pack()))) == HV_S_OK
    assert len(leftovers(root)) == 1
    assert status_of(svc.handle(fc(StartFcopy("b", str(root), 0, 0).pack()))) == HV_S_OK
    assert status_of(svc.handle(fc(FcopyHdr(FcopyOp.COMPLETE_FCOPY).pack()))) == HV_S_OK
    assert leftovers(root) == ["b"]


def test_close_removes_partial(root: Path) -> None:
    _, svc = setup(root)
    assert status_of(svc.handle(fc(StartFcopy("a", str(root), 0, 10).pack()))) == HV_S_OK
    svc.close()
    svc.close()
    assert leftovers(root) == []


def test_disk_full(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host, svc = setup(root)
    real_pwrite = os.pwrite
    calls = [0]

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    host.send_file(os.urandom(5 * DATA_FRAGMENT), "f", str(root))
    pump(host, svc)
    assert host.status == HV_ERROR_DISK_FULL and host.failed_op == "write"
    assert leftovers(root) == []


def test_events_are_deferred(root: Path) -> None:
    events: list[FcopyEvent] = []
    host, svc = setup(root, on_event=events.append)
    host.send_file(b"abc", "f", str(root))
    req = host.next_request()
    assert req is not None
    resp = svc.handle(req)
    assert resp is not None and events == [] and svc.pending == 1
    svc.run_pending()
    host.receive(resp)
    pump(host, svc)
    assert [e.kind for e in events] == ["started", "completed"]
    assert events[1].path == f"{root}/f" and events[1].size == 3
    host.send_file(b"abc", "f", "/etc")
    pump(host, svc)
    assert events[-1].kind == "refused" and "outside" in str(events[-1])


def test_file_mode(root: Path) -> None:
    host, svc = setup(root, file_mode=0o600)
    host.send_file(b"abc", "f", str(root))
    pump(host, svc)
    assert (root / "f").stat().st_mode & 0o777 == 0o600 & ~current_umask()


def test_roots_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        FcopyService([tmp_path / "nope"])
    with pytest.raises(ValueError, match="at least one"):
        FcopyService([])


# Random sequences of well-formed-looking operations: nothing outside the root, no fd leaks,
# no partial files once closed, and every completed file holds exactly what was written.

_comp = st.sampled_from(["a", "b", "..", ".", "link", "", "ü"])


@st.composite
def fcopy_ops(draw: st.DrawFn, root: str) -> list[bytes]:
    ops: list[bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["start", "write", "complete", "cancel"]))
        if kind == "start":
            comps = draw(st.lists(_comp, max_size=3))
            base = draw(st.sampled_from([root, "/tmp", "/", "rel"]))
            name = draw(st.sampled_from(["f", "g", "..", "a/b", "link", ""]))
            flags = draw(st.integers(0, 3))
            size = draw(st.integers(0, 3 * DATA_FRAGMENT) | st.integers(2**62, 2**64 - 1))
            ops.append(fc(StartFcopy(name, "/".join([base, *comps]), flags, size).pack()))
        elif kind == "write":
            off = draw(st.integers(0, 3 * DATA_FRAGMENT) | st.integers(2**62, 2**64 - 1))
            data = draw(st.binary(max_size=64))
            ops.append(fc(DoFcopy(off, data).pack(full=draw(st.booleans()))))
        elif kind == "complete":
            ops.append(fc(FcopyHdr(FcopyOp.COMPLETE_FCOPY).pack()))
        else:
            ops.append(fc(FcopyHdr(FcopyOp.CANCEL_FCOPY).pack()))
    return ops


def open_fds_under(path: Path) -> list[str]:
    """Targets of this process's open fds that lie under ``path`` (files or directories)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target == str(path) or target.startswith(f"{path}/"):
            found.append(target)
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_operation_sequences(tmp_path: Path, data: st.DataObject) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir=tmp_path))
    root = base / "root"
    root.mkdir()
    (base / "outside").mkdir()
    (root / "link").symlink_to(base / "outside")
    svc = FcopyService([root], fsync=False)
    for msg in data.draw(fcopy_ops(str(root))):
        resp = svc.handle(msg)
        assert resp is not None and resp[25] == 5 and svc.stats.errors == 0, svc.stats.last_error
    svc.close()
    # Counting all fds is racy in a full run (other tests' threads open and close theirs);
    # what matters is that nothing the service opened under this tree stays open.
    assert open_fds_under(base) == []
    assert leftovers(base / "outside") == []
    assert sorted(p.name for p in base.iterdir()) == ["outside", "root"]
    assert not [p for p in root.rglob("*") if PART_PATTERN.fullmatch(p.name)]
    shutil.rmtree(base)


def test_directory_in_the_way(root: Path) -> None:
    (root / "d").mkdir()
    host, svc = setup(root)
    host.send_file(b"x", "d", str(root), flags=CopyFlags.OVER_WRITE)
    pump(host, svc)
    assert host.status == HV_E_FAIL and leftovers(root) == ["d"]


def test_long_path_component() -> None:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="fc", dir="/tmp"))  # short, so the path fits 260 units
    try:
        host, svc = setup(root)
        host.send_file(b"x", "f", f"{root}/{'ü' * 128}", flags=CopyFlags.CREATE_PATH)  # 256 bytes
        pump(host, svc)
        assert host.status == HV_INVALIDARG and leftovers(root) == []
        host.send_file(b"x", "f", f"{root}/{'ü' * 127}", flags=CopyFlags.CREATE_PATH)  # 254 bytes
        pump(host, svc)
        assert host.transfer_state == "done"
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("exists", [False, True])
def test_no_hard_links_fallback(root: Path, monkeypatch: pytest.MonkeyPatch, exists: bool) -> None:
    def no_link(*args: object, **kw: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    host, svc = setup(root)
    host.send_file(b"new", "f", str(root))
    host.receive(svc.handle(host.next_request() or b"") or b"")  # START
    if exists:
        (root / "f").write_bytes(b"theirs")
    monkeypatch.setattr(os, "link", no_link)
    pump(host, svc)
    if exists:
        assert host.status == HV_ERROR_ALREADY_EXISTS and (root / "f").read_bytes() == b"theirs"
    else:
        assert host.transfer_state == "done" and (root / "f").read_bytes() == b"new"
    assert leftovers(root) == ["f"]


def test_start_os_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def full_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    host, svc = setup(root)
    monkeypatch.setattr(os, "open", full_open)
    host.send_file(b"x", "f", str(root))
    pump(host, svc)
    assert host.status == HV_ERROR_DISK_FULL and leftovers(root) == []


def test_huge_sizes(root: Path) -> None:
    _, svc = setup(root)
    assert status_of(svc.handle(fc(StartFcopy("f", str(root), 0, 2**63).pack()))) == HV_INVALIDARG
    assert status_of(svc.handle(fc(StartFcopy("f", str(root), 0, 2**63 - 1).pack()))) == HV_S_OK
    # Beyond what the file system takes (EFBIG): a failure status, the copy abandoned.
    assert status_of(svc.handle(fc(DoFcopy(2**63 - 2, b"x").pack()))) == HV_E_FAIL
    assert not svc.active and leftovers(root) == [] and svc.stats.errors == 0


# -- bytes actually received (issue 10, 5): ranges, not the highest offset ----------------------

GIB = 1 << 30


def test_only_the_last_bytes_of_an_announced_gib_fail_complete(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(b"", "holes.bin", str(root), file_size=GIB, fragments=[(GIB - 10, b"0123456789")])
    pump(host, svc)
    assert host.transfer_state == "failed" and host.failed_op == "complete"
    assert host.status == HV_E_FAIL
    assert leftovers(root) == [] and not svc.active and svc.files_completed == 0
    assert svc.last_event is not None and svc.last_event.kind == "failed"
    assert "missing" in svc.last_event.reason and svc.last_event.size == 10


def test_a_gap_in_the_middle_fails_complete(root: Path) -> None:
    data = os.urandom(5 * DATA_FRAGMENT)
    frags = [(off, data[off : off + DATA_FRAGMENT]) for off in range(0, len(data), DATA_FRAGMENT)]
    host, svc = setup(root)
    host.send_file(b"", "gap.bin", str(root), fragments=frags[:2] + frags[3:])
    pump(host, svc)
    assert host.failed_op == "complete" and host.status == HV_E_FAIL
    assert f"{2 * DATA_FRAGMENT}" in svc.last_event.reason if svc.last_event else False
    assert leftovers(root) == []


def test_repeated_fragments_do_not_count_twice(root: Path) -> None:
    """As many bytes as announced arrived, but the same ones twice: a hole remains."""
    data = os.urandom(2 * DATA_FRAGMENT)
    host, svc = setup(root)
    last = (DATA_FRAGMENT, data[DATA_FRAGMENT:])
    host.send_file(b"", "dup.bin", str(root), file_size=len(data), fragments=[last, last])
    pump(host, svc)
    assert host.failed_op == "complete" and host.status == HV_E_FAIL and leftovers(root) == []


def test_overlapping_out_of_order_fragments_make_a_whole_file(root: Path) -> None:
    data = os.urandom(4 * DATA_FRAGMENT + 123)
    n = len(data)
    spans = [(3000, 6000), (n - 5000, n), (0, 3100), (9000, 15000), (5000, 9500), (14000, 20000),
             (0, 10), (20000, n - 4000), (n - 4500, n - 100)]
    frags = [(a, data[a:b]) for a, b in spans]
    host, svc = setup(root)
    host.send_file(b"", "mixed.bin", str(root), file_size=n, fragments=frags)
    pump(host, svc)
    assert host.transfer_state == "done", host.snapshot()
    assert (root / "mixed.bin").read_bytes() == data and leftovers(root) == ["mixed.bin"]


def test_empty_fragments_and_empty_file(root: Path) -> None:
    host, svc = setup(root)
    host.send_file(b"", "e1", str(root), file_size=0, fragments=[(0, b"")])
    pump(host, svc)
    assert host.transfer_state == "done" and (root / "e1").read_bytes() == b""
    host.send_file(b"", "e2", str(root), file_size=5, fragments=[(0, b""), (5, b"")])
    pump(host, svc)
    assert host.failed_op == "complete" and not (root / "e2").exists()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spans=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 700)), max_size=12),
       size=st.integers(1, 3000), tail=st.integers(0, 700))
def test_complete_succeeds_exactly_when_every_byte_arrived(tmp_path: Path, spans: list[tuple[int, int]],
                                                           size: int, tail: int) -> None:
    """Random fragments, usually ending with one that reaches the end of the file (so the
    highest offset says "whole" whether or not a hole remains)."""
    import tempfile

    d = Path(tempfile.mkdtemp(dir=tmp_path))
    data = os.urandom(size)
    frags = [(a, data[a : a + n]) for a, n in spans if a + n <= size]
    if tail:
        start = max(0, size - tail)
        frags.append((start, data[start:]))
    covered = bytearray(size)
    for a, piece in frags:
        covered[a : a + len(piece)] = b"\1" * len(piece)
    host, svc = FcopySender(), FcopyService([d], fsync=False)
    pump(host, svc)
    host.send_file(b"", "f", str(d), file_size=size, fragments=frags)
    pump(host, svc)
    if all(covered):
        assert host.transfer_state == "done" and (d / "f").read_bytes() == data
    else:
        assert host.failed_op == "complete" and host.status == HV_E_FAIL and leftovers(d) == []


# -- partial files of dead services (issue 10, 5) ------------------------------------------------


def _stale(state: Path, directory: Path, pid: int = 999_999, *, record: bool = True,
           hexpart: str = "") -> Path:
    """A partial file as a daemon killed mid-copy leaves it: the file and its record, no flock."""
    name = f".pyvmbus-fcopy-{pid}-{hexpart or os.urandom(8).hex()}.part"
    part = directory / name
    part.write_bytes(b"half a file")
    if record:
        (state / name).symlink_to(part)
    return part


def test_partial_files_are_named_and_recorded(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    host, svc = setup(root, state_dir=state)
    host.send_file(os.urandom(3 * DATA_FRAGMENT), "f", str(root))
    for _ in range(2):
        host.receive(svc.handle(host.next_request() or b"") or b"")
    (part,) = list(root.iterdir())
    m = PART_PATTERN.fullmatch(part.name)
    assert m is not None and int(m[1]) == os.getpid()
    assert os.readlink(state / part.name) == str(part)
    pump(host, svc)
    assert host.transfer_state == "done" and leftovers(root) == ["f"]
    assert sorted(os.listdir(state)) == ["lock"]  # the record went with the partial file
    host.send_file(os.urandom(3 * DATA_FRAGMENT), "g", str(root), cancel_after=1)
    pump(host, svc)
    assert leftovers(root) == ["f"] and sorted(os.listdir(state)) == ["lock"]


def test_start_removes_stale_partial_files_of_ours_only(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    FcopyService([root], state_dir=state)  # creates the directory
    sub = root / "sub"
    sub.mkdir()
    stale = [_stale(state, root), _stale(state, sub, pid=1)]
    unrecorded = _stale(state, root, record=False)
    gone = _stale(state, root)
    gone.unlink()
    other = root / "keep.txt"
    other.write_bytes(b"x")
    (state / "notes.txt").write_bytes(b"not a record")
    # A link named like a partial file, recorded, pointing at a file of ours: not followed.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link_name = f".pyvmbus-fcopy-7-{'a' * 16}.part"
    (root / link_name).symlink_to(victim)
    (state / link_name).symlink_to(root / link_name)
    # A live copy's partial file: its flock is held (here by this process, another open file).
    live = _stale(state, root)
    import fcntl

    with open(live, "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        svc = FcopyService([root], state_dir=state)
        assert sorted(svc.stale_removed) == sorted(str(p) for p in stale)
        assert all(not p.exists() for p in stale)
        assert live.exists() and (state / live.name).is_symlink()
    assert unrecorded.exists() and other.exists() and victim.read_bytes() == b"precious"
    assert (root / link_name).is_symlink() and not (state / link_name).exists()
    assert sorted(os.listdir(state)) == sorted(["lock", "notes.txt", live.name])
    # Its owner died meanwhile (the with block closed the fd): the next start removes it.
    assert FcopyService([root], state_dir=state).stale_removed == [str(live)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_stale_partial_of_another_user_is_left_alone(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    FcopyService([root], state_dir=state)
    theirs = _stale(state, root)
    os.chown(theirs, 65534, 65534)
    assert FcopyService([root], state_dir=state).stale_removed == []
    assert theirs.exists() and sorted(os.listdir(state)) == ["lock"]


def test_state_dir_must_be_private(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(ValueError, match="writable by nobody else"):
        FcopyService([root], state_dir=state)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable fcopy state directory"):
        FcopyService([root], state_dir=tmp_path / "file" / "state")


def test_state_dir_candidates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pyvmbus.ic.fcopy import STATE_DIR_ENV, state_dir_candidates

    assert state_dir_candidates(tmp_path) == [tmp_path]
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "env"))
    assert state_dir_candidates() == [tmp_path / "env"]
    monkeypatch.delenv(STATE_DIR_ENV)
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/sd:/elsewhere")
    assert state_dir_candidates() == [tmp_path / "sd" / "fcopy"]
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert state_dir_candidates()[0] == Path("/var/lib/pyvmbus/fcopy")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir_candidates() == [tmp_path / "xdg" / "pyvmbus" / "fcopy"]


def _vmbus() -> list[str]:
    import sys

    script = Path(sys.executable).with_name("vmbus")
    return [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from pyvmbus.cli import main; sys.exit(main(prog_name='vmbus'))"]


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_kill_9_mid_copy_then_a_restart_removes_the_partial_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `vmbus fcopy-daemon` killed with SIGKILL mid-copy; a service starting meanwhile
    leaves the live one's file alone, the restarted daemon removes the dead one's."""
    from pyvmbus.errors import ChannelClosed
    from pyvmbus.ic.messages import FCOPY_INSTANCE_GUID
    from pyvmbus.mock import MockVmbus

    state, dest = tmp_path / "state", tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setenv("PYVMBUS_FCOPY_STATE_DIR", str(state))
    env = dict(os.environ)
    log_path = tmp_path / "daemons.log"
    with MockVmbus() as m, log_path.open("w") as log_file:
        guid = m.add_device("fcopy", instance=FCOPY_INSTANCE_GUID)

        def ready() -> bool:
            try:
                return bool(m.command(guid, "stats")["state"] == "ready")
            except ChannelClosed:
                return False

        def daemon() -> subprocess.Popen[bytes]:
            argv = [*_vmbus(), "--root", str(m.root), "fcopy-daemon", "--dest-root", str(dest), "--no-fsync"]
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)

        first = daemon()
        try:
            _wait(ready, "the first daemon to negotiate")
            # Stall the host first: START goes out, its answer is never read, the copy stays open.
            m.fault(guid, "stall")
            m.command(guid, "send_file", data=os.urandom(100_000), file_name="big.bin", dest=str(dest))
            _wait(lambda: len(os.listdir(dest)) == 1, "the partial file")
            (part,) = dest.iterdir()
            # A service starting while the copy lives must not take the file for a stale one.
            assert not getattr(FcopyService([dest]), "stale_removed", [])
            assert part.exists()
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(10)
        assert list(dest.iterdir()) == [part]  # what kill -9 leaves behind
        second = daemon()
        try:
            _wait(lambda: not part.exists(), "the restarted daemon to remove the partial file")
        finally:
            second.terminate()
            second.wait(20)
    assert list(dest.iterdir()) == []
    assert sorted(os.listdir(state)) == ["lock"]
    assert "removed" in log_path.read_text() and part.name in log_path.read_text()


def test_state_dir_removed_under_a_running_service_is_made_again(root: Path, tmp_path: Path) -> None:
    import shutil

    state = tmp_path / "state"
    host, svc = setup(root, state_dir=state)
    shutil.rmtree(state)
    host.send_file(b"abc", "f", str(root))
    pump(host, svc)
    assert host.transfer_state == "done" and (root / "f").read_bytes() == b"abc"
    assert sorted(os.listdir(state)) == ["lock"]


def test_short_writes_are_completed_and_a_stuck_one_fails(root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    stuck = [False]

    def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
        if stuck[0]:
            return 0
        return real_pwrite(fd, data[: max(1, len(data) // 3)], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = os.urandom(2 * DATA_FRAGMENT + 5)
    host, svc = setup(root)
    host.send_file(data, "f", str(root))
    pump(host, svc)
    assert host.transfer_state == "done" and (root / "f").read_bytes() == data
    stuck[0] = True
    host.send_file(data, "g", str(root))
    pump(host, svc)
    assert host.failed_op == "write" and host.status == HV_E_FAIL and leftovers(root) == ["f"]


def test_write_answers_are_the_request_with_status_and_flags(root: Path) -> None:
    """Every WRITE_TO_FILE answer, on the short path (in order) or not (the first fragment, out
    of order, a repeat, a bad one), is the request at its length with icflags 5 and the status
    in place of whatever status the host sent (as hv_fcopy_uio_daemon answers)."""
    _, svc = setup(root)
    size = 3 * DATA_FRAGMENT + 7
    data = os.urandom(size)
    start = fc(StartFcopy("f", str(root), CopyFlags.OVER_WRITE, size).pack())
    assert status_of(svc.handle(start)) == HV_S_OK

    def write(offset: int, chunk: bytes, host_status: int = 0x1234) -> bytes:
        return build_message(IcMsgType.FCOPY, DoFcopy(offset, chunk).pack(), status=host_status,
                             transaction_id=offset & 0xFF)

    def expected(req: bytes, status: int) -> bytes:
        return req[:20] + struct.pack("<I", status) + req[24:25] + b"\x05" + req[26:]

    frags = [(2 * DATA_FRAGMENT, data[2 * DATA_FRAGMENT : 3 * DATA_FRAGMENT]),  # out of order first
             (0, data[:DATA_FRAGMENT]), (DATA_FRAGMENT, data[DATA_FRAGMENT : 2 * DATA_FRAGMENT]),
             (DATA_FRAGMENT, data[DATA_FRAGMENT : 2 * DATA_FRAGMENT]),  # a repeat
             (3 * DATA_FRAGMENT, data[3 * DATA_FRAGMENT :])]  # in order after the merge
    for offset, chunk in frags:
        req = write(offset, chunk)
        resp = svc.answer(req)
        assert resp is not None and bytes(resp) == expected(req, HV_S_OK)
        assert bytes(resp) == svc.handle(req)  # handle() answers the same bytes
    assert status_of(svc.handle(fc(FcopyHdr(FcopyOp.COMPLETE_FCOPY).pack()))) == HV_S_OK
    assert (root / "f").read_bytes() == data
    # A fragment past file_size during a copy: HV_INVALIDARG in place, the copy abandoned.
    assert status_of(svc.handle(fc(StartFcopy("g", str(root), 0, 150).pack()))) == HV_S_OK
    assert status_of(svc.handle(write(0, data[:100]))) == HV_S_OK
    req = write(100, data[:100])
    resp = svc.answer(req)
    assert resp is not None and bytes(resp) == expected(req, HV_INVALIDARG) and not svc.active
    assert svc.stats.requests == svc.stats.responses and svc.stats.errors == 0
