"""The mock's driver core: react to sysfs writes the way drivers/base + vmbus_drv.c do.

A client binds a device by writing files (``driver_override``, ``drivers/*/unbind``,
``drivers/*/bind``, ``drivers/*/new_id``, ``drivers/*/remove_id``, ``drivers_probe``).
On a real kernel each write runs the store() function synchronously; here the mock
kernel process learns of the write through inotify (IN_CLOSE_WRITE on the watched
directories) and applies the same rules, asynchronously, as udev-driven binding is:

- matching (hv_vmbus_get_id): a driver_override naming another driver never matches;
  then the driver's dynamic ids (new_id), then its static id table; an override naming
  the driver matches even without an id.
- ``drivers/<drv>/bind`` <guid>: attach if the device is unbound and matches (-ENODEV
  otherwise, -EBUSY if bound); ``unbind`` <guid>: release if bound to that driver.
- ``new_id`` <class guid>: -EINVAL if not a bare GUID, -EEXIST if already a dynamic id;
  else add it and run driver_attach (every unbound matching device is probed).
  ``remove_id``: -ENODEV if absent.
- ``drivers_probe`` <guid>: probe an unbound device against every driver in
  registration order; the first that matches and whose probe succeeds keeps it. A
  failed probe is logged and the next driver tries, as really_probe does.
- ``driver_override``: "\\n" clears it; text up to the first newline sets it; it reads
  back as "%s\\n" ("(null)" when unset).
- a new device is probed at once while ``drivers_autoprobe`` is 1; loading a driver
  runs driver_attach for it.

Limits of a mock that serves regular files: a write the kernel would reject cannot fail
in the writer; the errno is recorded in ``root/run/mock/kernel.log`` (the mock's dmesg,
:meth:`SysfsTree.kernel_log`) instead. Write-only files are reset to empty once read, so
two writes to the same file that land before the mock reads the first one merge (the
last wins); binding code that waits for each effect, as :mod:`pyvmbus.binding` does,
never does that. Writes to ``channels/<relid>/cpu`` are not acted on.

uio_hv_generic's probe and remove belong to the mock kernel (it creates the uio node,
its socket and the maps): pass them as ``probe(guid) -> bool`` (False: the probe failed,
e.g. a non-monitored channel on a kernel <= 6.9) and ``remove(guid)``. Without them a
stand-in registers the uio sysfs entries and a placeholder ``root/dev/uioN`` file. The
in-kernel drivers are modelled here: their probe opens the channel (state 3, ring
allocated) and hv_netvsc registers ``net/ethN``; their remove undoes that (storvsc's
disks vanish too).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import threading
from collections.abc import Callable, Iterator

from inotify_simple import INotify
from inotify_simple import flags as in_flags

from ..classes import DeviceClass, class_by_name
from ..guid import Guid, is_guid, parse_guid
from .generations import KernelGeneration
from .sysfs_tree import KERNEL_DRIVERS, UIO_DRIVER, SysfsTree

__all__ = ["DriverCore", "ProbeHook", "RemoveHook", "id_table"]

ProbeHook = Callable[[Guid], bool]
RemoveHook = Callable[[Guid], None]

_ENOTSUPP = 524  # the kernel-internal errno uio_hv_generic's old probe returns
_OVERRIDE_MAX = 4096 - 1  # driver_set_override: len >= PAGE_SIZE - 1 is -EINVAL
_STATE_OPENED = 3
_STATE_CLOSED = 2  # vmbus_close_internal leaves CHANNEL_OPEN_STATE behind


def id_table(gen: KernelGeneration) -> dict[str, frozenset[Guid]]:
    """Static id tables of the in-kernel drivers (class GUIDs) for one generation.

    hv_utils serves fcopy only before 6.10, when the kernel fcopy driver gave way to the
    uio daemon (the same series that made ring sizes per class).
    """
    table: dict[str, frozenset[Guid]] = {}
    for name, classes in KERNEL_DRIVERS:
        names = [c for c in classes if not (c == "fcopy" and gen.per_class_ring_size)]
        table[name] = frozenset(g for c in names if (g := class_by_name(c).guid) is not None)
    table[UIO_DRIVER] = frozenset()  # "only dynamic id's"
    return table


def _errname(code: int) -> str:
    return "ENOTSUPP" if code == _ENOTSUPP else errno.errorcode.get(code, str(code))


class DriverCore:
    """The driver core of the mock kernel, over one :class:`SysfsTree`.

    Drive it from a selector loop: register :meth:`fileno` for reading and call
    :meth:`process` when it is readable (or use :meth:`running` for a thread). The mock
    kernel adds and removes devices through :meth:`add_device` / :meth:`remove_device`,
    which register them with the core (watch, auto-probe) and the tree.
    """

    def __init__(self, tree: SysfsTree, *, probe: ProbeHook | None = None,
                 remove: RemoveHook | None = None) -> None:
        self.tree = tree
        self._probe_uio = probe or self._stand_in_probe
        self._remove_uio = remove or self._stand_in_remove
        self._lock = threading.RLock()
        self._static = id_table(tree.generation)
        self._dynids: dict[str, list[Guid]] = {}
        self._override: dict[Guid, str | None] = {}
        self._autoprobe = True
        self._ino = INotify(nonblocking=True)
        self._watches: dict[int, tuple[str, str]] = {}
        self._by_key: dict[tuple[str, str], int] = {}
        self._watch("bus", "", tree.bus_dir)
        for name in tree.drivers():
            self._watch("driver", name, tree.drivers_dir / name)
        for guid in tree.devices():
            self._override.setdefault(guid, None)
            self._watch("device", guid, tree.device_dir(guid))

    # -- event loop ---------------------------------------------------------------------------
    def fileno(self) -> int:
        """The inotify fd: readable when a client wrote one of the watched files."""
        return int(self._ino.fileno())

    def process(self) -> int:
        """Handle every write reported so far (never blocks); return how many were handled."""
        handled = 0
        with self._lock:
            for event in self._ino.read(timeout=0):
                if event.mask & in_flags.Q_OVERFLOW:
                    handled += self._rescan()
                    continue
                if event.mask & in_flags.IGNORED:
                    key = self._watches.pop(event.wd, None)
                    if key is not None:
                        self._by_key.pop(key, None)
                    continue
                where = self._watches.get(event.wd)
                if where is not None and event.mask & in_flags.CLOSE_WRITE:
                    handled += self._dispatch(where[0], where[1], event.name)
        return handled

    def serve(self, stop: threading.Event, poll: float = 0.1) -> None:
        """Process writes until ``stop`` is set (for a thread; the mock kernel has its own loop)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.fileno(), selectors.EVENT_READ)
            while not stop.is_set():
                if sel.select(poll):
                    self.process()

    @contextlib.contextmanager
    def running(self) -> Iterator[DriverCore]:
        """Serve in a daemon thread for the duration of the ``with`` block."""
        stop = threading.Event()
        thread = threading.Thread(target=self.serve, args=(stop,), name="mock-driver-core", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(5)

    def close(self) -> None:
        """Stop watching (idempotent)."""
        with self._lock:
            if not self._ino.closed:
                self._ino.close()
            self._watches.clear()
            self._by_key.clear()

    def __enter__(self) -> DriverCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watch(self, kind: str, key: str, path: os.PathLike[str] | str) -> None:
        wd = self._ino.add_watch(os.fspath(path), in_flags.CLOSE_WRITE | in_flags.ONLYDIR)
        self._watches[wd] = (kind, key)
        self._by_key[(kind, key)] = wd

    def _unwatch(self, kind: str, key: str) -> None:
        wd = self._by_key.pop((kind, key), None)
        if wd is not None:
            self._watches.pop(wd, None)
            with contextlib.suppress(OSError):
                self._ino.rm_watch(wd)

    # -- reading what a client wrote ----------------------------------------------------------
    def _take(self, path: os.PathLike[str] | str) -> str:
        """Read a write-only file and reset it to empty (what a write-only attribute reads as)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            if data:
                os.truncate(path, 0)  # IN_MODIFY only: no event of our own to handle
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace")

    @staticmethod
    def _streq(text: str) -> str:
        """sysfs_streq: compare ignoring one trailing newline; device names are exact."""
        return text[:-1] if text.endswith("\n") else text

    def _dispatch(self, kind: str, key: str, name: str) -> int:
        if kind == "device" and name == "driver_override":
            self._store_override(Guid(key))
            return 1
        if kind == "bus" and name in ("drivers_probe", "drivers_autoprobe"):
            text = self._take(self.tree.bus_dir / name) if name == "drivers_probe" else \
                (self.tree.bus_dir / name).read_text()
            if not text or (name == "drivers_autoprobe" and text == f"{int(self._autoprobe)}\n"):
                return 0
            if name == "drivers_probe":
                self._report("drivers_probe", text, self.drivers_probe(self._streq(text)))
            else:
                self._store_autoprobe(text)
            return 1
        if kind == "driver" and name in ("bind", "unbind", "new_id", "remove_id"):
            text = self._take(self.tree.drivers_dir / key / name)
            if not text:
                return 0
            arg = self._streq(text)
            store = {"bind": self.bind, "unbind": self.unbind, "new_id": self.new_id,
                     "remove_id": self.remove_id}[name]
            self._report(f"{key}/{name}", text, store(key, arg))
            return 1
        return 0

    def _rescan(self) -> int:
        """After an inotify queue overflow: look at every file a client may have written.

        The order of the lost events is gone; take the order a binding client writes in:
        overrides, then new_id / unbind / bind / remove_id, then drivers_probe.
        """
        handled = 0
        rank = {"device": 0, "driver": 1, "bus": 2}
        for kind, key in sorted(self._by_key, key=lambda k: rank[k[0]]):
            names = {"bus": ("drivers_autoprobe", "drivers_probe"), "device": ("driver_override",),
                     "driver": ("new_id", "unbind", "bind", "remove_id")}[kind]
            for name in names:
                handled += self._dispatch(kind, key, name)
        return handled

    def _report(self, what: str, text: str, result: int) -> None:
        """Log the result of a store: a write's errno cannot reach the writer through a file.

        Successful stores are logged too, so that a client that timed out can tell "the mock
        never saw my write" from "the probe after it failed".
        """
        if result >= 0:
            self.tree.log(f"write {text.strip()!r} to {what}: ok")
        else:
            self.tree.log(f"write {text.strip()!r} to {what}: -{_errname(-result)} "
                          f"({os.strerror(-result) if -result != _ENOTSUPP else 'not supported'})")

    def _store_override(self, guid: Guid) -> None:
        path = self.tree.device_dir(guid) / "driver_override"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        current = self._override.get(guid)
        shown = f"{current if current is not None else '(null)'}\n"
        if text == shown:
            return  # our own rewrite, or a write of the same value
        if not text:
            pass  # an open/close without write(): the kernel's store() never runs
        elif len(text.encode()) >= _OVERRIDE_MAX:
            self.tree.log(f"write to {guid}/driver_override: -EINVAL (longer than a page)")
        else:
            value = text.split("\0")[0].split("\n")[0]
            self._override[guid] = value or None
        self.tree.set_driver_override_file(guid, self._override.get(guid))

    def _store_autoprobe(self, text: str) -> None:
        value = text.strip().lower()
        if value in ("1", "y", "yes", "on", "true"):
            self._autoprobe = True
        elif value in ("0", "n", "no", "off", "false"):
            self._autoprobe = False
        else:
            self.tree.log(f"write {value!r} to drivers_autoprobe: -EINVAL")
        self.tree.write_attr(self.tree.bus_dir / "drivers_autoprobe", f"{int(self._autoprobe)}\n", 0o644)

    # -- the driver core's rules --------------------------------------------------------------
    def driver_override(self, guid: str) -> str | None:
        with self._lock:
            return self._override.get(parse_guid(guid))

    def dynamic_ids(self, driver: str) -> tuple[Guid, ...]:
        with self._lock:
            return tuple(self._dynids.get(driver, ()))

    def matches(self, driver: str, guid: Guid) -> bool:
        """hv_vmbus_get_id(drv, dev) != NULL."""
        override = self._override.get(guid)
        if override is not None and override != driver:
            return False
        cls = self.tree.device(guid).class_guid
        if cls in self._dynids.get(driver, ()) or cls in self._static.get(driver, frozenset()):
            return True
        return override is not None

    def _device(self, name: str) -> Guid | None:
        """bus_find_device_by_name: exact (lower-case, unbraced) device names only."""
        if not is_guid(name) or name != name.lower() or name.startswith("{"):
            return None
        g = Guid(name)
        return g if g in self._override and self.tree.device_dir(g).is_dir() else None

    def _probe(self, driver: str, guid: Guid) -> int:
        """really_probe: 0 when bound, -errno when the driver's probe failed."""
        dev = self.tree.device(guid)
        if driver == UIO_DRIVER:
            if not self._probe_uio(guid):
                code = _ENOTSUPP if dev.monitor_id is None and self.tree.generation.refuses_unmonitored \
                    else errno.ENODEV
                self.tree.log(f"{UIO_DRIVER} {guid}: probe with driver {driver} failed with error -{code}"
                              + (" (vmbus channel requires hypercall)" if code == _ENOTSUPP else ""))
                return -code
            self.tree.set_ring_allocated(guid, dev.relid, self.tree.generation.ring_size(dev.cls))
        else:
            self.tree.set_ring_allocated(guid, dev.relid, self.tree.generation.ring_size(dev.cls))
            self.tree.set_state(guid, _STATE_OPENED)
            if driver == "hv_netvsc":
                self.tree.add_net(guid)
        self.tree.set_driver(guid, driver)
        self.tree.log(f"{driver} {guid}: bound")
        return 0

    def _release(self, guid: Guid) -> None:
        """device_release_driver: the bound driver's remove(), then the link goes."""
        driver = self.tree.driver_of(guid)
        if driver is None:
            return
        dev = self.tree.device(guid)
        if driver == UIO_DRIVER:
            self._remove_uio(guid)
        else:
            if driver == "hv_netvsc":
                self.tree.remove_net(guid)
            elif driver == "hv_storvsc":
                self.tree.remove_block_devices(guid)
            self.tree.set_state(guid, _STATE_CLOSED)
        if self.tree.device_dir(guid).is_dir():
            self.tree.set_ring_allocated(guid, dev.relid, None)
            self.tree.set_driver(guid, None)
        self.tree.log(f"{driver} {guid}: unbound")

    def device_attach(self, guid: Guid) -> bool:
        """Probe an unbound device against every driver in registration order."""
        if self.tree.driver_of(guid) is not None:
            return True
        for driver in self.tree.drivers():
            if self.matches(driver, guid) and self._probe(driver, guid) == 0:
                return True
        return False

    def driver_attach(self, driver: str) -> None:
        """Probe every unbound device the driver matches (errors only logged)."""
        for guid in list(self._override):
            if self.tree.device_dir(guid).is_dir() and self.tree.driver_of(guid) is None \
                    and self.matches(driver, guid):
                self._probe(driver, guid)

    # -- store() functions (also callable directly; return 0 or -errno) ------------------------
    def bind(self, driver: str, name: str) -> int:
        """drivers/<driver>/bind."""
        with self._lock:
            guid = self._device(name)
            if guid is None or not self.matches(driver, guid):
                return -errno.ENODEV
            if self.tree.driver_of(guid) is not None:
                return -errno.EBUSY
            return self._probe(driver, guid)

    def unbind(self, driver: str, name: str) -> int:
        """drivers/<driver>/unbind."""
        with self._lock:
            guid = self._device(name)
            if guid is None or self.tree.driver_of(guid) != driver:
                return -errno.ENODEV
            self._release(guid)
            return 0

    def new_id(self, driver: str, text: str) -> int:
        """drivers/<driver>/new_id: guid_parse (36 chars, no braces), -EEXIST if present."""
        with self._lock:
            guid = self._guid_parse(text)
            if guid is None:
                return -errno.EINVAL
            ids = self._dynids.setdefault(driver, [])
            if guid in ids:
                return -errno.EEXIST
            ids.append(guid)
            self.driver_attach(driver)
            return 0

    def remove_id(self, driver: str, text: str) -> int:
        """drivers/<driver>/remove_id: -ENODEV if the id is not a dynamic id."""
        with self._lock:
            guid = self._guid_parse(text)
            if guid is None:
                return -errno.EINVAL
            ids = self._dynids.get(driver, [])
            if guid not in ids:
                return -errno.ENODEV
            ids.remove(guid)
            return 0

    def drivers_probe(self, name: str) -> int:
        """bus drivers_probe: -ENODEV for an unknown device; a failed probe is not an error."""
        with self._lock:
            guid = self._device(name)
            if guid is None:
                return -errno.ENODEV
            self.device_attach(guid)
            return 0

    @staticmethod
    def _guid_parse(text: str) -> Guid | None:
        """guid_parse / uuid_is_valid: the first 36 characters, dashes at 8, 13, 18, 23."""
        head = text[:36]
        if len(head) != 36 or any(head[i] != "-" for i in (8, 13, 18, 23)) or not is_guid(head):
            return None
        return parse_guid(head)

    # -- kernel side: devices and modules come and go ------------------------------------------
    def add_device(self, cls: DeviceClass | str, instance: str | None = None, *,
                   monitored: bool | None = None, monitor_id: int | None = None,
                   relid: int | None = None, cpu: int = 0) -> Guid:
        """vmbus_device_register: create the device (see :meth:`SysfsTree.add_device`) and,
        while drivers_autoprobe is 1, probe it (a network device gets hv_netvsc, ...)."""
        with self._lock:
            guid = self.tree.add_device(cls, instance, monitored=monitored, monitor_id=monitor_id,
                                        relid=relid, cpu=cpu)
            self._override[guid] = None
            self._watch("device", guid, self.tree.device_dir(guid))
            if self._autoprobe:
                self.device_attach(guid)
            return guid

    def remove_device(self, guid: str) -> None:
        """vmbus_device_unregister: release the driver, then the device vanishes."""
        with self._lock:
            g = parse_guid(guid)
            if g not in self._override:
                return
            self._unwatch("device", g)
            self._release(g)
            self._override.pop(g, None)
            self.tree.remove_device(g)

    def load_driver(self, name: str) -> None:
        """modprobe: the driver registers (driver_attach runs for it)."""
        with self._lock:
            self.tree.load_driver(name)
            if ("driver", name) not in self._by_key:
                self._watch("driver", name, self.tree.drivers_dir / name)
            self.driver_attach(name)

    def unload_driver(self, name: str) -> None:
        """rmmod: every device it holds is released, its dynamic ids are forgotten."""
        with self._lock:
            for guid in list(self._override):
                if self.tree.driver_of(guid) == name:
                    self._release(guid)
            self._unwatch("driver", name)
            self._dynids.pop(name, None)
            self.tree.unload_driver(name)

    # -- stand-in uio_hv_generic (when the mock kernel supplies no hooks) ----------------------
    def _stand_in_probe(self, guid: Guid) -> bool:
        dev = self.tree.device(guid)
        if self.tree.generation.refuses_unmonitored and dev.monitor_id is None:
            return False
        name = self.tree.add_uio(guid, self.tree.next_uio_index(), self.tree.uio_maps(guid))
        (self.tree.dev_dir / name).touch()
        return True

    def _stand_in_remove(self, guid: Guid) -> None:
        name = self.tree.remove_uio(guid)
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.tree.dev_dir / name).unlink()
