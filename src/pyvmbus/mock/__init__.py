"""Mock VMBus: a fake sysfs root, a mock kernel and a mock Hyper-V host in another process.

:class:`MockVmbus` is what tests, the CLI's ``--mock`` and users' own test suites use::

    with MockVmbus(kernel="6.18") as mock:          # one uio_hv_generic generation
        guid = mock.add_device("echo")               # or a class name / class GUID
        bus = Vmbus(root=mock.root)                  # everything else runs unchanged
        ...
        mock.rescind(guid); mock.fault(guid, "stall")

The mock process (``python -m pyvmbus.mock.kernel``, a fresh interpreter, so it inherits
nothing from the test process) runs one loop: the driver core (sysfs writes), the uio
nodes and their connections, the host's page scans and model ticks, and a control
connection to this object. Kernel logic lives in :mod:`pyvmbus.mock.kernel`, host logic
in :mod:`pyvmbus.mock.host`, device models in :mod:`pyvmbus.mock.models`.

Robustness: the root is a fresh temporary folder (on /dev/shm when there is one) removed
on exit even when the ``with`` body raised; the process is asked to stop, then
terminated, then killed; if this process dies without closing, the mock process notices
its control connection close, removes the root and exits.

What it may import: the library's lower layers it plays the other side of (guid, classes,
errors, shm, ring, packet, sysfs formats, uio's page size) and the IC messages
(:mod:`pyvmbus.ic.messages`, :mod:`pyvmbus.ic.framework`), so host and guest share one
declaration of each message. Never channel, dispatch, aio or the CLI: the mock must not
share the client's logic, only its wire formats. The library imports nothing from here
(the CLI's ``--mock`` and ``vmbus mock serve`` do).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .. import errors as _errors
from ..errors import HostCrashed, Timeout
from ..guid import Guid, parse_guid
from .generations import DEFAULT_GENERATION, KernelGeneration, generation
from .models import ECHO_CLASS_GUID, DeviceModel, HostChannel, register_model

__all__ = ["ECHO_CLASS_GUID", "FAULTS", "DeviceModel", "HostChannel", "MockVmbus", "register_model"]

FAULTS = ("corrupt", "stall", "resume", "storm", "crash", "header", "descriptor")
"""What :meth:`MockVmbus.fault` accepts."""

_START_TIMEOUT = 60.0
_REPLY_TIMEOUT = 30.0


def _tmp_base() -> str | None:
    """/dev/shm when usable: ring files live there, and tmpfs has no writeback to disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _cleanup(state: dict[str, Any]) -> None:
    """Stop the mock process and remove the root (idempotent; also run by the finalizer)."""
    if state.get("done"):
        return
    state["done"] = True
    proc: subprocess.Popen[bytes] | None = state.get("proc")
    conn: Connection | None = state.get("conn")
    if proc is not None and proc.poll() is None and conn is not None:
        with contextlib.suppress(OSError, EOFError, ValueError):
            conn.send((0, "shutdown", {}))
            deadline = time.monotonic() + 5.0
            while conn.poll(max(0.0, deadline - time.monotonic())) and conn.recv()[0] != 0:
                pass
    if proc is not None:
        for stop in (None, proc.terminate, proc.kill):
            if stop is not None:
                with contextlib.suppress(OSError):
                    stop()
            try:
                proc.wait(5.0 if stop is None else 2.0)
                break
            except subprocess.TimeoutExpired:
                continue
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
    log = state.get("log")
    if log is not None:
        log.close()
    root = state.get("root")
    if root is not None and state.get("owns_root"):
        shutil.rmtree(root, ignore_errors=True)


class MockVmbus:
    """A mock VMBus under a temporary root: fake sysfs, mock kernel, mock host.

    ``kernel`` picks the uio_hv_generic generation ("5.15", "6.10", "6.15", "6.18",
    "6.12-debian", "6.6-lts", "openhcl"; see :mod:`pyvmbus.mock.generations`). ``devices`` are offered at
    start (what :meth:`add_device` takes). ``models`` names extra modules the host
    process imports to register device models (the built-in IC models are always
    imported when it exists). ``root`` uses a folder of yours instead of a fresh temporary
    one (then it is not removed). Use it as a context manager or call :meth:`start` and
    :meth:`close`.

    Device defaults: perf classes (network, scsi, ...) and unknown classes are offered
    monitored (with a monitor id), integration services (heartbeat, shutdown, timesync,
    kvp, vss, fcopy) are not; ``echo`` is monitored unless ``monitored=False``. On kernels
    that refuse unmonitored channels (5.15, 6.6-lts) binding such a device leaves no uio
    node, and the kernel log says why.
    """

    def __init__(self, kernel: str = DEFAULT_GENERATION, devices: Iterable[str] = (), *,
                 root: str | os.PathLike[str] | None = None, models: Iterable[str] = (),
                 timeout: float = _REPLY_TIMEOUT) -> None:
        self.generation: KernelGeneration = generation(kernel)
        self._initial = list(devices)
        self._root_arg = Path(root) if root is not None else None
        self._models = list(models)
        self._timeout = timeout
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {}
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._crash_detail = ""
        self._seq = 0

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> MockVmbus:
        """Build the root and start the mock process (done by ``with``)."""
        if self._proc is not None:
            raise RuntimeError("this MockVmbus was started already")
        owns = self._root_arg is None
        if self._root_arg is None:
            root = Path(tempfile.mkdtemp(prefix="pyvmbus-mock-", dir=_tmp_base()))
        else:
            root = self._root_arg
            root.mkdir(parents=True, exist_ok=True)
        self._root = root
        self._state = {"root": root, "owns_root": owns}
        self._finalizer = weakref.finalize(self, _cleanup, self._state)
        try:
            self._spawn(root, owns)
            for what in self._initial:
                self.add_device(what)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, root: Path, owns: bool) -> None:
        run = root / "run" / "mock"
        run.mkdir(parents=True, exist_ok=True)
        log = open(run / "process.log", "wb")  # noqa: SIM115 - closed by _cleanup
        self._state["log"] = log
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the folder that holds pyvmbus/
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "pyvmbus.mock.kernel", "--control-fd", str(child.fileno()),
               "--root", str(root), "--kernel", self.generation.name,
               "--models", ",".join(self._models)]
        if owns:
            cmd.append("--owns-root")
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._state.update(proc=self._proc, conn=self._conn)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._conn.poll(0.1):
                try:
                    msg = self._conn.recv()
                except EOFError:
                    msg = ("failed", "the process exited")
                if msg[0] == "ready":
                    return
                raise HostCrashed("mock VMBus", f"the mock process failed to start: {msg[1]}; "
                                  f"its output: {self._process_tail()}")
            if self._proc.poll() is not None:
                raise HostCrashed("mock VMBus", f"the mock process exited with {self._proc.returncode} "
                                  f"while starting; its output: {self._process_tail()}")
            if time.monotonic() > deadline:
                raise Timeout("the mock process to start", _START_TIMEOUT)

    def _process_tail(self, lines: int = 15) -> str:
        if self._root is None:
            return ""
        try:
            text = (self._root / "run" / "mock" / "process.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        """Stop the mock process and remove the root. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> MockVmbus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties -------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The fake root: ``root/sys``, ``root/dev`` (pass it to Vmbus / Sysfs / UioDevice)."""
        if self._root is None:
            raise RuntimeError("MockVmbus is not started")
        return self._root

    @property
    def pid(self) -> int | None:
        """The mock process's pid (None before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """True while the mock process runs."""
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<MockVmbus kernel={self.generation.name} root={self._root} {state}>"

    # -- the control connection -------------------------------------------------------------
    def _call(self, name: str, /, **args: Any) -> Any:
        with self._lock:
            conn, proc = self._conn, self._proc
            if conn is None or proc is None or self._state.get("done"):
                raise RuntimeError("MockVmbus is not running (not started, or closed)")
            limit = self._timeout
            self._seq += 1
            seq = self._seq
            try:
                conn.send((seq, name, args))
                deadline = time.monotonic() + limit
                while True:
                    while not conn.poll(0.05):
                        if proc.poll() is not None:
                            raise EOFError
                        if time.monotonic() > deadline:
                            raise Timeout(f"the mock process to answer {name!r}", limit)
                    reply = conn.recv()
                    if reply[0] == seq:  # else: the answer to a call that was interrupted
                        break
            except (EOFError, OSError):
                raise self._dead() from None
        if reply[1] == "ok":
            return reply[2]
        raise _rebuild(reply[1:])

    def _dead(self) -> HostCrashed:
        proc = self._proc
        code = proc.wait(5.0) if proc is not None else None
        from .kernel import OOPS_EXIT as _OOPS_EXIT  # only on this path: kernel.py is the process
        detail = self._crash_detail or (
            "the mock guest kernel oopsed (a subchannel interrupt on a kernel with b15b7 but "
            "without d062463; see kernel_log())" if code == _OOPS_EXIT
            else f"the mock process exited with {code}")
        return HostCrashed("mock VMBus", f"{detail}; its output: {self._process_tail(5)}")

    # -- devices ----------------------------------------------------------------------------
    def add_device(self, what: str | None = None, *, instance: str | None = None,
                   monitored: bool | None = None, model: str | None = None,
                   replay: str | os.PathLike[str] | None = None,
                   vary: dict[int, Any] | None = None) -> Guid:
        """Offer a device; return its instance GUID.

        ``what``: a model name ("echo", "heartbeat", ...; the device gets the model's
        class), a class short name ("network", "fcopy", ...) or a class GUID (the device
        runs the model registered for that class, else "null", which reads and never
        answers). ``model`` picks the model explicitly. ``instance`` defaults to Hyper-V's
        fixed instance GUID for an integration device (heartbeat, kvp, shutdown,
        timesync, vss, fcopy: :data:`pyvmbus.classes.HYPERV_INSTANCE_GUIDS`) while no
        other device holds it, so tools that hard-code them work, else a random GUID.
        Relids are allocated from 1 upward, monitor ids from 0 for monitored
        channels. The device appears under ``root/sys/bus/vmbus/devices`` and the driver
        core binds it as a kernel would (e.g. network -> hv_netvsc).

        ``replay``: a capture (pcapng from :mod:`pyvmbus.capture`): the device is offered
        with the captured device's instance GUID (unless ``instance``), class and monitor
        setting, and its host plays the capture back and checks the guest against it
        (:mod:`pyvmbus.mock.replay`; ``vary`` marks payload bytes that may differ, by record
        number; ``what`` picks the device when the capture has several). Read the outcome
        with :meth:`replay_report` / :meth:`replay_check`.
        """
        if replay is not None:
            return self._add_replay(replay, what, instance, monitored, vary)
        if what is None:
            raise TypeError("add_device() needs what (a model, class name or class GUID) or replay=")
        guid = self._call("add_device", what=what, instance=instance, monitored=monitored, model=model)
        return parse_guid(guid)

    def _add_replay(self, path: str | os.PathLike[str], device: str | None, instance: str | None,
                    monitored: bool | None, vary: dict[int, Any] | None) -> Guid:
        from .replay import build_script

        try:
            script = build_script(path, device, vary)
        except ValueError as exc:
            raise _errors.UsageError(f"replay {path}: {exc}") from None
        guid = self._call("add_device", what=script.class_guid or str(ECHO_CLASS_GUID),
                          instance=instance or script.device,
                          monitored=script.monitored if monitored is None else monitored,
                          model="replay", replay=script)
        return parse_guid(guid)

    def replay_report(self, guid: str) -> dict[str, Any]:
        """How a replayed device's guest did so far: ok, expected / matched guest packets,
        host packets played, pending (guest packets not seen yet), diffs (one string each:
        record number, expected, got), ring_sizes the capture had. KeyError if the device is not a replay."""
        report = self._call("replay_report", guid=str(guid))
        if report is None:
            raise KeyError(f"{guid} is not a replayed device (add_device(replay=...))")
        return dict(report)

    def replay_check(self, guid: str) -> dict[str, Any]:
        """:meth:`replay_report`, raising :class:`~pyvmbus.mock.replay.ReplayMismatch` with
        every diff unless the guest did all the capture recorded, and nothing else."""
        from .replay import ReplayMismatch

        report = self.replay_report(guid)
        if not report["ok"]:
            raise ReplayMismatch(str(guid), list(report["diffs"]))
        return report

    def remove_device(self, guid: str) -> None:
        """Hot-remove: the host rescinds the device for good; it is unregistered on every kernel."""
        self._call("remove_device", guid=str(guid))

    def rescind(self, guid: str) -> None:
        """The host rescinds the device: reads and writes of its node fail with EIO; on the
        generations that unregister on rescind (and for a node never opened) the node and
        the device directory vanish. :meth:`reoffer` offers it again."""
        self._call("rescind", guid=str(guid))

    def reoffer(self, guid: str) -> int:
        """Offer a rescinded device again (same instance GUID, a new relid, which is
        returned). It is bound as a new device: driver_override is gone, new_id ids stay."""
        return int(self._call("reoffer", guid=str(guid)))

    def fault(self, guid: str, kind: str, **args: Any) -> None:
        """Make the host misbehave.

        - ``corrupt``: the next descriptor the host writes claims len8 = 0x200 while 24
          bytes are published (``count=n`` for the next n);
        - ``stall``: the host stops reading the guest's TX ring (it fills up);
          ``resume`` undoes it;
        - ``storm``: ``count`` (default 1000) interrupts with nothing new, as fast as the
          loop turns;
        - ``crash``: the host process dies (every connection closes: a client sees
          :class:`~pyvmbus.errors.HostCrashed`); this object then only cleans up;
        - ``header``: ``ring="rx"|"tx", field=<write_index|read_index|interrupt_mask|
          pending_send_sz|feature_bits>, value=<u32>``: the host stores that value in that
          word of the guest's ring (whoever owns it), then interrupts (``interrupt=False``:
          not); ``subchannel=n`` picks the channel;
        - ``descriptor``: ``offset8=, len8=`` (and ``type``, ``flags``, ``transaction_id``,
          ``publish`` = bytes published, default 32): the host publishes a packet with that
          descriptor in the guest's RX ring, then interrupts.
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        self._call("fault", guid=str(guid), kind=kind, args=args)
        if kind == "crash" and self._proc is not None:
            self._crash_detail = "the mock host process was crashed on purpose (fault 'crash')"
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10.0)

    def offer_subchannels(self, guid: str, count: int, *, monitored: bool | None = None) -> list[int]:
        """The host offers ``count`` subchannels of an opened device; returns their relids.

        Their ``channels/<relid>/ring`` files appear ~50 ms later, asynchronously, as on
        a real kernel. They share the device's event counter; the kernel masks them on
        creation where the generation masks on open. They go away when the guest's last
        close of the node closes the primary. ``monitored`` (default: as the primary)
        offers them with or without monitor ids: Hyper-V may offer a non-latency-sensitive
        device's subchannels without one (d062463's commit message).
        """
        return [int(r) for r in self._call("offer_subchannels", guid=str(guid), count=int(count),
                                           monitored=monitored)]

    def command(self, guid: str, name: str, *, subchannel: int = 0, **args: Any) -> Any:
        """Forward ``name(**args)`` to the device model of the open channel (the primary,
        or subchannel index ``subchannel``) in the host process; return its result."""
        return self._call("command", guid=str(guid), name=name, args=args, subchannel=subchannel)

    def host_stats(self, guid: str) -> dict[str, Any]:
        """What the host saw: packets_in / bytes_in (from the guest), packets_out /
        bytes_out, signals (guest -> host), interrupts (host -> guest), ring_full,
        corrupt_sent, guest_ring_errors, model_errors, queued, stalled, relid, monitor_id,
        open, rescinded, subchannels, last_error, and ``channels`` per relid."""
        result: dict[str, Any] = self._call("host_stats", guid=str(guid))
        return result

    def kernel_state(self, guid: str) -> dict[str, Any]:
        """What the mock kernel holds for a device: registered, uio, opencount, event_count,
        rescinded, driver, relid, einval (refused writes), channels {relid: opened,
        ring_size, in_mask, interrupts, sig_events, subchannel}."""
        result: dict[str, Any] = self._call("kernel_state", guid=str(guid))
        return result

    def uio_name(self, guid: str) -> str | None:
        """The device's uio node name ("uio0"), or None when not bound to uio_hv_generic."""
        name = self.kernel_state(guid).get("uio")
        return str(name) if name is not None else None

    def bind_uio(self, guid: str) -> str | None:
        """Shortcut that binds the device to uio_hv_generic inside the mock (driver_override,
        unbind, drivers_probe; new_id where there is no override). Returns the uio name, or
        None if probe failed. Clients should use pyvmbus.binding; this is for tests."""
        name = self._call("bind_uio", guid=str(guid))
        return str(name) if name is not None else None

    def kernel_log(self) -> list[str]:
        """The mock kernel's dmesg (root/run/mock/kernel.log): probes, refusals, rescinds, faults."""
        try:
            return (self.root / "run" / "mock" / "kernel.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def process_log(self) -> str:
        """Whatever the mock process printed (tracebacks of model errors, start failures)."""
        try:
            return (self.root / "run" / "mock" / "process.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _rebuild(reply: tuple[Any, ...]) -> BaseException:
    """Turn the mock process's ("err", module, qualname, message, attrs) into an exception."""
    _, module, qualname, message, attrs = reply
    if module == "pyvmbus.errors" and isinstance(getattr(_errors, qualname, None), type):
        cls = getattr(_errors, qualname)
        exc: BaseException = cls.__new__(cls)
        Exception.__init__(exc, message)
        exc.__dict__.update(attrs)
        return exc
    builtin = getattr(builtins, qualname, None)
    if module == "builtins" and isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin(message)
    return RuntimeError(f"mock process raised {module}.{qualname}: {message}")

