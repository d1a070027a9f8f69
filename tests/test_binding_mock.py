"""sysfs + binding through MockVmbus: the mock kernel process reacts to the same file writes."""

from __future__ import annotations

import os
import stat
import time

import pytest

from conftest import until
from pyvmbus.binding import bind, read_record, restore, unbind
from pyvmbus.errors import AlreadyBound, BindFailed, DeviceNotFound, DeviceRescinded
from pyvmbus.mock import MockVmbus
from pyvmbus.sysfs import Sysfs
from pyvmbus.uio import UioDevice

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_CONNECTION", raising=False)


@pytest.mark.parametrize("kernel", ["6.18", "5.15"])
def test_round_trip_and_open_the_node(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        echo = mock.add_device("echo")
        net = mock.add_device("network")
        s = Sysfs(mock.root)
        assert s.device(net).driver == "hv_netvsc" and s.device(echo).driver is None
        name = bind(mock.root, echo)
        d = s.device(echo)
        assert d.driver == "uio_hv_generic" and d.uio_name == name == mock.uio_name(echo)
        assert stat.S_ISSOCK(os.stat(mock.root / "dev" / name).st_mode)
        info = d.uio()
        assert info is not None and info.driver_name == "uio_hv_generic" and info.version == "0.02.1"
        with UioDevice.open(mock.root, name, device=echo) as dev:
            assert dev.map("txrx_rings").size == info.map("txrx_rings").size
            assert until(lambda: d.state == 3)  # the first open opened the channel
            assert until(lambda: d.channels()[0].write_avail is not None)
        with pytest.raises(AlreadyBound):
            bind(mock.root, echo)
        assert bind(mock.root, net) != name
        assert restore(mock.root, net) == "hv_netvsc"
        assert s.device(net).net_interfaces == ["eth0"]
        assert restore(mock.root, echo) is None
        assert d.driver is None and d.uio_name is None and not (mock.root / "dev" / name).exists()


@pytest.mark.parametrize("kernel", ["5.15", "6.6-lts"])
def test_old_kernel_refuses_an_unmonitored_channel(kernel: str) -> None:
    with MockVmbus(kernel=kernel) as mock:
        hb = mock.add_device("heartbeat")  # integration services are not monitored
        assert Sysfs(mock.root).device(hb).driver == "hv_utils"
        t0 = time.monotonic()
        with pytest.raises(BindFailed, match="monitor id") as exc:
            bind(mock.root, hb, timeout=10.0)
        assert time.monotonic() - t0 < 5  # the failed probe ends it, not the timeout
        assert "ENOTSUPP" in str(exc.value) and "hv_utils was bound again" in str(exc.value)
        assert until(lambda: Sysfs(mock.root).device(hb).driver == "hv_utils")
        assert any("-524" in line for line in mock.kernel_log())
        assert read_record(mock.root, hb) is None


def test_newest_kernel_binds_an_unmonitored_channel() -> None:
    with MockVmbus(kernel="6.18") as mock:
        hb = mock.add_device("heartbeat")
        d = Sysfs(mock.root).device(hb)
        assert d.monitor_id is None and not (d.path / "monitor_id").exists()  # hidden
        assert bind(mock.root, hb).startswith("uio")
        assert unbind(mock.root, hb) == "uio_hv_generic"
        assert restore(mock.root, hb) == "hv_utils"


def test_rescind_on_the_newest_kernel_unregisters_the_device() -> None:
    with MockVmbus(kernel="6.18") as mock:
        echo = mock.add_device("echo")
        s = Sysfs(mock.root)
        d = s.device(echo)
        bind(mock.root, echo)
        mock.rescind(echo)
        assert until(lambda: not d.exists())
        with pytest.raises(DeviceRescinded, match=echo):
            _ = d.relid
        with pytest.raises(DeviceNotFound):
            s.device(echo)
        mock.reoffer(echo)
        assert until(lambda: d.exists())
        assert d.driver is None and d.driver_override is None  # a new device: the override is gone


def test_subchannels_appear_in_sysfs() -> None:
    with MockVmbus(kernel="6.18") as mock:
        net = mock.add_device("network")
        name = bind(mock.root, net)
        d = Sysfs(mock.root).device(net)
        with UioDevice.open(mock.root, name, device=net):
            relids = mock.offer_subchannels(net, 2)
            assert until(lambda: [c.relid for c in d.channels()][1:] == relids)
            assert [c.subchannel_id for c in d.channels()] == [0, 1, 2]
            assert until(lambda: all(c.ring_path is not None for c in d.channels()[1:]))
            assert [r for r, _ in d.channel_vp_mapping] == [d.relid, *relids]
