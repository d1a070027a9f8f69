"""Shared pytest configuration: skip real-hardware tests where there is no Hyper-V."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvmbus import ring as _ring_mod
from pyvmbus.bus import Vmbus
from pyvmbus.mock import MockVmbus


def until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` every 2 ms until it holds (True) or ``timeout`` passes (False): the
    mock reacts asynchronously, as the kernel does. ``from conftest import until``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def pytest_configure(config: pytest.Config) -> None:
    """fcopy services record their partial files in a state directory (default
    /var/lib/pyvmbus/fcopy for root): the tests, and the daemons they start, use their own."""
    if "PYVMBUS_FCOPY_STATE_DIR" not in os.environ:
        state = tempfile.mkdtemp(prefix="pyvmbus-fcopy-state-")
        os.environ["PYVMBUS_FCOPY_STATE_DIR"] = state
        config.add_cleanup(lambda: shutil.rmtree(state, ignore_errors=True))


def _on_hyperv() -> bool:
    return Path("/sys/bus/vmbus/devices").is_dir() and any(Path("/sys/bus/vmbus/devices").iterdir())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    hyperv = _on_hyperv()
    root = os.geteuid() == 0
    for item in items:
        if "hyperv" in item.keywords and not hyperv:
            item.add_marker(pytest.mark.skip(reason="needs a Hyper-V guest (no /sys/bus/vmbus)"))
        if "root" in item.keywords and not (root and hyperv):
            item.add_marker(pytest.mark.skip(reason="needs root on a Hyper-V guest"))


@pytest.fixture(scope="module", params=_ring_mod.ENGINES)
def ring_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a ring test module once per ring engine ("c", "python"): every RingBuffer made
    without an explicit engine uses it. Ring test modules say
    ``pytestmark = pytest.mark.usefixtures("ring_engine")``."""
    saved = _ring_mod.ENGINE
    _ring_mod.ENGINE = request.param
    try:
        yield request.param
    finally:
        _ring_mod.ENGINE = saved


def mock_of_generation(request: pytest.FixtureRequest) -> Iterator[MockVmbus]:
    """A module's mock on the kernel generation ``request.param``. Test modules that run
    on every generation make it their ``mock`` fixture:
    ``mock = pytest.fixture(scope="module", params=GENS, name="mock")(mock_of_generation)``."""
    with MockVmbus(kernel=request.param) as m:
        yield m


def bound_monitored_echo(mock: MockVmbus) -> Iterator[str]:
    """A monitored echo device bound to uio_hv_generic on ``mock``, removed afterwards
    (``device = pytest.fixture(name="device")(bound_monitored_echo)``)."""
    guid = mock.add_device("echo", monitored=True)
    Vmbus(mock.root).bind(guid)
    yield guid
    mock.remove_device(guid)
