"""The pyvmbus exception tree.

One root, :class:`VmbusError`. Faults the host caused (a malformed ring, a rescinded
device, a crashed host) derive from :class:`HostError`; faults of the caller or the
system set-up (a GUID typo, no root, a missing driver) derive from :class:`UsageError`.
Every exception keeps its inputs as attributes and prints a message that says what was
wrong and, where there is one, what to do.
"""

from __future__ import annotations

import time

__all__ = [
    "AlreadyBound",
    "AmbiguousDevice",
    "BindFailed",
    "ChannelClosed",
    "DeviceBusy",
    "DeviceNotFound",
    "DeviceRescinded",
    "DriverNotLoaded",
    "GuardRailRefused",
    "HostCrashed",
    "HostError",
    "InvalidGuid",
    "InvalidState",
    "MalformedSysfs",
    "NotPermitted",
    "RingCorrupt",
    "RingFull",
    "Timeout",
    "UnsupportedKernel",
    "UsageError",
    "VmbusError",
]


class VmbusError(Exception):
    """Root of every error pyvmbus raises on purpose."""


class HostError(VmbusError):
    """The host (or its mock) did something the protocol does not allow, or went away."""


class UsageError(VmbusError):
    """The caller or the system set-up is at fault: fix the input or the environment."""


class RingCorrupt(HostError):
    """A ring header or packet descriptor holds a value the protocol forbids.

    Nothing was consumed: the ring is left exactly as it was found, so the caller can
    dump it for a bug report.
    """

    def __init__(self, field: str, value: int, reason: str, where: str = "") -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.where = where
        """Which ring of which channel, and at which point it was seen (empty when the ring
        engine raised it: the channel adds it, see :meth:`located`)."""
        super().__init__(f"ring corrupt: {self.detail}")

    @property
    def detail(self) -> str:
        """The message without the "ring corrupt:" prefix (a close reason's "corrupt: ..." part)."""
        text = f"{self.field}={self.value:#x} ({self.value}): {self.reason}"
        return f"{text} ({self.where})" if self.where else text

    def in_ring(self, ring: str) -> RingCorrupt:
        """The same fault naming ``ring`` ("rx ring", "tx ring") if the ring engine raised
        it, which does not know which ring it runs (the header check names its own)."""
        return self if self.where else RingCorrupt(self.field, self.value, self.reason, ring)

    def located(self, where: str) -> RingCorrupt:
        """The same fault, saying where it was seen: "<ring> of <where>" (``where`` names the
        channel and the point, e.g. "channel X relid 5, before a drain")."""
        return RingCorrupt(self.field, self.value, self.reason,
                           f"{self.where} of {where}" if self.where else where)


class RingFull(VmbusError):
    """A packet does not fit in the free space of the outbound ring (nothing was written).

    Not a fault: the writer should wait for the reader (see ``pending_send_size``).
    """

    def __init__(self, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(
            f"ring full: packet needs {needed} bytes, {available} free "
            "(one byte always stays free so that full and empty differ)"
        )


class InvalidGuid(UsageError, ValueError):
    """A string is not a GUID (typo, wrong length, bad hex digit)."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"not a GUID: {text!r}: {reason}")


class DeviceNotFound(UsageError, LookupError):
    """No VMBus device matches the GUID or name given."""

    def __init__(self, query: str, nearest: tuple[str, ...] = (), where: str = "") -> None:
        self.query = query
        self.nearest = nearest
        self.where = where
        shown = query if len(query) <= 200 else query[:196] + "..."
        msg = f"no VMBus device {shown!r}"
        if where:
            msg += f" under {where}"
        if nearest:
            msg += "; nearest: " + ", ".join(nearest)
        else:
            msg += " (run 'vmbus list' to see the devices)"
        super().__init__(msg)


class AmbiguousDevice(DeviceNotFound):
    """A GUID prefix or class name matches several devices; ``candidates`` lists them.

    A kind of :class:`DeviceNotFound` (no one device was found), so code that handles a
    miss handles this too; the message lists every candidate instead of the nearest.
    """

    def __init__(self, query: str, what: str, candidates: tuple[str, ...], where: str = "",
                 fix: str = "give more of the GUID", labels: tuple[str, ...] = ()) -> None:
        self.query = query
        self.what = what
        self.candidates = candidates
        """The GUIDs it matches (``nearest`` too, as for any DeviceNotFound)."""
        self.nearest = candidates
        self.where = where
        labels = labels or ("",) * len(candidates)
        self.labels = labels
        """Each candidate's class name ('' when unknown)."""
        names = [f"{g} ({label})" if label else g for g, label in zip(candidates, labels, strict=False)]
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        shown_query = query if len(query) <= 200 else query[:196] + "..."
        msg = f"{shown_query!r} is ambiguous: it matches {len(candidates)} {what}"
        if where:
            msg += f" under {where}"
        VmbusError.__init__(self, f"{msg}: {shown}; {fix}")


class MalformedSysfs(VmbusError, ValueError):
    """A sysfs file holds what the kernel never writes there (a non-number where a number
    belongs, a directory where a file belongs), or cannot be read for another reason.

    Seen under a corrupted or hand-made ``--root``, or a broken mock root; a real kernel
    does not do this. Also a ``ValueError``, as :func:`pyvmbus.sysfs.parse_int` raised
    before this class existed.
    """

    def __init__(self, path: str, value: str | None, expected: str) -> None:
        self.path = path
        self.value = value
        self.expected = expected
        if value is None:
            msg = f"malformed sysfs entry {path}: {expected}"
        else:
            shown = value if len(value) <= 64 else value[:60] + "..."
            msg = f"malformed sysfs attribute {path}: read {shown!r}, expected {expected}"
        super().__init__(msg + " (a broken kernel, mock or --root tree: check that file)")


class NotPermitted(UsageError, PermissionError):
    """The operation needs privileges this process does not have."""

    def __init__(self, path: str, action: str) -> None:
        self.path = path
        self.action = action
        super().__init__(
            f"permission denied: cannot {action} {path}: run as root, or install "
            "udev/90-pyvmbus.rules and join the vmbus group"
        )


class DriverNotLoaded(UsageError):
    """The uio_hv_generic driver is not loaded (or another driver named is missing)."""

    def __init__(self, driver: str, path: str) -> None:
        self.driver = driver
        self.path = path
        super().__init__(f"driver {driver} is not loaded ({path} missing): run 'modprobe {driver}'")


class AlreadyBound(UsageError):
    """The device is already bound to the driver asked for."""

    def __init__(self, guid: str, driver: str) -> None:
        self.guid = guid
        self.driver = driver
        super().__init__(f"device {guid} is already bound to {driver}")


class BindFailed(UsageError):
    """The kernel refused to bind (or give back) a device: a store() or a probe failed."""

    def __init__(self, guid: str, driver: str, detail: str) -> None:
        self.guid = guid
        self.driver = driver
        self.detail = detail
        super().__init__(f"binding {guid} to {driver} failed: {detail}")


_HOLDING = {
    "open": "holds it open",
    "reserve": "has reserved it",
    "bind": "is binding it",
    "unbind": "is unbinding it",
    "restore": "is restoring it",
}


class DeviceBusy(UsageError):
    """Another user holds the device: a Channel has it open, or a bind / unbind / restore runs.

    pyvmbus allows one user of a device at a time, across processes (an advisory lock per
    device, ``root/run/pyvmbus/lock/<guid>.lock``; see :mod:`pyvmbus.devlock`): the kernel
    would let two processes open the node and share the channel, and they would take each
    other's packets. ``pid``, ``command``, ``role`` (``open``, ``reserve``, ``bind``,
    ``unbind``, ``restore``) and ``since`` (a time.time() value) describe the holder; each
    is None when it cannot be found out. ``this_process`` is True when the holder is the
    caller's own process (a second Channel of the same device, a restore of a device the
    process has open). ``waited``: seconds spent waiting for a bind / unbind / restore to end.
    """

    def __init__(self, device: str, action: str, lock: str, *, pid: int | None = None,
                 command: str | None = None, role: str | None = None, since: float | None = None,
                 this_process: bool = False, waited: float = 0.0) -> None:
        self.device = device
        self.action = action
        self.lock = lock
        self.pid = pid
        self.command = command
        self.role = role
        self.since = since
        self.this_process = this_process
        self.waited = waited
        if pid is None:
            who = ("a process pyvmbus cannot identify (the kernel's /proc/locks does not name the "
                   f"holder of {lock}: another PID namespace?)")
        else:
            who = f"pid {pid} ({command or 'command unknown'}{', this process' if this_process else ''})"
        doing = _HOLDING.get(role or "", "holds it")
        msg = f"device {device} is busy: cannot {action}: {who} {doing}"
        if since is not None:
            msg += f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
        if waited > 0:
            msg += f"; still busy after waiting {waited:g} s"
        if this_process:
            msg += ("; disable() the other Channel of this device first" if role == "open"
                    else "; wait for this process's other user of the device to finish")
        elif pid is not None:
            msg += f"; wait for it to finish or stop it (kill {pid}); the lock is {lock}"
        else:
            msg += "; wait for it to finish, or find it with 'fuser' on the lock file"
        super().__init__(msg)


class GuardRailRefused(UsageError):
    """Binding would take away something the system depends on (a mounted disk, the route)."""

    def __init__(self, guid: str, why: str) -> None:
        self.guid = guid
        self.why = why
        super().__init__(f"refusing to rebind {guid}: {why} (use --force / force=True to override)")


class Timeout(VmbusError, TimeoutError):
    """Something did not happen within the time allowed."""

    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__(f"timed out after {seconds:g} s waiting for {what}")


class DeviceRescinded(HostError):
    """The host took the device away (uio read/write returned EIO, or the node vanished)."""

    def __init__(self, device: str, detail: str = "") -> None:
        self.device = device
        self.detail = detail
        msg = f"device {device} was rescinded by the host"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; rediscover it once the host offers it again")


class HostCrashed(DeviceRescinded):
    """The host side stopped answering for good (the mock host process died).

    A kind of :class:`DeviceRescinded` (the device is gone either way), so code that
    handles a rescind handles this too; ``isinstance`` tells the two apart.
    """

    def __init__(self, device: str, detail: str = "") -> None:
        self.device = device
        self.detail = detail
        HostError.__init__(self, f"host of {device} is gone" + (f": {detail}" if detail else ""))


class InvalidState(UsageError):
    """The channel's state does not allow the operation (enable twice; wait inside on_started)."""

    def __init__(self, device: str, state: str, action: str, hint: str = "") -> None:
        self.device = device
        self.state = state
        self.action = action
        self.hint = hint
        msg = f"channel {device}: cannot {action} in state {state}"
        super().__init__(msg + (f": {hint}" if hint else ""))


class ChannelClosed(VmbusError):
    """The channel closed while the operation waited, or was not enabled."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"channel {device} is closed ({reason})")


class UnsupportedKernel(UsageError):
    """The running kernel's uio_hv_generic cannot do what the device needs; ``works_on``
    names the kernels where it would work (the fix is a kernel update, not a retry)."""

    def __init__(self, device: str, what: str, why: str, works_on: str) -> None:
        self.device = device
        self.what = what
        self.why = why
        self.works_on = works_on
        super().__init__(f"{device}: cannot {what}: {why}; it works on {works_on}")
