#!/usr/bin/env python3
"""The fault storm: requests under random rescind / re-offer / stall / storm / crash /
corrupt headers, on every mock kernel generation, with a count and a time bound.

Each round takes the next generation, starts a mock VMBus (again, if the last round
crashed its host), offers an echo device, binds it and enables a channel in a random
dispatch mode ("thread" or "caller"); WORKERS threads then send requests with random
payloads while the injector applies random faults. A fault that closes the channel is
followed by what a user would do: re-offer and re-bind after a rescind, enable again after
a corrupt header, a new mock after a crash. Every request ends in exactly one class:

- answered: the reply is the request's own payload (padded to 8), byte for byte;
- failed:   a pyvmbus error with a message (ChannelClosed naming why, Timeout in a stall,
            DeviceRescinded ...);
- lost:     a reply with the wrong bytes (someone else's, or corrupted), an error that is
            not a pyvmbus error (a bug), or a request left pending after its channel closed;
- hung:     a request that had not returned REQUEST_TIMEOUT + 10 s after it started.

lost and hung must be 0: the script exits 1 otherwise. Figures go to stdout (``--json``
for one JSON object). docs/reliability.md records a long run.

    python scripts/soak.py --seconds 60              # about a minute, every generation
    python scripts/soak.py --count 100000 --seconds 3600 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pyvmbus import ChannelClosed, VmbusError
from pyvmbus.bus import Vmbus
from pyvmbus.channel import Channel
from pyvmbus.errors import DeviceRescinded
from pyvmbus.lifecycle import ChannelState
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS

FAULTS = ("rescind", "stall", "storm", "crash", "corrupt", "header", "descriptor")
HEADER_WORDS = (("rx", "write_index"), ("rx", "read_index"), ("rx", "interrupt_mask"),
                ("rx", "pending_send_sz"), ("tx", "write_index"), ("tx", "read_index"),
                ("tx", "interrupt_mask"), ("tx", "pending_send_sz"))


@dataclass
class Tally:
    answered: int = 0
    failed: int = 0
    lost: int = 0
    hung: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lost_detail: list[str] = field(default_factory=list)
    rounds: int = 0
    restores: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, detail: str = "") -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            if kind == "failed":
                self.errors[detail] += 1
            elif kind in ("lost", "hung") and len(self.lost_detail) < 20:
                self.lost_detail.append(f"{kind}: {detail}")

    @property
    def total(self) -> int:
        return self.answered + self.failed + self.lost + self.hung


def error_class(exc: BaseException) -> str:
    """A short name for the failed-requests table: the type and, for a close, why."""
    if isinstance(exc, ChannelClosed):
        return f"ChannelClosed({exc.reason.split(':')[0].split(' (')[0]})"
    return type(exc).__name__


class Round:
    """One generation, one mock (reused until a crash), one channel, WORKERS senders."""

    def __init__(self, args: argparse.Namespace, tally: Tally, mock: MockVmbus, rng: random.Random) -> None:
        self.args = args
        self.tally = tally
        self.mock = mock
        self.rng = rng
        self.bus = Vmbus(mock.root)
        self.guid = mock.add_device("echo", monitored=True)
        self.bus.bind(self.guid)
        self.mode = rng.choice(args.modes)
        timeout = args.request_timeout
        self.ch: Channel = self.bus.channel(self.guid, dispatch=self.mode, request_timeout=timeout,
                                            send_timeout=timeout)
        self.stop = threading.Event()
        self.crashed = False
        self.started: dict[int, float] = {}  # worker -> start of its request in flight
        self.flagged: set[int] = set()
        self.budget = args.count

    # -- senders ---------------------------------------------------------------------------
    def worker(self, wid: int) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            if self.tally.total >= self.budget:
                self.stop.set()
                return
            ch = self.ch
            if ch.state is not ChannelState.RUNNING:
                time.sleep(0.005)
                continue
            payload = os.urandom(rng.choice((1, 8, 13, 64, 200, 1500)))
            self.started[wid] = time.monotonic()
            try:
                reply = ch.send_request(payload)
            except VmbusError as exc:
                kind, detail = "failed", error_class(exc)
                if not str(exc):
                    kind, detail = "lost", f"{type(exc).__name__} without a message"
            except Exception as exc:  # a bug: not a pyvmbus error
                kind, detail = "lost", f"{type(exc).__name__}: {exc}"
            else:
                padded = payload + bytes(-len(payload) % 8)
                kind, detail = ("answered", "") if reply == padded else (
                    "lost", f"wrong reply ({len(reply)} bytes for {len(payload)})")
            finally:
                self.started.pop(wid, None)
            if wid in self.flagged:
                self.flagged.discard(wid)  # counted as hung already; its late end is not counted again
                continue
            self.tally.add(kind, detail)

    def watchdog(self) -> None:
        limit = self.args.request_timeout + 10.0
        while not self.stop.wait(0.5):
            now = time.monotonic()
            for wid, t0 in list(self.started.items()):
                if now - t0 > limit and wid not in self.flagged:
                    self.flagged.add(wid)
                    self.tally.add("hung", f"worker {wid} in {self.mode} mode on {self.mock.generation.name}")

    # -- faults ----------------------------------------------------------------------------
    def inject(self, fault: str) -> None:
        try:
            self._inject(fault)
        except ChannelClosed:  # a header/descriptor fault while the channel was closed
            self.tally.faults[f"{fault} (refused: not open)"] += 1
            self.tally.faults[fault] -= 1
        if not self.crashed and self.ch.state is not ChannelState.RUNNING:
            self.restore(reoffer=False)

    def _inject(self, fault: str) -> None:
        m, g, rng = self.mock, self.guid, self.rng
        self.tally.faults[fault] += 1
        if fault == "rescind":
            m.rescind(g)
            time.sleep(rng.uniform(0.0, 0.3))
            self.restore(reoffer=True)
        elif fault == "stall":
            m.fault(g, "stall")
            time.sleep(rng.uniform(0.05, min(1.0, self.args.request_timeout / 2)))
            m.fault(g, "resume")
        elif fault == "storm":
            m.fault(g, "storm", count=rng.choice((100, 1000, 5000)))
        elif fault == "crash":
            m.fault(g, "crash")
            self.crashed = True
        elif fault == "corrupt":
            m.fault(g, "corrupt")
        elif fault == "header":
            ring, word = rng.choice(HEADER_WORDS)
            dsize = 1 << 20
            value = rng.choice((7, dsize * 4 + 1, 0xFFFFFFFF, rng.randrange(2, 1 << 32)))
            with_args: dict[str, Any] = {"ring": ring, "field": word, "value": value}
            if word.endswith("_index") and rng.random() < 0.5:
                with_args = {"ring": ring, "field": word, "add": 8 * rng.randrange(1, 64)}
            m.fault(g, "header", **with_args)
        elif fault == "descriptor":
            m.fault(g, "descriptor", offset8=rng.choice((0, 1, 5, 0xFFFF)), len8=rng.choice((0, 1, 4, 0x200)),
                    type=rng.randrange(0, 1 << 16), transaction_id=rng.randrange(0, 1 << 64))

    def settled(self) -> bool:
        """Running, or closed with its teardown done (the device and its lock let go)."""
        state = self.ch.state
        if state is ChannelState.RUNNING:
            return True
        disp = self.ch.dispatcher
        return state is ChannelState.DISABLED and (disp is None or disp.closed)

    def restore(self, reoffer: bool) -> None:
        """What a user does after a close: wait for it, re-offer/re-bind, enable again."""
        deadline = time.monotonic() + 15
        while not self.settled():
            if time.monotonic() > deadline:
                raise RuntimeError(f"channel stuck in {self.ch.state.value}")
            time.sleep(0.005)
        if reoffer:
            if self.ch.state is ChannelState.RUNNING:  # the rescind raced an idle channel
                deadline = time.monotonic() + 5
                while self.ch.state is ChannelState.RUNNING and time.monotonic() < deadline:
                    if self.mode == "caller":
                        self.ch.poll(0.05)
                    time.sleep(0.005)
                if self.ch.state is not ChannelState.DISABLED:
                    self.ch.disable()
                while not self.settled():
                    time.sleep(0.005)
            self.mock.reoffer(self.guid)
            deadline = time.monotonic() + 15
            while True:
                try:
                    dev = self.bus.device(self.guid)
                    if dev.exists() and dev.relid > 0:
                        break
                except VmbusError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the re-offered device did not appear")
                time.sleep(0.01)
            if self.bus.device(self.guid).uio_name is None:
                self.bus.bind(self.guid)
        if self.ch.state is ChannelState.DISABLED:
            for attempt in range(50):
                try:
                    self.ch.enable()
                    break
                except (DeviceRescinded, ChannelClosed, VmbusError):
                    if attempt == 49:
                        raise
                    time.sleep(0.02)
            self.tally.restores += 1

    def run(self, seconds: float) -> None:
        self.ch.enable()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(self.args.workers)]
        dog = threading.Thread(target=self.watchdog, daemon=True)
        for t in (*threads, dog):
            t.start()
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end and not self.stop.is_set() and not self.crashed:
                time.sleep(self.rng.uniform(0.05, self.args.fault_every * 2))
                if self.stop.is_set():
                    break
                self.inject(self.rng.choice(self.args.faults))
        finally:
            self.stop.set()
            for t in threads:
                t.join(self.args.request_timeout + 15)
            dog.join(5)
            if not self.crashed:
                if self.ch.state is not ChannelState.DISABLED:
                    self.ch.disable()
                pending = self.ch.info()["outstanding_requests"]
                if pending:
                    self.tally.add("lost", f"{pending} requests pending after close")
                self.mock.remove_device(self.guid)
        self.tally.rounds += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000, help="stop after this many requests (default 1e6)")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this long (default 60)")
    p.add_argument("--kernels", default=",".join(GENERATIONS),
                   help="comma-separated mock kernel generations (default: all)")
    p.add_argument("--modes", default="thread,caller",
                   help="dispatch modes to pick from (default thread,caller)")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"faults to pick from (default {','.join(FAULTS)})")
    p.add_argument("--workers", type=int, default=3, help="sending threads per channel (default 3)")
    p.add_argument("--round", type=float, default=5.0, help="seconds per round (one generation; default 5)")
    p.add_argument("--fault-every", type=float, default=0.5, help="mean seconds between faults (default 0.5)")
    p.add_argument("--request-timeout", type=float, default=3.0, help="send_request timeout (default 3)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    logging.getLogger("pyvmbus").setLevel(logging.ERROR)  # each corrupt close warns; the tally counts them
    for name, value in (("--count", args.count), ("--workers", args.workers)):
        if value < 1:
            p.error(f"{name} must be at least 1")
    for name, value in (("--seconds", args.seconds), ("--round", args.round),
                        ("--fault-every", args.fault_every), ("--request-timeout", args.request_timeout)):
        if not 0 < value < 1e7:
            p.error(f"{name} must be a positive number of seconds")
    args.kernels = [k for k in args.kernels.split(",") if k]
    args.modes = [m for m in args.modes.split(",") if m]
    args.faults = [f for f in args.faults.split(",") if f]
    for what, values, known in (("kernel", args.kernels, GENERATIONS),
                                ("mode", args.modes, ("thread", "caller")), ("fault", args.faults, FAULTS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"unknown {what} {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.seconds
    mocks: dict[str, MockVmbus] = {}
    i = 0
    try:
        while time.monotonic() < deadline and tally.total < args.count:
            gen = args.kernels[i % len(args.kernels)]
            i += 1
            mock = mocks.get(gen)
            if mock is None:
                mock = mocks[gen] = MockVmbus(kernel=gen).start()
            rnd = Round(args, tally, mock, rng)
            rnd.run(min(args.round, max(0.5, deadline - time.monotonic())))
            if rnd.crashed:
                mocks.pop(gen).close()
    finally:
        for m in mocks.values():
            m.close()
    elapsed = time.monotonic() - start
    result = {
        "requests": tally.total, "answered": tally.answered, "failed": tally.failed, "lost": tally.lost,
        "hung": tally.hung, "seconds": round(elapsed, 1), "rounds": tally.rounds, "restores": tally.restores,
        "faults": dict(sorted(tally.faults.items())), "failed_by_error": dict(tally.errors.most_common()),
        "lost_detail": tally.lost_detail, "seed": seed, "kernels": args.kernels, "modes": args.modes,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"{platform.system()} {platform.release()}",
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"requests {tally.total} in {elapsed:.1f} s ({tally.rounds} rounds, seed {seed}, "
              f"kernels {','.join(args.kernels)}, modes {','.join(args.modes)})")
        print(f"  answered                 {tally.answered}")
        print(f"  failed with a clear error {tally.failed}")
        for name, n in tally.errors.most_common():
            print(f"      {name:<30} {n}")
        print(f"  lost (must be 0)         {tally.lost}")
        print(f"  hung (must be 0)         {tally.hung}")
        print(f"  faults injected          {sum(tally.faults.values())}: "
              + ", ".join(f"{k} {v}" for k, v in sorted(tally.faults.items())))
        print(f"  channel restores         {tally.restores}")
        for line in tally.lost_detail:
            print(f"  ! {line}")
        print(f"  machine                  {result['machine']}")
    return 1 if tally.lost or tally.hung else 0


if __name__ == "__main__":
    sys.exit(main())
