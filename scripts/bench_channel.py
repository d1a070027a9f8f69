#!/usr/bin/env python3
"""Benchmark Channel through the mock host, next to a bare fd ping-pong measured in the same run.

Figures (nothing is asserted):

- ``pingpong``: a 4-byte SOCK_SEQPACKET ping-pong between two processes, the floor of
  any round trip that crosses into another process and back;
- ``raw``: the same echo round trip done by hand at the ring level (no channel layer:
  write, signal, blocking read, re-check), i.e. what the mock host itself costs;
- ``rtt_*``: ``send_request`` round trips (median, p99) against the echo device on
  6.18: the requester leading the dispatch itself (``caller``), with the background
  thread present (``thread``: it steps aside, the requester still leads), with a
  separate dispatcher thread that always holds the lead (``handoff``: the hand-off that
  leader/follower avoids), from asyncio, and a monitored channel (the host's ~100 us
  monitor scan);
- ``cpu_*``: CPU per request of this process and of the mock process (what bounds it);
- ``pipelined``: asyncio requests 64 deep;
- ``stream_out`` / ``stream_in``: one-way throughput guest -> host (a host that only
  reads) and host -> guest (the host posts, the guest's on_packet counts).

    python scripts/bench_channel.py            # ~40 s
    python scripts/bench_channel.py --quick    # ~15 s
    python scripts/bench_channel.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import struct
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


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p * len(s)))]


def summary(samples: list[float]) -> dict[str, float]:
    """Median and p99 in microseconds."""
    return {"median_us": round(statistics.median(samples) * 1e6, 1),
            "p99_us": round(pct(samples, 0.99) * 1e6, 1), "n": len(samples)}


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the floor ---------------------------------------------------------------------------------

def pingpong(n: int) -> list[float]:
    """4-byte SOCK_SEQPACKET ping-pong with a forked child (two processes, blocking reads)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        a.close()
        while True:
            msg = b.recv(4)
            if not msg:
                os._exit(0)
            b.send(msg)
    b.close()
    ping = struct.pack("=I", 1)
    out = []
    for i in range(n + n // 10):
        t = time.perf_counter()
        a.send(ping)
        a.recv(4)
        if i >= n // 10:
            out.append(time.perf_counter() - t)
    a.close()
    os.waitpid(pid, 0)
    return out


def raw_rtt(mock: MockVmbus, guid: str, n: int) -> list[float]:
    """The echo round trip at the ring level, without the channel layer (mock's RawGuest)."""
    out = []
    with RawGuest(mock.root, guid, unmask_with_write=False) as g:
        for i in range(n + n // 10):
            t = time.perf_counter()
            g.primary.send(b"x" * 64, PacketType.DATA_INBAND, 1, i + 1)
            pkt = g.recv(5)
            if i >= n // 10:
                out.append(time.perf_counter() - t)
            assert pkt is not None and pkt.transaction_id == i + 1
    return out


# -- channel round trips -----------------------------------------------------------------------

def echo_device(mock: MockVmbus, monitored: bool) -> str:
    guid = mock.add_device("echo", monitored=monitored)
    Vmbus(mock.root).bind(guid)
    return str(guid)


def timed_requests(ch: Channel, n: int, payload: bytes = b"x" * 64) -> list[float]:
    for _ in range(n // 10):
        ch.send_request(payload, timeout=10)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        ch.send_request(payload, timeout=10)
        out.append(time.perf_counter() - t)
    return out


def rtt(mock: MockVmbus, guid: str, dispatch: str, n: int) -> tuple[list[float], dict[str, float]]:
    """send_request round trips; also CPU per request of this process and the mock."""
    ch = Vmbus(mock.root).channel(guid, dispatch=dispatch)
    ch.enable()
    try:
        assert mock.pid is not None
        h0, g0 = proc_cpu(mock.pid), time.process_time()
        samples = timed_requests(ch, n)
        total = n + n // 10
        cpu = {"guest_cpu_us": round((time.process_time() - g0) / total * 1e6, 1),
               "mock_cpu_us": round((proc_cpu(mock.pid) - h0) / total * 1e6, 1)}
        return samples, cpu
    finally:
        ch.disable()


def rtt_handoff(mock: MockVmbus, guid: str, n: int) -> list[float]:
    """A dispatcher thread always holds the lead (ch.run()); the requester only follows."""
    ch = Vmbus(mock.root).channel(guid, dispatch="caller")
    ch.enable()
    runner = threading.Thread(target=ch.run, daemon=True)
    runner.start()
    time.sleep(0.05)
    try:
        return timed_requests(ch, n)
    finally:
        ch.disable()
        runner.join(5)


def rtt_asyncio(mock: MockVmbus, guid: str, n: int) -> list[float]:
    ch = Vmbus(mock.root).channel(guid)

    async def main() -> list[float]:
        out = []
        async with ch.enabled():
            for i in range(n + n // 10):
                t = time.perf_counter()
                await ch.request(b"x" * 64, timeout=10)
                if i >= n // 10:
                    out.append(time.perf_counter() - t)
        return out

    return asyncio.run(main())


def pipelined(mock: MockVmbus, guid: str, n: int, window: int = 64) -> dict[str, float]:
    ch = Vmbus(mock.root).channel(guid)

    async def main() -> float:
        nxt = 0

        async def lane() -> None:
            nonlocal nxt
            while nxt < n:
                nxt += 1
                await ch.request(b"x" * 64, timeout=20)

        async with ch.enabled():
            t = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(window)))
            return time.perf_counter() - t

    dt = asyncio.run(main())
    return {"requests_per_s": round(n / dt), "window": window, "n": n}


# -- one-way streaming -------------------------------------------------------------------------

def stream_out(mock: MockVmbus, size: int, n: int, batch: int = 1) -> dict[str, float]:
    """Guest -> host: send() (or send_batch() of ``batch``) n packets to a host that only
    reads (null model), until it has read them all."""
    guid = mock.add_device(ECHO_CLASS_GUID, monitored=False, model="null")
    Vmbus(mock.root).bind(guid)
    ch = Vmbus(mock.root).channel(guid, dispatch="caller")
    ch.enable()
    payload = b"s" * size
    try:
        t = time.perf_counter()
        if batch == 1:
            for _ in range(n):
                ch.send(payload, timeout=10)
        else:
            group = [payload] * batch
            for _ in range(n // batch):
                ch.send_batch(group, timeout=10)
        while mock.host_stats(guid)["packets_in"] < n:
            ch.poll(0.001)
        dt = time.perf_counter() - t
        return {"payload": size, "batch": batch, "packets_per_s": round(n / dt),
                "MB_per_s": round(n * size / dt / 1e6, 1), "ring_full_waits": ch.counters.ring_full_waits,
                "signals": ch.info()["counters"]["signals"], "n": n}
    finally:
        ch.disable()
        mock.remove_device(guid)


def stream_in(mock: MockVmbus, guid: str, size: int, n: int) -> dict[str, float]:
    """Host -> guest: the host posts n packets; the guest's on_packet counts them."""
    ch = Vmbus(mock.root).channel(guid, dispatch="caller")
    got = 0

    def on_packet(c: Channel, p: object) -> None:
        nonlocal got
        got += 1

    ch.on_packet(on_packet)
    ch.enable()
    try:
        done = threading.Event()
        t = time.perf_counter()
        cmd = threading.Thread(target=lambda: (mock.command(guid, "send", payload=b"h" * size, count=n),
                                               done.set()))
        cmd.start()
        while got < n:
            ch.poll(0.01)
        dt = time.perf_counter() - t
        cmd.join(10)
        return {"payload": size, "packets_per_s": round(n / dt), "MB_per_s": round(n * size / dt / 1e6, 1),
                "n": n, "interrupts": ch.info()["interrupts"]}
    finally:
        ch.disable()


# -- main --------------------------------------------------------------------------------------

def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    n = 2000 if quick else 5000
    res: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "kernel_generation": "6.18",
    }
    res["pingpong"] = summary(pingpong(n))
    log(f"ping-pong                       {res['pingpong']}")
    with MockVmbus(kernel="6.18") as mock:
        fast = echo_device(mock, monitored=False)
        res["raw"] = summary(raw_rtt(mock, fast, n))
        log(f"raw ring-level echo             {res['raw']}")
        for mode in ("caller", "thread"):
            samples, cpu = rtt(mock, fast, mode, n)
            res[f"rtt_{mode}"] = {**summary(samples), **cpu}
            log(f"send_request ({mode:6})          {res[f'rtt_{mode}']}")
        res["rtt_handoff"] = summary(rtt_handoff(mock, fast, n))
        log(f"send_request (hand-off)         {res['rtt_handoff']}")
        res["rtt_asyncio"] = summary(rtt_asyncio(mock, fast, n))
        log(f"await request (asyncio)         {res['rtt_asyncio']}")
        slow = echo_device(mock, monitored=True)
        samples, cpu = rtt(mock, slow, "caller", n // 4)
        res["rtt_monitored"] = {**summary(samples), **cpu}
        log(f"send_request (monitored)        {res['rtt_monitored']}")
        res["pipelined"] = pipelined(mock, fast, 10_000 if quick else 50_000)
        log(f"pipelined asyncio requests      {res['pipelined']}")
        for size in (64, 4096):
            count = (20_000 if size == 64 else 5_000) // (2 if quick else 1)
            res[f"stream_out_{size}"] = stream_out(mock, size, count)
            log(f"one-way guest->host {size:5} B     {res[f'stream_out_{size}']}")
            res[f"stream_out_batch_{size}"] = stream_out(mock, size, count, batch=16)
            log(f"  ... send_batch of 16          {res[f'stream_out_batch_{size}']}")
            res[f"stream_in_{size}"] = stream_in(mock, fast, size, count)
            log(f"one-way host->guest {size:5} B     {res[f'stream_in_{size}']}")
    res["pingpong_after"] = summary(pingpong(n))
    log(f"ping-pong (again)               {res['pingpong_after']}")
    pp = min(res["pingpong"]["median_us"], res["pingpong_after"]["median_us"])
    res["ratio_caller_to_pingpong"] = round(res["rtt_caller"]["median_us"] / pp, 2)
    res["ratio_raw_to_pingpong"] = round(res["raw"]["median_us"] / pp, 2)
    log(f"median round trip / ping-pong: channel {res['ratio_caller_to_pingpong']}x, "
        f"raw ring-level {res['ratio_raw_to_pingpong']}x")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (~15 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    res = run(args.quick, (lambda s: None) if args.json else print)
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
