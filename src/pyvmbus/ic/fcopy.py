"""Guest file copy IC (HV_FCOPY_GUID 34d14be3-dee4-41c8-9ae7-6b174977c192; ICMSGTYPE 7).

The host (``Copy-VMFile``) sends START_FILE_COPY (names, flags, size), WRITE_TO_FILE
fragments of up to 6 KiB, then COMPLETE_FCOPY, or CANCEL_FCOPY; one message at a time, each
answered with a status. This is the protocol of tools/hv/hv_fcopy_uio_daemon.c, which this
service replaces; it matches the daemon's statuses (negotiation with framework 3.0 and service
1.1 sets HV_E_FAIL then 0; unknown types and operations HV_E_FAIL; an existing file without
OVER_WRITE HV_ERROR_ALREADY_EXISTS; ENOSPC HV_ERROR_DISK_FULL; a missing directory without
CREATE_PATH HV_E_FAIL) and differs on purpose where the daemon is unsafe:

- The file is written under a temporary name in the destination directory
  (``.pyvmbus-fcopy-<pid>-<16 hex>.part``) and renamed into place on COMPLETE_FCOPY; a
  cancelled, failed or interrupted copy leaves nothing, and an existing file is replaced
  only when the copy is whole (the daemon truncates it at START).
- Every partial file is recorded in the state directory (a symlink to it, see
  :func:`state_dir_candidates`) before it is created, and held under an exclusive flock
  while its copy lives. A service starting up removes the partial files of dead ones
  (kill -9, a crash, power loss): recorded, named by the pattern, a regular file owned by
  this user, and no flock held on it.
- Destinations must lie inside the allowed roots given to the service. ``..`` components,
  relative paths, ``/`` or NUL in the file name, invalid UTF-16 and over-long names get
  HV_INVALIDARG; a path outside every root, or through a symlink below a root, gets
  HV_E_ACCESSDENIED (0x80070005, not in the Linux headers: the host prints "Access is
  denied"). Directories are walked with O_NOFOLLOW from the root, so a symlink swapped in
  meanwhile cannot redirect the write.
- Names are decoded as real UTF-16 (the daemon turns every non-ASCII unit into 'X').
- Lengths are checked: START needs the whole 1088-byte body, WRITE needs ``size`` <= 6144
  bytes present, and ``offset + size`` <= ``file_size`` (HV_INVALIDARG otherwise; the copy is
  abandoned). The byte ranges received are tracked (overlaps and repeats count once):
  COMPLETE fails with HV_E_FAIL, and the partial file is removed, unless every byte of
  ``0 .. file_size`` arrived. A host leaving more than 65,536 separate ranges open at once
  gets HV_INVALIDARG (Hyper-V sends in order: one range).
- CANCEL_FCOPY removes the partial file and answers HV_S_OK (the uio daemon does not handle
  it and answers HV_E_FAIL; the older hv_fcopy_daemon removed the file and answered 0).
- COMPLETE or WRITE with no copy in progress answer HV_E_FAIL.
- A message shorter than 28 + 36 bytes gets no answer (the daemon exits on it).
- New files get mode 0644 (the daemon: 0744), directories 0755; both before the umask.

File I/O happens inside :meth:`handle` (writing the file is the service); the channel I/O
does not, so the service runs the same in-process against the mock's host model. A
WRITE_TO_FILE that continues the file in order (what Hyper-V sends) takes a short path: one
unpack of its fields, one ``os.pwrite`` straight from the received packet (a memoryview, no
copy), the last byte range extended in place, one bytearray for the answer; anything else
goes through the full checks, with the same answers.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..devlock import pid_alive
from ..errors import UsageError
from .framework import RESPONSE_FLAGS, IcService
from .messages import (
    DATA_FRAGMENT,
    HV_E_ACCESSDENIED,
    HV_E_FAIL,
    HV_ERROR_ALREADY_EXISTS,
    HV_ERROR_DISK_FULL,
    HV_INVALIDARG,
    HV_S_OK,
    ICMSG_HDR,
    UTIL_FW_VERSION,
    WIN8_SRV_VERSION,
    Buffer,
    CopyFlags,
    DoFcopy,
    FcopyHdr,
    FcopyOp,
    IcMsgHdr,
    IcMsgType,
    StartFcopy,
    status_name,
)

__all__ = ["PART_PATTERN", "STATE_DIR_ENV", "FcopyEvent", "FcopyService", "StateDirUnusable",
           "state_dir_candidates"]

log = logging.getLogger("pyvmbus.ic.fcopy")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Opening a stale partial file to lock it: never follow, never block (a FIFO), never a tty.
_REAP_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NAME_MAX = 255
_MAX_FILE_SIZE = (1 << 63) - 1
PART_PATTERN = re.compile(r"\.pyvmbus-fcopy-([1-9][0-9]{0,9})-([0-9a-f]{16})\.part")
"""Names of partial files (and of their records in the state directory): pid, random."""
STATE_DIR_ENV = "PYVMBUS_FCOPY_STATE_DIR"
"""Environment variable naming the state directory (overrides the default)."""
_LOCK_NAME = "lock"
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_RANGES = 1 << 16
# WRITE_TO_FILE's fields in one unpack: icmsgtype @12, operation @28, offset @68, size @76;
# the data follows at 80 (pipe header 8 + icmsg_hdr 20 + hv_do_fcopy's fixed 52).
_WRITE_FIELDS = struct.Struct("<12xH14xI36xQI")
_WRITE_DATA = ICMSG_HDR + DoFcopy.DATA_AT
_U32 = struct.Struct("<I")
_ZERO_STATUS = bytes(4)
_STATUS_SLICE = slice(IcMsgHdr.STATUS_AT, IcMsgHdr.STATUS_AT + 4)
_FCOPY = int(IcMsgType.FCOPY)
_WRITE_TO_FILE = int(FcopyOp.WRITE_TO_FILE)
_STATUS_AT = IcMsgHdr.STATUS_AT
_FLAGS_AT = IcMsgHdr.FLAGS_AT
# Errors for which a hard link is not available on this file system: publish by rename.
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


@dataclass(frozen=True, slots=True)
class FcopyEvent:
    """What happened to one copy, for logs (passed to ``on_event`` after the answer)."""

    kind: str
    """"started", "completed", "cancelled", "failed" or "refused"."""
    path: str
    status: int
    size: int = 0
    reason: str = ""

    def __str__(self) -> str:
        text = f"fcopy {self.kind}: {self.path or '?'} ({self.size} bytes, {status_name(self.status)})"
        return text + (f": {self.reason}" if self.reason else "")


class StateDirUnusable(UsageError, ValueError):
    """No state directory to record partial files in (missing, read-only, or writable by
    another user): the service does not start, rather than leave files it cannot find."""


class _Refusal(Exception):
    """A status to answer with, and why (internal)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Ranges:
    """The byte ranges of a file received so far: sorted, disjoint, non-touching
    ``[starts[i], ends[i])``. Appending in order (what Hyper-V does) stays one range."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, lo: int, hi: int) -> bool:
        """Record ``[lo, hi)`` (lo < hi); False when that would exceed _MAX_RANGES ranges."""
        ends = self.ends
        if ends and ends[-1] == lo:  # the next fragment in order
            ends[-1] = hi
            return True
        starts = self.starts
        i = bisect.bisect_left(ends, lo)  # first range ending at or after lo: touches or overlaps
        j = bisect.bisect_right(starts, hi)  # ranges starting at or before hi merge too
        if i == j:
            if len(starts) >= _MAX_RANGES:
                return False
            starts.insert(i, lo)
            ends.insert(i, hi)
        else:
            lo = min(lo, starts[i])
            hi = max(hi, ends[j - 1])
            starts[i:j] = [lo]
            ends[i:j] = [hi]
        return True

    def covered(self) -> int:
        """Bytes received (each counted once)."""
        return sum(self.ends) - sum(self.starts)

    def whole(self, size: int) -> bool:
        """Every byte of ``[0, size)`` arrived."""
        return size == 0 or (len(self.starts) == 1 and self.starts[0] == 0 and self.ends[0] == size)

    def missing(self, size: int) -> str:
        """What is missing of ``[0, size)``, for the log: the bytes, the gaps, the first gap."""
        gaps: list[tuple[int, int]] = []
        at = 0
        for lo, hi in zip(self.starts, self.ends, strict=True):
            if lo > at:
                gaps.append((at, lo))
            at = hi
        if at < size:
            gaps.append((at, size))
        lost = size - self.covered()
        lo, hi = gaps[0]
        return (f"{lost} of {size} bytes never arrived ({len(gaps)} gap{'s' if len(gaps) > 1 else ''}, "
                f"the first at bytes {lo}..{hi - 1}): missing data")


@dataclass(slots=True)
class _Copy:
    dir_fd: int
    tmp: str
    name: str
    path: str
    fd: int
    flags: int
    size: int
    record: str
    """The symlink in the state directory that names the partial file."""
    ranges: _Ranges = field(default_factory=_Ranges)


def state_dir_candidates(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where the partial files are recorded, in order of preference: ``explicit``, else
    $PYVMBUS_FCOPY_STATE_DIR, else systemd's $STATE_DIRECTORY/fcopy (StateDirectory=), else
    /var/lib/pyvmbus/fcopy for root (then /run/pyvmbus/fcopy when /var/lib is read-only:
    it does not survive a reboot), else $XDG_STATE_HOME (~/.local/state)/pyvmbus/fcopy."""
    if explicit is not None:
        return [Path(explicit)]
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return [Path(env)]
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return [Path(systemd.split(":")[0]) / "fcopy"]
    if os.geteuid() == 0:
        return [Path("/var/lib/pyvmbus/fcopy"), Path("/run/pyvmbus/fcopy")]
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return [Path(xdg) / "pyvmbus" / "fcopy"]


def _prepare_state_dir(path: Path) -> None:
    """Create ``path`` (0700) and its lock file; OSError when unusable, StateDirUnusable when unsafe."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirUnusable(f"fcopy state directory {path} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise StateDirUnusable(
            f"fcopy state directory {path} must be owned by uid {os.geteuid()} and writable by nobody "
            f"else (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): fix it, or use another "
            f"({STATE_DIR_ENV}=DIR, or the daemon's --state-dir DIR)")
    os.close(os.open(path / _LOCK_NAME, _LOCK_FLAGS, 0o600))


def _os_status(exc: OSError) -> int:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HV_ERROR_DISK_FULL
    if exc.errno == errno.ELOOP:
        return HV_E_ACCESSDENIED
    if exc.errno == errno.ENAMETOOLONG:
        return HV_INVALIDARG
    return HV_E_FAIL


def _components(path: str) -> list[str]:
    """The components of an absolute path; _Refusal for '..', a relative path, long names."""
    if not path.startswith("/"):
        raise _Refusal(HV_INVALIDARG, f"destination path {path!r} is not absolute")
    comps = [c for c in path.split("/") if c not in ("", ".")]
    for c in comps:
        if c == "..":
            raise _Refusal(HV_INVALIDARG, f"destination path {path!r} contains '..'")
        if len(os.fsencode(c)) > _NAME_MAX:
            raise _Refusal(HV_INVALIDARG, f"a component of {path!r} is longer than {_NAME_MAX} bytes")
    return comps


class FcopyService(IcService):
    """Receives files from the host into the allowed ``roots`` (directories; at least one).

    ``fsync``: flush the file and its directory before answering COMPLETE (default on).
    ``on_event(FcopyEvent)``: called after the answer for every start, end and refusal.
    ``state_dir``: where partial files are recorded (default: :func:`state_dir_candidates`);
    the partial files of dead services recorded there are removed at construction
    (``clean_stale=False``: not; :meth:`remove_stale` does it on demand).
    :class:`StateDirUnusable` (a ValueError) when there is none to use.
    """

    service_name: ClassVar[str] = "fcopy"
    class_name: ClassVar[str] = "fcopy"
    message_type: ClassVar[int] = IcMsgType.FCOPY
    framework_versions: ClassVar[tuple[int, ...]] = (UTIL_FW_VERSION,)
    service_versions: ClassVar[tuple[int, ...]] = (WIN8_SRV_VERSION,)
    max_request: ClassVar[int] = 0x4000
    """The daemon reads into a 16 KiB buffer (its ring size)."""
    negotiate_sets_status: ClassVar[bool] = True

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        *,
        file_mode: int = 0o644,
        dir_mode: int = 0o755,
        fsync: bool = True,
        on_event: Callable[[FcopyEvent], None] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        clean_stale: bool = True,
    ) -> None:
        super().__init__()
        if not roots:
            raise ValueError("fcopy needs at least one allowed destination root (e.g. /var/lib/fcopy)")
        self._roots: list[tuple[list[str], str]] = []
        for root in roots:
            real = os.path.realpath(root)
            if not os.path.isdir(real):
                raise ValueError(f"fcopy destination root {os.fspath(root)!r} is not a directory")
            spelled = os.path.normpath(os.path.abspath(root))
            for form in {spelled, real}:
                self._roots.append(([c for c in form.split("/") if c], real))
        self._roots.sort(key=lambda r: -len(r[0]))  # longest (most specific) root first
        self.roots = tuple(sorted({real for _, real in self._roots}))
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.fsync = fsync
        self.on_event = on_event
        self._copy: _Copy | None = None
        self.files_completed = 0
        self.bytes_written = 0
        self.last_event: FcopyEvent | None = None
        self.state_dir = self._choose_state_dir(state_dir)
        self.stale_removed: list[str] = self.remove_stale() if clean_stale else []
        """Partial files of dead services removed at construction (absolute paths)."""

    @staticmethod
    def _choose_state_dir(explicit: str | os.PathLike[str] | None) -> Path:
        candidates = state_dir_candidates(explicit)
        errors: list[str] = []
        for i, path in enumerate(candidates):
            try:
                _prepare_state_dir(path)
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror or exc}")
                continue
            if i:
                log.warning("fcopy: recording partial files in %s (%s); partial files left by a crash "
                            "before a reboot will not be found: give the daemon a persistent state "
                            "directory (systemd: StateDirectory=pyvmbus)", path, "; ".join(errors))
            return path
        raise StateDirUnusable(f"no usable fcopy state directory to record partial files in "
                               f"({'; '.join(errors)}): use another ({STATE_DIR_ENV}=DIR, or the daemon's "
                               "--state-dir DIR)")

    # --- partial files of dead services ---------------------------------------------------

    @contextlib.contextmanager
    def _state_lock(self, how: int) -> Iterator[None]:
        """Shared while a partial file is created and locked, exclusive while stale ones are
        reaped: a reaper never sees a new file before its creator holds its flock."""
        try:
            fd = os.open(self.state_dir / _LOCK_NAME, _LOCK_FLAGS, 0o600)
        except FileNotFoundError:  # the directory was removed under us: make it again
            _prepare_state_dir(self.state_dir)
            fd = os.open(self.state_dir / _LOCK_NAME, _LOCK_FLAGS, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # releases the flock

    def remove_stale(self) -> list[str]:
        """Remove the partial files recorded in the state directory whose service is gone.

        A file is removed only when its record (a symlink named like the file) points at it,
        its name matches :data:`PART_PATTERN`, it is a regular file owned by this user, and
        nobody holds the flock a live copy keeps on it (on a file system without flock:
        the pid in its name is not running). Records of files already gone are dropped;
        a live copy's are kept. Returns the paths removed (each also logged).
        """
        removed: list[str] = []
        sdir = self.state_dir
        try:
            with self._state_lock(fcntl.LOCK_EX):
                for rec in sorted(os.listdir(sdir)):
                    m = PART_PATTERN.fullmatch(rec)
                    if m is None:
                        continue
                    try:
                        target = os.readlink(sdir / rec)
                    except OSError:
                        continue  # not a symlink: not a record of ours
                    verdict = self._reap(rec, target)
                    if verdict == "busy":
                        continue
                    if verdict == "removed":
                        removed.append(target)
                        log.warning("fcopy: removed %s, the partial file of a copy interrupted by the "
                                    "end of its daemon (pid %s)", target, m[1])
                    elif verdict == "foreign":
                        log.warning("fcopy: %s is not the partial file recorded (another file, owner or "
                                    "type): left alone, its record dropped", target)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(sdir / rec)
        except OSError as exc:
            log.warning("fcopy: could not look for stale partial files in %s: %s", sdir, exc)
        return removed

    @staticmethod
    def _reap(rec: str, target: str) -> str:
        """Remove one recorded partial file if stale: "removed", "gone", "foreign", "busy"."""
        if not os.path.isabs(target) or os.path.basename(target) != rec:
            return "foreign"
        try:
            dfd = os.open(os.path.dirname(target), _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return "gone"
        except OSError as exc:  # EACCES, EIO...: cannot tell; keep the record for next time
            log.warning("fcopy: cannot look at the partial file %s: %s", target, exc)
            return "busy"
        try:
            try:
                st = os.stat(rec, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return "gone"
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return "foreign"
            fd = os.open(rec, _REAP_FLAGS, dir_fd=dfd)
            try:
                if os.fstat(fd).st_ino != st.st_ino:
                    return "foreign"
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return "busy"  # a live copy holds it
                except OSError:  # no flock here (ENOLCK): fall back to the pid in the name
                    m = PART_PATTERN.fullmatch(rec)
                    if m is None or pid_alive(int(m[1])):
                        return "busy"
                if os.stat(rec, dir_fd=dfd, follow_symlinks=False).st_ino != st.st_ino:
                    return "foreign"
                os.unlink(rec, dir_fd=dfd)
                return "removed"
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("fcopy: could not remove the stale partial file %s: %s", target, exc)
            return "busy"  # keep the record: try again next time
        finally:
            os.close(dfd)

    @property
    def active(self) -> bool:
        """A copy is in progress."""
        return self._copy is not None

    def close(self) -> None:
        """Abandon a copy in progress (its partial file is removed). Idempotent."""
        if self._copy is not None:
            self._discard("failed", HV_E_FAIL, "the channel closed during the copy")

    # --- dispatch -----------------------------------------------------------------------

    def answer(self, request: Buffer) -> bytearray | None:
        """WRITE_TO_FILE during a copy on a short path (it is ~all of the traffic); the rest
        through :meth:`IcService.answer`. Same answers either way.

        The short path takes only a whole, in-range fragment written in one ``pwrite``
        and appended to the byte ranges in order (what Hyper-V sends); anything else
        (a short or failed write, an empty or out-of-order fragment, bad fields) goes
        through :meth:`_write` and its checks, with the same statuses."""
        c = self._copy
        n = len(request)
        if c is None or n < _WRITE_DATA or n > self.max_request:
            return super().answer(request)
        msgtype, op, offset, size = _WRITE_FIELDS.unpack_from(request)
        if msgtype != _FCOPY or op != _WRITE_TO_FILE:
            return super().answer(request)
        stats = self.stats
        stats.requests += 1
        try:
            end = offset + size
            stop = _WRITE_DATA + size
            ends = c.ranges.ends
            if size and size <= DATA_FRAGMENT and stop <= n and end <= c.size and ends and ends[-1] == offset:
                # c.size < 2**63 (checked at START), so offset fits pwrite's off_t.
                try:
                    k = os.pwrite(c.fd, memoryview(request)[_WRITE_DATA:stop], offset)
                except OSError as exc:
                    status = self._fail(_os_status(exc), f"writing {size} bytes at {offset}: {exc.strerror}")
                else:
                    if k == size:
                        ends[-1] = end
                        self.bytes_written += size
                        buf = bytearray(request)
                        buf[_STATUS_SLICE] = _ZERO_STATUS
                        buf[_FLAGS_AT] = RESPONSE_FLAGS
                        stats.responses += 1
                        return buf
                    status = self._write(c, request, n, offset, size, k)  # a short write: go on
            else:
                status = self._write(c, request, n, offset, size)
            buf = bytearray(request)
            _U32.pack_into(buf, _STATUS_AT, status)
        except Exception as exc:  # a bug must not kill the channel: answer E_FAIL, as handle does
            buf = self._failed(request, exc)
        buf[_FLAGS_AT] = RESPONSE_FLAGS
        stats.responses += 1
        return buf

    def _message(self, buf: bytearray) -> bool:
        n = len(buf)
        if n < ICMSG_HDR + FcopyHdr.SIZE:
            self._drop(f"fcopy message of {n} bytes, needs {ICMSG_HDR + FcopyHdr.SIZE}")
            return False
        op = FcopyHdr.STRUCT.unpack_from(buf, ICMSG_HDR)[0]
        if op == FcopyOp.WRITE_TO_FILE:
            c = self._copy
            if c is None:
                status = HV_E_FAIL
            elif n < _WRITE_DATA:
                status = self._fail(HV_INVALIDARG, f"WRITE_TO_FILE of {n} bytes")
            else:  # (answer() takes these)
                offset, size = _WRITE_FIELDS.unpack_from(buf)[2:]
                status = self._write(c, buf, n, offset, size)
        elif op == FcopyOp.START_FILE_COPY:
            status = self._start(buf)
        elif op == FcopyOp.COMPLETE_FCOPY:
            status = self._complete()
        elif op == FcopyOp.CANCEL_FCOPY:
            if self._copy is not None:
                self._discard("cancelled", HV_S_OK, "the host cancelled the copy")
            status = HV_S_OK
        else:
            status = HV_E_FAIL
        self._set_status(buf, status)
        return True

    def _event(self, kind: str, path: str, status: int, size: int = 0, reason: str = "") -> None:
        ev = FcopyEvent(kind, path, status, size, reason)
        self.last_event = ev
        on_event = self.on_event
        if on_event is not None:
            self._defer(lambda: on_event(ev))

    # --- START_FILE_COPY ----------------------------------------------------------------

    def _start(self, buf: bytearray) -> int:
        if self._copy is not None:
            self._discard("failed", HV_E_FAIL, "a new START_FILE_COPY arrived before COMPLETE")
        if len(buf) < ICMSG_HDR + StartFcopy.SIZE:
            self._event("refused", "", HV_INVALIDARG, 0, f"START_FILE_COPY of {len(buf)} bytes")
            return HV_INVALIDARG
        path = ""
        try:
            try:
                msg = StartFcopy.unpack_from(buf)
            except UnicodeDecodeError as exc:
                raise _Refusal(HV_INVALIDARG, f"a name is not valid UTF-16 ({exc.reason})") from None
            path = msg.path_name.rstrip("/") + "/" + msg.file_name
            self._copy = self._open(msg, path)
        except _Refusal as r:
            self._event("refused", path, r.status, 0, r.reason)
            return r.status
        except OSError as exc:
            status = _os_status(exc)
            self._event("refused", path, status, 0, str(exc))
            return status
        self._event("started", path, HV_S_OK, msg.file_size)
        return HV_S_OK

    def _open(self, msg: StartFcopy, path: str) -> _Copy:
        name = msg.file_name
        if msg.file_size > _MAX_FILE_SIZE:
            raise _Refusal(HV_INVALIDARG, f"file_size {msg.file_size} is larger than a file can be")
        if name in ("", ".", "..") or "/" in name:
            raise _Refusal(HV_INVALIDARG, f"file name {name!r} is not a single path component")
        if len(os.fsencode(name)) > _NAME_MAX:
            raise _Refusal(HV_INVALIDARG, f"file name is longer than {_NAME_MAX} bytes")
        comps = _components(msg.path_name)
        for root, real in self._roots:
            if comps[: len(root)] == root:
                base, below = real, comps[len(root) :]
                break
        else:
            raise _Refusal(HV_E_ACCESSDENIED, f"{msg.path_name!r} is outside the allowed roots {self.roots}")
        dfd = self._walk(base, below, msg.copy_flags)
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not msg.copy_flags & CopyFlags.OVER_WRITE:
                    raise _Refusal(HV_ERROR_ALREADY_EXISTS, f"{path} exists and OVER_WRITE is not set")
                if stat.S_ISDIR(st.st_mode):
                    raise _Refusal(HV_E_FAIL, f"{path} is a directory")
            fd, tmp, record = self._create_part(dfd, os.path.join(base, *below))
        except BaseException:
            os.close(dfd)
            raise
        return _Copy(dfd, tmp, name, path, fd, msg.copy_flags, msg.file_size, record)

    def _create_part(self, dfd: int, directory: str) -> tuple[int, str, str]:
        """Record, create and flock a partial file in ``dfd`` (``directory``): (fd, name, record).

        The record comes first, so no partial file exists unrecorded; the flock is taken
        under the shared state lock, so a reaper never takes a new file for a stale one."""
        sdir = self.state_dir
        with self._state_lock(fcntl.LOCK_SH):
            for _ in range(8):
                tmp = f".pyvmbus-fcopy-{os.getpid()}-{secrets.token_hex(8)}.part"
                record = str(sdir / tmp)
                try:
                    os.symlink(os.path.join(directory, tmp), record)
                except FileExistsError:
                    continue
                try:
                    if self.fsync:
                        _fsync_dir(sdir)
                    fd = os.open(tmp, _TMP_FLAGS, self.file_mode, dir_fd=dfd)
                except FileExistsError:
                    os.unlink(record)
                    continue
                except BaseException:
                    os.unlink(record)
                    raise
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # cannot be: the file is new and nobody reaps now
                    raise
                except OSError as exc:  # no flock on this file system: the pid in the name serves
                    log.debug("fcopy: no flock on %s/%s: %s", directory, tmp, exc)
                return fd, tmp, record
        raise _Refusal(HV_E_FAIL, "could not create a temporary file")

    def _walk(self, root: str, below: list[str], flags: int) -> int:
        """An fd of root/below..., creating directories with CREATE_PATH; no symlinks below root."""
        dfd = os.open(root, _DIR_FLAGS)
        try:
            for comp in below:
                try:
                    st = os.stat(comp, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    if not flags & CopyFlags.CREATE_PATH:
                        raise _Refusal(HV_E_FAIL, f"no directory {comp!r} (and no CREATE_PATH)") from None
                    # A racing creator is fine: the open below checks what is there.
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(comp, self.dir_mode, dir_fd=dfd)
                else:
                    if stat.S_ISLNK(st.st_mode):
                        raise _Refusal(HV_E_ACCESSDENIED, f"{comp!r} is a symlink below an allowed root")
                    if not stat.S_ISDIR(st.st_mode):
                        raise _Refusal(HV_E_FAIL, f"{comp!r} is not a directory")
                nfd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
        except BaseException:
            os.close(dfd)
            raise
        return dfd

    # --- WRITE_TO_FILE ------------------------------------------------------------------

    def _write(self, c: _Copy, data: Buffer, n: int, offset: int, size: int, done: int = -1) -> int:
        """Write one fragment from the message ``data`` (``n`` bytes): one pwrite from a view
        into it (more only on a short write), and record the range. ``done``: the bytes a
        first pwrite (in :meth:`answer`) already wrote, after the checks here passed."""
        if size > DATA_FRAGMENT or _WRITE_DATA + size > n:
            return self._fail(HV_INVALIDARG, f"fragment size {size} does not fit a {n}-byte message")
        end = offset + size
        if end > c.size:
            return self._fail(HV_INVALIDARG, f"fragment {offset}+{size} beyond file_size {c.size}")
        if not size:
            return HV_S_OK
        # c.size < 2**63 (checked at START), so offset fits pwrite's off_t.
        view = memoryview(data)[_WRITE_DATA : _WRITE_DATA + size]
        try:
            k = os.pwrite(c.fd, view, offset) if done < 0 else done
            while k < size:  # a short write: rare (the next call reports the error, if any)
                more = os.pwrite(c.fd, view[k:], offset + k)
                if not more:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                k += more
        except OSError as exc:
            return self._fail(_os_status(exc), f"writing {size} bytes at {offset}: {exc.strerror}")
        if not c.ranges.add(offset, end):
            return self._fail(HV_INVALIDARG, f"more than {_MAX_RANGES} separate byte ranges are open")
        self.bytes_written += size
        return HV_S_OK

    # --- COMPLETE_FCOPY -----------------------------------------------------------------

    def _complete(self) -> int:
        c = self._copy
        if c is None:
            return HV_E_FAIL
        try:
            if not c.ranges.whole(c.size):
                raise _Refusal(HV_E_FAIL, c.ranges.missing(c.size))
            if self.fsync:
                os.fsync(c.fd)
            # Published with the fd (and its flock) still held: never stale meanwhile.
            self._publish(c)
            if self.fsync:
                os.fsync(c.dir_fd)
        except _Refusal as r:
            return self._fail(r.status, r.reason)
        except OSError as exc:
            return self._fail(_os_status(exc), f"finishing: {exc}")
        self._drop_record(c)
        os.close(c.fd)
        os.close(c.dir_fd)
        self._copy = None
        self.files_completed += 1
        self._event("completed", c.path, HV_S_OK, c.size)
        return HV_S_OK

    def _publish(self, c: _Copy) -> None:
        """Move the temporary file to its name: replace only with OVER_WRITE."""
        d = c.dir_fd
        if c.flags & CopyFlags.OVER_WRITE:
            os.replace(c.tmp, c.name, src_dir_fd=d, dst_dir_fd=d)
            return
        try:
            os.link(c.tmp, c.name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
        except FileExistsError:
            raise _Refusal(HV_ERROR_ALREADY_EXISTS, f"{c.path} appeared during the copy") from None
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            # No hard links here (e.g. vfat): check, then rename (a small window remains).
            try:
                os.stat(c.name, dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                os.replace(c.tmp, c.name, src_dir_fd=d, dst_dir_fd=d)
                return
            raise _Refusal(HV_ERROR_ALREADY_EXISTS, f"{c.path} appeared during the copy") from None
        try:
            os.unlink(c.tmp, dir_fd=d)
        except OSError as exc:  # the file is in place; only the extra link is left
            log.warning("fcopy: could not remove %s next to %s: %s", c.tmp, c.path, exc)

    # --- failure ------------------------------------------------------------------------

    def _fail(self, status: int, reason: str) -> int:
        self._discard("failed", status, reason)
        return status

    def _discard(self, kind: str, status: int, reason: str) -> None:
        """Drop the copy in progress and remove its temporary file."""
        c = self._copy
        if c is None:
            return
        self._copy = None
        try:
            os.unlink(c.tmp, dir_fd=c.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the record stays: a later start removes the file
            log.warning("fcopy: could not remove the partial file %s: %s", c.tmp, exc)
            c.record = ""
        if c.record:
            self._drop_record(c)
        os.close(c.fd)
        os.close(c.dir_fd)
        self._event(kind, c.path, status, c.ranges.covered(), reason)

    @staticmethod
    def _drop_record(c: _Copy) -> None:
        try:
            os.unlink(c.record)
        except FileNotFoundError:
            pass
        except OSError as exc:  # harmless: the next start drops a record whose file is gone
            log.warning("fcopy: could not remove the record %s: %s", c.record, exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
