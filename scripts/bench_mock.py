"""Round trips through the mock host at the ring level, next to a bare 4-byte ping-pong.

Prints, for the echo device: median and p99 request -> completion round trip with a
monitored channel (the host finds the monitor bit in its ~100 µs scan) and a
non-monitored one (signalled by a write of 1 to the node, which the mock answers once it
has applied it), plus the mock process's CPU use while a monitored channel sits open and
idle. Figures, not assertions: run ``python scripts/bench_mock.py``.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import threading
import time

from pyvmbus import binding
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.guest import RawGuest
from pyvmbus.packet import PacketType


def _pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p * len(s)))]


def pingpong(n: int = 5000) -> list[float]:
    """4-byte SOCK_SEQPACKET ping-pong between two threads of this process and a child."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            msg = b.recv(4)
            if not msg:
                os._exit(0)
            b.send(msg)
    b.close()
    out = []
    ping = struct.pack("=I", 1)
    for _ in range(n):
        t = time.perf_counter()
        a.send(ping)
        a.recv(4)
        out.append(time.perf_counter() - t)
    a.close()
    os.waitpid(pid, 0)
    return out


def echo_rtt(monitored: bool, n: int = 2000) -> list[float]:
    with MockVmbus() as mock:
        guid = mock.add_device("echo", monitored=monitored)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            out = []
            for i in range(n):
                t = time.perf_counter()
                g.primary.send(b"x" * 64, PacketType.DATA_INBAND, 1, i)
                pkt = g.recv(5)
                out.append(time.perf_counter() - t)
                assert pkt is not None and pkt.transaction_id == i
            return out


def idle_cpu(seconds: float = 2.0) -> float:
    def cpu(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().split(")")[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid):
            assert mock.pid is not None
            time.sleep(0.2)
            c0 = cpu(mock.pid)
            time.sleep(seconds)
            return (cpu(mock.pid) - c0) / seconds


def main() -> None:
    threading.current_thread().name = "bench"
    pp = pingpong()
    print(f"4-byte ping-pong (two processes): median {statistics.median(pp) * 1e6:7.1f} µs, "
          f"p99 {_pct(pp, 0.99) * 1e6:7.1f} µs")
    for monitored in (True, False):
        rtt = echo_rtt(monitored)
        kind = "monitored (scan)    " if monitored else "non-monitored (write)"
        print(f"echo round trip, {kind}: median {statistics.median(rtt) * 1e6:7.1f} µs, "
              f"p99 {_pct(rtt, 0.99) * 1e6:7.1f} µs")
    print(f"mock process CPU, monitored channel open and idle: {idle_cpu() * 100:.1f} % of a core")


if __name__ == "__main__":
    main()
