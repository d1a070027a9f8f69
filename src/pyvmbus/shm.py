"""Shared-memory primitives: sequentially consistent 32-bit atomics and numpy views.

The ring indices, the interrupt page and the monitor page are shared with the host (and
the int/monitor pages with every other VMBus driver in the guest). Python offers no
atomic access to such memory, so this module provides exactly four operations on a
32-bit word of any buffer (bytearray, mmap, numpy array, memoryview):

``load32``, ``store32``, ``fetch_or32`` (all ``__ATOMIC_SEQ_CST``) and ``fence``.

Two backends give the same semantics:

- ``c``: the project's extension :mod:`pyvmbus._atomic` (``__atomic_*`` builtins),
  about 100 ns a call;
- ``libatomic``: the system's ``libatomic.so.1`` through ctypes, 3-5x slower, used where
  the extension could not be built.

``PYVMBUS_ATOMICS=c|libatomic`` forces one. If neither exists, importing the atomics
raises :class:`AtomicsUnavailable` naming both fixes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import VmbusError

__all__ = [
    "AtomicBackend",
    "AtomicsUnavailable",
    "BACKEND",
    "available_backends",
    "as_u8",
    "fence",
    "fetch_or32",
    "get_backend",
    "load32",
    "store32",
]

Buffer = Any
"""Anything exposing the buffer protocol (bytearray, mmap, numpy array, memoryview)."""


class AtomicsUnavailable(VmbusError, ImportError):
    """Neither the C helper nor libatomic.so.1 can be used on this system."""


@dataclass(frozen=True)
class AtomicBackend:
    """One implementation of the four shared-memory operations."""

    name: str
    load32: Callable[[Buffer, int], int]
    store32: Callable[[Buffer, int, int], None]
    fetch_or32: Callable[[Buffer, int, int], int]
    fence: Callable[[], None]


def _c_backend() -> AtomicBackend:
    from . import _atomic  # type: ignore[attr-defined]

    return AtomicBackend("c", _atomic.load32, _atomic.store32, _atomic.fetch_or32, _atomic.fence)


_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _libatomic_backend() -> AtomicBackend:
    path = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise AtomicsUnavailable(f"cannot load libatomic ({path}): {exc}") from exc
    u32, vp, cint = ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int
    load = lib.__atomic_load_4
    load.argtypes, load.restype = [vp, cint], u32
    store = lib.__atomic_store_4
    store.argtypes, store.restype = [vp, u32, cint], None
    fetch_or = lib.__atomic_fetch_or_4
    fetch_or.argtypes, fetch_or.restype = [vp, u32, cint], u32

    def word(buf: Buffer, offset: int) -> tuple[ctypes.c_char, int]:
        """(pin, address) of the u32 at ``offset``. The pin is the ctypes object that holds
        the buffer export: while the caller keeps it, an mmap under ``buf`` cannot be
        closed (BufferError) and the address stays valid, as the C helper's Py_buffer does.
        from_buffer needs a writable buffer."""
        mv = memoryview(buf)
        if offset < 0 or offset > mv.nbytes - 4:
            raise IndexError(
                f"word at offset {offset} is outside the buffer of {mv.nbytes} bytes"
            )
        pin = ctypes.c_char.from_buffer(mv.cast("B"))
        addr = ctypes.addressof(pin) + offset
        if addr & 3:
            raise ValueError(f"word at offset {offset} is not 4-byte aligned")
        return pin, addr

    def load32(buf: Buffer, offset: int) -> int:
        _pin, addr = word(buf, offset)  # ``_pin`` lives until the atomic has run
        return int(load(addr, _SEQ_CST))

    def store32(buf: Buffer, offset: int, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise OverflowError("value does not fit in 32 bits")
        _pin, addr = word(buf, offset)
        store(addr, value, _SEQ_CST)

    def fetch_or32(buf: Buffer, offset: int, mask: int) -> int:
        if not 0 <= mask <= 0xFFFFFFFF:
            raise OverflowError("value does not fit in 32 bits")
        _pin, addr = word(buf, offset)
        return int(fetch_or(addr, mask, _SEQ_CST))

    thread_fence = getattr(lib, "atomic_thread_fence", None)
    if thread_fence is not None:
        thread_fence.argtypes, thread_fence.restype = [cint], None

        def fence() -> None:
            thread_fence(_SEQ_CST)
    else:  # libatomic < 1.2: a seq_cst RMW on a private word is a full barrier too.
        scratch = (ctypes.c_uint32 * 1)()
        scratch_addr = ctypes.addressof(scratch)

        def fence() -> None:
            fetch_or(scratch_addr, 0, _SEQ_CST)

    return AtomicBackend("libatomic", load32, store32, fetch_or32, fence)


_FACTORIES: dict[str, Callable[[], AtomicBackend]] = {
    "c": _c_backend,
    "libatomic": _libatomic_backend,
}


def get_backend(name: str) -> AtomicBackend:
    """Build the backend called ``name`` ("c" or "libatomic"); AtomicsUnavailable if it can't."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown atomics backend {name!r}; known: {', '.join(_FACTORIES)}") from None
    try:
        return factory()
    except ImportError as exc:
        if isinstance(exc, AtomicsUnavailable):
            raise
        raise AtomicsUnavailable(f"atomics backend {name!r} unavailable: {exc}") from exc


def available_backends() -> list[str]:
    """Names of the backends that load on this system, fastest first."""
    names = []
    for name in _FACTORIES:
        try:
            get_backend(name)
        except AtomicsUnavailable:
            continue
        names.append(name)
    return names


def _default_backend() -> AtomicBackend:
    forced = os.environ.get("PYVMBUS_ATOMICS")
    if forced:
        return get_backend(forced)
    errors = []
    for name in _FACTORIES:
        try:
            return get_backend(name)
        except AtomicsUnavailable as exc:
            errors.append(str(exc))
    raise AtomicsUnavailable(
        "no atomics backend: " + "; ".join(errors) + ". Reinstall pyvmbus with a C compiler "
        "(apt-get install gcc python3-dev) or install libatomic1."
    )


_backend = _default_backend()
BACKEND: str = _backend.name
"""Name of the backend in use ("c" or "libatomic")."""

load32: Callable[[Buffer, int], int] = _backend.load32
"""Sequentially consistent load of the little-endian u32 at ``offset``."""
store32: Callable[[Buffer, int, int], None] = _backend.store32
"""Sequentially consistent store of a u32 at ``offset``."""
fetch_or32: Callable[[Buffer, int, int], int] = _backend.fetch_or32
"""Atomically OR ``mask`` into the u32 at ``offset``; returns the old value."""
fence: Callable[[], None] = _backend.fence
"""Full memory barrier (the kernel's virt_mb())."""


def as_u8(buf: Buffer) -> npt.NDArray[np.uint8]:
    """A writable flat uint8 numpy view of ``buf`` with no copy (ValueError if read-only)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    if not arr.flags.writeable:
        raise ValueError("shared-memory buffer must be writable")
    return arr
