"""Exit codes of the ``vmbus`` command and how an expected error becomes one line on stderr.

Every error pyvmbus raises on purpose (:class:`~pyvmbus.errors.VmbusError`) is caught in
one place (:class:`pyvmbus.cli.VmbusGroup`), printed as one line that says what went wrong
and what to do, and mapped to an exit code by :data:`EXIT_CODES`, the one table that the
CLI, its tests and docs/cli.md all read. No traceback for these (``-vv`` adds one, to
debug pyvmbus itself); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    AlreadyBound,
    AmbiguousDevice,
    BindFailed,
    ChannelClosed,
    DeviceBusy,
    DeviceNotFound,
    DriverNotLoaded,
    GuardRailRefused,
    HostError,
    InvalidGuid,
    InvalidState,
    MalformedSysfs,
    NotPermitted,
    Timeout,
    UsageError,
    VmbusError,
)

__all__ = [
    "EXIT_BUSY",
    "EXIT_CODES",
    "EXIT_FAILURE",
    "EXIT_HOST",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NO_VMBUS",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "EXIT_SYSFS",
    "ExitCode",
    "NoVmbus",
    "PayloadTooLarge",
    "WrongClass",
    "error_line",
    "exit_code",
    "hint_for",
]


class NoVmbus(UsageError):
    """There is no VMBus under the root: not a Hyper-V guest, or a mock root that is not served.

    The CLI's own error (the library just sees no devices there); it suggests ``--mock``.
    """

    def __init__(self, root: str | os.PathLike[str], dead_mock: int | None = None) -> None:
        self.root = str(root)
        self.dead_mock = dead_mock
        """The pid of the mock process that served this root and is gone (0: unknown);
        None when the root is not a dead mock's."""
        bus = Path(root) / "sys" / "bus" / "vmbus"
        if dead_mock is not None:
            pid = f" (pid {dead_mock})" if dead_mock else ""
            msg = (f"no VMBus under {root}: it is a mock root whose process{pid} is gone (killed or "
                   f"stopped), so its devices are leftovers; start one with 'vmbus mock serve --root "
                   f"{root}', or use --mock")
        elif os.path.realpath(root) == "/":
            msg = (f"no VMBus here ({bus} does not exist): this is not a Hyper-V or Azure guest, or "
                   "hv_vmbus is not loaded; try the mock: 'vmbus --mock list' or 'vmbus demo'")
        else:
            msg = (f"no VMBus under {root} ({bus} does not exist): start one there with "
                   f"'vmbus mock serve --root {root}', or use --mock")
        super().__init__(msg)


class WrongClass(UsageError):
    """A ``vmbus ic`` service was pointed at a device of another class."""

    def __init__(self, guid: str, cls: str, wanted: str) -> None:
        self.guid, self.cls, self.wanted = guid, cls, wanted
        article = "an" if cls[:1] in "aeiou" else "a"
        super().__init__(f"{guid} is {article} {cls} device, not {wanted}: give the {wanted} device "
                         f"(its GUID or '{wanted}'; run 'vmbus list' to see the devices)")


class PayloadTooLarge(UsageError):
    """A ``--send`` payload is larger than the device's ring can ever take."""

    def __init__(self, guid: str, size: int, limit: int, ring: int) -> None:
        self.guid, self.size, self.limit, self.ring = guid, size, limit, ring
        super().__init__(f"a --send payload of {size} bytes cannot fit in the ring of {guid} ({ring} data "
                         f"bytes: at most {limit} bytes per packet); nothing was sent: send it in pieces")


@dataclass(frozen=True)
class ExitCode:
    """One row of :data:`EXIT_CODES`: which errors exit with ``code``, and the usual fix."""

    code: int
    name: str
    errors: tuple[type[BaseException], ...]
    meaning: str
    hint: str
    """Appended to the message when the message does not already say what to do."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_TIMEOUT = 8
EXIT_HOST = 9
EXIT_NO_VMBUS = 10
EXIT_BUSY = 12
EXIT_SYSFS = 13
EXIT_INTERRUPTED = 130

EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(EXIT_OK, "ok", (), "success (also: enable/watch/ring --watch stopped by Ctrl-C, "
             "SIGTERM, --count or --timeout)", ""),
    ExitCode(EXIT_FAILURE, "error", (VmbusError,), "any other pyvmbus error", ""),
    ExitCode(EXIT_USAGE, "usage", (WrongClass, PayloadTooLarge), "bad command line (click's usage errors: "
             "a value out of range, not finite, too long or unreadable; a 'vmbus ic' service given a "
             "device of another class; a --send payload larger than the device's ring takes)",
             "see 'vmbus --help'"),
    ExitCode(EXIT_NOT_FOUND, "not-found", (DeviceNotFound, AmbiguousDevice, InvalidGuid),
             "no such device, or the name matches several (the error lists them)",
             "run 'vmbus list' to see the devices"),
    ExitCode(4, "permission", (NotPermitted,), "not allowed to read/write a sysfs file or the uio node",
             "run as root, or install udev/90-pyvmbus.rules and join the vmbus group"),
    ExitCode(5, "driver-missing", (DriverNotLoaded,), "uio_hv_generic (or the driver to restore) "
             "is not loaded", "run 'modprobe uio_hv_generic'"),
    ExitCode(6, "guard-rail", (GuardRailRefused,), "binding would take away a disk in use, the "
             "default route or this SSH session", "add --force if you really mean it"),
    ExitCode(7, "state", (AlreadyBound, InvalidState), "the device or channel is not in a state "
             "that allows this", "check 'vmbus show DEVICE'"),
    ExitCode(EXIT_TIMEOUT, "timeout", (Timeout,), "something did not happen in time (a uio node, a "
             "reply, --count packets before --timeout)", "see dmesg (or the mock's kernel log)"),
    ExitCode(EXIT_HOST, "host", (HostError, ChannelClosed), "the host rescinded the device, crashed or "
             "wrote a corrupt ring", "run 'vmbus list' to find the device again once the host "
             "offers it"),
    ExitCode(EXIT_NO_VMBUS, "no-vmbus", (NoVmbus,), "no VMBus under the root (not a Hyper-V guest, "
             "or a mock root whose process is gone)", "try --mock, or 'vmbus mock serve --root DIR'"),
    ExitCode(11, "bind-failed", (BindFailed,), "the kernel refused a bind or unbind write",
             "see dmesg"),
    ExitCode(EXIT_BUSY, "busy", (DeviceBusy,), "another process uses the device (a channel holds it "
             "open, or a bind / unbind / restore of it did not end in time); the message names it",
             "wait for that process or stop it, then run the command again"),
    ExitCode(EXIT_SYSFS, "bad-sysfs", (MalformedSysfs,), "a sysfs file under the root holds what a "
             "kernel never writes there (a word for a number, a directory for a file): a broken "
             "kernel, mock or --root tree", "check that file"),
    ExitCode(EXIT_INTERRUPTED, "interrupted", (), "interrupted by Ctrl-C in a command that does not "
             "stop on it by design", ""),
)
"""Exit codes, most specific errors first (the first row whose ``errors`` match wins)."""

def _row(exc: BaseException) -> ExitCode | None:
    # A subclass can sit in two rows' trees (HostCrashed is a DeviceRescinded, Timeout a
    # VmbusError): pick the row whose class is the nearest ancestor in the MRO.
    best: tuple[int, ExitCode] | None = None
    mro = type(exc).__mro__
    for row in EXIT_CODES:
        for cls in row.errors:
            if isinstance(exc, cls):
                depth = mro.index(cls)
                if best is None or depth < best[0]:
                    best = (depth, row)
    return best[1] if best else None


def exit_code(exc: BaseException) -> int:
    """The exit code for ``exc`` (:data:`EXIT_FAILURE` for an unlisted VmbusError; an error
    relayed from another process carries the code it had there as ``cli_exit_code``)."""
    relayed = getattr(exc, "cli_exit_code", None)
    if isinstance(relayed, int):
        return relayed
    row = _row(exc)
    return row.code if row is not None else EXIT_FAILURE


def hint_for(exc: BaseException) -> str:
    """The usual fix for ``exc``'s row, or ''."""
    row = _row(exc)
    return row.hint if row is not None else ""


def _says_what_to_do(message: str, hint: str) -> bool:
    low = message.lower()
    words = ("run ", "--force", "modprobe", "see dmesg", "rediscover", "use ", "try ", "vmbus list",
             "bind it", "give the instance", "wait for")
    return hint.lower() in low or any(w in low for w in words)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: its message, plus the row's fix when the message has none."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    hint = hint_for(exc)
    if hint and not _says_what_to_do(message, hint):
        message = f"{message}; {hint}"
    return message
