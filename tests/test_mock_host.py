"""The mock host: the echo model end to end at the ring level, flow control both ways,
signalling rules, faults (corrupt, stall, storm), commands and the model plug-in point."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import until
from pyvmbus import binding
from pyvmbus.errors import ChannelClosed, DeviceNotFound, RingCorrupt, RingFull
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS
from pyvmbus.mock.guest import RawGuest
from pyvmbus.mock.host import INT_PAGE_SEND_OFFSET, monitor_word
from pyvmbus.packet import PacketType
from pyvmbus.shm import fetch_or32, load32


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", list(GENERATIONS))
def test_echo_end_to_end(kernel: str) -> None:
    """Completion requested -> VM_PKT_COMP with the same id and bytes; else echoed in-band."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            assert g.primary.monitored
            g.primary.send(b"hello", PacketType.DATA_INBAND, 1, 0x1234)
            pkt = g.recv(5)
            assert pkt is not None
            assert (pkt.type, pkt.transaction_id, pkt.payload) == (PacketType.COMP, 0x1234, b"hello\0\0\0")
            g.primary.send([b"two ", b"parts"], PacketType.DATA_INBAND, 0, 77)
            pkt = g.recv(5)
            assert pkt is not None
            assert (pkt.type, pkt.flags, pkt.transaction_id) == (PacketType.DATA_INBAND, 0, 77)
            assert pkt.payload == b"two parts\0\0\0\0\0\0\0"
            g.primary.send(b"ignored", PacketType.COMP, 0, 9)  # not in-band: dropped
            g.primary.send(b"last", PacketType.DATA_INBAND, 1, 10)
            pkt = g.recv(5)
            assert pkt is not None and pkt.transaction_id == 10
            stats = mock.host_stats(guid)
            assert stats["packets_in"] == 4 and stats["packets_out"] == 3
            assert stats["signals"] >= 1 and stats["interrupts"] >= 1
        assert mock.kernel_state(guid)["internal_errors"] == 0


@pytest.mark.timeout(30)
def test_echo_on_a_non_monitored_channel_is_signalled_by_the_write() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo", monitored=False)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            assert not g.primary.monitored
            for i in range(20):
                g.primary.send(b"n%d" % i, PacketType.DATA_INBAND, 1, i)
                pkt = g.recv(5)
                assert pkt is not None and pkt.transaction_id == i


@pytest.mark.timeout(30)
def test_monitored_channel_needs_its_monitor_bit_and_other_bits_stay() -> None:
    """The int-page bit alone does not wake a monitored channel; the scan consumes the
    channel's own int and monitor bits and nobody else's."""
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            ch = g.primary
            assert ch.monitor_id is not None
            ints = g.dev.map("int_page").array
            mon = g.dev.map("monitor_page").array
            ch.tx.write(b"quiet", PacketType.DATA_INBAND, 1, 1)
            int_off = INT_PAGE_SEND_OFFSET + 4 * (ch.relid // 32)
            fetch_or32(ints, int_off, (1 << (ch.relid % 32)) | (1 << 31))  # ours + someone else's
            time.sleep(0.05)
            assert mock.host_stats(guid)["signals"] == 0
            mon_off, bit = monitor_word(ch.monitor_id)
            other = 1 << ((ch.monitor_id + 5) % 32)
            fetch_or32(mon, mon_off, bit | other)
            pkt = g.recv(5)
            assert pkt is not None and pkt.transaction_id == 1
            assert until(lambda: load32(mon, mon_off) == other)
            assert load32(ints, int_off) == 1 << 31


def _stream(g: RawGuest, count: int, size: int,
            hold: Callable[[], bool] | None = None) -> list[bytes]:
    """Send ``count`` requests as fast as the rings allow while reading the replies; return them.

    ``hold``: while it returns True the guest does not read, so the host's replies pile up
    in the RX ring until the host has to wait for room (a path timing alone may not reach).
    """
    ch = g.primary
    replies: list[bytes] = []
    sent = 0
    deadline = time.monotonic() + 20
    while len(replies) < count:
        assert time.monotonic() < deadline, f"stuck at {sent} sent, {len(replies)} received"
        progressed = False
        while sent < count:
            payload = hashlib.sha256(sent.to_bytes(4, "little")).digest() * (size // 32)
            try:
                ch.send(payload, PacketType.DATA_INBAND, 1, sent)
            except RingFull as exc:
                if ch.tx.set_pending_send_size(exc.needed):
                    continue  # room appeared meanwhile
                break
            ch.tx.clear_pending_send_size()
            sent += 1
            progressed = True
        while hold is None or not hold():
            pkt = ch.read()
            if pkt is None:
                break
            assert pkt.type == PacketType.COMP and pkt.transaction_id == len(replies)
            replies.append(pkt.payload)
            progressed = True
        if not progressed and not g.unmask_all():
            g.dev.wait(0.05 if hold is not None else 1)
    return replies


@pytest.mark.timeout(40)
@pytest.mark.parametrize("kernel", ["6.18", "5.15"])
def test_flow_control_both_ways(kernel: str) -> None:
    """More data than both rings hold: the host stops reading while its replies wait for
    room (RX pending_send_size, the guest's read signal), the guest waits for TX room
    (TX pending_send_size, the host's read signal). Nothing lost, reordered or torn."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            count, size = 1500, 1024
            # 64 KiB rings on 6.18 (the unknown class's 0x11000): hold the first reads until
            # the host reports a full RX ring, so the host-waits-for-room path always runs.
            hold = (lambda: mock.host_stats(guid)["ring_full"] == 0) if kernel == "6.18" else None
            replies = _stream(g, count, size, hold)
            for i, payload in enumerate(replies):
                assert payload == hashlib.sha256(i.to_bytes(4, "little")).digest() * (size // 32)
            stats = mock.host_stats(guid)
            assert stats["packets_in"] == count == stats["packets_out"]
            assert mock.kernel_state(guid)["internal_errors"] == 0
            if kernel == "6.18":
                assert stats["ring_full"] > 0


@pytest.mark.timeout(30)
def test_stall_and_resume() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            mock.fault(guid, "stall")
            sent = 0
            with pytest.raises(RingFull):
                for sent in range(10_000):
                    g.primary.send(b"s" * 500, PacketType.DATA_INBAND, 1, sent)
            time.sleep(0.05)
            stats = mock.host_stats(guid)
            assert stats["stalled"] and stats["packets_in"] == 0 and stats["signals"] >= 1
            mock.fault(guid, "resume")
            got = 0
            while got < sent:
                pkt = g.recv(5)
                assert pkt is not None and pkt.transaction_id == got
                got += 1
            assert g.primary.tx.available_to_read() == 0  # the host drained the TX ring


@pytest.mark.timeout(30)
def test_corrupt_descriptor() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            g.primary.send(b"fine", PacketType.DATA_INBAND, 1, 1)
            assert g.recv(5) is not None
            mock.fault(guid, "corrupt")
            g.primary.send(b"doomed", PacketType.DATA_INBAND, 1, 2)
            assert g.unmask_all() or g.dev.wait(5)
            read_index = g.primary.rx.read_index
            with pytest.raises(RingCorrupt) as info:
                g.primary.read()
            assert info.value.field == "len8"
            assert g.primary.rx.read_index == read_index  # nothing consumed
            assert mock.host_stats(guid)["corrupt_sent"] == 1
            assert any("corrupt descriptor" in line for line in mock.kernel_log())


@pytest.mark.timeout(30)
def test_interrupt_storm() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            mock.fault(guid, "storm", count=300)
            wakeups = 0
            while g.dev.wait(0.5) is not None:
                wakeups += 1
                assert g.primary.read() is None  # nothing new, ever
            assert wakeups >= 2
            assert mock.kernel_state(guid)["event_count"] == 300
            assert mock.host_stats(guid)["interrupts"] == 300


@pytest.mark.timeout(30)
def test_commands_and_their_errors() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with pytest.raises(ChannelClosed):  # not opened by the guest yet
            mock.command(guid, "send", payload=b"x")
        with RawGuest(mock.root, guid) as g:
            assert mock.command(guid, "send", payload=b"abc", count=3, transaction_id=7) == 3
            for _ in range(3):
                pkt = g.recv(5)
                assert pkt is not None and pkt.transaction_id == 7 and pkt.type == PacketType.DATA_INBAND
            with pytest.raises(KeyError, match="no command"):
                mock.command(guid, "frobnicate")
        with pytest.raises(DeviceNotFound):
            mock.host_stats("00000000-0000-0000-0000-000000000001")
        with pytest.raises(ValueError, match="unknown fault"):
            mock.fault(guid, "meltdown")
        with pytest.raises(KeyError):
            mock.add_device("no-such-class")


_MODEL = '''
from pyvmbus.mock.models import DeviceModel, register_model
from pyvmbus.packet import PacketType

@register_model
class Shout(DeviceModel):
    name = "shout"
    class_name = "2a6a7b3e-3c5e-4bd4-9a07-1e1b6f9e0a55"

    def opened(self, chan):
        self.count = 0

    def packet(self, chan, pkt):
        if pkt.payload.startswith(b"boom"):
            raise RuntimeError("model bug")
        self.count += 1
        chan.post(pkt.payload.upper(), PacketType.DATA_INBAND, 0, pkt.transaction_id)

    def command(self, chan, name, args):
        if name == "count":
            return self.count
        return super().command(chan, name, args)
'''


def user_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str) -> None:
    """Put a model module of the user's own where the mock host process will import it."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.timeout(30)
def test_model_plug_in_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model in a module of the user's own, registered in the host process; a model that
    raises is logged and counted, and the host goes on."""
    user_model(tmp_path, monkeypatch, "shout_model", _MODEL)
    with MockVmbus(models=["shout_model"]) as mock:
        guid = mock.add_device("shout", monitored=False)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            g.primary.send(b"boom", transaction_id=1)
            g.primary.send(b"quiet please", transaction_id=2)
            pkt = g.recv(5)
            assert pkt is not None and pkt.payload.rstrip(b"\0") == b"QUIET PLEASE"
            assert mock.command(guid, "count") == 1
            stats = mock.host_stats(guid)
            assert stats["model"] == "shout" and stats["model_errors"] == 1
            assert "model bug" in stats["last_error"]
            assert any("model bug" in line for line in mock.kernel_log())


@pytest.mark.timeout(30)
def test_integration_service_models_are_registered() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("heartbeat")
        stats = mock.host_stats(guid)
        assert stats["model"] == "heartbeat"
        assert stats["monitor_id"] is None
        net = mock.add_device("network")
        assert mock.host_stats(net)["model"] == "null"
        assert mock.host_stats(net)["monitor_id"] is not None


@pytest.mark.timeout(30)
def test_big_backlog_is_drained_in_turns() -> None:
    """A network-class device running the echo model (2 MiB rings): thousands of queued
    packets are drained in budgeted turns of the loop, none lost, all in order."""
    with MockVmbus() as mock:
        guid = mock.add_device("network", model="echo")
        binding.bind(mock.root, guid, force=True)
        with RawGuest(mock.root, guid) as g:
            assert len(g.dev.map("txrx_rings").array) == 4 << 20
            mock.fault(guid, "stall")
            count = 4000
            for i in range(count):
                g.primary.send(b"%07d" % i, PacketType.DATA_INBAND, 0, i)
            mock.fault(guid, "resume")
            for i in range(count):
                pkt = g.recv(5)
                assert pkt is not None and pkt.transaction_id == i
            assert mock.host_stats(guid)["packets_out"] == count


_BURST_MODEL = '''
from pyvmbus.mock.models import DeviceModel, register_model

@register_model
class Burst(DeviceModel):
    name = "burst"
    class_name = "2a6a7b3e-3c5e-4bd4-9a07-1e1b6f9e0a56"

    def command(self, chan, name, args):
        if name != "burst":
            return super().command(chan, name, args)
        first, count = args["first"], args["count"]
        specs = [(b"%07d" % i * 8, 6, 0, i) for i in range(first, first + count)]
        half = count // 2
        chan.post_batch(specs[:half])
        # a packet with an extra header in the middle: queued as it is, written in its turn
        chan.post(b"x" * 8, 6, 0, 10**9 + first, extra_header=b"E" * 8)
        chan.post_batch(specs[half:])
        return chan.queued

    def packet(self, chan, pkt):
        chan.post(b"one:" + pkt.payload, 6, 0, pkt.transaction_id)

    def packets(self, chan, pkts):
        if any(p.payload.startswith(b"boom") for p in pkts):
            raise RuntimeError("batch model bug")
        chan.post_batch([(b"many:" + p.payload, 6, 0, p.transaction_id) for p in pkts])
'''


@pytest.mark.timeout(60)
def test_post_batch_fills_the_ring_then_queues_in_order(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """post_batch writes whole chunks while they fit, then packet by packet, then queues;
    flush sends the queue in write_batch chunks around a queued extra-header packet.
    Every packet arrives once, in order, with its bytes; the counters add up; a pending
    corrupt fault still hits exactly the next packet written."""
    user_model(tmp_path, monkeypatch, "burst_model", _BURST_MODEL)
    with MockVmbus(models=["burst_model"]) as mock:
        guid = mock.add_device("burst", monitored=False)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            count = 3000  # 80 bytes each: several times what the 64 KiB ring holds
            assert mock.command(guid, "burst", first=0, count=count) > 0  # some had to wait
            stats = mock.host_stats(guid)
            assert 0 < stats["packets_out"] < count and stats["ring_full"] >= 1
            expect = [*range(count // 2), 10**9, *range(count // 2, count)]
            got: list[int] = []
            while len(got) < len(expect):
                pkt = g.recv(5)
                assert pkt is not None, f"stalled after {len(got)} packets"
                got.append(pkt.transaction_id)
                if pkt.transaction_id == 10**9:
                    assert pkt.extra_header == b"E" * 8 and pkt.payload == b"x" * 8
                else:
                    assert pkt.payload == b"%07d" % pkt.transaction_id * 8
            assert got == expect
            assert g.primary.read() is None
            stats = mock.host_stats(guid)
            assert stats["packets_out"] == count + 1 and stats["queued"] == 0
            assert stats["bytes_out"] == count * 56 + 8
            mock.fault(guid, "corrupt")
            mock.command(guid, "burst", first=5000, count=4)
            assert g.unmask_all() or g.dev.wait(5)
            with pytest.raises(RingCorrupt):
                g.primary.read()
            assert mock.host_stats(guid)["corrupt_sent"] == 1


@pytest.mark.timeout(60)
def test_a_model_may_answer_a_read_batch_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeviceModel.packets gets what one read of the TX ring found (two or more packets),
    packet() a single one; an exception in packets() is counted once and the host goes on."""
    user_model(tmp_path, monkeypatch, "burst_model", _BURST_MODEL)
    with MockVmbus(models=["burst_model"]) as mock:
        guid = mock.add_device("burst", monitored=False)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            for batch in ([b"a", b"b", b"c"], [b"boom", b"d"]):
                mock.fault(guid, "stall")  # the host reads them in one batch on resume
                for i, payload in enumerate(batch):
                    g.primary.send(payload, PacketType.DATA_INBAND, 0, i)
                mock.fault(guid, "resume")
            got = []
            for _ in range(3):
                pkt = g.recv(5)
                assert pkt is not None
                got.append(pkt.payload.rstrip(b"\0"))
            assert got == [b"many:a", b"many:b", b"many:c"]
            g.primary.send(b"e", PacketType.DATA_INBAND, 0, 9)
            pkt = g.recv(5)
            assert pkt is not None and pkt.payload.rstrip(b"\0") == b"one:e"
            stats = mock.host_stats(guid)
            assert stats["packets_in"] == 6 and stats["packets_out"] == 4 and stats["model_errors"] == 1
            assert "batch model bug" in stats["last_error"]
