"""The error tree: one root, host faults apart from caller faults, readable messages."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pyvmbus
from pyvmbus import errors


def test_tree() -> None:
    assert issubclass(errors.RingCorrupt, errors.HostError)
    assert issubclass(errors.DeviceRescinded, errors.HostError)
    assert issubclass(errors.DeviceNotFound, errors.UsageError)
    assert issubclass(errors.NotPermitted, errors.UsageError)
    assert issubclass(errors.NotPermitted, PermissionError)
    assert issubclass(errors.Timeout, TimeoutError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.VmbusError)


def test_messages_carry_inputs() -> None:
    e = errors.RingCorrupt("len8", 0, "a packet cannot be empty")
    assert (e.field, e.value) == ("len8", 0)
    assert "len8=0x0" in str(e)
    nf = errors.DeviceNotFound("abc", nearest=("abcd-1",))
    assert "nearest: abcd-1" in str(nf)
    assert "modprobe uio_hv_generic" in str(errors.DriverNotLoaded("uio_hv_generic", "/x"))
    assert "--force" in str(errors.GuardRailRefused("g", "mounted /"))
    uk = errors.UnsupportedKernel("g", "open subchannel 5", "nothing signals it", "6.15+")
    assert (uk.device, uk.works_on) == ("g", "6.15+") and isinstance(uk, errors.UsageError)
    assert str(uk) == "g: cannot open subchannel 5: nothing signals it; it works on 6.15+"


def test_every_exception_named_in_a_docstring_exists() -> None:
    """A docstring that says ``raises :class:`X``` (or names an error) must name a real class."""
    known = {"ValueError", "KeyError", "IndexError", "OSError", "TimeoutError", "ImportError"}
    modules = []
    for mod_info in pkgutil.walk_packages(pyvmbus.__path__, "pyvmbus."):
        if not mod_info.name.startswith("pyvmbus._"):
            modules.append(importlib.import_module(mod_info.name))
    for mod in modules:
        known |= {n for n, v in vars(mod).items() if isinstance(v, type) and issubclass(v, Exception)}
    pattern = re.compile(r":class:`~?(?:pyvmbus\.)?(?:errors\.)?(\w+(?:Error|Corrupt|Full|Found|"
                         r"Permitted|Loaded|Bound|Refused|Rescinded|Crashed|Closed|Unavailable|Guid|Timeout))`")
    missing = []
    for mod in modules:
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None) or ""
            for name in pattern.findall(doc):
                if name not in known:
                    missing.append((mod.__name__, name))
    assert not missing


def test_ring_corrupt_is_located_once_with_its_ring() -> None:
    engine = errors.RingCorrupt("len8", 0, "shorter than the descriptor")  # as the engine raises it
    assert engine.where == ""
    named = engine.in_ring("rx ring")
    assert named.located("channel X relid 1, in a drain").detail == (
        "len8=0x0 (0): shorter than the descriptor (rx ring of channel X relid 1, in a drain)")
    check = errors.RingCorrupt("interrupt_mask", 2, "only 0 or 1", "tx ring")  # the header check: named
    assert check.in_ring("rx ring") is check
