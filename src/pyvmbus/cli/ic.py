"""``vmbus ic heartbeat|shutdown|timesync|fcopy`` and ``vmbus fcopy-daemon`` (issue 6).

Each command runs one integration service (:mod:`pyvmbus.ic`) in the foreground through
:class:`~pyvmbus.ic.runner.IcRunner`: it binds the device to uio_hv_generic if needed,
serves it until Ctrl-C / SIGTERM (or ``--count`` / ``--timeout``), survives a rescind by
waiting for the re-offer, and gives the device back to its previous driver on the way out.

Safety rules, checked here and tested:

- shutdown: the request is always answered as the kernel answers it, but the machine is
  powered off or rebooted (``systemctl poweroff`` / ``reboot``) only with
  ``--allow-shutdown``, and never when the bus is a mock or another ``--root``: then the
  command says what it would have run.
- timesync: the offset is reported; the clock is set (clock_settime(CLOCK_REALTIME), on
  the host's SYNC requests only) only with ``--set-clock``, and never from a mock bus.
- fcopy: files land only below the ``--dest-root`` directories, which must be given:
  a tool that writes, as root, files whose names and paths the host chose should not
  pick "anywhere" by itself (hv_fcopy_uio_daemon writes anywhere; ``--dest-root /`` does
  the same, with a note). See :mod:`pyvmbus.ic.fcopy` for what is refused.
- every ``vmbus ic`` command checks that DEVICE is of its class (serving heartbeat on
  the network device would only confuse the host).

``vmbus fcopy-daemon`` is the replacement for tools/hv/hv_fcopy_uio_daemon: it finds the
file-copy device (the well-known instance eb765408-105f-49b6-b4aa-c123b64d17d4 first,
else the one device of class fcopy) and logs through Python logging to stderr, which
systemd puts in the journal (with syslog priority prefixes when ``JOURNAL_STREAM`` says
stderr is the journal; python-systemd's JournalHandler when it is installed).
systemd/pyvmbus-fcopy.service runs it.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from ..errors import DeviceNotFound, Timeout
from ..ic import (
    FcopyEvent,
    FcopyService,
    HeartbeatService,
    IcService,
    ShutdownAction,
    ShutdownRequest,
    ShutdownService,
    TimeSample,
    TimesyncService,
)
from ..ic.messages import FCOPY_INSTANCE_GUID, status_name
from ..ic.runner import IcRunner, RunnerEvent, RunResult
from ..sysfs import Sysfs, VmbusDevice
from .enable import stop_on_signals
from .errors import WrongClass
from .output import Output, render_event, stamp
from .params import SECONDS, SECONDS_OR_ZERO, SafePath
from .state import CliState, class_label, json_option

__all__ = [
    "POWER_COMMANDS",
    "acts_on_this_machine",
    "find_fcopy_device",
    "ic",
    "fcopy_daemon",
    "power_command",
    "register",
    "render_ic_event",
    "run_power_command",
    "setup_daemon_logging",
]

_log = logging.getLogger("pyvmbus.cli.ic")

POWER_COMMANDS: dict[ShutdownAction, tuple[tuple[str, ...], ...]] = {
    ShutdownAction.POWEROFF: (("systemctl", "poweroff"), ("shutdown", "-P", "now")),
    ShutdownAction.REBOOT: (("systemctl", "reboot"), ("shutdown", "-r", "now")),
    ShutdownAction.HIBERNATE: (("systemctl", "hibernate"),),
}
"""What ``--allow-shutdown`` runs for each action: the first whose program is installed."""


def power_command(action: ShutdownAction) -> list[str]:
    """The command line for ``action`` on this system (systemctl, else shutdown(8))."""
    choices = POWER_COMMANDS[action]
    for argv in choices:
        if shutil.which(argv[0]):
            return list(argv)
    return list(choices[0])


def run_power_command(argv: Sequence[str]) -> None:
    """Run the poweroff / reboot command (the one place that does; tests replace it)."""
    subprocess.run(list(argv), check=True, timeout=60)


def acts_on_this_machine(root: Path) -> bool:
    """Whether the bus is this machine's own (root ``/``): only then may a host request
    power it off or set its clock. A mock bus or another ``--root`` never does."""
    return os.path.realpath(root) == "/"


# -- events as text -----------------------------------------------------------------------------

def render_ic_event(ev: dict[str, Any]) -> str:
    """One text line for an event of ``vmbus ic ...`` (the ones it shares with ``vmbus
    enable``, such as bound, closed, restored and note, are rendered by
    :func:`~pyvmbus.cli.output.render_event`)."""
    kind = ev["event"]
    s = stamp(ev)
    if kind == "enabled":
        return f"{s}enabled   relid {ev['relid']}: waiting for the host's requests"
    if kind == "negotiated":
        return f"{s}negotiated {ev['service']} version {ev['version']} (framework {ev['framework']})"
    if kind == "negotiation_failed":
        return f"{s}negotiation failed: {ev['offered']}"
    if kind == "shutdown_request":
        what = {"poweroff": "power off", "reboot": "reboot", "hibernate": "hibernate"}[ev["action"]]
        msg = f": {ev['message']!r}" if ev["message"] else ""
        return (f"{s}shutdown  the host asks to {what} (flags {ev['flags']:#x}, "
                f"reason {ev['reason_code']:#x}, timeout {ev['timeout_seconds']} s){msg}; {ev['outcome']}")
    if kind == "sample":
        sync = "SYNC" if ev["sync"] else "sample"
        return (f"{s}time      {sync}: host - guest = {ev['offset_ns'] / 1e9:+.6f} s "
                f"(host {ev['host_time']}, {ev['format']} format)")
    if kind == "clock_set":
        return f"{s}clock     set to the host's time (moved {ev['step_ns'] / 1e9:+.6f} s)"
    if kind == "clock_not_set":
        return f"{s}clock     not set: {ev['why']}"
    if kind == "fcopy":
        extra = f": {ev['reason']}" if ev["reason"] else ""
        return f"{s}fcopy     {ev['kind']:<9} {ev['path'] or '?'} ({ev['size']} bytes, {ev['status']}){extra}"
    if kind == "waiting":
        return f"{s}waiting   for the host to offer {ev['device']} again"
    if kind == "action_failed":
        return f"{s}action failed: {ev['error']}"
    if kind == "stopped":
        return f"{s}stopped   ({ev['why']}): {ev['answered']} of {ev['packets']} message(s) answered"
    if kind == "summary":
        keys = ", ".join(f"{k} {v}" for k, v in ev.items() if k not in ("event", "t", "device", "service"))
        return f"{s}summary   {ev['service']}: {keys}"
    return render_event(ev)


def ic_device(state: CliState, query: str, service: type[IcService]) -> VmbusDevice:
    """The device ``query`` names, refused when it has another known class than the
    service's (a typo or a wrong GUID: heartbeat answers on the network device would only
    confuse the host). Devices of an unknown class are served: the user knows best."""
    dev = state.device(query)
    label = class_label(dev)
    if label not in (service.class_name, "unknown"):
        raise WrongClass(str(dev.guid), label, service.class_name)
    return dev


# -- the shared run ------------------------------------------------------------------------------

class IcSession:
    """One ``vmbus ic ...`` run: output, counters, the runner, and how it is stopped."""

    def __init__(self, state: CliState, out: Output | None) -> None:
        self.state = state
        self.out = out
        self.start = time.monotonic()
        self.guid = ""
        self.runner: IcRunner | None = None
        if out is not None:
            out.on_broken = lambda: self.stop("output closed")
            if state.verbose <= 0:
                # The events are printed; keep logging's last-resort handler from printing
                # the runner's warnings a second time (-v shows the log instead).
                logger = logging.getLogger("pyvmbus")
                if not logger.handlers:
                    logger.addHandler(logging.NullHandler())

    def stop(self, why: str) -> None:
        if self.runner is not None:
            self.runner.stop(why)

    def ev(self, event: str, /, **data: Any) -> None:
        ev = {"event": event, "t": round(time.monotonic() - self.start, 3), "device": self.guid, **data}
        if self.out is not None:
            self.out.emit(ev, lambda: render_ic_event(ev))

    def runner_event(self, ev: RunnerEvent) -> None:
        if self.out is not None:
            data = ev.as_dict()
            data["t"] = round(time.monotonic() - self.start, 3)
            if data["event"] == "stopped" and data["why"] == "until":
                data["why"] = "count"  # the runner's 'until' predicate is --count here
            self.out.emit(data, lambda: render_ic_event(data))

    def run(self, dev: VmbusDevice, svc: IcService, *, bind: bool, force: bool, timeout: float | None,
            count: int | None, done: Callable[[], int], reoffer_timeout: float | None) -> RunResult:
        """Serve until a signal, ``count`` (``done()`` reached it) or ``timeout``."""
        self.guid = str(dev.guid)
        until = None if count is None else (lambda: done() >= count)
        self.runner = IcRunner(self.state.bus(), self.guid, svc, bind=bind, force=force,
                               on_event=self.runner_event, until=until, reoffer_timeout=reoffer_timeout)
        with stop_on_signals(self.stop):
            result = self.runner.run(timeout)
        if result.why == "timeout" and count is not None and done() < count:
            raise Timeout(f"{count} {svc.service_name} request(s) on {self.guid} (got {done()}; try a longer "
                          "--timeout or a smaller --count)", timeout or 0.0)
        return result


def ic_options(f: Any) -> Any:
    """Options every ``vmbus ic`` command takes."""
    options = [
        click.option("--no-bind", is_flag=True,
                     help="Do not bind DEVICE to uio_hv_generic; it must be bound already."),
        click.option("--force", is_flag=True, help="Bind even when a guard rail refuses."),
        click.option("--count", type=click.IntRange(min=1), default=None,
                     help="Stop after N requests (fcopy: files) were handled."),
        click.option("--timeout", type=SECONDS, default=None,
                     help="Stop after S seconds (with --count: fail, exit 8, if fewer came)."),
        click.option("--reoffer-timeout", type=SECONDS_OR_ZERO, default=None,
                     help="After a rescind, wait at most S seconds for the host to offer DEVICE "
                          "again [default: until stopped]."),
        json_option,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def emit_summary(session: IcSession, svc: IcService, **extra: Any) -> None:
    st = svc.stats
    session.ev("summary", service=svc.service_name, requests=st.requests, answered=st.responses,
               dropped=st.dropped, negotiations=st.negotiations, unknown_types=st.unknown_types,
               errors=st.errors, **extra)


# -- vmbus ic ... ---------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def ic() -> None:
    """Run a Hyper-V integration service in the foreground (heartbeat, shutdown, timesync, fcopy, kvp).

    DEVICE defaults to the service's class name (the one device of that class). The
    device is bound to uio_hv_generic if needed (taking it from hv_utils) and given back
    on exit (Ctrl-C, SIGTERM, --count, --timeout). A rescinded device is waited for and
    served again when the host offers it anew.
    """


@ic.command()
@click.argument("device", default="heartbeat")
@ic_options
@click.pass_obj
def heartbeat(state: CliState, device: str, no_bind: bool, force: bool, count: int | None,
              timeout: float | None, reoffer_timeout: float | None) -> None:
    """Answer the host's heartbeats (seq_num + 1), so it sees the guest alive."""
    out = Output(state.json)
    session = IcSession(state, out)
    dev = ic_device(state, device, HeartbeatService)
    svc = HeartbeatService()
    out.echo(f"serving heartbeat on {dev.guid}; Ctrl-C to stop", err=True)
    try:
        session.run(dev, svc, bind=not no_bind, force=force, timeout=timeout, count=count,
                    done=lambda: svc.beats, reoffer_timeout=reoffer_timeout)
    finally:
        emit_summary(session, svc, beats=svc.beats, last_seq=svc.last_seq)


@ic.command()
@click.argument("device", default="shutdown")
@click.option("--allow-shutdown", is_flag=True,
              help="Really power off / reboot when the host asks (systemctl poweroff / reboot). "
                   "Without it requests are answered and reported only. Never on a mock or --root bus.")
@click.option("--allow-hibernate", is_flag=True,
              help="Accept hibernate requests (answer HV_S_OK; with --allow-shutdown run systemctl "
                   "hibernate). Without it they get HV_E_FAIL, as on a kernel without hibernation.")
@ic_options
@click.pass_obj
def shutdown(state: CliState, device: str, allow_shutdown: bool, allow_hibernate: bool, no_bind: bool,
             force: bool, count: int | None, timeout: float | None, reoffer_timeout: float | None) -> None:
    """Answer the host's shutdown / reboot requests; act on them only with --allow-shutdown.

    The answer always goes first (with the status the kernel gives: HV_S_OK for power
    off and reboot, HV_E_FAIL for anything else); the action runs after it.
    """
    out = Output(state.json)
    session = IcSession(state, out)
    dev = ic_device(state, device, ShutdownService)
    real = acts_on_this_machine(state.root())

    def on_shutdown(req: ShutdownRequest) -> None:
        argv = power_command(req.action)
        cmd = " ".join(argv)
        data = {"action": req.action.value, "flags": req.flags, "force": req.force,
                "reason_code": req.reason_code, "timeout_seconds": req.timeout_seconds,
                "message": req.message, "command": cmd}
        if not allow_shutdown:
            session.ev("shutdown_request", performed=False,
                       outcome=f"not acting (run with --allow-shutdown to let the host {req.action.value})",
                       **data)
            return
        if not real:
            session.ev("shutdown_request", performed=False,
                       outcome=f"would run '{cmd}', but this is not this machine's bus (mock or --root)",
                       **data)
            return
        session.ev("shutdown_request", performed=True, outcome=f"running '{cmd}'", **data)
        _log.warning("the host asked to %s: running %s", req.action.value, cmd)
        run_power_command(argv)

    svc = ShutdownService(on_shutdown, hibernate_supported=allow_hibernate)
    acting = "acting on" if allow_shutdown and real else "only answering"
    out.echo(f"serving shutdown on {dev.guid} ({acting} requests); Ctrl-C to stop", err=True)
    try:
        session.run(dev, svc, bind=not no_bind, force=force, timeout=timeout, count=count,
                    done=lambda: svc.stats.responses - svc.stats.negotiations - svc.stats.unknown_types,
                    reoffer_timeout=reoffer_timeout)
    finally:
        emit_summary(session, svc, accepted=len(svc.requests))


@ic.command()
@click.argument("device", default="timesync")
@click.option("--set-clock", is_flag=True,
              help="Set the system clock (CLOCK_REALTIME; needs root or CAP_SYS_TIME) to the host's time "
                   "when the host asks for a SYNC. Never on a mock or --root bus.")
@ic_options
@click.pass_obj
def timesync(state: CliState, device: str, set_clock: bool, no_bind: bool, force: bool, count: int | None,
             timeout: float | None, reoffer_timeout: float | None) -> None:
    """Report the host's time samples and the host - guest clock offset.

    The host sends a SYNC after the channel opens and then samples (Hyper-V: every 5 s).
    With --set-clock a SYNC sets the clock, as the kernel's hv_utils does; samples never
    do (the kernel only feeds them to its PTP clock).
    """
    out = Output(state.json)
    session = IcSession(state, out)
    dev = ic_device(state, device, TimesyncService)
    real = acts_on_this_machine(state.root())

    def on_sample(sample: TimeSample) -> None:
        host = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sample.host_ns // 1_000_000_000))
        host += f".{sample.host_ns % 1_000_000_000:09d}Z"
        session.ev("sample", offset_ns=sample.offset_ns, host_ns=sample.host_ns, host_time=host,
                   sync=sample.sync, format="4.0" if sample.ref_format else "<=3.0", flags=sample.flags)

    def do_set_clock(unix_ns: int) -> None:
        if not real:
            session.ev("clock_not_set", why="this is not this machine's bus (mock or --root); "
                       f"would have moved the clock {(unix_ns - time.time_ns()) / 1e9:+.6f} s")
            return
        before = time.time_ns()
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)
        except PermissionError:
            session.ev("clock_not_set", why="permission denied: setting the clock needs root or CAP_SYS_TIME")
            return
        session.ev("clock_set", step_ns=unix_ns - before)
        _log.info("clock set to the host's time (moved %+.6f s)", (unix_ns - before) / 1e9)

    svc = TimesyncService(on_sample=on_sample, set_clock=do_set_clock if set_clock else None)
    out.echo(f"serving timesync on {dev.guid} ({'setting' if set_clock else 'not setting'} the clock); "
             "Ctrl-C to stop", err=True)
    try:
        session.run(dev, svc, bind=not no_bind, force=force, timeout=timeout, count=count,
                    done=lambda: svc.samples, reoffer_timeout=reoffer_timeout)
    finally:
        last = svc.last_sample
        emit_summary(session, svc, samples=svc.samples,
                 last_offset_ns=last.offset_ns if last is not None else None)


def _need_dest_roots(ctx: click.Context, param: click.Parameter,
                     values: tuple[Path, ...]) -> tuple[Path, ...]:
    if not values and not ctx.resilient_parsing:
        raise click.UsageError(
            "give --dest-root DIR: the directory the host may copy files into (repeatable; "
            "e.g. --dest-root /srv/incoming). '--dest-root /' lets the host write anywhere this "
            "process can, as hv_fcopy_uio_daemon does", ctx)
    return values


_DEST_ROOT = click.option(
    "--dest-root", "dest_roots", multiple=True, metavar="DIR", callback=_need_dest_roots,
    type=SafePath(exists=True, file_okay=False, resolve_path=True, path_type=Path),
    help="Required, repeatable: a directory the host may copy files into, with everything "
         "below it. A destination outside every root is refused with 'access denied'. "
         "'/' allows anywhere (as hv_fcopy_uio_daemon).")
_FILE_MODE = click.option("--file-mode", default="644", show_default=True, metavar="OCTAL",
                          callback=lambda ctx, p, v: _octal(v), help="Mode of new files (before the umask).")
_STATE_DIR = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
    help="Where partial files are recorded, so that a restart after a kill removes them "
         "[default: $PYVMBUS_FCOPY_STATE_DIR, else $STATE_DIRECTORY/fcopy, else "
         "/var/lib/pyvmbus/fcopy for root].")
_NO_FSYNC = click.option("--no-fsync", is_flag=True,
                         help="Do not flush each file and its directory to disk before answering COMPLETE.")


def _octal(text: str) -> int:
    try:
        mode = int(str(text), 8)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an octal mode such as 644") from None
    if not 0 <= mode <= 0o7777:
        raise click.BadParameter(f"{text!r} is not a file mode (0..7777)")
    return mode


def _fcopy_service(session: IcSession, roots: Sequence[Path], file_mode: int, fsync: bool,
                   finished: list[int], state_dir: Path | None = None) -> FcopyService:
    def on_event(ev: FcopyEvent) -> None:
        if ev.kind != "started":
            finished[0] += 1
        level = logging.INFO if ev.kind in ("started", "completed") else logging.WARNING
        _log.log(level, "%s", ev)
        session.ev("fcopy", kind=ev.kind, path=ev.path or None, size=ev.size, status=status_name(ev.status),
                   reason=ev.reason)

    return FcopyService([str(r) for r in roots], file_mode=file_mode, fsync=fsync, on_event=on_event,
                        state_dir=state_dir)


def _warn_wide_roots(roots: Sequence[Path], say: Callable[[str], None]) -> None:
    if any(str(r) == "/" for r in roots):
        say("fcopy destination root is / (as hv_fcopy_uio_daemon): the host may write wherever this "
            "process can; restrict it with --dest-root DIR")





@ic.command()
@click.argument("device", default="fcopy")
@_DEST_ROOT
@_FILE_MODE
@_NO_FSYNC
@_STATE_DIR
@ic_options
@click.pass_obj
def fcopy(state: CliState, device: str, dest_roots: tuple[Path, ...], file_mode: int, no_fsync: bool,
          state_dir: Path | None, no_bind: bool, force: bool, count: int | None, timeout: float | None,
          reoffer_timeout: float | None) -> None:
    """Receive files the host sends (Copy-VMFile -FileSource Host) into --dest-root directories.

    Each file is written under a temporary name next to its destination and renamed into
    place when complete, so a cancelled or failed copy leaves nothing; an existing file is
    replaced only when the host sets OVER_WRITE. Names with '..', and paths outside every
    --dest-root or through a symlink below one, are refused. Partial files left by a
    killed run are removed at start (see --state-dir).
    """
    out = Output(state.json)
    session = IcSession(state, out)
    dev = ic_device(state, device, FcopyService)
    finished = [0]
    svc = _fcopy_service(session, dest_roots, file_mode, not no_fsync, finished, state_dir)
    _warn_wide_roots(dest_roots, lambda text: out.echo(f"note: {text}", err=True))
    out.echo(f"serving fcopy on {dev.guid} into {', '.join(map(str, dest_roots))}; Ctrl-C to stop", err=True)
    try:
        session.run(dev, svc, bind=not no_bind, force=force, timeout=timeout, count=count,
                    done=lambda: finished[0], reoffer_timeout=reoffer_timeout)
    finally:
        emit_summary(session, svc, files_completed=svc.files_completed, bytes_written=svc.bytes_written)


# -- vmbus fcopy-daemon ---------------------------------------------------------------------------

def find_fcopy_device(fs: Sysfs) -> VmbusDevice:
    """The file-copy device: instance eb765408-... (what hv_fcopy_uio_daemon opens), else the
    one device of class fcopy. :class:`DeviceNotFound` when there is none, or when several
    are there and none is the well-known one (listing them, as an ambiguous lookup does)."""
    try:
        return fs.device(FCOPY_INSTANCE_GUID)
    except DeviceNotFound:
        pass
    found = [d for d in fs.devices() if d.device_class.name == "fcopy"]
    if len(found) == 1:
        return found[0]
    if found:
        raise DeviceNotFound(f"fcopy (ambiguous: {len(found)} file-copy devices; pick one with "
                             "--device GUID)", tuple(d.guid for d in found),
                             str(fs.root / "sys" / "bus" / "vmbus" / "devices"))
    raise DeviceNotFound(f"fcopy (instance {FCOPY_INSTANCE_GUID} or class fcopy): enable the VM's "
                         "'Guest Service Interface' on the host (Enable-VMIntegrationService)",
                         where=str(fs.root / "sys" / "bus" / "vmbus" / "devices"))


class _PriorityFormatter(logging.Formatter):
    """``<N>`` syslog priority prefixes: systemd reads them from stderr (SyslogLevelPrefix=yes)."""

    _PRIO = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for level, p in self._PRIO if record.levelno >= level), 7)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_daemon_logging(verbose: int, identifier: str = "vmbus-fcopy") -> logging.Handler | None:
    """Log pyvmbus's INFO (DEBUG with -vv) to the journal or stderr; None if -v set it up already.

    Under systemd (``JOURNAL_STREAM`` set) python-systemd's JournalHandler is used when it
    is installed, else stderr lines with ``<N>`` priority prefixes and no timestamps (the
    journal adds its own); elsewhere stderr with timestamps.
    """
    logger = logging.getLogger("pyvmbus")
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if any(getattr(h, "_vmbus_cli", False) for h in logger.handlers):
        return None  # 'vmbus -v' already logs to stderr
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        try:
            journal: Any = importlib.import_module("systemd.journal")
            handler = journal.JournalHandler(SYSLOG_IDENTIFIER=identifier)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_PriorityFormatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._vmbus_daemon = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    return handler


@click.command("fcopy-daemon", context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.option("--device", default=None,
              help=f"The file-copy device [default: instance {FCOPY_INSTANCE_GUID}, else the one "
                   "device of class fcopy].")
@_DEST_ROOT
@_FILE_MODE
@_NO_FSYNC
@_STATE_DIR
@click.option("--no-bind", is_flag=True, help="Do not bind the device; it must be on uio_hv_generic already.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Exit after N files were received, cancelled or refused (for scripts and tests).")
@click.option("--timeout", type=SECONDS, default=None,
              help="Exit after S seconds.")
@json_option
@click.pass_obj
def fcopy_daemon(state: CliState, device: str | None, dest_roots: tuple[Path, ...], file_mode: int,
                 no_fsync: bool, state_dir: Path | None, no_bind: bool, count: int | None,
                 timeout: float | None) -> None:
    """Receive host files like hv_fcopy_uio_daemon, until SIGTERM / SIGINT (systemd unit:
    systemd/pyvmbus-fcopy.service).

    Finds the file-copy device, binds it to uio_hv_generic if needed (run 'modprobe
    uio_hv_generic' first), serves Copy-VMFile requests, waits for the device across a
    rescind, and on exit gives the device back to the driver it had. Partial files of a
    run that was killed are removed at start (see --state-dir). Logs go to the journal
    under systemd, else to stderr; with --json the events of 'vmbus ic fcopy' also go to
    stdout as JSON lines.
    """
    logger = logging.getLogger("pyvmbus")
    old_level = logger.level
    handler = setup_daemon_logging(state.verbose)
    try:
        fs = state.sysfs()
        dev = ic_device(state, device, FcopyService) if device is not None else find_fcopy_device(fs)
        finished = [0]
        session = IcSession(state, Output(True) if state.json else None)
        session.guid = str(dev.guid)
        svc = _fcopy_service(session, dest_roots, file_mode, not no_fsync, finished, state_dir)
        _warn_wide_roots(dest_roots, _log.warning)
        _log.info("fcopy daemon serving %s into %s", dev.guid, ", ".join(map(str, dest_roots)))
        result = session.run(dev, svc, bind=not no_bind, force=False, timeout=timeout, count=count,
                             done=lambda: finished[0], reoffer_timeout=None)
        _log.info("fcopy daemon stopped (%s): %d file(s) received, %d bytes", result.why,
                  svc.files_completed, svc.bytes_written)
    finally:
        logger.setLevel(old_level)
        if handler is not None:
            logger.removeHandler(handler)


# -- plug-in hook ---------------------------------------------------------------------------------

def register(group: click.Group) -> None:
    """Add ``ic`` and ``fcopy-daemon`` to the ``vmbus`` group (called by pyvmbus.cli)."""
    group.add_command(ic)
    group.add_command(fcopy_daemon)
