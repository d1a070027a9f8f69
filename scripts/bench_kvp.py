#!/usr/bin/env python3
"""Benchmark KVP (Data Exchange): the pool files and the service, in-process and through the mock.

Figures (nothing is asserted):

- ``pool_set``: :meth:`KvpPoolFile.set` of a changing value in a pool of ``--records``
  records (lock, read if changed, rewrite in place, unlock), per second;
- ``pool_get``: :meth:`KvpPoolFile.get` with the file unchanged (served from the records
  read last, after the 1 s trust window) and with another writer touching it between reads;
- ``two_writers``: two processes updating one pool concurrently, updates per second in all,
  and whether every record was whole afterwards;
- ``service``: the host model enumerating a pool of ``--records`` records through
  :class:`KvpService` in-process (``pump``), records per second;
- ``mock``: the whole path, a full enumeration of every pool by the mock host process
  through a runner on a mock VMBus, one request in flight at a time as Hyper-V does:
  requests per second (each a round trip between the two processes).

    python scripts/bench_kvp.py            # ~15 s
    python scripts/bench_kvp.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pyvmbus.ic import KvpService
from pyvmbus.ic.kvp_pool import RECORD_SIZE, KvpPoolFile, KvpPools, decode_records, pool_path
from pyvmbus.ic.runner import IcRunner
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.ic_models import pump
from pyvmbus.mock.kvp_model import KvpHost

__all__ = ["main"]

_WRITER = """
import sys, time
from pyvmbus.ic.kvp_pool import KvpPools
pools = KvpPools(sys.argv[1], check_daemon=False)
n, tag = int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
for i in range(n):
    pools.set(1, f"{tag}-{i % 50}", f"value {i}")
print(time.perf_counter() - t0)
"""


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def bench_pool(tmp: Path, records: int, n: int) -> dict[str, Any]:
    path = pool_path(tmp, 1)
    f = KvpPoolFile(path)
    for i in range(records):
        f.set(f"key-{i}", "x" * 100)
    t0 = time.perf_counter()
    for i in range(n):
        f.set(f"key-{i % records}", f"value {i}")
    set_rate = _rate(n, time.perf_counter() - t0)
    time.sleep(1.1)  # past the trust window: unchanged reads come from the cache
    f.get("key-0")
    reads0 = f.reads
    t0 = time.perf_counter()
    for _ in range(n):
        f.get(f"key-{records - 1}")
    cached = _rate(n, time.perf_counter() - t0)
    cached_reads = f.reads - reads0
    other = KvpPoolFile(path)
    t0 = time.perf_counter()
    for i in range(n // 10):
        other.set("touch", str(i))
        f.get(f"key-{records - 1}")
    changed = _rate(n // 10, time.perf_counter() - t0)
    other.close()
    f.close()
    return {"records": records, "pool_set_per_s": set_rate, "pool_get_cached_per_s": cached,
            "file_reads_for_cached_gets": cached_reads, "pool_get_after_other_writer_per_s": changed}


def bench_two_writers(tmp: Path, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp), str(n), tag], stdout=subprocess.PIPE,
                              text=True) for tag in ("A", "B")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    wall = time.perf_counter() - t0
    data = pool_path(tmp, 1).read_bytes()
    recs = decode_records(data)
    whole = len(data) % RECORD_SIZE == 0 and all(r.key[:2] in (b"A-", b"B-") for r in recs)
    return {"updates": 2 * n, "two_writers_updates_per_s": _rate(2 * n, wall),
            "per_writer_seconds": [round(float(o), 2) for o in outs], "records_after": len(recs),
            "all_records_whole": whole and len(recs) == 100}


def bench_service(tmp: Path, records: int) -> dict[str, Any]:
    pools = KvpPools(tmp / "svc", check_daemon=False)
    for i in range(records):
        pools.set(1, f"key-{i}", "y" * 200)
    svc = KvpService(pools)
    host = KvpHost(enumerate_on_ready=False)
    pump(host, svc)
    t0 = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        host.enumerate(1)
        pump(host, svc)
    dt = time.perf_counter() - t0
    assert len(host.enumerations[1]) == records
    pools.close()
    return {"service_enumerate_records_per_s": _rate(rounds * (records + 1), dt)}


def bench_mock(tmp: Path, records: int) -> dict[str, Any]:
    pools = KvpPools(tmp / "mock-pools", check_daemon=False)
    for i in range(records):
        pools.set(1, f"key-{i}", "z" * 200)
    svc = KvpService(pools)
    with MockVmbus() as mock:
        guid = mock.add_device("kvp")
        stop = threading.Event()
        runner = IcRunner(mock.root, guid, svc, stop_event=stop)
        t = threading.Thread(target=runner.run, kwargs={"timeout": 120}, daemon=True)
        t.start()

        def idle() -> dict[str, Any]:
            while True:
                try:
                    st = mock.command(guid, "stats")
                    if st["state"] == "ready" and st["idle"]:
                        return dict(st)
                except Exception:
                    pass
                time.sleep(0.01)

        idle()
        before = svc.stats.requests
        t0 = time.perf_counter()
        mock.command(guid, "enumerate")  # every pool
        st = idle()
        dt = time.perf_counter() - t0
        n = svc.stats.requests - before
        stop.set()
        t.join(30)
    pools.close()
    return {"mock_requests": n, "mock_requests_per_s": _rate(n, dt), "mock_seconds": round(dt, 3),
            "mock_passes": st["passes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200, help="records in the pool (default 200)")
    ap.add_argument("--updates", type=int, default=2000, help="updates per measurement (default 2000)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-kvp-") as d:
        tmp = Path(d)
        (tmp / "pool").mkdir()
        (tmp / "two").mkdir()
        out.update(bench_pool(tmp / "pool", args.records, args.updates))
        out.update(bench_two_writers(tmp / "two", args.updates))
        out.update(bench_service(tmp, args.records))
        out.update(bench_mock(tmp, args.records))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
