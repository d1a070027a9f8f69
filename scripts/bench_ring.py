#!/usr/bin/env python3
"""Benchmark the ring engines against copy floors measured in the same run.

For 64 B, 4 KiB and 64 KiB payloads it measures write+read pairs per second through one
ring, for each engine ("c": pyvmbus._ring, "python": ring.py) and API:

- single: ``write(payload); read()``;
- batch: ``write_batch(k specs); read_batch(k)`` (a Packet per packet);
- into (C engine): ``write_batch(k specs); read_into(out, records)``: the batch read into
  caller numpy arrays, no Python object per packet read;
- arrays (C engine): ``write_from(data, records); read_into(out, records)``: no Python
  object per packet on either side;

and two floors, the copies a pair cannot avoid (the payload into the ring's data area
at the ring's offsets, and back out into a new buffer):

- numpy floor: those copies with numpy slicing (``ring[a:b] = src; ring[a:b].copy()``);
- C floor: the same copies in a compiled C loop (memcpy in, malloc + memcpy out + free),
  the physical floor of this machine; built with the system's cc when there is one.

The contenders take turns in short rounds, so background load hits them alike. Each
figure is the best round (the median in brackets); "vs floor" is the median over rounds
of (contender / floor of the same round), which is the figure least moved by noise.

    python scripts/bench_ring.py            # ~60 s
    python scripts/bench_ring.py --quick    # ~15 s
    python scripts/bench_ring.py --json     # one JSON object (for docs/performance.md)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pyvmbus import ring as ring_mod
from pyvmbus import shm
from pyvmbus.packet import packet_size
from pyvmbus.ring import READ_RECORD, RingBuffer

__all__ = ["main"]

SIZES = (64, 4096, 65536)
RING_SIZE = 2 * 1024 * 1024  # uio_hv_generic's default per direction (SZ_2M): header + data
HEADER = 4096
TARGET_SINGLE_64 = 1_500_000
TARGET_FLOOR_RATIO_64K = 0.9
TARGET_BATCH_64 = 5_000_000

Runner = Callable[[], int]  # runs some pairs, returns how many


def _count(size: int) -> int:
    return 2000 if size <= 4096 else 200


def single(size: int, data_size: int, engine: str) -> Runner:
    ring = RingBuffer.init(bytearray(HEADER + data_size), engine=engine)
    payload = os.urandom(size)
    write, read = ring.write, ring.read
    n = _count(size)

    def run() -> int:
        for _ in range(n):
            write(payload)
            read()
        return n

    return run


def batch_count(size: int, data_size: int) -> int:
    return max(1, min(256, (data_size - 8) // packet_size(size) // 2))


def batch(size: int, data_size: int, engine: str) -> Runner:
    ring = RingBuffer.init(bytearray(HEADER + data_size), engine=engine)
    payload = os.urandom(size)
    count = batch_count(size, data_size)
    packets = [(payload, 6, 0, i) for i in range(count)]
    write_batch, read_batch = ring.write_batch, ring.read_batch
    reps = max(1, 4000 // count)

    def run() -> int:
        for _ in range(reps):
            write_batch(packets)
            read_batch(count)
        return reps * count

    return run


def into(size: int, data_size: int, engine: str) -> Runner:
    """write_batch + read_into: payloads into one numpy array, descriptors into another."""
    ring = RingBuffer.init(bytearray(HEADER + data_size), engine=engine)
    payload = os.urandom(size)
    count = batch_count(size, data_size)
    packets = [(payload, 6, 0, i) for i in range(count)]
    out = np.empty(count * packet_size(size), dtype=np.uint8)
    records = np.empty(count, dtype=READ_RECORD)
    write_batch, read_into = ring.write_batch, ring.read_into
    reps = max(1, 4000 // count)

    def run() -> int:
        for _ in range(reps):
            write_batch(packets)
            read_into(out, records)
        return reps * count

    return run


def arrays(size: int, data_size: int, engine: str) -> Runner:
    """write_from + read_into: both sides of the batch from and into numpy arrays."""
    ring = RingBuffer.init(bytearray(HEADER + data_size), engine=engine)
    count = batch_count(size, data_size)
    data = np.frombuffer(os.urandom(size) * count, dtype=np.uint8)
    src = np.zeros(count, dtype=READ_RECORD)
    src["type"], src["length"] = 6, size
    src["offset"] = np.arange(count) * size
    src["transaction_id"] = np.arange(count)
    out = np.empty(count * packet_size(size), dtype=np.uint8)
    records = np.empty(count, dtype=READ_RECORD)
    write_from, read_into = ring.write_from, ring.read_into
    reps = max(1, 4000 // count)

    def run() -> int:
        for _ in range(reps):
            write_from(data, src)
            read_into(out, records)
        return reps * count

    return run


def floor(size: int, data_size: int) -> Runner:
    """numpy: the payload into a ring-sized array at the ring's offsets, and out into a new array."""
    ring = np.zeros(data_size, dtype=np.uint8)
    src = np.frombuffer(os.urandom(size), dtype=np.uint8)
    step = packet_size(size)
    n = _count(size)
    starts = [(i * step) % (data_size - step) for i in range(n)]

    def run() -> int:
        for pos in starts:
            ring[pos : pos + size] = src
            ring[pos : pos + size].copy()
        return n

    return run


_C_FLOOR = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* The copies of one write+read pair, count times: the payload into the ring at the
 * ring's offsets, and out into a new buffer (malloc + memcpy + free), as a read makes
 * a new bytes object.  The empty asm keeps the compiler from eliding the copies. */
uint64_t pairs(uint8_t *ring, size_t dsize, const uint8_t *src, size_t n, size_t step, size_t count)
{
    size_t pos = 0;
    uint64_t sink = 0;
    for (size_t i = 0; i < count; i++) {
        memcpy(ring + pos, src, n);
        uint8_t *out = malloc(n ? n : 1);
        memcpy(out, ring + pos, n);
        __asm__ __volatile__("" : : "r"(out) : "memory");
        sink += n ? out[n - 1] : 0;
        free(out);
        pos += step;
        if (pos + step > dsize)
            pos = 0;
    }
    return sink;
}
"""


def _c_floor_lib() -> Any:
    """The C floor, compiled now with the system's cc; None where there is none."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = tempfile.mkdtemp(prefix="bench_ring_")
    try:
        src = os.path.join(tmp, "floor.c")
        lib = os.path.join(tmp, "floor.so")
        with open(src, "w") as f:
            f.write(_C_FLOOR)
        done = subprocess.run([cc, "-O2", "-shared", "-fPIC", src, "-o", lib], capture_output=True)
        if done.returncode:
            return None
        dll = ctypes.CDLL(lib)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the library stays mapped
    dll.pairs.restype = ctypes.c_uint64
    dll.pairs.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p] + [ctypes.c_size_t] * 3
    return dll


def c_floor(size: int, data_size: int, lib: Any) -> Runner:
    ring = np.zeros(data_size, dtype=np.uint8)
    src = np.frombuffer(os.urandom(max(size, 1)), dtype=np.uint8)
    step = packet_size(size)
    n = _count(size) * 20  # ~20x faster than the Python contenders: keep a call ~ms long
    pairs = lib.pairs
    keep = (ring, src)  # the closure holds the arrays: the pointers below stay valid
    ring_p, src_p = ring.ctypes.data, src.ctypes.data

    def run() -> int:
        pairs(ring_p, data_size, src_p, size, step, n)
        assert keep
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

    from pyvmbus.packet import Packet, make_packet

    buf = bytearray(HEADER + 65536)
    view = memoryview(buf)
    data = view[HEADER:]
    payload = os.urandom(64)
    desc = struct.Struct("<HHHHQ")
    packer = struct.Struct("<HHHHQ64sQ").pack_into
    both = struct.Struct("<HHHHQ64s").unpack_from
    env: dict[str, Any] = {
        "shm": shm, "view": view, "data": data, "payload": payload, "desc": desc, "packer": packer,
        "both": both, "Packet": Packet, "make": make_packet,
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
    for engine in ring_mod.ENGINES:
        rb = RingBuffer.init(bytearray(HEADER + 65536), engine=engine)
        env[f"{engine}_w"], env[f"{engine}_r"] = rb.write, rb.read
        stmts[f"{engine} engine: write(64 B) + read() (one pair)"] = f"{engine}_w(payload); {engine}_r()"
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


def contenders(size: int, data_size: int, lib: Any) -> dict[str, Runner]:
    runners: dict[str, Runner] = {"floor": floor(size, data_size)}
    if lib is not None:
        runners["c_floor"] = c_floor(size, data_size, lib)
    for engine in ring_mod.ENGINES:
        runners[f"{engine}:single"] = single(size, data_size, engine)
        runners[f"{engine}:batch"] = batch(size, data_size, engine)
        if engine == "c":
            runners["c:into"] = into(size, data_size, engine)
            runners["c:arrays"] = arrays(size, data_size, engine)
    return runners


def measure(seconds: float, rounds: int, data_size: int) -> dict[str, Any]:
    lib = _c_floor_lib()
    out: dict[str, Any] = {
        "machine": machine(), "ring_data_size": data_size, "rounds": rounds, "sizes": {},
        "engines": list(ring_mod.ENGINES), "c_floor": lib is not None,
    }  # fmt: skip
    for size in SIZES:
        rates = interleaved(contenders(size, data_size, lib), seconds, rounds)
        row: dict[str, Any] = {"batch_count": batch_count(size, data_size)}
        for name, series in rates.items():
            ratios = [x / f for x, f in zip(series, rates["floor"], strict=True)]
            row[name] = {
                "best": max(series),
                "median": statistics.median(series),
                "vs_floor": statistics.median(ratios),
            }
            if "c_floor" in rates:
                c_ratios = [x / f for x, f in zip(series, rates["c_floor"], strict=True)]
                row[name]["vs_c_floor"] = statistics.median(c_ratios)
        out["sizes"][size] = row
    s = out["sizes"]
    fast = "c" if "c" in ring_mod.ENGINES else "python"
    best_batch = max(
        (s[64][name]["best"], name) for name in s[64] if name.endswith((":batch", ":into", ":arrays"))
    )  # fmt: skip
    out["targets"] = {
        f"batch 64 B >= 5M packets/s ({best_batch[1]}: {best_batch[0] / 1e6:.2f} M)": (
            best_batch[0] >= TARGET_BATCH_64
        ),
        f"single 64 B >= 1.5M pairs/s ({fast}: {s[64][f'{fast}:single']['best'] / 1e6:.2f} M)": (
            s[64][f"{fast}:single"]["best"] >= TARGET_SINGLE_64
        ),
        f"single 64 KiB >= 0.9 x numpy floor ({fast}: {s[65536][f'{fast}:single']['vs_floor']:.2f})": (
            s[65536][f"{fast}:single"]["vs_floor"] >= TARGET_FLOOR_RATIO_64K
        ),
    }
    return out


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"pyvmbus ring benchmark {m['date']}: Python {m['python']}, numpy {m['numpy']}, "
        f"{m['cpus']} CPUs ({m['cpu']}), atomics={m['atomics']}, engines={','.join(res['engines'])}, "
        f"load average {m['load_avg_1m']}",
        f"ring: {HEADER} B header + {res['ring_data_size']:,} B data; {res['rounds']} interleaved rounds"
        + ("" if res["c_floor"] else "; no C compiler: no C floor"),
        "",
        f"{'payload':>8} {'API':>16} {'pairs/s best':>13} {'(median)':>12} {'GB/s':>6} "
        f"{'vs numpy floor':>14} {'vs C floor':>10}",
    ]
    for size, row in res["sizes"].items():
        for name, r in row.items():
            if name == "batch_count":
                continue
            label = name
            for api in (":batch", ":into", ":arrays"):
                label = label.replace(api, f"{api}/{row['batch_count']}")
            c_ratio = f"{r['vs_c_floor']:>9.3f}x" if "vs_c_floor" in r else f"{'-':>10}"
            lines.append(
                f"{_size(int(size)):>8} {label:>16} {r['best']:>13,.0f} ({r['median']:>10,.0f}) "
                f"{r['best'] * int(size) / 1e9:>6.2f} {r['vs_floor']:>13.2f}x {c_ratio}"
            )
    lines += ["", "targets:"]
    lines += [f"  [{'met' if ok else 'NOT met'}] {text}" for text, ok in res["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short rounds, ~15 s in all")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--ring-size", type=int, default=RING_SIZE, help="bytes per ring, header included (default 2 MiB)"
    )
    args = ap.parse_args(argv)
    seconds, rounds = (4.0, 6) if args.quick else (18.0, 15)
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
