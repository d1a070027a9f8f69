"""One user per device, across processes: pyvmbus's own advisory lock per VMBus device.

The kernel lets any number of processes open ``/dev/uioN``, and uio_hv_generic shares the
one channel between them, so two users would take each other's packets (both number their
requests from 1, so one can even get the other's reply as its own). Neither the kernel nor
the mock stops this; pyvmbus does, with a lock per device that it takes before it touches
the node or the device's binding and holds while it uses them:

- :meth:`UioDevice.open <pyvmbus.uio.UioDevice.open>`, so every Channel, holds it while
  the node is open (role ``open``);
- :func:`~pyvmbus.binding.bind`, :func:`~pyvmbus.binding.unbind` and
  :func:`~pyvmbus.binding.restore` hold it while they run (``bind``, ``unbind``, ``restore``);
- :func:`reserve` (``Vmbus.reserve``) holds it across a sequence of those (``reserve``):
  ``vmbus enable`` and the IC runner bind, enable, run and restore under one reservation,
  so nobody can slip in between their bind and their open.

**Where.** ``root/run/pyvmbus/lock/<guid>.lock``, one file per device instance GUID,
locked with flock(2). Not the node itself: the mock's node is a socket, which cannot be
opened (ENXIO) nor so flocked by its path, and opening the real node already opens the
channel (hv_uio_open) and counts as a user; a bind has no node yet; a rescind removes the
node and a re-offer may give the same ``uioN`` to another device; subchannel ring files
are separate files of the same device. The instance GUID names the device through all
of these, in the mock and on a real guest alike.

**Who may lock.** Whoever may use the devices: the lock directory is mode 1770, root's
and, once udev/90-pyvmbus.rules made it so, group vmbus's (the group that may open the
nodes), so a member takes a lock without root and nobody else can reach a lock file
(anyone who can read one could flock it and so block the device). It is sticky: nobody
removes another's lock file, since a lock file removed while held would let a second
holder in on a new file. No set-group-id bit (systemd's RestrictSUIDSGID refuses it).
Lock files are mode 0666 inside it, so that every member can write the holder line; they
are opened with O_NOFOLLOW and must be plain files with one link. The bind records one
level up stay root's.

**Dead holders.** A flock belongs to the open file, and the kernel drops it when the
holder closes it or dies (kill -9 included): a lock left by a dead process never blocks
anyone; the file stays, unlocked, and the next holder overwrites its content. A forked
child does not keep its parent's locks (its copies of the lock fds are closed at fork);
exec'd programs never get them (O_CLOEXEC).

**Within one process** the same lock taken twice conflicts as between processes, unless
the first hold admits the second: a reservation admits anything of its process (one open
at a time); a bind / unbind / restore admits nested binding calls of the same thread (a
failed bind's roll-back runs restore); an open admits nothing (a second Channel, or a
restore of a device this process has open, is refused).

**Who holds it.** The holder writes one JSON line into the file: pid, command, role and
since. A refused caller reads it and checks the pid against the kernel's list of flock
holders (``/proc/locks``, which names the process that took the lock); when the line is
missing or names another pid (a holder that may not write the file, a stale line), the
pid comes from /proc/locks and the command from ``/proc/<pid>/cmdline``. This is the real
/proc, for a mock root too: the holder is a process of this machine (a mock's root/proc
is a fixture of mounts and routes). When neither tells, :class:`DeviceBusy` says the
holder could not be identified.

**Who waits.** A bind / unbind / restore ends within its timeout, so a caller that finds
one running waits for it (up to the ``wait`` it was given); an open device or a
reservation may be held for hours, so a caller that finds one is refused at once with
:class:`DeviceBusy`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DeviceBusy, NotPermitted, VmbusError

__all__ = [
    "LOCK_DIR_MODE",
    "LOCK_FILE_MODE",
    "ROLES",
    "WAIT_ROLES",
    "DeviceLock",
    "Holder",
    "acquire",
    "holder",
    "lock_dir",
    "lock_path",
    "pid_alive",
    "reserve",
]

ROLES = ("open", "reserve", "bind", "unbind", "restore")
"""What a hold is for (see the module docstring)."""
WAIT_ROLES = frozenset({"bind", "unbind", "restore"})
"""Holds that end by themselves within their timeout: a caller waits for these."""
LOCK_DIR_MODE = 0o1770
"""``root/run/pyvmbus/lock`` as pyvmbus makes it: owner and group only, sticky."""
LOCK_FILE_MODE = 0o666
"""A lock file, reachable only through the directory above."""

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IDENTIFY_TRIES = 5
"""Looks at a holder that cannot be identified yet (it may be between its flock and its
line, or just releasing) before calling it unknown; 10 ms apart."""
_WAIT_MIN, _WAIT_MAX = 0.005, 0.1
_COMMAND_MAX = 200


def lock_dir(root: str | os.PathLike[str]) -> Path:
    """The directory of the device locks under ``root``."""
    return Path(root) / "run" / "pyvmbus" / "lock"


def lock_path(root: str | os.PathLike[str], key: str) -> Path:
    """The lock file of the device ``key`` (its instance GUID) under ``root``."""
    if not _KEY.match(key):
        raise ValueError(f"not a device lock name: {key!r}")
    return lock_dir(root) / f"{key}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a device lock, as far as it can be found out (None: unknown)."""

    pid: int | None
    command: str | None
    role: str | None
    since: float | None
    this_process: bool = False


# -- this process's holds ------------------------------------------------------------------------
class _Entry:
    """The one open lock file of one device in this process, and the holds on it."""

    def __init__(self, fd: int, path: Path, key: str, writable: bool) -> None:
        self.fd = fd
        self.path = path
        self.key = key
        self.writable = writable
        self.since = time.time()
        self.holds: list[DeviceLock] = []

    def role(self) -> str:
        """The role others see: open outranks reserve, which outranks the binding calls."""
        roles = [h.role for h in self.holds]
        for r in ("open", "reserve"):
            if r in roles:
                return r
        return roles[0] if roles else "reserve"

    def admits(self, role: str, thread: int) -> bool:
        roles = [h.role for h in self.holds]
        if "open" in roles:
            return False
        if "reserve" in roles:
            return True
        return all(h.thread == thread for h in self.holds)

    def holder(self) -> Holder:
        return Holder(os.getpid(), _self_command(), self.role(), self.since, this_process=True)

    def write(self) -> None:
        """Say who holds the lock in the file (best effort: the flock is the lock)."""
        if not self.writable:
            return
        line = json.dumps({"pid": os.getpid(), "command": _self_command(), "role": self.role(),
                           "since": round(self.since, 3), "device": self.key}) + "\n"
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, line.encode(), 0)


_mutex = threading.Lock()
_entries: dict[str, _Entry] = {}
_command: str | None = None


def _after_fork_in_child() -> None:
    """A forked child holds none of its parent's locks: close its copies of the lock fds
    (the parent's flocks stay: they go only when the last copy closes or with LOCK_UN)."""
    global _mutex, _command
    _mutex = threading.Lock()
    _command = None
    for entry in _entries.values():
        with contextlib.suppress(OSError):
            os.close(entry.fd)
    _entries.clear()


os.register_at_fork(before=lambda: _mutex.acquire(), after_in_parent=lambda: _mutex.release(),
                    after_in_child=_after_fork_in_child)


class DeviceLock:
    """One hold of a device's lock (from :func:`acquire` / :func:`reserve`).

    :meth:`release` ends it (idempotent); so does leaving a ``with`` block. The flock itself
    goes when the last hold of this process on the device is released.
    """

    def __init__(self, entry: _Entry, role: str) -> None:
        self._entry: _Entry | None = entry
        self.key = entry.key
        self.path = entry.path
        self.role = role
        self.thread = threading.get_ident()

    @property
    def held(self) -> bool:
        """True until :meth:`release` (and in a forked child: never)."""
        entry = self._entry
        return entry is not None and _entries.get(str(entry.path)) is entry

    def release(self) -> None:
        """Give this hold up; the last one unlocks the file (content emptied first)."""
        with _mutex:
            entry, self._entry = self._entry, None
            if entry is None or _entries.get(str(entry.path)) is not entry:
                return  # released already, or a forked child's inherited object
            with contextlib.suppress(ValueError):
                entry.holds.remove(self)
            if entry.holds:
                entry.write()
                return
            del _entries[str(entry.path)]
            try:
                if entry.writable:
                    with contextlib.suppress(OSError):
                        os.ftruncate(entry.fd, 0)
                fcntl.flock(entry.fd, fcntl.LOCK_UN)
            finally:
                os.close(entry.fd)

    def __enter__(self) -> DeviceLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DeviceLock {self.key} {self.role} {'held' if self.held else 'released'}>"


# -- taking a lock -------------------------------------------------------------------------------
def acquire(root: str | os.PathLike[str], key: str, role: str, *, wait: float = 0.0,
            action: str | None = None) -> DeviceLock:
    """Take the lock of device ``key`` (its instance GUID) under ``root`` for ``role``.

    Returns at once when the device is free (or this process's hold admits this one, see
    the module docstring). While a bind / unbind / restore holds it, waits up to ``wait``
    seconds for it to end; an open device or a reservation is refused at once.
    Raises :class:`DeviceBusy` naming the holder (``action`` says what was refused; default
    the role), :class:`NotPermitted` when the lock file or its directory cannot be made or
    opened, :class:`VmbusError` when the lock path is not a plain file.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    path = lock_path(root, key)
    _ensure_dir(path.parent)
    path = Path(os.path.realpath(path.parent)) / path.name
    start = time.monotonic()
    delay = _WAIT_MIN
    unknown = 0
    while True:
        got = _try(path, key, role)
        if isinstance(got, DeviceLock):
            return got
        found = got
        unidentified = found.pid is None or (found.role is None and not found.this_process)
        if unidentified and unknown < _IDENTIFY_TRIES:
            unknown += 1
            time.sleep(0.01)
            continue
        waited = time.monotonic() - start
        if found.role in WAIT_ROLES and waited < wait:
            time.sleep(min(delay, wait - waited))
            delay = min(delay * 2, _WAIT_MAX)
            continue
        raise DeviceBusy(key, action or role, str(path), pid=found.pid, command=found.command,
                         role=found.role, since=found.since, this_process=found.this_process,
                         waited=round(waited, 3) if found.role in WAIT_ROLES and wait > 0 else 0.0)


def reserve(root: str | os.PathLike[str], key: str, *, wait: float = 0.0,
            action: str | None = None) -> DeviceLock:
    """Hold device ``key`` across several steps (bind, open, restore) of this process.

    Other processes are refused (:class:`DeviceBusy`) until :meth:`DeviceLock.release`;
    this process's bind / unbind / restore and one open at a time go through. ``action``
    names, in the error, what this reservation was for ("enable").
    """
    return acquire(root, key, "reserve", wait=wait, action=action or "reserve it")


def _try(path: Path, key: str, role: str) -> DeviceLock | Holder:
    """One attempt: the new hold, or who holds the lock now."""
    thread = threading.get_ident()
    with _mutex:
        entry = _entries.get(str(path))
        if entry is not None:
            if not entry.admits(role, thread):
                return entry.holder()
            hold = DeviceLock(entry, role)
            entry.holds.append(hold)
            entry.write()
            return hold
        fd, writable = _open_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            st = os.fstat(fd)
            os.close(fd)
            return holder(path, st)
        except OSError as exc:
            os.close(fd)
            raise VmbusError(f"cannot lock {path}: {exc.strerror} (pyvmbus locks each device with "
                             "flock in root/run: a local file system is needed there)") from None
        try:
            # Locked the file the path names now? (Someone may have removed it meanwhile.)
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return Holder(None, None, None, None)  # look again: the caller retries shortly
        entry = _Entry(fd, path, key, writable)
        _entries[str(path)] = entry
        hold = DeviceLock(entry, role)
        entry.holds.append(hold)
        entry.write()
        return hold


def _ensure_dir(d: Path) -> None:
    """Make ``root/run/pyvmbus/lock`` (mode 1770) when it is missing."""
    if d.is_dir():
        return
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(d, LOCK_DIR_MODE)
            os.chmod(d, LOCK_DIR_MODE)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass
    except PermissionError:
        where = d.parent if d.parent.exists() else d.parent.parent
        raise NotPermitted(str(where), "create the device lock directory in") from None
    except OSError as exc:
        raise VmbusError(f"cannot create the device lock directory {d}: {exc.strerror}; pyvmbus "
                         "keeps one lock file per device there and needs it writable") from None


def _open_file(path: Path) -> tuple[int, bool]:
    """Open (or create) the lock file: (fd, writable). Read-only still locks: flock needs
    no write access, only the holder's line cannot be written then."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        for _ in range(8):
            try:
                fd, writable = os.open(path, os.O_RDWR | flags), True
                break
            except FileNotFoundError:
                try:
                    fd, writable = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o600), True
                except FileExistsError:
                    continue  # created by someone else just now: open theirs
                with contextlib.suppress(OSError):
                    os.fchmod(fd, LOCK_FILE_MODE)  # past the umask
                break
            except PermissionError:
                fd, writable = os.open(path, os.O_RDONLY | flags), False
                break
        else:
            raise VmbusError(f"{path} keeps appearing and vanishing: is something deleting lock files?")
    except PermissionError:
        raise NotPermitted(str(path), "open the device lock") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VmbusError(f"{path} is a symbolic link, not a lock file: remove it") from None
        raise VmbusError(f"cannot open the device lock {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = f"{st.st_nlink} links" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise VmbusError(f"{path} is not a plain lock file ({what}): remove it")
    return fd, writable


# -- who holds it ----------------------------------------------------------------------------------
def holder(path: str | os.PathLike[str], st: os.stat_result | None = None) -> Holder:
    """Who holds the lock file ``path`` (``st``: its stat, if known), checked against /proc/locks.

    Holder(None, ...) when nobody can be named (including: nobody holds it).
    """
    p = Path(path)
    if st is None:
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            return Holder(None, None, None, None)
    line = _read_line(p)
    pid = line.get("pid")
    pid = pid if isinstance(pid, int) and pid > 0 else None
    holders = _flock_holders(st)
    if holders is None:  # no /proc/locks: trust a line whose process lives
        if pid is not None and pid_alive(pid):
            return _from_line(pid, line)
        return Holder(None, None, None, None)
    if pid is not None and pid in holders:
        return _from_line(pid, line)
    for other in holders:
        if other > 0:
            return Holder(other, _cmdline(other), None, None, this_process=other == os.getpid())
    return Holder(None, None, None, None)


def _from_line(pid: int, line: dict[str, Any]) -> Holder:
    command = line.get("command")
    role = line.get("role")
    since = line.get("since")
    return Holder(pid, command if isinstance(command, str) and command else _cmdline(pid),
                  role if role in ROLES else None,
                  float(since) if isinstance(since, (int, float)) and since > 0 else None,
                  this_process=pid == os.getpid())


def _read_line(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        data = os.read(fd, 4096)
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        value = json.loads(data.decode("utf-8", "replace").splitlines()[0])
    except (ValueError, IndexError):
        return {}
    return value if isinstance(value, dict) else {}


def _flock_holders(st: os.stat_result) -> list[int] | None:
    """Pids /proc/locks names as flock holders of the file ``st`` (None: no /proc/locks).

    Lines read ``1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146450 0 EOF`` (major:minor in hex,
    inode in decimal); ``1: -> FLOCK ...`` lines are waiters. Matched on device and inode;
    on inode alone when nothing matches both (stacked file systems may report another
    device number in stat than the lock's inode has).
    """
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    exact: list[int] = []
    loose: list[int] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK":
            continue
        try:
            pid = int(f[4])
            major, minor, ino = f[5].split(":")
            if int(ino) != st.st_ino:
                continue
            if int(major, 16) == os.major(st.st_dev) and int(minor, 16) == os.minor(st.st_dev):
                exact.append(pid)
            else:
                loose.append(pid)
        except ValueError:
            continue
    return exact or loose


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (another user's counts: EPERM)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    text = " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)
    return _shorten(text) or None


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _COMMAND_MAX else text[:_COMMAND_MAX - 3] + "..."


def _self_command() -> str:
    global _command
    if _command is None:
        _command = _cmdline(os.getpid()) or _shorten(" ".join([sys.executable, *sys.argv]))
    return _command
