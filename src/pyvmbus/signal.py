"""How the guest tells the host "look at my outbound ring" (SPEC.md section 5).

Two mechanisms exist, and the offer decides which one a channel needs:

- **monitored** channels (the offer has a monitor id): set our relid bit in the send half of
  the interrupt page (uio map 1, +2048: word ``relid // 32``, bit ``relid % 32``) and our
  bit in the monitor page's trigger group (uio map 2: ``trigger_group[monitor_id // 32]
  .pending`` at ``8 + 8 * group``, bit ``monitor_id % 32``). This is what the kernel's
  ``vmbus_setevent`` does; the host's monitor scan (every 50-100 us) picks it up. Both pages
  are global and shared with every other VMBus driver, so each bit is set with one atomic
  OR on its 32-bit word and no other bit is touched.
- **non-monitored** channels: userspace cannot make the HvSignalEvent hypercall, so it
  writes a 4-byte 1 to the uio fd; since 6.10 (547fa4ffd799) the kernel then signals the
  host for the primary. Kernels before 6.10 and the 5.4-6.6 LTS lines refuse such
  primaries at probe. A non-monitored *subchannel* is signalled only by d062463's
  set_event() (6.15+, 6.12.y from Nov 2025); elsewhere pyvmbus refuses to open it.

:meth:`HostSignal.describe` says which one a channel uses and why, for ``vmbus show``.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any, Final

from . import shm

__all__ = [
    "HV_HYP_PAGE_SIZE",
    "INT_PAGE_SEND_OFFSET",
    "MAX_MONITOR_ID",
    "MONITOR_PENDING_OFFSET",
    "HostSignal",
    "Mechanism",
    "int_page_bit",
    "monitor_page_bit",
]

HV_HYP_PAGE_SIZE: Final = 4096
"""The interrupt and monitor pages are Hyper-V pages: 4 KiB whatever the guest page size."""
INT_PAGE_SEND_OFFSET: Final = HV_HYP_PAGE_SIZE // 2
"""Guest-to-host half of the interrupt page (connection.c: send_int_page = int_page + 2048)."""
MONITOR_PENDING_OFFSET: Final = 8
"""struct hv_monitor_page: trigger_group[4] of {u32 pending; u32 armed} starts at 0x008."""
MONITOR_GROUP_STRIDE: Final = 8
MAX_MONITOR_ID: Final = 4 * 32 - 1
"""Four trigger groups of 32 bits."""
MAX_RELID: Final = INT_PAGE_SEND_OFFSET * 8 - 1
"""The send half holds 2048 bytes of bits."""


class Mechanism(enum.Enum):
    """Which way a channel signals the host."""

    MONITOR = "monitor-page"
    FD_WRITE = "fd-write"

    def __str__(self) -> str:
        return self.value


def int_page_bit(relid: int) -> tuple[int, int]:
    """(byte offset of the u32 word in the interrupt page, bit mask) for ``relid``."""
    if not 0 <= relid <= MAX_RELID:
        raise ValueError(f"relid {relid} is outside the interrupt page (0..{MAX_RELID})")
    return INT_PAGE_SEND_OFFSET + 4 * (relid // 32), 1 << (relid % 32)


def monitor_page_bit(monitor_id: int) -> tuple[int, int]:
    """(byte offset of trigger_group[id // 32].pending, bit mask) for ``monitor_id``."""
    if not 0 <= monitor_id <= MAX_MONITOR_ID:
        raise ValueError(f"monitor id {monitor_id} is outside the monitor page (0..{MAX_MONITOR_ID})")
    return MONITOR_PENDING_OFFSET + MONITOR_GROUP_STRIDE * (monitor_id // 32), 1 << (monitor_id % 32)


def _check_page(name: str, page: Any, offset: int) -> None:
    size = memoryview(page).nbytes
    if size < offset + 4:
        raise ValueError(f"{name} map is {size} bytes; the word at +{offset} is outside it")


class HostSignal:
    """Signals the host for one channel; :meth:`signal` is the per-send fast path.

    Build it with :meth:`monitored` or :meth:`fd_write`, or let :meth:`for_channel` pick
    from the offer. ``signals`` counts the signals sent.
    """

    __slots__ = ("_count_lock", "_fd_write", "_int_mask", "_int_off", "_int_page", "_mon_mask", "_mon_off",
                 "_mon_page", "mechanism", "monitor_id", "reason", "relid", "signal", "signals",
                 "subchannel")

    def __init__(self, mechanism: Mechanism, relid: int, monitor_id: int | None, reason: str,
                 subchannel: bool = False) -> None:
        self.mechanism = mechanism
        self.relid = relid
        self.monitor_id = monitor_id
        self.reason = reason
        self.subchannel = subchannel
        self.signals = 0
        self._count_lock = threading.Lock()  # senders on several threads, and the dispatcher
        self._int_page: Any = None
        self._mon_page: Any = None
        self._int_off = self._int_mask = self._mon_off = self._mon_mask = 0
        self._fd_write: Callable[[], object] | None = None
        self.signal: Callable[[], None] = self._no_signal

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def monitored(cls, relid: int, monitor_id: int, int_page: Any, monitor_page: Any, *,
                  subchannel: bool = False) -> HostSignal:
        """Signal by setting our relid bit (interrupt page) and monitor bit (monitor page)."""
        int_off, int_mask = int_page_bit(relid)
        mon_off, mon_mask = monitor_page_bit(monitor_id)
        _check_page("int_page", int_page, int_off)
        _check_page("monitor_page", monitor_page, mon_off)
        group = monitor_id // 32
        reason = (
            f"monitored channel (monitor_id {monitor_id}): a write to the uio fd only unmasks "
            f"a monitored channel, so pyvmbus sets relid bit {relid % 32} of word {relid // 32} "
            f"in the interrupt page's send half (+{int_off}) and bit {monitor_id % 32} of "
            f"trigger_group[{group}].pending in the monitor page (+{mon_off}), each with one "
            "atomic OR; the host's monitor scan picks it up (latency 50-100 us)"
        )
        self = cls(Mechanism.MONITOR, relid, monitor_id, reason, subchannel)
        self._int_page, self._int_off, self._int_mask = int_page, int_off, int_mask
        self._mon_page, self._mon_off, self._mon_mask = monitor_page, mon_off, mon_mask
        self.signal = self._signal_monitor
        return self

    @classmethod
    def fd_write(cls, relid: int, write_one: Callable[[], object], *,
                 subchannel: bool = False) -> HostSignal:
        """Signal by a 4-byte write of 1 to the uio fd (``write_one``): the kernel signals."""
        reason = (
            "not monitored (no monitor_id in the offer): userspace cannot make the "
            "HvSignalEvent hypercall, so pyvmbus writes a 4-byte 1 to the uio fd and the "
            "kernel (6.10+) calls vmbus_setevent; the same write also unmasks interrupts"
        )
        if subchannel:
            reason += (
                "; for a subchannel only a kernel with d062463 signals on a write (upstream 6.15+, "
                "inferred; 6.12.y from Nov 2025): on <= 6.14 before it (6.10-6.14, 6.12.y before "
                "Nov 2025 e.g. Debian 6.12.57, OpenHCL) a write signals the primary only, and on "
                "the 5.4-6.6 LTS lines, even after the Dec 2025 backport, it signals nothing, so "
                "pyvmbus refuses such a subchannel there (UnsupportedKernel)"
            )
        self = cls(Mechanism.FD_WRITE, relid, None, reason, subchannel)
        self._fd_write = write_one
        self.signal = self._signal_fd
        return self

    @classmethod
    def for_channel(cls, relid: int, monitor_id: int | None, *, int_page: Any = None,
                    monitor_page: Any = None, write_one: Callable[[], object] | None = None,
                    subchannel: bool = False) -> HostSignal:
        """Pick the mechanism the offer needs (see the module docstring)."""
        if monitor_id is not None:
            if int_page is None or monitor_page is None:
                raise ValueError(
                    f"relid {relid} is monitored (monitor_id {monitor_id}) but the uio device "
                    "has no int_page / monitor_page map to signal through"
                )
            return cls.monitored(relid, monitor_id, int_page, monitor_page, subchannel=subchannel)
        if write_one is None:
            raise ValueError(f"relid {relid} is not monitored and no uio fd was given to signal through")
        return cls.fd_write(relid, write_one, subchannel=subchannel)

    # -- the fast path ------------------------------------------------------------------------

    def _signal_monitor(self) -> None:
        # Order: the interrupt-page bit first, then the monitor bit that makes the host look
        # (vmbus_setevent's order). Both are seq_cst RMWs, so the ring's write index (stored
        # before this call by the ring engine, after its own fence) is visible first.
        shm.fetch_or32(self._int_page, self._int_off, self._int_mask)
        shm.fetch_or32(self._mon_page, self._mon_off, self._mon_mask)
        with self._count_lock:
            self.signals += 1

    def _signal_fd(self) -> None:
        assert self._fd_write is not None
        self._fd_write()
        with self._count_lock:
            self.signals += 1

    def _no_signal(self) -> None:  # pragma: no cover - replaced by every constructor
        raise RuntimeError("HostSignal built without a mechanism")

    # -- diagnostics --------------------------------------------------------------------------

    def describe(self) -> str:
        """One paragraph for ``vmbus show``: mechanism, bits, and why."""
        return f"{self.mechanism} (relid {self.relid}): {self.reason}"

    def info(self) -> dict[str, object]:
        """The same as data: mechanism, relid, monitor id, bit positions, signals sent."""
        out: dict[str, object] = {
            "mechanism": self.mechanism.value,
            "relid": self.relid,
            "monitor_id": self.monitor_id,
            "signals": self.signals,
        }
        if self.mechanism is Mechanism.MONITOR:
            out["int_page_word_offset"] = self._int_off
            out["int_page_bit_mask"] = self._int_mask
            out["monitor_pending_offset"] = self._mon_off
            out["monitor_bit_mask"] = self._mon_mask
        return out

    def __repr__(self) -> str:
        return f"HostSignal({self.mechanism.value}, relid={self.relid}, monitor_id={self.monitor_id})"
