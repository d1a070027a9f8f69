"""The mock process's event loop: readers, timers and a fast scan hook, one thread.

Why not selectors/asyncio: Hyper-V scans the monitor page about every 100 µs, and epoll
and poll take their timeout in whole milliseconds. select() takes microseconds but walks
(and hooks into the wait queue of) every fd it is given, each call. So the readers live
in an epoll set (level-triggered, like select), and the loop waits:

- in ``epoll_wait`` itself when it may sleep long (no timeout, or one of at least
  :data:`EPOLL_MIN_TIMEOUT`: its rounding up to whole ms makes a timer or a tick at most
  1 ms late, which none of them minds), one system call;
- in select() on the one epoll fd when it needs a shorter sleep (the monitor scan), then
  ``epoll_wait(0)`` for the ready list if something is.

(The epoll fd is created first, so it is always below FD_SETSIZE: the 100 µs scans hold
however many fds the mock has open.)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import select
import time
from collections.abc import Callable

__all__ = ["EPOLL_MIN_TIMEOUT", "Loop", "TimerHandle"]

EPOLL_MIN_TIMEOUT = 1e-3
"""Timeouts from here up are waited in epoll_wait (rounded up to the next ms); shorter
ones (the monitor scan's 100 µs, the storm's 50 µs) in select() on the epoll fd."""
_EVENTS = select.EPOLLIN  # EPOLLHUP and EPOLLERR are always reported, as select() sees them


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
        self._epoll = select.epoll()
        self._epfd = [self._epoll.fileno()]
        self._readers: dict[int, Callable[[], None]] = {}
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
        with contextlib.suppress(FileExistsError):  # the same open file: a new callback
            self._epoll.register(fd, _EVENTS)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):  # closed: gone from the set with its file
                self._epoll.unregister(fd)

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
        # One turn, on every packet's path: kept to few calls (no helpers for the
        # common case, the callbacks called here directly).
        monotonic = time.monotonic
        now = monotonic()
        timeout: float | None = None
        if self.scan is not None:
            try:
                timeout = self.scan(now)
            except Exception as exc:
                if self.on_error is None:
                    raise
                self.on_error(exc)
                timeout = 0.001
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if timers:
            until = timers[0][0] - now
            if until < 0.0:
                until = 0.0
            if timeout is None or until < timeout:
                timeout = until
        if timeout is None or timeout >= EPOLL_MIN_TIMEOUT:
            ready = self._epoll.poll(-1 if timeout is None else timeout)
        elif timeout <= 0.0 or select.select(self._epfd, [], [], timeout)[0]:
            ready = self._epoll.poll(0)
        else:
            ready = []
        readers = self._readers
        on_error = self.on_error
        for fd, _ in ready:
            callback = readers.get(fd)
            if callback is not None:
                if on_error is None:
                    callback()
                else:
                    try:
                        callback()
                    except Exception as exc:
                        on_error(exc)
            if self._stopped:
                return
        if timers:
            now = monotonic()
            while timers and timers[0][0] <= now:
                _, _, handle = heapq.heappop(timers)
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
