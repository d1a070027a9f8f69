"""Two processes, one device: race binds and enables through the mock and count what happens.

Issue 10's experiment, run against pyvmbus's device lock: two processes bind the same
device at the same moment (``--binds`` trials), and two processes enable it and send
``--requests`` requests each (``--enables`` trials). Each trial must end with exactly one
winner; the loser must be refused (AlreadyBound after waiting for the bind, DeviceBusy
for the enable), never both "success", never a timeout, never another process's reply.
Also prints what a lock costs (acquire + release in one process, and UioDevice.open with
and without it).

    python scripts/race_devlock.py --binds 100 --enables 13 --requests 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any


def child(root: str, guid: str) -> None:
    """One racer: a command a line on stdin, a JSON answer a line on stdout."""
    from pyvmbus import Vmbus
    from pyvmbus.binding import bind
    from pyvmbus.errors import VmbusError

    bus = Vmbus(root)
    ch = None
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "bind":
                out: dict[str, Any] = {"ok": bind(root, guid, timeout=20)}
            elif words[0] == "enable":
                new = bus.channel(guid)
                new.enable()
                ch = new
                wrong = 0
                for i in range(int(words[1])):
                    payload = f"{words[2]}:{i}".encode()
                    if ch.send_request(payload, timeout=10).rstrip(b"\0") != payload:
                        wrong += 1
                out = {"ok": True, "wrong": wrong}
            elif words[0] == "disable":
                if ch is not None:
                    ch.disable()
                out = {"ok": True}
            else:
                return
        except VmbusError as exc:
            out = {"error": type(exc).__name__, "message": str(exc)[:200]}
        print(json.dumps(out), flush=True)


class Racer:
    def __init__(self, root: Path, guid: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", __file__, "--child", str(root), guid],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self.read()["ready"])

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"racer {self.proc.pid} died")
        return dict(json.loads(line))

    def close(self) -> None:
        self.send("quit")
        self.proc.wait(timeout=20)


def race_binds(trials: int, kernel: str) -> Counter[str]:
    from pyvmbus.binding import restore
    from pyvmbus.mock import MockVmbus

    outcomes: Counter[str] = Counter()
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("heartbeat")
        a, b = Racer(mock.root, guid), Racer(mock.root, guid)
        try:
            for _ in range(trials):
                a.send("bind")
                b.send("bind")
                ra, rb = a.read(), b.read()
                oks = sum("ok" in r for r in (ra, rb))
                errors = sorted(r["error"] for r in (ra, rb) if "error" in r)
                if oks == 1 and errors == ["AlreadyBound"]:
                    outcomes["one bound, the other waited and saw AlreadyBound"] += 1
                elif oks == 1 and errors == ["DeviceBusy"]:
                    outcomes["one bound, the other refused busy"] += 1
                elif oks == 2:
                    outcomes["BOTH reported success"] += 1
                else:
                    outcomes[f"other: {ra} / {rb}"] += 1
                if "Timeout" in errors:
                    outcomes["a Timeout"] += 1
                restore(mock.root, guid)
        finally:
            a.close()
            b.close()
    return outcomes


def race_enables(trials: int, requests: int, kernel: str) -> Counter[str]:
    from pyvmbus.binding import bind
    from pyvmbus.mock import MockVmbus

    outcomes: Counter[str] = Counter()
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo", monitored=True)
        bind(mock.root, guid)
        a, b = Racer(mock.root, guid), Racer(mock.root, guid)
        try:
            for t in range(trials):
                a.send(f"enable {requests} a{t}")
                b.send(f"enable {requests} b{t}")
                ra, rb = a.read(), b.read()
                winners = [(r, p) for r, p in ((ra, a), (rb, b)) if r.get("ok")]
                losers = [r for r in (ra, rb) if not r.get("ok")]
                if len(winners) == 1 and losers[0].get("error") == "DeviceBusy":
                    outcomes["one enabled, the other refused busy"] += 1
                    outcomes["requests answered"] += requests
                    outcomes["requests with another process's reply"] += winners[0][0]["wrong"]
                    if str(winners[0][1].pid) not in losers[0]["message"]:
                        outcomes["refusal without the holder's pid"] += 1
                elif len(winners) == 2:
                    outcomes["BOTH enabled"] += 1
                else:
                    outcomes[f"other: {ra} / {rb}"] += 1
                for _, p in winners:
                    p.send("disable")
                    p.read()
        finally:
            a.close()
            b.close()
    return outcomes


def lock_costs() -> dict[str, float]:
    from pyvmbus import devlock
    from pyvmbus.binding import bind
    from pyvmbus.mock import MockVmbus
    from pyvmbus.uio import UioDevice

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
        devlock.acquire(tmp, guid, "open").release()
        samples = []
        for _ in range(2000):
            t0 = time.perf_counter()
            devlock.acquire(tmp, guid, "open").release()
            samples.append(time.perf_counter() - t0)
        out["acquire + release (us, median)"] = statistics.median(samples) * 1e6
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        name = bind(mock.root, guid)
        opens: dict[bool, list[float]] = {True: [], False: []}
        for i in range(400):  # interleaved: the machine's load falls on both alike
            exclusive = i % 2 == 0
            t0 = time.perf_counter()
            UioDevice.open(mock.root, name, guid, exclusive=exclusive).close()
            opens[exclusive].append(time.perf_counter() - t0)
        for exclusive, samples in opens.items():
            key = f"UioDevice.open + close (mock), exclusive={exclusive} (us, median)"
            out[key] = statistics.median(samples) * 1e6
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binds", type=int, default=100)
    ap.add_argument("--enables", type=int, default=13)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--kernel", default="6.18")
    args = ap.parse_args()
    t0 = time.monotonic()
    print(f"two simultaneous binds, {args.binds} trials (kernel {args.kernel}):")
    for what, n in sorted(race_binds(args.binds, args.kernel).items()):
        print(f"  {n:6d}  {what}")
    print(f"two simultaneous enables + {args.requests} requests each, {args.enables} trials:")
    for what, n in sorted(race_enables(args.enables, args.requests, args.kernel).items()):
        print(f"  {n:6d}  {what}")
    print("what the lock costs:")
    for what, v in lock_costs().items():
        print(f"  {v:9.1f}  {what}")
    print(f"({time.monotonic() - t0:.1f} s)")


if __name__ == "__main__":
    main()
