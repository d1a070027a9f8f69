"""Guest file copy IC (HV_FCOPY_GUID 34d14be3-dee4-41c8-9ae7-6b174977c192; ICMSGTYPE 7).

The host (``Copy-VMFile``) sends START_FILE_COPY (names, flags, size), WRITE_TO_FILE
fragments of up to 6 KiB, then COMPLETE_FCOPY, or CANCEL_FCOPY; one message at a time, each
answered with a status. This is the protocol of tools/hv/hv_fcopy_uio_daemon.c, which this
service replaces; it matches the daemon's statuses (negotiation with framework 3.0 and service
1.1 sets HV_E_FAIL then 0; unknown types and operations HV_E_FAIL; an existing file without
OVER_WRITE HV_ERROR_ALREADY_EXISTS; ENOSPC HV_ERROR_DISK_FULL; a missing directory without
CREATE_PATH HV_E_FAIL) and differs on purpose where the daemon is unsafe:

- The file is written under a temporary name in the destination directory and renamed into
  place on COMPLETE_FCOPY; a cancelled, failed or interrupted copy leaves nothing, and an
  existing file is replaced only when the copy is whole (the daemon truncates it at START).
- Destinations must lie inside the allowed roots given to the service. ``..`` components,
  relative paths, ``/`` or NUL in the file name, invalid UTF-16 and over-long names get
  HV_INVALIDARG; a path outside every root, or through a symlink below a root, gets
  HV_E_ACCESSDENIED (0x80070005, not in the Linux headers: the host prints "Access is
  denied"). Directories are walked with O_NOFOLLOW from the root, so a symlink swapped in
  meanwhile cannot redirect the write.
- Names are decoded as real UTF-16 (the daemon turns every non-ASCII unit into 'X').
- Lengths are checked: START needs the whole 1088-byte body, WRITE needs ``size`` <= 6144
  bytes present, and ``offset + size`` <= ``file_size`` (HV_INVALIDARG otherwise; the copy is
  abandoned). COMPLETE fails with HV_E_FAIL when fewer than ``file_size`` bytes arrived.
- CANCEL_FCOPY removes the partial file and answers HV_S_OK (the uio daemon does not handle
  it and answers HV_E_FAIL; the older hv_fcopy_daemon removed the file and answered 0).
- COMPLETE or WRITE with no copy in progress answer HV_E_FAIL.
- A message shorter than 28 + 36 bytes gets no answer (the daemon exits on it).
- New files get mode 0644 (the daemon: 0744), directories 0755; both before the umask.

File I/O happens inside :meth:`handle` (writing the file is the service); the channel I/O
does not, so the service runs the same in-process against the mock's host model.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from .framework import IcService
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
    CopyFlags,
    DoFcopy,
    FcopyHdr,
    FcopyOp,
    IcMsgType,
    StartFcopy,
    status_name,
)

__all__ = ["FcopyEvent", "FcopyService"]

log = logging.getLogger("pyvmbus.ic.fcopy")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_MAX = 255
_MAX_FILE_SIZE = (1 << 63) - 1
_TMP_SUFFIX = ".fcopy-part"
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


class _Refusal(Exception):
    """A status to answer with, and why (internal)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class _Copy:
    dir_fd: int
    tmp: str
    name: str
    path: str
    fd: int
    flags: int
    size: int
    end: int = 0
    """Highest byte written + 1."""


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

    @property
    def active(self) -> bool:
        """A copy is in progress."""
        return self._copy is not None

    def close(self) -> None:
        """Abandon a copy in progress (its partial file is removed). Idempotent."""
        if self._copy is not None:
            self._discard("failed", HV_E_FAIL, "the channel closed during the copy")

    # --- dispatch -----------------------------------------------------------------------

    def _message(self, buf: bytearray) -> bool:
        n = len(buf)
        if n < ICMSG_HDR + FcopyHdr.SIZE:
            self._drop(f"fcopy message of {n} bytes, needs {ICMSG_HDR + FcopyHdr.SIZE}")
            return False
        op = FcopyHdr.STRUCT.unpack_from(buf, ICMSG_HDR)[0]
        if op == FcopyOp.WRITE_TO_FILE:
            status = self._write(buf)
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
            for _ in range(8):
                tmp = f".{secrets.token_hex(8)}{_TMP_SUFFIX}"
                try:
                    fd = os.open(tmp, _TMP_FLAGS, self.file_mode, dir_fd=dfd)
                    break
                except FileExistsError:
                    continue
            else:
                raise _Refusal(HV_E_FAIL, "could not create a temporary file")
        except BaseException:
            os.close(dfd)
            raise
        return _Copy(dfd, tmp, name, path, fd, msg.copy_flags, msg.file_size)

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

    def _write(self, buf: bytearray) -> int:
        c = self._copy
        if c is None:
            return HV_E_FAIL
        n = len(buf)
        if n < ICMSG_HDR + DoFcopy.FIXED:
            return self._fail(HV_INVALIDARG, f"WRITE_TO_FILE of {n} bytes")
        offset, size = DoFcopy.STRUCT.unpack_from(buf, ICMSG_HDR)[4:]
        start = ICMSG_HDR + DoFcopy.DATA_AT
        if size > DATA_FRAGMENT or start + size > n:
            return self._fail(HV_INVALIDARG, f"fragment size {size} does not fit a {n}-byte message")
        if offset + size > c.size:
            return self._fail(HV_INVALIDARG, f"fragment {offset}+{size} beyond file_size {c.size}")
        # c.size < 2**63 (checked at START), so offset fits pwrite's off_t.
        data = memoryview(buf)[start : start + size]
        at = offset
        try:
            while data:
                k = os.pwrite(c.fd, data, at)
                data, at = data[k:], at + k
        except OSError as exc:
            return self._fail(_os_status(exc), f"writing {size} bytes at {offset}: {exc.strerror}")
        if offset + size > c.end:
            c.end = offset + size
        self.bytes_written += size
        return HV_S_OK

    # --- COMPLETE_FCOPY -----------------------------------------------------------------

    def _complete(self) -> int:
        c = self._copy
        if c is None:
            return HV_E_FAIL
        try:
            if c.end < c.size:
                raise _Refusal(HV_E_FAIL, f"only {c.end} of {c.size} bytes arrived")
            if self.fsync:
                os.fsync(c.fd)
            os.close(c.fd)
            c.fd = -1
            self._publish(c)
            if self.fsync:
                os.fsync(c.dir_fd)
        except _Refusal as r:
            return self._fail(r.status, r.reason)
        except OSError as exc:
            return self._fail(_os_status(exc), f"finishing: {exc}")
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
        if c.fd >= 0:
            os.close(c.fd)
        try:
            os.unlink(c.tmp, dir_fd=c.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("fcopy: could not remove the partial file %s: %s", c.tmp, exc)
        os.close(c.dir_fd)
        self._event(kind, c.path, status, c.end, reason)
