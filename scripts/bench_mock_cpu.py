#!/usr/bin/env python3
"""The mock host's own CPU per operation, next to the guest's (what bounds bench_channel.py).

Each workload runs against the echo device (or, for ``stream_in``, echo's ``send``
command) on kernel 6.18, in one fresh mock per run, and prints the CPU time the mock
process spent per operation (``/proc/<pid>/task/*/schedstat``: nanoseconds, not the
10 ms ticks of ``/proc/<pid>/stat``), the guest's (``time.process_time``) and the wall
time:

- ``caller``: ``send_request`` round trips, one at a time, in caller-driven dispatch;
- ``raw``: the same echo round trip at the ring level (:class:`pyvmbus.mock.guest.RawGuest`);
- ``pipelined``: asyncio ``ch.request`` 64 deep;
- ``stream_in``: the host posts 64 B packets, the guest's on_packet counts them;
- ``stream_out``: the guest sends 64 B packets to a host that only reads (null model);
  ``stream_out_batch``: the same with ``send_batch`` of 16.

    python scripts/bench_mock_cpu.py                 # every workload once
    python scripts/bench_mock_cpu.py caller pipelined --repeat 3
    python scripts/bench_mock_cpu.py --json

To compare two trees, run this script with ``PYTHONPATH=<other tree>/src`` (the mock
process is started from the same package, so it runs that tree's mock too).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvmbus.bus import Vmbus
from pyvmbus.channel import Channel
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.guest import RawGuest
from pyvmbus.mock.models import ECHO_CLASS_GUID
from pyvmbus.packet import PacketType


def task_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns (schedstat's first field)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far (/proc/<pid>/stat: 10 ms ticks, so only
    a long run splits its CPU time between Python and the kernel usefully)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def echo(mock: MockVmbus, model: str = "echo") -> str:
    guid = mock.add_device(ECHO_CLASS_GUID, monitored=False, model=model)
    Vmbus(mock.root).bind(guid)
    return str(guid)


def measure(mock: MockVmbus, n: int, work: Callable[[], None]) -> dict[str, Any]:
    pid = mock.pid
    assert pid is not None
    u0, s0 = user_sys(pid)
    m0, c0, t0 = task_cpu_ns(pid), time.process_time(), time.perf_counter()
    work()
    t1, c1, m1 = time.perf_counter(), time.process_time(), task_cpu_ns(pid)
    u1, s1 = user_sys(pid)
    return {"n": n, "mock_cpu_us": round((m1 - m0) / n / 1e3, 2),
            "mock_user_sys_us": (round((u1 - u0) / n * 1e6, 1), round((s1 - s0) / n * 1e6, 1)),
            "guest_cpu_us": round((c1 - c0) / n * 1e6, 2), "wall_us": round((t1 - t0) / n * 1e6, 2),
            "per_s": round(n / (t1 - t0))}


def caller(mock: MockVmbus, n: int) -> dict[str, Any]:
    ch = Vmbus(mock.root).channel(echo(mock), dispatch="caller")
    ch.enable()
    try:
        for _ in range(n // 10):  # warm up
            ch.send_request(b"x" * 64, timeout=10)

        def work() -> None:
            payload = b"x" * 64
            for _ in range(n):
                ch.send_request(payload, timeout=10)

        return measure(mock, n, work)
    finally:
        ch.disable()


def raw(mock: MockVmbus, n: int) -> dict[str, Any]:
    guest = RawGuest(mock.root, echo(mock), unmask_with_write=False)
    try:
        payload = b"x" * 64

        def trip(i: int) -> None:
            guest.primary.send(payload, PacketType.DATA_INBAND, 1, i)
            pkt = guest.recv(5)
            assert pkt is not None and pkt.transaction_id == i

        for i in range(n // 10):
            trip(i + 1)

        def work() -> None:
            for i in range(n):
                trip(i + 1)

        return measure(mock, n, work)
    finally:
        guest.close()


def pipelined(mock: MockVmbus, n: int, window: int = 64) -> dict[str, Any]:
    ch = Vmbus(mock.root).channel(echo(mock))
    out: dict[str, Any] = {}

    async def main() -> None:
        nxt = 0

        async def lane(count: int) -> None:
            nonlocal nxt
            while nxt < count:
                nxt += 1
                await ch.request(b"x" * 64, timeout=20)

        async with ch.enabled():
            await asyncio.gather(*(lane(n // 10) for _ in range(window)))  # warm up
            nxt = 0
            pid = mock.pid
            assert pid is not None
            u0, s0 = user_sys(pid)
            m0, c0, t0 = task_cpu_ns(pid), time.process_time(), time.perf_counter()
            await asyncio.gather(*(lane(n) for _ in range(window)))
            t1, c1, m1 = time.perf_counter(), time.process_time(), task_cpu_ns(pid)
            u1, s1 = user_sys(pid)
            out.update(n=n, mock_cpu_us=round((m1 - m0) / n / 1e3, 2),
                       mock_user_sys_us=(round((u1 - u0) / n * 1e6, 1), round((s1 - s0) / n * 1e6, 1)),
                       guest_cpu_us=round((c1 - c0) / n * 1e6, 2), wall_us=round((t1 - t0) / n * 1e6, 2),
                       per_s=round(n / (t1 - t0)))

    asyncio.run(main())
    return out


def stream_in(mock: MockVmbus, n: int, size: int = 64) -> dict[str, Any]:
    guid = echo(mock)
    ch = Vmbus(mock.root).channel(guid, dispatch="caller")
    got = 0

    def on_packet(c: Channel, p: object) -> None:
        nonlocal got
        got += 1

    ch.on_packet(on_packet)
    ch.enable()
    try:
        def work() -> None:
            target = got + n
            cmd = threading.Thread(target=mock.command, args=(guid, "send"),
                                   kwargs={"payload": b"h" * size, "count": n})
            cmd.start()
            while got < target:
                ch.poll(0.01)
            cmd.join(10)

        mock.command(guid, "send", payload=b"h" * size, count=n // 10)
        while got < n // 10:
            ch.poll(0.01)
        return measure(mock, n, work)
    finally:
        ch.disable()


def stream_out(mock: MockVmbus, n: int, size: int = 64, batch: int = 1) -> dict[str, Any]:
    guid = echo(mock, "null")
    ch = Vmbus(mock.root).channel(guid, dispatch="caller")
    ch.enable()
    try:
        payload = b"s" * size
        n = n // batch * batch

        def work() -> None:
            base = mock.host_stats(guid)["packets_in"]
            if batch == 1:
                for _ in range(n):
                    ch.send(payload, timeout=10)
            else:
                group = [payload] * batch
                for _ in range(n // batch):
                    ch.send_batch(group, timeout=10)
            while mock.host_stats(guid)["packets_in"] < base + n:
                ch.poll(0.001)

        return measure(mock, n, work)
    finally:
        ch.disable()


WORKLOADS: dict[str, tuple[Callable[[MockVmbus, int], dict[str, Any]], int]] = {
    "caller": (caller, 5000),
    "raw": (raw, 5000),
    "pipelined": (pipelined, 20000),
    "stream_in": (stream_in, 20000),
    "stream_out": (stream_out, 20000),
    "stream_out_batch": (lambda mock, n: stream_out(mock, n, batch=16), 40000),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workloads", nargs="*", choices=[*WORKLOADS, []], help="default: all")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each workload (a fresh mock each)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the operation counts")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    names = args.workloads or list(WORKLOADS)
    res: dict[str, Any] = {"load": os.getloadavg()[0]}
    for name in names:
        fn, n = WORKLOADS[name]
        runs = []
        for _ in range(args.repeat):
            with MockVmbus(kernel="6.18") as mock:
                runs.append(fn(mock, max(10, int(n * args.scale))))
            if not args.json:
                print(f"{name:10} {runs[-1]}  (load {os.getloadavg()[0]:.2f})", flush=True)
        res[name] = runs
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
