"""Time sync IC (HV_TS_GUID 9527e630-d0ae-497b-adce-e80ab0175caf; ICMSGTYPE 4).

Two body formats, picked by the negotiated service version as hv_util.c does
(``ts_srv_version > TS_VERSION_3``):

- <= 3.0: ``ictimesync_data`` (25 bytes): the host time ``parenttime`` only is used.
- 4.0: ``ictimesync_ref_data`` (22 bytes): ``parenttime`` was taken when the guest's Hyper-V
  reference counter read ``vmreferencetime``; the guest adds the counter's advance since.
  Userspace cannot read that counter portably, so it is an injected callable; without one
  the sample is taken as fresh (the <= 3.0 rule).

Every message is echoed back unchanged as TRANSACTION|RESPONSE (the kernel does not touch the
status). The offset host - guest is reported in :attr:`TimesyncService.last_sample`; the clock
is set only through the injected ``set_clock`` (the CLI passes one only with ``--set-clock``),
only on SYNC (the kernel's hard request), after the answer was sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .framework import IcService
from .messages import (
    ICMSG_HDR,
    TS_VERSIONS,
    IcMsgType,
    TimesyncData,
    TimesyncFlags,
    TimesyncRefData,
    filetime_to_unix_ns,
    version,
)

__all__ = ["TS_VERSION_3", "TimeSample", "TimesyncService"]

TS_VERSION_3 = version(3, 0)


@dataclass(frozen=True, slots=True)
class TimeSample:
    """One host time sample as the guest saw it."""

    host_ns: int
    """Host time in Unix ns, advanced by the reference-counter delay on 4.0."""
    guest_ns: int
    """The guest clock when the sample was handled."""
    flags: int
    ref_format: bool
    """True for the 4.0 ``ictimesync_ref_data`` format."""
    leapflags: int = 0
    stratum: int = 0

    @property
    def offset_ns(self) -> int:
        """host - guest: positive when the guest clock is behind."""
        return self.host_ns - self.guest_ns

    @property
    def sync(self) -> bool:
        """The host asked to set the clock (ICTIMESYNCFLAG_SYNC), not just a sample."""
        return bool(self.flags & TimesyncFlags.SYNC)


class TimesyncService(IcService):
    """Reports host - guest offsets; sets the clock only through ``set_clock``.

    ``clock``: the guest clock in Unix ns (default ``time.time_ns``).
    ``reference_counter``: the Hyper-V reference counter (100 ns units) for 4.0 samples.
    ``set_clock(unix_ns)``: called after the answer to a SYNC request, with the host time
    advanced to the moment of the call. ``on_sample(sample)``: called after every answer.
    """

    service_name: ClassVar[str] = "timesync"
    class_name: ClassVar[str] = "timesync"
    message_type: ClassVar[int] = IcMsgType.TIMESYNC
    service_versions: ClassVar[tuple[int, ...]] = TS_VERSIONS

    def __init__(
        self,
        *,
        clock: Callable[[], int] = time.time_ns,
        reference_counter: Callable[[], int] | None = None,
        set_clock: Callable[[int], None] | None = None,
        on_sample: Callable[[TimeSample], None] | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.reference_counter = reference_counter
        self.set_clock = set_clock
        self.on_sample = on_sample
        self.samples = 0
        self.last_sample: TimeSample | None = None

    @property
    def ref_format(self) -> bool:
        """Whether messages carry ``ictimesync_ref_data`` (negotiated version > 3.0)."""
        return self.service_version is not None and self.service_version > TS_VERSION_3

    def _message(self, buf: bytearray) -> bool:
        n = len(buf)
        if self.ref_format:
            if n < ICMSG_HDR + TimesyncRefData.SIZE:
                self._drop(f"timesync 4.0 message of {n} bytes, needs {ICMSG_HDR + TimesyncRefData.SIZE}")
                return False
            ref = TimesyncRefData.unpack_from(buf)
            host = ref.parenttime
            if self.reference_counter is not None:
                host += self.reference_counter() - ref.vmreferencetime
            sample = TimeSample(
                filetime_to_unix_ns(host), self.clock(), ref.flags, True, ref.leapflags, ref.stratum
            )
        else:
            if n < ICMSG_HDR + TimesyncData.SIZE:
                self._drop(f"timesync message of {n} bytes, needs {ICMSG_HDR + TimesyncData.SIZE}")
                return False
            data = TimesyncData.unpack_from(buf)
            sample = TimeSample(filetime_to_unix_ns(data.parenttime), self.clock(), data.flags, False)
        self.samples += 1
        self.last_sample = sample
        on_sample, set_clock = self.on_sample, self.set_clock
        if on_sample is not None:
            self._defer(lambda: on_sample(sample))
        if sample.sync and set_clock is not None:
            # Like the kernel's hv_get_adj_host_time: carry the sample forward to "now".
            self._defer(lambda: set_clock(self.clock() + sample.offset_ns))
        return True
