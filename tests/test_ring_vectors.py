"""Replay ../shared/vectors/ring-dpdk.jsonl: a ring driven by DPDK's bufring, byte for byte.

Every step's result, both indices and the SHA-256 of the whole ring (header + data,
padding and trailers included) must match. The replay runs through the single-packet API
and again through the batch API (one-packet batches), which must be indistinguishable,
and once more in a subprocess on the libatomic backend of pyvmbus.shm.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyvmbus import shm
from pyvmbus.errors import RingFull
from pyvmbus.ring import RingBuffer


def _find_vectors() -> Path | None:
    """$PYVMBUS_VECTORS, else the copy in tests/vectors/, else shared/vectors/ above the checkout."""
    env = os.environ.get("PYVMBUS_VECTORS")
    here = Path(__file__).resolve()
    candidates = (
        [Path(env)]
        if env
        else [here.parent / "vectors", *(p / "shared" / "vectors" for p in here.parents)]
    )
    for folder in candidates:
        if (folder / "ring-dpdk.jsonl").is_file():
            return folder / "ring-dpdk.jsonl"
    return None


VECTORS = _find_vectors()
pytestmark = [
    pytest.mark.skipif(
        VECTORS is None, reason="ring-dpdk.jsonl not found (set PYVMBUS_VECTORS to its folder)"
    ),
    pytest.mark.usefixtures("ring_engine"),  # replayed on each ring engine
]


def replay(path: Path, mode: str) -> int:
    """Replay every step; returns the number of steps checked. AssertionError on a mismatch."""
    buf = bytearray()
    rb: RingBuffer | None = None
    steps = 0
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            step: dict[str, Any] = json.loads(line)
            if "ring" in step:
                geometry = step["ring"]
                buf = bytearray(geometry["header_size"] + geometry["data_size"])  # zeroed
                rb = RingBuffer(buf, geometry["header_size"])
                continue
            assert rb is not None, "a step before the first ring line"
            op = step["op"]
            where = f"line {lineno} ({op})"
            if op == "set_interrupt_mask":
                rb.interrupt_mask = step["value"]
            elif op == "write":
                payload = bytes.fromhex(step["payload"])
                args = (step["type"], step["flags"], step["transaction_id"])
                try:
                    if mode == "batch":
                        signal = rb.write_batch([(payload, *args)])
                    else:
                        signal = rb.write(payload, *args)
                    result = "signal" if signal else "no-signal"
                except RingFull:
                    result = "RingFull"
                assert result == step["result"], where
            elif op == "read":
                if mode == "batch":
                    pkts, _ = rb.read_batch(1)
                    pkt = pkts[0] if pkts else None
                else:
                    pkt = rb.read()
                got = None
                if pkt is not None:
                    got = {
                        "type": pkt.type,
                        "flags": pkt.flags,
                        "transaction_id": pkt.transaction_id,
                        "payload": pkt.payload.hex(),  # includes the zero padding, like the vector
                    }
                assert got == step["result"], where
            else:
                raise AssertionError(f"{where}: unknown op")
            after = step["after"]
            assert (rb.write_index, rb.read_index) == (after["write_index"], after["read_index"]), where
            assert hashlib.sha256(buf).hexdigest() == after["sha256"], f"{where}: ring bytes differ"
            steps += 1
    return steps


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_replay_dpdk_vectors(mode: str) -> None:
    assert VECTORS is not None
    steps = replay(VECTORS, mode)
    assert steps > 2900  # the whole file ran


@pytest.mark.timeout(60)
@pytest.mark.skipif("libatomic" not in shm.available_backends(), reason="no libatomic.so.1")
def test_replay_on_the_libatomic_backend() -> None:
    assert VECTORS is not None
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from pyvmbus import shm; assert shm.BACKEND == 'libatomic'; "
        "import test_ring_vectors as t, pathlib; print(t.replay(pathlib.Path(sys.argv[2]), 'single'))"
    )
    env = dict(os.environ, PYVMBUS_ATOMICS="libatomic")
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(VECTORS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 2900
