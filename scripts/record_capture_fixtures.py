#!/usr/bin/env python3
"""Record tests/fixtures/capture/<model>.pcapng: one mock session of each device model.

The sessions are tests/capture_sessions.py's (the tests replay these files against the
same clients). Run it again after a wire-format change:

    python scripts/record_capture_fixtures.py
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

from capture_sessions import MODELS, drive  # noqa: E402
from pyvmbus.capture import read_capture  # noqa: E402
from pyvmbus.mock import MockVmbus  # noqa: E402


def main() -> None:
    out = HERE / "tests" / "fixtures" / "capture"
    out.mkdir(parents=True, exist_ok=True)
    with MockVmbus(kernel="6.18") as mock:
        for model in MODELS:
            path = out / f"{model}.pcapng"
            drive(mock, model, capture=path)
            if path.stat().st_size > 32 * 1024:  # keep the fixtures small: gzip (Wireshark reads it)
                gz = path.with_suffix(".pcapng.gz")
                gz.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
                path.unlink()
                path = gz
            cap = read_capture(path)
            print(f"{path.relative_to(HERE)}: {len(cap.records)} records, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
