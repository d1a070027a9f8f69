"""The mock kernel, generation by generation (SPEC sections 1 and 8): masks, writes, signals,
the shared event counter, subchannels, rescind, probe refusals, sysfs counters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import until
from pyvmbus import binding
from pyvmbus.errors import DeviceRescinded, HostCrashed
from pyvmbus.mock import MockVmbus
from pyvmbus.mock.generations import GENERATIONS, generation
from pyvmbus.mock.guest import RawGuest
from pyvmbus.packet import PacketType
from pyvmbus.sysfs import Sysfs

GENS = list(GENERATIONS)
ALLOWS_UNMONITORED = [g for g in GENS if not generation(g).refuses_unmonitored]


def dev_dir(mock: MockVmbus, guid: str) -> Path:
    return mock.root / "sys" / "bus" / "vmbus" / "devices" / guid


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", GENS)
def test_mask_after_open(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            assert g.primary.rx.interrupt_mask == int(generation(kernel).masks_on_open)
            assert g.primary.tx.interrupt_mask == 0
            assert g.primary.rx.feature_bits == 1  # hv_ringbuffer_init


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", GENS)
def test_mask_on_interrupt(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            g.primary.rx.interrupt_mask = 0  # the client owns the mask: no write here
            mock.command(guid, "send", payload=b"one")
            assert g.dev.wait(5) == 1
            assert g.primary.rx.interrupt_mask == int(generation(kernel).masks_on_interrupt)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", GENS)
def test_client_that_does_not_unmask_hangs_where_the_kernel_masks(kernel: str) -> None:
    """After an interrupt, a client that never unmasks hears of the next packet only on
    generations whose kernel leaves the mask alone."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            g.primary.rx.interrupt_mask = 0
            mock.command(guid, "send", payload=b"one")
            assert g.dev.wait(5) is not None
            assert g.primary.read() is not None
            mock.command(guid, "send", payload=b"two")  # ring empty again: a transition
            second = g.dev.wait(0.3)
            assert (second is None) == generation(kernel).masks_on_interrupt


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", GENS)
def test_unmasking_never_interrupts_so_waiting_without_recheck_hangs(kernel: str) -> None:
    """The host interrupts only on empty -> non-empty of an unmasked ring: a packet written
    while masked stays silent after the unmask (the lost wakeup of SPEC section 8)."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            g.primary.rx.interrupt_mask = 1
            mock.command(guid, "send", payload=b"while masked")
            assert g.primary.rx.available_to_read() > 0
            g.dev.irqcontrol(True)
            g.primary.rx.interrupt_mask = 0
            assert g.dev.wait(0.3) is None  # a client that does not re-check sleeps here
            assert g.recv(1) is not None  # RawGuest re-checks after unmasking


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", GENS)
def test_write_masks_per_generation(kernel: str) -> None:
    gen = generation(kernel)
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            (relid,) = mock.offer_subchannels(guid, 1)
            sub = g.subchannel(relid)
            assert sub.rx.interrupt_mask == int(gen.masks_on_open)  # masked on creation
            for ch in (g.primary, sub):
                ch.rx.interrupt_mask = 0
            g.dev.irqcontrol(False)  # synchronous, as on the real node
            assert g.primary.rx.interrupt_mask == int(gen.write_touches_mask)
            assert sub.rx.interrupt_mask == int(gen.write_touches_mask and gen.write_covers_subchannels)
            for ch in (g.primary, sub):
                ch.rx.interrupt_mask = 1
            g.dev.irqcontrol(True)
            assert g.primary.rx.interrupt_mask == int(not gen.write_touches_mask)
            covers = gen.write_touches_mask and gen.write_covers_subchannels
            assert sub.rx.interrupt_mask == int(not covers)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", ALLOWS_UNMONITORED)
def test_write_of_1_signals_a_non_monitored_host(kernel: str) -> None:
    gen = generation(kernel)
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo", monitored=False)
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid, unmask_with_write=False) as g:
            assert not g.primary.monitored
            (relid,) = mock.offer_subchannels(guid, 1)
            sub = g.subchannel(relid)
            assert not sub.monitored
            g.primary.tx.write(b"p", transaction_id=1)  # written, not signalled
            sub.tx.write(b"s", transaction_id=2)
            time.sleep(0.05)
            assert mock.host_stats(guid)["packets_in"] == 0
            g.dev.irqcontrol(True)
            stats = mock.host_stats(guid)
            assert stats["channels"][stats["relid"]]["signals"] == int(gen.signal_on_unmask)
            assert stats["channels"][relid]["signals"] == int(gen.signal_subchannels)
            assert stats["packets_in"] == int(gen.signal_on_unmask) + int(gen.signal_subchannels)
            state = mock.kernel_state(guid)
            assert state["channels"][stats["relid"]]["sig_events"] == int(gen.signal_on_unmask)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", ["5.15", "6.6-lts"])
def test_old_kernels_refuse_unmonitored_channels(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("heartbeat")
        assert Sysfs(mock.root).device(guid).monitor_id is None
        assert mock.bind_uio(guid) is None
        assert Sysfs(mock.root).device(guid).uio_name is None
        assert not list((mock.root / "dev").glob("uio*"))
        assert any("requires hypercall" in line for line in mock.kernel_log())
        echo = mock.add_device("echo")  # monitored: fine
        assert mock.bind_uio(echo) == "uio0"


@pytest.mark.timeout(30)
def test_event_counter_is_shared_by_primary_and_subchannels() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            relids = mock.offer_subchannels(guid, 2)
            subs = [g.subchannel(r) for r in relids]
            g.unmask_all()
            counts = []
            for index, ch in ((1, subs[0]), (2, subs[1]), (0, g.primary)):
                mock.command(guid, "send", subchannel=index, payload=b"x")
                counts.append(g.dev.wait(5))
                pkt = ch.read()
                assert pkt is not None and pkt.payload.rstrip(b"\0") == b"x"
            assert counts == [1, 2, 3]
            state = mock.kernel_state(guid)
            assert [state["channels"][r]["interrupts"] for r in (*relids, state["relid"])] == [1, 1, 1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", ["6.18", "5.15"])
def test_subchannel_ring_files_appear_later_and_go_with_the_last_close(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        g = RawGuest(mock.root, guid)
        t0 = time.monotonic()
        relids = mock.offer_subchannels(guid, 3)
        rings = [mock.root / "sys" / "bus" / "vmbus" / "devices" / guid / "channels" / str(r) / "ring"
                 for r in relids]
        if time.monotonic() - t0 < 0.03:
            assert not any(p.exists() for p in rings)  # not yet: hv_uio_new_channel runs later
        assert until(lambda: all(p.exists() for p in rings))
        info = Sysfs(mock.root).device(guid)
        for p, r in zip(rings, relids, strict=True):
            assert info.channel(r).ring_file_size == 4 << 20  # 2 x 2 MiB on every generation
            assert p.stat().st_mode & 0o777 == 0o600
        assert [c.subchannel_id for c in info.channels()] == [0, 1, 2, 3]
        assert mock.host_stats(guid)["subchannels"] == relids
        g.close()
        assert until(lambda: not any(p.parent.exists() for p in rings))
        assert [c.subchannel_id for c in info.channels()] == [0]


UNREGISTERS = [g for g in GENS if generation(g).unregister_on_rescind]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", UNREGISTERS)
def test_rescind_unregisters_on_every_generation_with_the_2024_fix(kernel: str) -> None:
    """fb1adbd7e50f + 6fd28941447b (Sep 2024, in 4.19, 5.4, 5.10, 5.15, 6.1, 6.6, 6.10 and
    later): hv_uio_rescind calls vmbus_device_unregister, so the uio node and the sysfs
    directory go away, reads fail with EIO, and the host can offer the device again."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        name = binding.bind(mock.root, guid)
        g = RawGuest(mock.root, guid)
        mock.rescind(guid)
        assert not dev_dir(mock, guid).exists()
        assert not (mock.root / "dev" / name).exists()
        with pytest.raises(DeviceRescinded):
            g.dev.wait(5)
        g.close()
        assert any("unregistered (rescinded)" in line for line in mock.kernel_log())
        mock.reoffer(guid)
        info = Sysfs(mock.root).device(guid)
        assert info.driver is None and info.driver_override is None  # a new device object
        assert info.state == 2
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g2:
            g2.primary.send(b"again", flags=1, transaction_id=5)
            pkt = g2.recv(5)
            assert pkt is not None and pkt.type == PacketType.COMP and pkt.transaction_id == 5


@pytest.mark.timeout(30)
def test_rescind_on_openhcl_keeps_an_opened_device() -> None:
    """OHCL-Linux-Kernel's hv_uio_rescind (05b48eb85d34) has its own NULL fix but not
    6fd28941447b's vmbus_device_unregister: an opened device stays registered, reads
    fail with EIO; a device never opened has no rescind callback and goes."""
    with MockVmbus(kernel="openhcl") as mock:
        opened = mock.add_device("echo")
        never = mock.add_device("echo")
        binding.bind(mock.root, opened)
        binding.bind(mock.root, never)
        g = RawGuest(mock.root, opened)
        mock.rescind(opened)
        mock.rescind(never)
        with pytest.raises(DeviceRescinded):
            g.dev.wait(5)
        g.close()
        assert dev_dir(mock, opened).exists()
        assert not dev_dir(mock, never).exists()  # no rescind callback yet
        assert Sysfs(mock.root).device(opened).uio_name == "uio0"
        assert mock.kernel_state(opened)["rescinded"]
        assert any("lacks 6fd28941447b" in line for line in mock.kernel_log())
        mock.reoffer(opened)  # the stale device goes, the new one comes
        assert not mock.kernel_state(opened)["rescinded"]
        assert binding.bind(mock.root, opened) is not None
        RawGuest(mock.root, opened).close()  # opened once: the rescind callback is set
        mock.rescind(opened)
        assert dev_dir(mock, opened).exists()
        mock.remove_device(opened)  # a hot-remove takes it away for good
        assert not dev_dir(mock, opened).exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", GENS)
def test_state_is_2_when_offered_and_3_when_opened(kernel: str) -> None:
    """vmbus_process_offer sets CHANNEL_OPEN_STATE (2) before vmbus_device_register; a
    driver's open makes it CHANNEL_OPENED_STATE (3); the close leaves 2 again."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        info = Sysfs(mock.root).device(guid)
        assert info.state == 2
        binding.bind(mock.root, guid)
        assert info.state == 2  # bound, not opened: probe only allocates the ring
        with RawGuest(mock.root, guid):
            assert info.state == 3
        assert until(lambda: info.state == 2)


@pytest.mark.timeout(30)
def test_unbind_while_open_and_remove_device() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        g = RawGuest(mock.root, guid, exclusive=False)  # so that pyvmbus lets the unbind through
        binding.unbind(mock.root, guid)
        with pytest.raises(DeviceRescinded):
            g.dev.wait(5)
        g.close()
        assert mock.kernel_state(guid)["uio"] is None
        assert mock.host_stats(guid)["open"] is False
        mock.remove_device(guid)
        assert not dev_dir(mock, guid).exists()


@pytest.mark.timeout(30)
def test_sysfs_counters_follow_the_rings() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        info = Sysfs(mock.root).device(guid)
        with RawGuest(mock.root, guid) as g:
            g.unmask_all()
            mock.command(guid, "send", payload=b"z" * 100)
            assert g.dev.wait(5) == 1
            chan = info.channel(info.relid)
            assert until(lambda: chan.interrupts == 1 and (chan.read_avail or 0) > 0, 2)
            assert until(lambda: getattr(info.uio(), "event", None) == 1, 2)
            assert info.state == 3
        assert until(lambda: info.state == 2)


@pytest.mark.timeout(30)
def test_subchannels_offered_but_not_yet_created_go_with_the_close() -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        g = RawGuest(mock.root, guid)
        relids = mock.offer_subchannels(guid, 2)
        g.close()  # before hv_uio_new_channel ran (~50 ms)
        assert until(lambda: mock.host_stats(guid)["subchannels"] == [])
        time.sleep(0.1)  # the pending creation finds the primary closed and does nothing
        assert [c.relid for c in Sysfs(mock.root).device(guid).channels()] == [1]
        with RawGuest(mock.root, guid):
            assert mock.offer_subchannels(guid, 2) == relids  # relids were released


CRASHES = ["5.15", "6.10", "6.12-debian", "openhcl"]
"""hv_uio_channel_cb without the primary lookup: before d062463 / the Dec 2025 backport, OpenHCL."""


def test_the_crash_list_is_the_generations_flag() -> None:
    assert CRASHES == [g for g in GENS if generation(g).subchannel_interrupt_crash]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", CRASHES)
def test_subchannel_interrupt_oopses_kernels_without_the_primary_lookup(kernel: str) -> None:
    """A host interrupt on an unmasked subchannel is the kernel's NULL dereference in
    hv_uio_channel_cb: a BUG line naming the function in the kernel log, the mock process
    dies, every client sees HostCrashed. 5.15 / 6.10 mask subchannels at creation and a
    write covers the primary only, so only a client that unmasks the subchannel itself
    (the old masked-on-open shortcut did) gets there; 6.12-debian and openhcl start them
    unmasked."""
    gen = generation(kernel)
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            (relid,) = mock.offer_subchannels(guid, 1)
            sub = g.subchannel(relid)
            assert sub.rx.interrupt_mask == int(gen.masks_on_open)  # unmasked from birth on b15b7+
            sub.rx.interrupt_mask = 1
            g.primary.rx.interrupt_mask = 0
            g.dev.irqcontrol(True)
            assert sub.rx.interrupt_mask == 1  # the write did not reach the subchannel
            mock.command(guid, "send", payload=b"primary is fine")
            assert g.recv(5) is not None and mock.alive
            mock.command(guid, "send", subchannel=1, payload=b"masked: no interrupt")
            assert mock.alive and sub.read() is not None
            sub.rx.interrupt_mask = 0
            with pytest.raises(HostCrashed, match="oops"):
                mock.command(guid, "send", subchannel=1, payload=b"boom")
            with pytest.raises(HostCrashed):  # after any event still unread from before
                for _ in range(5):
                    g.dev.wait(5)
            assert until(lambda: not mock.alive)
            log = mock.kernel_log()
            bug = [line for line in log if "BUG: kernel NULL pointer dereference" in line]
            assert bug and f"hv_uio_channel_cb (subchannel relid {relid}" in bug[0]
            assert "device_obj" in bug[0] and f"kernel {kernel}" in bug[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kernel", [g for g in GENS if g not in CRASHES])
def test_subchannel_interrupts_are_safe_with_the_primary_lookup(kernel: str) -> None:
    """6.15, 6.18 (d062463) and 6.6-lts (the Dec 2025 backport): a write of 1 clears the
    subchannel's mask (SPEC rule 6's test) and its interrupts are ordinary events."""
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo")
        binding.bind(mock.root, guid)
        with RawGuest(mock.root, guid) as g:
            (relid,) = mock.offer_subchannels(guid, 1)
            sub = g.subchannel(relid)
            sub.rx.interrupt_mask = 1
            g.dev.irqcontrol(True)
            assert sub.rx.interrupt_mask == 0
            mock.command(guid, "send", subchannel=1, payload=b"fine")
            assert g.dev.wait(5) is not None and sub.read() is not None and mock.alive
