#!/usr/bin/env python3
"""Benchmark the ring engine against a numpy copy floor measured in the same run.

For 64 B, 4 KiB and 64 KiB payloads it measures write+read pairs per second through one
ring, with the single-packet API (write(); read()) and the batch API (write_batch();
read_batch()), and the numpy floor: the two copies a pair cannot avoid (the payload
into the ring's data area, and back out into a new buffer), done with numpy slicing at
the same offsets. GB/s counts payload bytes.

The contenders take turns in short rounds, so background load hits them alike. Each
figure is the best round (the median in brackets); "vs floor" is the median over rounds
of (contender / floor of the same round), which is the figure least moved by noise.

    python scripts/bench_ring.py            # ~20 s
    python scripts/bench_ring.py --quick    # ~5 s
    python scripts/bench_ring.py --json     # one JSON object (for docs/performance.md)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pyvmbus import shm
from pyvmbus.packet import packet_size
from pyvmbus.ring import RingBuffer

__all__ = ["main"]

SIZES = (64, 4096, 65536)
RING_SIZE = 2 * 1024 * 1024  # uio_hv_generic's default per direction (SZ_2M): header + data
HEADER = 4096
TARGET_SINGLE_64 = 400_000
TARGET_FLOOR_RATIO_64K = 0.75
TARGET_BATCH_64 = 3_000_000

Runner = Callable[[], int]  # runs some pairs, returns how many


def single(size: int, data_size: int) -> Runner:
    ring = RingBuffer.init(bytearray(HEADER + data_size))
    payload = os.urandom(size)
    write, read = ring.write, ring.read
    n = 2000 if size <= 4096 else 200

    def run() -> int:
        for _ in range(n):
            write(payload)
            read()
        return n

    return run


def batch(size: int, data_size: int) -> tuple[Runner, int]:
    ring = RingBuffer.init(bytearray(HEADER + data_size))
    payload = os.urandom(size)
    count = max(1, min(256, (data_size - 8) // packet_size(size) // 2))
    packets = [(payload, 6, 0, i) for i in range(count)]
    write_batch, read_batch = ring.write_batch, ring.read_batch
    reps = max(1, 4000 // count)

    def run() -> int:
        for _ in range(reps):
            write_batch(packets)
            read_batch(count)
        return reps * count

    return run, count


def floor(size: int, data_size: int) -> Runner:
    """numpy: the payload into a ring-sized array at the ring's offsets, and out into a new array."""
    ring = np.zeros(data_size, dtype=np.uint8)
    src = np.frombuffer(os.urandom(size), dtype=np.uint8)
    step = packet_size(size)
    n = 2000 if size <= 4096 else 200
    starts = [(i * step) % (data_size - step) for i in range(n)]

    def run() -> int:
        for pos in starts:
            ring[pos : pos + size] = src
            ring[pos : pos + size].copy()
        return n

    return run


def interleaved(runners: dict[str, Runner], seconds: float, rounds: int) -> dict[str, list[float]]:
    """pairs/s of each runner in each of ``rounds`` rounds, the runners taking turns."""
    for run in runners.values():
        run()  # warm up: struct caches, page faults
    rates: dict[str, list[float]] = {name: [] for name in runners}
    per_turn = seconds / rounds / len(runners)
    for _ in range(rounds):
        for name, run in runners.items():
            done = 0
            start = time.perf_counter()
            while (elapsed := time.perf_counter() - start) < per_turn:
                done += run()
            rates[name].append(done / elapsed)
    return rates


def primitive_costs() -> dict[str, float]:
    """ns per call of the operations a packet cannot avoid: what bounds the batch figures."""
    import struct
    import timeit

    from pyvmbus.packet import Packet, _make_packet

    buf = bytearray(HEADER + 65536)
    view = memoryview(buf)
    data = view[HEADER:]
    payload = os.urandom(64)
    desc = struct.Struct("<HHHHQ")
    packer = struct.Struct("<HHHHQ64sQ").pack_into
    both = struct.Struct("<HHHHQ64s").unpack_from
    env = {
        "shm": shm, "view": view, "data": data, "payload": payload, "desc": desc, "packer": packer,
        "both": both, "Packet": Packet, "make": _make_packet,
    }  # fmt: skip
    stmts = {
        "seq_cst load32": "shm.load32(view, 4)",
        "seq_cst store32": "shm.store32(view, 4, 0)",
        "fence": "shm.fence()",
        "64 B packet into the ring (one pack_into)": "packer(data, 0, 6, 2, 10, 0, 1, payload, 0)",
        "descriptor out (unpack_from)": "desc.unpack_from(data, 0)",
        "64 B payload out (slice + tobytes)": "data[16:80].tobytes()",
        "descriptor + 64 B payload out (one unpack_from)": "both(data, 0)",
        "Packet via the frozen dataclass __init__": "Packet(6, 0, 1, payload)",
        "Packet as the ring builds it": "make(6, 0, 1, payload, b'', None, None)",
        "4-tuple (the cheapest object)": "(6, 0, 1, payload)",
    }
    out = {}
    for name, stmt in stmts.items():
        best = min(timeit.repeat(stmt, globals=env, number=100_000, repeat=7))
        out[name] = best / 100_000 * 1e9
    return out


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "atomics": shm.BACKEND,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def measure(seconds: float, rounds: int, data_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "ring_data_size": data_size, "rounds": rounds, "sizes": {}}
    for size in SIZES:
        batch_run, count = batch(size, data_size)
        rates = interleaved(
            {"floor": floor(size, data_size), "single": single(size, data_size), "batch": batch_run},
            seconds,
            rounds,
        )
        row: dict[str, Any] = {"batch_count": count}
        for name, series in rates.items():
            ratios = [x / f for x, f in zip(series, rates["floor"], strict=True)]
            row[name] = {
                "best": max(series),
                "median": statistics.median(series),
                "vs_floor": statistics.median(ratios),
                "vs_floor_best": max(series) / max(rates["floor"]),
            }
        out["sizes"][size] = row
    s = out["sizes"]
    out["targets"] = {
        "single 64 B >= 400k pairs/s": s[64]["single"]["best"] >= TARGET_SINGLE_64,
        "single 64 KiB >= 0.75 x numpy floor": s[65536]["single"]["vs_floor"] >= TARGET_FLOOR_RATIO_64K,
        "batch 64 B >= 3M pairs/s": s[64]["batch"]["best"] >= TARGET_BATCH_64,
    }
    return out


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"pyvmbus ring benchmark {m['date']}: Python {m['python']}, numpy {m['numpy']}, "
        f"{m['cpus']} CPUs ({m['cpu']}), atomics={m['atomics']}, load average {m['load_avg_1m']}",
        f"ring: {HEADER} B header + {res['ring_data_size']:,} B data; {res['rounds']} interleaved rounds",
        "",
        f"{'payload':>8} {'API':>10} {'pairs/s best':>13} {'(median)':>11} {'GB/s':>6} {'vs floor':>9}",
    ]
    for size, row in res["sizes"].items():
        for name in ("floor", "single", "batch"):
            r = row[name]
            label = f"batch/{row['batch_count']}" if name == "batch" else name
            lines.append(
                f"{_size(int(size)):>8} {label:>10} {r['best']:>13,.0f} ({r['median']:>9,.0f}) "
                f"{r['best'] * int(size) / 1e9:>6.2f} {r['vs_floor']:>8.2f}x"
            )
    lines += ["", "targets:"]
    lines += [f"  [{'met' if ok else 'NOT met'}] {text}" for text, ok in res["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short rounds, ~5 s in all")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--ring-size", type=int, default=RING_SIZE, help="bytes per ring, header included (default 2 MiB)"
    )
    args = ap.parse_args(argv)
    seconds, rounds = (1.5, 6) if args.quick else (6.0, 15)
    data_size = args.ring_size - HEADER
    if data_size < 2 * packet_size(max(SIZES)) or data_size % 8:
        ap.error(f"--ring-size must leave a multiple of 8 bytes, at least {2 * packet_size(max(SIZES))}")
    res = measure(seconds, rounds, data_size)
    res["primitive_ns"] = primitive_costs()
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(report(res))
    print("\nper-call cost of what every packet needs (ns, best of 7):")
    for name, ns in res["primitive_ns"].items():
        print(f"  {ns:7.0f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
