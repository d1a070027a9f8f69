"""Host signalling on plain buffers: exactly our bits, atomically, nothing else."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
import pytest

from pyvmbus import shm
from pyvmbus.signal import (
    INT_PAGE_SEND_OFFSET,
    HostSignal,
    Mechanism,
    int_page_bit,
    monitor_page_bit,
)


def pages() -> tuple[Any, Any]:
    return np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)


@pytest.mark.parametrize(("relid", "word", "bit"), [(0, 0, 0), (31, 0, 31), (32, 1, 0), (45, 1, 13),
                                                    (16383, 511, 31)])
def test_int_page_bit(relid: int, word: int, bit: int) -> None:
    assert int_page_bit(relid) == (2048 + 4 * word, 1 << bit)


@pytest.mark.parametrize(("mid", "off", "bit"), [(0, 8, 0), (31, 8, 31), (32, 16, 0), (70, 24, 6),
                                                 (127, 32, 31)])
def test_monitor_bit(mid: int, off: int, bit: int) -> None:
    assert monitor_page_bit(mid) == (off, 1 << bit)


def test_out_of_range_ids_refused() -> None:
    with pytest.raises(ValueError, match="monitor id 128"):
        monitor_page_bit(128)
    with pytest.raises(ValueError, match="relid"):
        int_page_bit(16384)
    with pytest.raises(ValueError, match="relid"):
        int_page_bit(-1)


def test_monitored_sets_only_our_bits_and_keeps_others() -> None:
    ip, mp_ = pages()
    # other drivers' bits already set must survive
    shm.store32(ip, INT_PAGE_SEND_OFFSET + 4, 0x8000_0001)
    shm.store32(mp_, 16, 0x0000_F000)
    shm.store32(mp_, 20, 0xFFFF_FFFF)  # the armed word next to pending: never touched
    before_ip, before_mp = ip.copy(), mp_.copy()
    sig = HostSignal.for_channel(45, 38, int_page=ip, monitor_page=mp_)
    assert sig.mechanism is Mechanism.MONITOR
    sig.signal()
    assert shm.load32(ip, INT_PAGE_SEND_OFFSET + 4) == 0x8000_0001 | (1 << 13)
    assert shm.load32(mp_, 16) == 0x0000_F000 | (1 << 6)
    assert shm.load32(mp_, 20) == 0xFFFF_FFFF
    changed_ip = np.flatnonzero(ip != before_ip)
    changed_mp = np.flatnonzero(mp_ != before_mp)
    assert set(changed_ip) <= {INT_PAGE_SEND_OFFSET + 5}
    assert set(changed_mp) == {16}
    assert ip[:2048].sum() == 0  # the receive half is the host's
    sig.signal()  # idempotent on the bits; counted
    assert sig.signals == 2
    assert "monitor_id 38" in sig.describe() and "atomic" in sig.describe()
    info = sig.info()
    assert info["mechanism"] == "monitor-page" and info["monitor_pending_offset"] == 16


def test_fd_write_mechanism() -> None:
    writes: list[int] = []
    sig = HostSignal.for_channel(3, None, write_one=lambda: writes.append(1))
    assert sig.mechanism is Mechanism.FD_WRITE
    sig.signal()
    sig.signal()
    assert writes == [1, 1] and sig.signals == 2
    assert "6.10" in sig.describe()
    sub = HostSignal.fd_write(9, lambda: None, subchannel=True)
    assert "d062463" in sub.describe()


def test_for_channel_needs_the_pages_or_the_fd() -> None:
    with pytest.raises(ValueError, match="int_page"):
        HostSignal.for_channel(1, 2)
    with pytest.raises(ValueError, match="not monitored"):
        HostSignal.for_channel(1, None)
    with pytest.raises(ValueError, match="outside"):
        HostSignal.monitored(1, 2, np.zeros(1024, np.uint8), np.zeros(4096, np.uint8))


def _hammer(buf: Any, bit: int, start: Any) -> None:
    ip = np.frombuffer(buf, np.uint8)[:4096]
    mp_ = np.frombuffer(buf, np.uint8)[4096:]
    sigs = [HostSignal.monitored(32 * w + bit, 32 * (w % 4) + bit, ip, mp_) for w in range(512)]
    start.wait()
    for _ in range(20):
        for sig in sigs:
            sig.signal()


@pytest.mark.timeout(30)
def test_concurrent_signallers_in_the_same_words_lose_no_bits() -> None:
    """Two processes set different bits of the same 512 words at once: every bit survives."""
    ctx = mp.get_context("fork")
    buf = ctx.RawArray("B", 8192)
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(buf, bit, start)) for bit in (3, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    words = np.frombuffer(buf, np.uint32)
    assert (words[512:1024] == 0b11000).all()  # send half of the interrupt page
    assert (words[:512] == 0).all()  # receive half untouched
    assert list(words[1024 + 2:1024 + 10:2]) == [0b11000] * 4  # pending words of the 4 groups
    assert list(words[1024 + 3:1024 + 11:2]) == [0] * 4  # armed words untouched
