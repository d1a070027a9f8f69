"""Bind a VMBus device to uio_hv_generic and give it back, with guard rails.

Everything goes through sysfs file writes under ``root``, so the same code binds a real
device and a mock one (the mock kernel reacts to the same writes, asynchronously, which
is why every change is followed by a wait with a timeout).

Method (SPEC section 2): where the bus has ``driver_override`` (kernels >= 4.18) write
``uio_hv_generic`` there, unbind the current driver and write the GUID to
``drivers_probe``: only this device is affected. Without it, fall back to the documented
``new_id`` (the class GUID; the kernel then also attaches every *unbound* device of that
class, so that path refuses, unless forced, while another device of the class is unbound)
+ ``unbind`` + ``bind``. Before anything changes, the previous driver is written
to ``root/run/pyvmbus/<guid>.json`` so :func:`restore` can put it back.

Binding a device that is already bound to uio_hv_generic raises :class:`AlreadyBound`
(it does not quietly return the node: the caller may hold stale assumptions about who
bound it and with which override; :attr:`VmbusDevice.uio_name` gives the node).

Guard rails (:mod:`pyvmbus.guardrails`), refused unless ``force=True``
(:class:`GuardRailRefused` says why): a storage device with a mounted filesystem or swap
behind it, a network device that holds the default route or carries the SSH session.

Permissions are checked before the first write: on the real root the process must be
root, and every file to be written must pass ``os.access(path, W_OK)``
(:class:`NotPermitted` names the file).

One at a time: bind, unbind and restore each hold the device's lock
(:mod:`pyvmbus.devlock`, ``root/run/pyvmbus/lock/<guid>.lock``) from before they read the
device's state until they return, the lock every :class:`~pyvmbus.channel.Channel` holds
while the device is open. So two binds of one device cannot both act: the second waits for
the first (up to its ``timeout``) and then finds the device bound (:class:`AlreadyBound`).
A device that another user holds open (a Channel, ``vmbus enable``) or has reserved is
not taken from under it: :class:`DeviceBusy`, at once, naming that process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import devlock
from .errors import (
    AlreadyBound,
    BindFailed,
    DeviceNotFound,
    DeviceRescinded,
    DriverNotLoaded,
    GuardRailRefused,
    InvalidGuid,
    NotPermitted,
    Timeout,
)
from .guardrails import guard_rails
from .guid import Guid
from .sysfs import UIO_DRIVER, Sysfs, VmbusDevice, is_real_root

__all__ = [
    "BindRecord",
    "bind",
    "guard_rails",
    "read_record",
    "record_path",
    "restore",
    "unbind",
    "wait_for_uio",
]

_ENOTSUPP = 524
_POLL_MIN, _POLL_MAX = 0.002, 0.05


# -- the record of what a device had before --------------------------------------------------
@dataclass(frozen=True)
class BindRecord:
    """What :func:`bind` changed, kept in ``root/run/pyvmbus/<guid>.json`` for :func:`restore`."""

    guid: str
    previous_driver: str | None
    method: str
    """``driver_override`` or ``new_id``."""
    new_id: str | None
    """The class GUID written to uio_hv_generic's new_id (removed again on restore)."""
    created: float


def record_path(root: str | os.PathLike[str], guid: str) -> Path:
    """Where :func:`bind` remembers the previous driver: it must survive this process."""
    return Path(root) / "run" / "pyvmbus" / f"{guid}.json"


def read_record(root: str | os.PathLike[str], guid: str) -> BindRecord | None:
    """The saved record of a device, or None (never bound by pyvmbus, or restored)."""
    try:
        data = json.loads(record_path(root, guid).read_text())
        return BindRecord(**{k: data.get(k) for k in BindRecord.__dataclass_fields__})
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _save_record(root: Path, rec: BindRecord) -> None:
    path = record_path(root, rec.guid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(rec), indent=1) + "\n")
    os.replace(tmp, path)


# -- writes and permissions ----------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_root(root: Path, guid: Guid, action: str) -> None:
    """Driver binding on a real system needs root: say so before taking the device's lock."""
    if is_real_root(root) and os.geteuid() != 0:
        raise NotPermitted(str(root / "sys" / "bus" / "vmbus"), f"{action} {guid} (driver binding needs "
                           "root): write")


def _check_access(root: Path, guid: Guid, action: str, paths: list[Path]) -> None:
    """Refuse before the first write: root on a real system, W_OK on every file."""
    if is_real_root(root) and os.geteuid() != 0:
        raise NotPermitted(str(paths[0]), f"{action} {guid} (driver binding needs root): write")
    for p in [*paths, _nearest_existing(record_path(root, guid).parent)]:
        if not os.access(p, os.W_OK):
            raise NotPermitted(str(p), f"{action} {guid}: write")


def _require(path: Path, driver: str, device: Path | None = None) -> None:
    """A sysfs file we are about to write must exist; say why when it does not.

    A missing file under the device's own folder means the device went away (rescinded
    between lookup and write), not a missing driver: "modprobe" would be the wrong advice.
    """
    if path.exists():
        return
    if device is not None and not device.exists():
        raise DeviceRescinded(device.name, f"{device} vanished while binding")
    raise DriverNotLoaded(driver, str(path))


def _write(path: Path, text: str, guid: Guid, action: str) -> int:
    """Write ``text`` in one write(); return 0 or the errno the kernel's store() returned."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except PermissionError:
        raise NotPermitted(str(path), f"{action} {guid}: write") from None
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        os.write(fd, text.encode())
    except PermissionError:
        raise NotPermitted(str(path), f"{action} {guid}: write") from None
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(fd)
    return 0


def _strerror(code: int) -> str:
    if code == _ENOTSUPP:
        return "error 524 (ENOTSUPP): uio_hv_generic on kernels <= 6.9 only takes channels with a monitor id"
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"


# -- how a failed probe shows ---------------------------------------------------------------------
# A real kernel runs every store() synchronously, but a probe that fails does not always fail the
# write: bind_store returns the probe's error (device_driver_attach), while drivers_probe_store
# returns success when device_attach merely bound nothing (__device_attach_driver turns a probe
# error into "no match, try the next driver"). So after the write returns the device is either
# bound or the probe failed. The mock's files cannot fail a write; its driver core records the
# errno in its dmesg instead (root/run/mock/kernel.log, lines written by mock/driver_core.py).
_MOCK_PROBE_FAILED = re.compile(r"(\S+) (\S+): probe with driver \S+ failed with error -(\d+)")
_MOCK_WRITE_FAILED = re.compile(r"write '(.*)' to (\S+): -([A-Z0-9]+) ")
_MOCK_WRITE = re.compile(r"write '(.*)' to (\S+): ")


def _mock_log(root: Path) -> Path:
    return root / "run" / "mock" / "kernel.log"


def _log_mark(root: Path) -> int:
    """Where the mock's kernel log ends now (0 without one): only later lines are about us."""
    try:
        return _mock_log(root).stat().st_size
    except OSError:
        return 0


def _errno_named(name: str) -> int:
    return _ENOTSUPP if name == "ENOTSUPP" else int(getattr(errno, name, errno.EIO))


def _mock_failure(root: Path, mark: int, guid: Guid, final: Path) -> int | None:
    """The errno of a failed uio_hv_generic probe of ``guid``, or of the ``final`` write, logged
    by the mock kernel after ``mark``; None if it logged neither."""
    try:
        with open(_mock_log(root), "rb") as f:
            f.seek(mark)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    what = f"{final.parent.name}/{final.name}" if final.name == "bind" else final.name
    for line in text.splitlines():
        if guid not in line:
            continue
        probe = _MOCK_PROBE_FAILED.search(line)
        if probe is not None and probe[1] == UIO_DRIVER and probe[2] == guid:
            return int(probe[3])
        write = _MOCK_WRITE_FAILED.search(line)
        if write is not None and write[1].strip() == guid and write[2] == what:
            return _errno_named(write[3])
    return None


def _mock_store_ran(root: Path, mark: int, guid: Guid, what: str) -> bool:
    """Whether the store() of our write of ``guid`` to ``what`` has run (ok or not).

    On a kernel it ran inside write(). The mock's driver core handles writes later and
    logs each store's result once it has run (after ``mark``: see :func:`_mock_failure`).
    """
    if is_real_root(root):
        return True
    try:
        with open(_mock_log(root), "rb") as f:
            f.seek(mark)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return True  # no mock kernel log: nothing to wait for
    return any((m := _MOCK_WRITE.search(line)) is not None and m[1].strip() == guid and m[2] == what
               for line in text.splitlines())


def _probe_failed(dev: VmbusDevice, code: int | None, after: str) -> BindFailed:
    """BindFailed naming the errno (when known) and the likely reason."""
    if code is not None:
        detail = f"the probe failed with {_strerror(code)}"
    else:
        detail = f"the probe failed: the device is still unbound after the write to {after} returned"
    if code == _ENOTSUPP:
        detail += " (dmesg: 'vmbus channel requires hypercall'); use a kernel >= 6.10 for this device"
    elif not dev.monitored:
        detail += ("; this channel has no monitor id, and uio_hv_generic before 6.10 refuses such "
                   "channels (dmesg: 'vmbus channel requires hypercall'): use a kernel >= 6.10")
    else:
        detail += "; see dmesg"
    return BindFailed(dev.guid, UIO_DRIVER, detail)


def _wait(cond: Callable[[], bool], timeout: float,
          pause: Callable[[float], object] | None = None) -> bool:
    """Check ``cond`` until it holds or ``timeout`` passes.

    Between checks ``pause(seconds_left)`` blocks (a udev monitor's poll); by default a
    sleep growing from 2 to 50 ms, quick for the mock and cheap for a slow kernel.
    """
    deadline = time.monotonic() + timeout
    delay = _POLL_MIN
    while True:
        if cond():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if pause is not None:
            pause(left)
            continue
        time.sleep(min(delay, left))
        delay = min(delay * 2, _POLL_MAX)


# -- bind / unbind / restore ----------------------------------------------------------------------
def bind(root: str | os.PathLike[str], guid: str, *, force: bool = False, timeout: float = 10.0) -> str:
    """Bind a device to uio_hv_generic and return its uio node name (``uio0``).

    ``guid``: an instance GUID (any spelling), unique prefix or class name (see
    :meth:`Sysfs.device`). Raises :class:`DriverNotLoaded`, :class:`AlreadyBound`,
    :class:`GuardRailRefused` (unless ``force``), :class:`NotPermitted` before any
    write; :class:`BindFailed` when the kernel refuses and :class:`Timeout` when the
    node does not appear, in both cases after putting the previous driver back;
    :class:`DeviceBusy` when another process holds the device open or has reserved it
    (a bind / unbind / restore in another process is waited for, up to ``timeout``).
    """
    rootp = Path(root)
    g = Sysfs(rootp).device(guid).guid
    _check_root(rootp, g, "bind")
    with devlock.acquire(rootp, g, "bind", wait=timeout):
        return _bind(rootp, g, force, timeout)


def _bind(rootp: Path, g: Guid, force: bool, timeout: float) -> str:
    """:func:`bind` under the device's lock."""
    fs = Sysfs(rootp)
    dev = fs.device(g)
    uio_dir = fs.drivers_dir / UIO_DRIVER
    if not fs.driver_loaded(UIO_DRIVER):
        raise DriverNotLoaded(UIO_DRIVER, str(uio_dir))
    current = dev.driver
    if current == UIO_DRIVER:
        raise AlreadyBound(g, UIO_DRIVER)
    method = "driver_override" if dev.has_driver_override else "new_id"
    class_guid = dev.class_guid
    if not force:
        reasons = guard_rails(rootp, g)
        if method == "new_id":
            reasons += _new_id_bystanders(fs, g, class_guid)
        if reasons:
            raise GuardRailRefused(g, "; ".join(reasons))
    bus = rootp / "sys" / "bus" / "vmbus"
    unbind_path = fs.drivers_dir / current / "unbind" if current else None
    if method == "driver_override":
        writes = [(dev.path / "driver_override", UIO_DRIVER + "\n")]
        final = (bus / "drivers_probe", str(g))
    else:
        writes = [(uio_dir / "new_id", str(class_guid))]
        final = (uio_dir / "bind", str(g))
    if unbind_path is not None:
        _require(unbind_path, current or "")
        writes.append((unbind_path, str(g)))
    writes.append(final)
    for path, _ in writes:
        _require(path, UIO_DRIVER if path.parent == uio_dir else "hv_vmbus", dev.path)
    _check_access(rootp, g, "bind", [p for p, _ in writes])

    old = read_record(rootp, g)
    previous = old.previous_driver if old is not None and current is None else current
    _save_record(rootp, BindRecord(str(g), previous, method,
                                   str(class_guid) if method == "new_id" else None, time.time()))
    mark = _log_mark(rootp)
    final_path = final[0]
    try:
        for path, text in writes:
            err = _write(path, text, g, "bind")
            if err == 0:
                continue
            if path == unbind_path and err == errno.ENODEV:
                continue  # no longer bound to that driver: nothing to release
            if path.name == "new_id" and err == errno.EEXIST:
                continue  # the class is a dynamic id already
            if path.name == "bind" and err in (errno.EBUSY, errno.ENODEV) and dev.driver == UIO_DRIVER:
                continue  # new_id's driver_attach bound it already
            if not dev.exists():
                raise DeviceRescinded(g, f"it vanished while being bound ({path.name}: {_strerror(err)})")
            raise BindFailed(g, UIO_DRIVER, f"writing {text.strip()!r} to {path} gave {_strerror(err)}; "
                             "see dmesg")
        if is_real_root(rootp) and dev.driver is None:
            # The kernel probed synchronously inside the write (see _MOCK_PROBE_FAILED): an
            # unbound device now means the probe failed; waiting would only use up the timeout.
            raise _probe_failed(dev, None, str(final_path))

        def failed() -> BindFailed | None:
            if dev.driver == UIO_DRIVER:
                return None  # bound: the node is on its way
            code = _mock_failure(rootp, mark, g, final_path)
            return None if code is None else _probe_failed(dev, code, str(final_path))

        node = _wait_for_uio(rootp, dev, timeout, failed)
        # On a kernel the store ran inside write(); the mock's driver core logs it once the
        # probe returned, which can be after the node appeared. Return only then: a restore
        # right after must not take this store's late log line for its own drivers_probe
        # (seen under load as a restore that returned with the device still unbound).
        what = final_path.name if final_path.name == "drivers_probe" else \
            f"{final_path.parent.name}/{final_path.name}"
        _wait(lambda: _mock_store_ran(rootp, mark, g, what), timeout)
        return node
    except (BindFailed, Timeout) as exc:
        note = _roll_back(rootp, g, previous, min(timeout, 5.0))
        if isinstance(exc, Timeout):
            raise Timeout(f"{exc.what}; {note}", exc.seconds) from None
        raise BindFailed(g, UIO_DRIVER, f"{exc.detail}; {note}") from None


def _new_id_bystanders(fs: Sysfs, guid: Guid, class_guid: Guid) -> list[str]:
    """Why a new_id write would take other devices too ([] = it would not).

    new_id_store -> vmbus_add_dynid -> driver_attach: every *unbound* device of the class
    (a second NIC someone unbound, a disk controller between drivers) goes to
    uio_hv_generic at once, not just ``guid``.
    """
    others = []
    for d in fs.devices():
        if d.guid == guid:
            continue
        with contextlib.suppress(DeviceRescinded, DeviceNotFound, InvalidGuid):
            if d.class_guid == class_guid and d.driver is None:
                others.append(str(d.guid))
    if not others:
        return []
    return [f"this kernel has no driver_override, so binding writes class {class_guid} to "
            f"{UIO_DRIVER}/new_id, and the kernel then also binds every unbound device of that "
            f"class: {', '.join(others)}; bind those to their driver first"]


def _roll_back(root: Path, guid: Guid, previous: str | None, timeout: float) -> str:
    try:
        restore(root, guid, timeout=timeout)
    except Exception as exc:  # the original error matters more; say what is left to do
        what = previous or "the previous state"
        return f"putting back {what} failed too ({exc}); run 'vmbus restore {guid}'"
    return f"{previous} was bound again" if previous else "the device was left unbound as before"


def unbind(root: str | os.PathLike[str], guid: str, *, force: bool = False,
           timeout: float = 10.0) -> str | None:
    """Release the device from its driver; return that driver's name (None if unbound).

    driver_override stays as it is, so nothing rebinds the device behind your back. The
    guard rails apply when the driver is not uio_hv_generic (unbinding hv_netvsc takes the
    interface down just as binding does); the driver is remembered for :func:`restore`.
    :class:`DeviceBusy` when another user holds the device open or has reserved it.
    """
    rootp = Path(root)
    dev = Sysfs(rootp).device(guid)
    g = dev.guid
    if dev.driver is None:
        return None  # nothing to release (a bind that comes later is simply later)
    _check_root(rootp, g, "unbind")
    with devlock.acquire(rootp, g, "unbind", wait=timeout):
        return _unbind(rootp, g, force, timeout)


def _unbind(rootp: Path, g: Guid, force: bool, timeout: float) -> str | None:
    """:func:`unbind` under the device's lock."""
    fs = Sysfs(rootp)
    dev = fs.device(g)
    current = dev.driver
    if current is None:
        return None
    if current != UIO_DRIVER and not force:
        reasons = guard_rails(rootp, g)
        if reasons:
            raise GuardRailRefused(g, "; ".join(reasons))
    path = fs.drivers_dir / current / "unbind"
    _require(path, current)
    _check_access(rootp, g, "unbind", [path])
    if current != UIO_DRIVER and read_record(rootp, g) is None:
        _save_record(rootp, BindRecord(str(g), current, "unbind", None, time.time()))
    err = _write(path, str(g), g, "unbind")
    if err not in (0, errno.ENODEV):
        raise BindFailed(g, current, f"writing to {path} gave {_strerror(err)}")
    if not _wait(lambda: not dev.exists() or dev.driver != current, timeout):
        raise Timeout(f"{g} to be released by {current} (its 'driver' link still points there)", timeout)
    return current


def restore(root: str | os.PathLike[str], guid: str, *, timeout: float = 10.0) -> str | None:
    """Undo :func:`bind`: unbind from uio_hv_generic, clear driver_override, bind the driver
    remembered in ``root/run/pyvmbus/<guid>.json`` (or let the kernel probe), drop the
    record. Returns the driver bound afterwards (None if none).

    Without a record (bound by hand) the device gets whatever driver the kernel picks.
    A device that some other driver holds now keeps it; only the override is cleared.
    A device that another user holds open (or has reserved) is left alone:
    :class:`DeviceBusy`, naming that process.
    """
    rootp = Path(root)
    g = Sysfs(rootp).device(guid).guid
    with devlock.acquire(rootp, g, "restore", wait=timeout):
        return _restore(rootp, g, timeout)


def _restore(rootp: Path, g: Guid, timeout: float) -> str | None:
    """:func:`restore` under the device's lock."""
    fs = Sysfs(rootp)
    dev = fs.device(g)
    rec = read_record(rootp, g)
    previous = rec.previous_driver if rec is not None else None
    current = dev.driver
    bus = rootp / "sys" / "bus" / "vmbus"
    writes: list[tuple[Path, str]] = []
    if current == UIO_DRIVER:
        writes.append((fs.drivers_dir / UIO_DRIVER / "unbind", str(g)))
    if dev.has_driver_override and dev.driver_override is not None:
        writes.append((dev.path / "driver_override", "\n"))
    if rec is not None and rec.new_id and fs.driver_loaded(UIO_DRIVER):
        writes.append((fs.drivers_dir / UIO_DRIVER / "remove_id", rec.new_id))
    target: str | None = None
    if current in (None, UIO_DRIVER):
        if previous is not None and fs.driver_loaded(previous):
            target = previous
            writes.append((fs.drivers_dir / previous / "bind", str(g)))
        else:
            writes.append((bus / "drivers_probe", str(g)))
    for path, _ in writes:
        _require(path, path.parent.name if path.parent.parent == fs.drivers_dir else "hv_vmbus", dev.path)
    if writes:
        _check_access(rootp, g, "restore", [p for p, _ in writes])
    mark = _log_mark(rootp)
    for path, text in writes:
        err = _write(path, text, g, "restore")
        if err == 0 or path.name in ("unbind", "remove_id"):
            continue  # not bound / id already gone: the state we want anyway
        if path.name == "bind" and err in (errno.EBUSY, errno.ENODEV) and dev.driver == target:
            continue
        if not dev.exists():
            raise DeviceRescinded(g, f"it vanished while being restored ({path.name}: {_strerror(err)})")
        raise BindFailed(g, target or "its previous driver",
                         f"writing {text.strip()!r} to {path} gave {_strerror(err)}; see dmesg")
    if target is not None:
        # Stores run in the order of the writes, so the bind's effect covers the earlier ones.
        ok = _wait(lambda: not dev.exists() or dev.driver == target, timeout)
        what = f"{g} to be bound to {target} again"
    else:
        # "Not on uio_hv_generic" holds as soon as the unbind ran, before the drivers_probe
        # written after it: wait for that store too, or the caller sees the device unbound
        # while the mock is about to probe it, and the caller's next drivers_probe (a bind)
        # merges with ours and is handled before the unbind written ahead of it.
        probed = not any(p.name == "drivers_probe" for p, _ in writes)
        ok = _wait(lambda: not dev.exists() or (dev.driver != UIO_DRIVER and (
            probed or _mock_store_ran(rootp, mark, g, "drivers_probe"))), timeout)
        what = f"{g} to be released by {UIO_DRIVER}"
    if not ok:
        raise Timeout(f"{what} (see dmesg; the record stays in {record_path(rootp, g)})", timeout)
    with contextlib.suppress(FileNotFoundError):
        record_path(rootp, g).unlink()
    return dev.driver if dev.exists() else None


# -- waiting for the node ------------------------------------------------------------------------
def wait_for_uio(root: str | os.PathLike[str], guid: str, timeout: float = 10.0) -> str:
    """Wait until the device is bound to uio_hv_generic with its node registered; its name.

    Done means: ``<device>/uio/uioN`` exists, ``root/dev/uioN`` exists and the ``driver``
    link names uio_hv_generic. On the real root with udev running, a pyudev monitor
    (uio and vmbus events) wakes the wait; otherwise (the mock, containers) it polls
    with a delay growing from 2 to 50 ms. Raises :class:`Timeout` naming what is missing,
    :class:`DeviceRescinded` if the device vanishes meanwhile.
    """
    rootp = Path(root)
    return _wait_for_uio(rootp, Sysfs(rootp).device(guid), timeout, lambda: None)


def _wait_for_uio(rootp: Path, dev: VmbusDevice, timeout: float,
                  failed: Callable[[], BindFailed | None]) -> str:
    """:func:`wait_for_uio`, which also stops at once when ``failed()`` returns an error."""
    found: list[str] = []

    def ready() -> bool:
        name = dev.uio_name  # DeviceRescinded when the device is gone
        if name is None or not (rootp / "dev" / name).exists() or dev.driver != UIO_DRIVER:
            error = failed()
            if error is not None:
                raise error
            return False
        found.append(name)
        return True

    if _wait_udev(ready, timeout) if _use_udev(rootp) else _wait(ready, timeout):
        return found[-1]
    name = dev.uio_name
    missing = (f"{dev.path}/uio/uioN" if name is None
               else f"{rootp / 'dev' / name}" if not (rootp / "dev" / name).exists()
               else f"the driver link (now {dev.driver})")
    raise Timeout(
        f"{dev.guid} to come up under uio_hv_generic ({missing} missing); the probe may have failed: "
        "see dmesg (kernels <= 6.9 refuse channels without a monitor id)" + _mock_log_tail(rootp, dev.guid),
        timeout,
    )


def _mock_log_tail(root: Path, guid: Guid) -> str:
    """The mock kernel's last log lines about the device (its dmesg), when the root is a mock's."""
    try:
        lines = _mock_log(root).read_text().splitlines()
    except OSError:
        return ""
    mine = [line for line in lines if guid in line][-3:]
    return "; mock kernel log: " + " | ".join(mine) if mine else ""


def _use_udev(root: Path) -> bool:
    return is_real_root(root) and os.path.exists("/run/udev/control")


def _wait_udev(ready: Callable[[], bool], timeout: float) -> bool:
    try:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        monitor.filter_by("uio")
        monitor.filter_by("vmbus")
        monitor.start()
    except Exception:  # no libudev, no netlink socket: polling works everywhere
        return _wait(ready, timeout)
    # Any uio / vmbus event, or a quarter second without one, re-checks.
    return _wait(ready, timeout, lambda left: monitor.poll(timeout=min(left, 0.25)))
