"""The mock process's event loop: readers, timers and a fast scan hook, one thread.

Why not selectors/asyncio: Hyper-V scans the monitor page about every 100 µs, and epoll
and poll take their timeout in whole milliseconds. select() takes microseconds, so the
loop sleeps in select() with a 100 µs timeout while something needs scanning and blocks
without a timeout otherwise. (select() is limited to fds below FD_SETSIZE; past that the
loop falls back to poll() and 1 ms scans.)
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from collections.abc import Callable

__all__ = ["FD_SETSIZE", "Loop", "TimerHandle"]

FD_SETSIZE = 1024


class TimerHandle:
    """A pending :meth:`Loop.call_later`; :meth:`cancel` drops it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Single-threaded loop: fd readers, one-shot timers and a per-iteration scan hook."""

    def __init__(self) -> None:
        self._readers: dict[int, Callable[[], None]] = {}
        self._fds: list[int] = []
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._stopped = False
        self.scan: Callable[[float], float | None] | None = None
        """Called every iteration with the time; returns how long the loop may sleep
        (None: as long as it likes). The mock host scans its pages here."""
        self.on_error: Callable[[BaseException], None] | None = None
        """Called with an exception a callback raised; the loop goes on. Without it the
        exception ends :meth:`run`."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._fds = list(self._readers)

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._fds = list(self._readers)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def stop(self) -> None:
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def run(self) -> None:
        """Run until :meth:`stop`."""
        while not self._stopped:
            self.run_once()

    def run_once(self) -> None:
        now = time.monotonic()
        timeout: float | None = None
        if self.scan is not None:
            try:
                timeout = self.scan(now)
            except Exception as exc:
                if self.on_error is None:
                    raise
                self.on_error(exc)
                timeout = 0.001
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            until = max(0.0, self._timers[0][0] - now)
            timeout = until if timeout is None else min(timeout, until)
        for fd in self._wait(timeout):
            callback = self._readers.get(fd)
            if callback is not None:
                self._call(callback)
            if self._stopped:
                return
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self._call(handle.callback)
            if self._stopped:
                return

    def _call(self, callback: Callable[[], None]) -> None:
        if self.on_error is None:
            callback()
            return
        try:
            callback()
        except Exception as exc:
            self.on_error(exc)

    def _wait(self, timeout: float | None) -> list[int]:
        fds = self._fds
        if fds and max(fds) >= FD_SETSIZE:
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            ms = None if timeout is None else max(1, int(timeout * 1000 + 0.999))
            return [fd for fd, _ in poller.poll(ms)]
        ready, _, _ = select.select(fds, [], [], timeout)
        return ready
