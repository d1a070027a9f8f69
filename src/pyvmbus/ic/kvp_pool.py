"""The KVP pool files, in exactly the format and with the locking of tools/hv/hv_kvp_daemon.c.

Five pools live in ``/var/lib/hyperv/.kvp_pool_0`` .. ``_4`` (one per
:class:`~pyvmbus.ic.messages.KvpPoolId`). A pool file is a plain array of records with no
header, each ``struct kvp_record { char key[512]; char value[2048]; }`` (2560 bytes): the key
and value are UTF-8 C strings, NUL-terminated inside their fields. A trailing partial record
is ignored (the daemon's ``fread`` of whole records does the same). Other programs read and
write these files directly: cloud-init and the Azure agent append reports to pool 1 (taking
``flock``), the C daemon rewrites a pool under an ``fcntl`` write lock of the whole file,
and tools read them to see what the host pushed into pool 0.

How pyvmbus keeps them consistent with every one of those writers:

- **Both locks, always in the same order**: ``flock(LOCK_EX)`` (what cloud-init takes; it
  also orders the threads and pool objects of one process, which ``fcntl`` locks cannot),
  then an ``fcntl`` ``F_SETLKW`` write lock of the whole file (what hv_kvp_daemon takes).
- **Read-modify-write under one lock**: a set or delete reads the file, changes the records
  and writes it back without letting go in between (the C daemon unlocks between its read
  and its write, so a concurrent writer's record can be lost there).
- **In place**: only the records that changed are written (``pwrite`` at their offsets),
  then the file is cut after the last record; it is never replaced by a rename, so other
  processes keep their descriptors and their locks on that inode. A pool file that someone
  else renamed over or removed is reopened by name (the daemon reads by name too).
- **Re-read on change**: a read under the lock re-uses the records it read last only when
  the file's identity, size, mtime and ctime are unchanged and the ctime lay more than a
  second before that last read (file timestamps advance in coarse ticks, so a change within
  the same tick could otherwise go unseen); otherwise it reads the file again.

Keys match as whole C strings (the daemon's ``memcmp`` over the key and its NUL); the first
record with the key wins, as in the daemon; ``set`` replaces the value of that record, or
appends one. Records are written zero-filled after their NUL (the daemon leaves stale bytes
of a longer old value behind the new NUL; readers must stop at the NUL anyway).

:func:`check_no_daemon` refuses pools that a running hv_kvp_daemon holds open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .messages import HV_KVP_EXCHANGE_MAX_KEY_SIZE, HV_KVP_EXCHANGE_MAX_VALUE_SIZE, KvpPoolId

__all__ = [
    "DAEMON_NAMES",
    "DEFAULT_POOL_DIR",
    "KvpDaemonRunning",
    "KvpPoolError",
    "KvpPoolFile",
    "KvpPoolUnavailable",
    "KvpPools",
    "KvpRecord",
    "POOL_COUNT",
    "RECORD_SIZE",
    "check_key",
    "check_no_daemon",
    "check_value",
    "decode_records",
    "encode_record",
    "parse_pool",
    "pool_path",
]

DEFAULT_POOL_DIR = "/var/lib/hyperv"
"""KVP_CONFIG_LOC of hv_kvp_daemon.c."""
POOL_COUNT = len(KvpPoolId)
KEY_FIELD = HV_KVP_EXCHANGE_MAX_KEY_SIZE
VALUE_FIELD = HV_KVP_EXCHANGE_MAX_VALUE_SIZE
RECORD_SIZE = KEY_FIELD + VALUE_FIELD
"""sizeof(struct kvp_record): 2560."""
DAEMON_NAMES = ("hv_kvp_daemon", "hypervkvpd")
"""Process names the C daemon runs under (upstream, and Red Hat's hyperv-daemons)."""
_TRUST_AFTER = 1.0
"""Seconds a file's ctime must lie before a read for that read's records to be re-used."""


class KvpPoolError(UsageError, ValueError):
    """A key or value that does not fit a pool record, or a pool number out of range."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class KvpPoolUnavailable(UsageError, OSError):
    """A pool file or its directory cannot be created, opened or written (``errno`` says why)."""

    def __init__(self, path: str | os.PathLike[str], exc: OSError | None = None, *,
                 reason: str | None = None, denied: bool = False) -> None:
        self.path = str(path)
        why = reason or (exc.strerror if exc is not None and exc.strerror else str(exc))
        denied = denied or (exc is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS))
        hint = " (the pools are root's: run as root, or give --pool-dir)" if denied else ""
        self.message = f"cannot use the KVP pool {self.path}: {why}{hint}"
        super().__init__(self.message)
        self.errno = exc.errno if exc is not None else errno.EACCES
        self.strerror = why

    def __str__(self) -> str:  # OSError's would print "[Errno N] strerror" once errno is set
        return self.message


class KvpDaemonRunning(UsageError):
    """A running hv_kvp_daemon owns the pool files: two writers of one pool would lose records."""

    def __init__(self, pid: int, name: str, pool_dir: str) -> None:
        super().__init__(
            f"{name} (pid {pid}) is running and owns the KVP pools in {pool_dir}: stop it first "
            f"('systemctl stop hv-kvp-daemon' / 'hypervkvpd'), or give pyvmbus other pools with --pool-dir"
        )
        self.pid = pid
        self.name = name
        self.pool_dir = pool_dir


@dataclass(frozen=True, slots=True)
class KvpRecord:
    """One ``struct kvp_record``: key and value as the bytes before their NUL."""

    key: bytes
    value: bytes

    @property
    def key_text(self) -> str:
        """The key as text (undecodable bytes become U+FFFD)."""
        return self.key.decode("utf-8", errors="replace")

    @property
    def value_text(self) -> str:
        return self.value.decode("utf-8", errors="replace")


def pool_path(pool_dir: str | os.PathLike[str], pool: int) -> Path:
    """``<pool_dir>/.kvp_pool_<pool>``."""
    return Path(pool_dir) / f".kvp_pool_{int(pool)}"


def _as_bytes(text: str | bytes, field: int, what: str) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if b"\0" in raw:
        raise KvpPoolError(f"{what} contains a NUL byte")
    if len(raw) > field - 1:
        raise KvpPoolError(f"{what} is {len(raw)} bytes as UTF-8; a pool record holds at most {field - 1}")
    return raw


def check_key(key: str | bytes) -> bytes:
    """The key as record bytes; :class:`KvpPoolError` if empty, too long or with a NUL."""
    raw = _as_bytes(key, KEY_FIELD, "key")
    if not raw:
        raise KvpPoolError("key is empty")
    return raw


def check_value(value: str | bytes) -> bytes:
    """The value as record bytes; :class:`KvpPoolError` if too long or with a NUL."""
    return _as_bytes(value, VALUE_FIELD, "value")


def encode_record(key: str | bytes, value: str | bytes) -> bytes:
    """One 2560-byte record: key and value NUL-terminated and zero-filled in their fields."""
    return check_key(key).ljust(KEY_FIELD, b"\0") + check_value(value).ljust(VALUE_FIELD, b"\0")


def _pack(r: KvpRecord) -> bytes:
    """A record as stored (a key that fills its field, as another writer may leave it, stays
    as it is; the fields are zero-filled after the NUL)."""
    return r.key[:KEY_FIELD].ljust(KEY_FIELD, b"\0") + r.value[:VALUE_FIELD].ljust(VALUE_FIELD, b"\0")


def _cstr(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def decode_records(data: bytes) -> list[KvpRecord]:
    """The whole records in a pool file's bytes (a trailing partial record is ignored)."""
    out = []
    for at in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
        key, value = data[at : at + KEY_FIELD], data[at + KEY_FIELD : at + RECORD_SIZE]
        out.append(KvpRecord(_cstr(key), _cstr(value)))
    return out


def parse_pool(path: str | os.PathLike[str]) -> list[KvpRecord]:
    """Read a pool file once, under its locks (empty if it does not exist)."""
    try:
        f = KvpPoolFile(path, create=False)
    except FileNotFoundError:
        return []
    with f:
        return f.records()


class KvpPoolFile:
    """One pool file (``.kvp_pool_N``), opened once and kept open like the C daemon does.

    Thread-safe. ``create``: create the file (mode 0644) if missing, as the daemon does.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, mode: int = 0o644) -> None:
        self.path = Path(path)
        self._create = create
        self._mode = mode
        self.writable = True
        self._fd = self._open()
        self.reopens = 0
        """How many times the file was found replaced (renamed over, or removed) and reopened."""
        self._mutex = threading.Lock()
        self._cache: list[KvpRecord] | None = None
        self._sig: tuple[int, ...] | None = None
        self._trusted = False
        self.reads = 0
        """How many times the file was read (not served from the cache)."""

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> KvpPoolFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    # -- locking -------------------------------------------------------------------------

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if self._create else 0)
        try:
            fd = os.open(self.path, flags, self._mode)
            self.writable = True
        except PermissionError:
            if self._create:
                raise
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # another user's pool: read it
            self.writable = False
        return fd

    def _replaced(self, fd: int) -> bool:
        """Whether the path no longer names the file ``fd`` holds (a tool renamed a new file
        over it, or removed it): the C daemon reads by name, so the file at the path counts."""
        try:
            st_path = os.stat(self.path)
        except FileNotFoundError:
            return self._create or os.fstat(fd).st_nlink == 0
        st_fd = os.fstat(fd)
        return (st_path.st_dev, st_path.st_ino) != (st_fd.st_dev, st_fd.st_ino)

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """OSErrors of a pool operation as :class:`KvpPoolUnavailable` (errno kept)."""
        try:
            yield
        except (KvpPoolUnavailable, FileNotFoundError):
            raise  # a pool removed meanwhile, opened read-only: it reads as empty
        except OSError as exc:
            raise KvpPoolUnavailable(self.path, exc) from exc

    @contextlib.contextmanager
    def locked(self, *, write: bool = True) -> Iterator[int]:
        """Hold the pool: this object's mutex, ``flock`` and the ``fcntl`` lock (a write lock,
        or a read lock for ``write=False``). Yields the descriptor of the file the path
        names now (reopened if it was replaced)."""
        with self._mutex:
            if self._fd < 0:
                raise ValueError(f"{self.path} is closed")
            if write and not self.writable:
                raise KvpPoolUnavailable(self.path, reason="it is not writable for this user", denied=True)
            while True:
                fd = self._fd
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
                except BaseException:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    raise
                if not self._replaced(fd):
                    break
                fcntl.lockf(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_UN)
                new = self._open()
                os.close(fd)
                self._fd = new
                self._cache = None
                self.reopens += 1
            try:
                yield fd
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_UN)

    # -- under the lock ------------------------------------------------------------------

    def _read_locked(self, fd: int) -> list[KvpRecord]:
        st = os.fstat(fd)
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._cache is not None and self._trusted and sig == self._sig:
            return self._cache
        now = time.time_ns()
        chunks = []
        at = 0
        while True:
            chunk = os.pread(fd, 1 << 20, at)
            if not chunk:
                break
            chunks.append(chunk)
            at += len(chunk)
        self.reads += 1
        records = decode_records(b"".join(chunks))
        self._cache, self._sig = records, sig
        self._trusted = now - st.st_ctime_ns > _TRUST_AFTER * 1e9
        return records

    def _write_locked(self, fd: int, records: Sequence[KvpRecord], start: int = 0,
                      stop: int | None = None) -> None:
        """Write ``records[start:stop]`` at their places and cut the file after the last
        record: in place, so the records before ``start`` are not even rewritten."""
        end = len(records) if stop is None else stop
        data = b"".join(_pack(r) for r in records[start:end])
        view = memoryview(data)
        base = start * RECORD_SIZE
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], base + done)
        size = len(records) * RECORD_SIZE
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        self._cache = None
        self._sig = None

    # -- the operations ------------------------------------------------------------------

    def records(self) -> list[KvpRecord]:
        """Every record, in file order (re-read only if the file changed)."""
        with self._io(), self.locked(write=False) as fd:
            return list(self._read_locked(fd))

    def get(self, key: str | bytes) -> bytes | None:
        """The value of the first record with ``key``, or None."""
        raw = check_key(key)
        for r in self.records():
            if r.key == raw:
                return r.value
        return None

    def set(self, key: str | bytes, value: str | bytes) -> bool:
        """Set ``key`` (replace the first record's value, else append); True if it was new."""
        rkey, rvalue = check_key(key), check_value(value)
        with self._io(), self.locked() as fd:
            records = list(self._read_locked(fd))
            for i, r in enumerate(records):
                if r.key == rkey:
                    records[i] = KvpRecord(rkey, rvalue)
                    self._write_locked(fd, records, i, i + 1)
                    return False
            records.append(KvpRecord(rkey, rvalue))  # only the new record is written
            self._write_locked(fd, records, len(records) - 1)
            return True

    def delete(self, key: str | bytes) -> bool:
        """Remove the first record with ``key``; False if there was none."""
        rkey = check_key(key)
        with self._io(), self.locked() as fd:
            records = list(self._read_locked(fd))
            for i, r in enumerate(records):
                if r.key == rkey:
                    del records[i]
                    self._write_locked(fd, records, i)
                    return True
            return False

    def merge(self, items: Sequence[tuple[str | bytes, str | bytes]]) -> bool:
        """Set every (key, value) of ``items`` in one locked pass (written only if something
        changed; other records stay). True if the file was rewritten."""
        wanted = [KvpRecord(check_key(k), check_value(v)) for k, v in items]
        with self._io(), self.locked() as fd:
            records = list(self._read_locked(fd))
            first: int | None = None
            for rec in wanted:
                at = next((i for i, r in enumerate(records) if r.key == rec.key), None)
                if at is None:
                    records.append(rec)
                    at = len(records) - 1
                elif records[at] == rec:
                    continue
                records[at] = rec
                first = at if first is None else min(first, at)
            if first is not None:
                self._write_locked(fd, records, first)
            return first is not None

    def replace_all(self, items: Sequence[tuple[str | bytes, str | bytes]]) -> None:
        """Make the pool hold exactly ``items``, in order (the auto pool's snapshot)."""
        records = [KvpRecord(check_key(k), check_value(v)) for k, v in items]
        with self._io(), self.locked() as fd:
            if list(self._read_locked(fd)) != records:
                self._write_locked(fd, records)

    def clear(self) -> None:
        """Remove every record."""
        self.replace_all([])


class KvpPools:
    """The five pool files in ``pool_dir`` (created, mode 0755 / 0644, like the daemon).

    ``check_daemon``: refuse with :class:`KvpDaemonRunning` if a running hv_kvp_daemon holds
    them (see :func:`check_no_daemon`). ``create``: False to open existing files only (a
    missing pool reads as empty).
    """

    def __init__(self, pool_dir: str | os.PathLike[str] = DEFAULT_POOL_DIR, *, create: bool = True,
                 check_daemon: bool = True, proc: str | os.PathLike[str] = "/proc") -> None:
        self.pool_dir = Path(pool_dir)
        if check_daemon:
            check_no_daemon(self.pool_dir, proc=proc)
        self._files: dict[int, KvpPoolFile] = {}
        if create:
            try:
                self.pool_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise KvpPoolUnavailable(self.pool_dir, exc) from exc
        self._create = create
        try:
            for n in range(POOL_COUNT):
                self._open(n)
        except BaseException:
            self.close()
            raise

    def _open(self, n: int) -> KvpPoolFile | None:
        f = self._files.get(n)
        if f is None:
            path = pool_path(self.pool_dir, n)
            try:
                f = KvpPoolFile(path, create=self._create)
            except FileNotFoundError:
                if self._create:
                    raise KvpPoolUnavailable(path, reason="its directory does not exist") from None
                return None
            except OSError as exc:
                raise KvpPoolUnavailable(path, exc) from exc
            self._files[n] = f
        return f

    def pool(self, n: int) -> KvpPoolFile:
        """The file of pool ``n`` (:class:`KvpPoolError` if not 0..4, FileNotFoundError if absent)."""
        if not 0 <= int(n) < POOL_COUNT:
            raise KvpPoolError(f"pool {n} does not exist; pools are 0..{POOL_COUNT - 1}")
        f = self._open(int(n))
        if f is None:
            raise FileNotFoundError(errno.ENOENT, "no such pool file", str(pool_path(self.pool_dir, n)))
        return f

    def records(self, n: int) -> list[KvpRecord]:
        try:
            return self.pool(n).records()
        except FileNotFoundError:
            return []

    def get(self, n: int, key: str | bytes) -> bytes | None:
        try:
            return self.pool(n).get(key)
        except FileNotFoundError:
            return None

    def set(self, n: int, key: str | bytes, value: str | bytes) -> bool:
        return self.pool(n).set(key, value)

    def delete(self, n: int, key: str | bytes) -> bool:
        try:
            return self.pool(n).delete(key)
        except FileNotFoundError:
            return False

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> KvpPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_no_daemon(pool_dir: str | os.PathLike[str] = DEFAULT_POOL_DIR, *,
                    proc: str | os.PathLike[str] = "/proc") -> None:
    """Raise :class:`KvpDaemonRunning` if a running hv_kvp_daemon owns the pools in ``pool_dir``.

    A process named hv_kvp_daemon / hypervkvpd owns them when it holds one of the pool files
    open (the daemon opens all five at start and keeps them). When its descriptors cannot be
    read (another user's process and no root), it is taken to own the default directory.
    """
    wanted = {os.path.realpath(pool_path(pool_dir, n)) for n in range(POOL_COUNT)}
    default = os.path.realpath(pool_dir) == os.path.realpath(DEFAULT_POOL_DIR)
    me = os.getpid()
    try:
        entries = os.listdir(proc)
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(os.path.join(proc, entry, "comm"), encoding="utf-8", errors="replace") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name not in DAEMON_NAMES:
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            if default:
                raise KvpDaemonRunning(int(entry), name, str(pool_dir)) from None
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target in wanted:
                raise KvpDaemonRunning(int(entry), name, str(pool_dir))
