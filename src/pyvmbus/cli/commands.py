"""The ``vmbus`` command line (click): thin commands over pyvmbus, tested through CliRunner.

Each command resolves its DEVICE through :class:`~pyvmbus.cli.state.CliState`, builds
plain data (:mod:`pyvmbus.cli.views`, keys pinned in :mod:`pyvmbus.cli.schema`) and prints
it as text or JSON lines (:mod:`pyvmbus.cli.output`). Expected errors are caught once, in
:class:`VmbusGroup`, and become one line on stderr and an exit code from
:data:`pyvmbus.cli.errors.EXIT_CODES`. docs/cli.md is generated from this file's help
(``python -m pyvmbus.cli.docs``) and a test keeps it in sync.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from .. import __version__
from ..errors import AlreadyBound, NotPermitted, VmbusError
from ..mock.generations import DEFAULT_GENERATION, GENERATIONS
from ..sysfs import Sysfs
from .enable import EnableOptions, SendSpec, StopFlag, parse_send, run_demo, run_enable, stop_on_signals
from .errors import EXIT_INTERRUPTED, error_line, exit_code
from .mock import FAULT_ARGS, FAULT_KINDS, MockControl, parse_fault_args, render_fault, send_fault
from .output import Output
from .params import INTERVAL_MAX, SECONDS, RootPath, SafePath, Seconds
from .state import MOCK_DEVICES, CliState, device_names, json_option, known_device_words, setup_logging
from .text import render_bind, render_list, render_restore, render_ring, render_show, render_unbind
from .views import MappedRings, device_detail, list_devices, ring_from_sysfs
from .watch import poll_events, udev_available, udev_events

__all__ = ["VmbusGroup", "main"]

_HELP_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class VmbusGroup(click.Group):
    """A click group that turns expected errors into one stderr line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VmbusError as exc:
            _fail(ctx, exc)
        except PermissionError as exc:
            _fail(ctx, NotPermitted(str(exc.filename or "?"), "access"))
        except KeyboardInterrupt:
            click.echo("vmbus: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _fail(ctx: click.Context, exc: BaseException) -> None:
    state = ctx.find_object(CliState)
    code = exit_code(exc)
    line = error_line(exc)
    if state is not None and state.verbose > 1:
        traceback.print_exception(exc)
    if state is not None and state.json:
        click.echo(json.dumps({"error": line, "type": type(exc).__name__, "exit_code": code}), err=True)
    else:
        click.echo(f"vmbus: error: {line}", err=True)
    ctx.exit(code)


# -- completion ---------------------------------------------------------------------------------
def _complete_device(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """GUIDs and class names under --root (or /); class names alone with --mock."""
    params = ctx.find_root().params
    words: list[str]
    if params.get("mock"):
        words = [*MOCK_DEVICES]
    else:
        root = params.get("root") or Path("/")
        try:
            words = device_names(Sysfs(root))
        except Exception:  # completion must never fail loudly
            words = []
    seen: list[str] = []
    for w in words:
        if w.startswith(incomplete.lower()) and w not in seen:
            seen.append(w)
    return [CompletionItem(w) for w in seen]


def _complete_mock_device(ctx: click.Context, param: click.Parameter,
                          incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(w) for w in known_device_words() if w.startswith(incomplete.lower())]


_DEVICE_ARG = click.argument("device", shell_complete=_complete_device)
_SECONDS = SECONDS


# -- the group --------------------------------------------------------------------------------
@click.group(cls=VmbusGroup, context_settings=_HELP_SETTINGS)
@click.option("--root", type=RootPath(), envvar="VMBUS_ROOT",
              help="Work under this root instead of / (root/sys, root/dev): e.g. the folder of "
                   "'vmbus mock serve'. Env: VMBUS_ROOT.")
@click.option("--mock", is_flag=True,
              help="Run the command against a fresh mock VMBus (network, scsi, heartbeat, shutdown, "
                   "timesync, fcopy and echo devices) that lives as long as the command.")
@click.option("--kernel", type=click.Choice(list(GENERATIONS)), default=None,
              help=f"With --mock (and for demo / mock serve): the uio_hv_generic generation the mock "
                   f"kernel behaves as [default: {DEFAULT_GENERATION}].")
@click.option("--json", "json_mode", is_flag=True,
              help="Machine-readable output: one JSON object per line (schemas in docs/cli.md).")
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug and tracebacks).")
@click.version_option(__version__, "-V", "--version", prog_name="vmbus")
@click.pass_context
def main(ctx: click.Context, root: Path | None, mock: bool, kernel: str | None, json_mode: bool,
         verbose: int) -> None:
    """Drive Hyper-V VMBus devices from Linux userspace through uio_hv_generic.

    DEVICE is an instance GUID (braces and case do not matter, a unique prefix of 4+ hex
    digits will do) or a class name that exactly one device has (heartbeat, fcopy, ...).

    \b
    First steps:
      vmbus demo                      the whole path on a mock bus, in seconds
      vmbus --mock list               what a guest's bus looks like
      sudo vmbus list                 the devices of this Hyper-V / Azure guest
      sudo vmbus enable heartbeat     bind, open and watch a channel (Ctrl-C restores)

    Shell completion: eval "$(_VMBUS_COMPLETE=bash_source vmbus)" (zsh_source, fish_source).
    Exit codes and JSON schemas: docs/cli.md.
    """
    from_env = ctx.get_parameter_source("root") is click.core.ParameterSource.ENVIRONMENT
    if root is not None and mock:
        if not from_env:
            raise click.UsageError("--root and --mock exclude each other (--mock makes its own root)")
        root = None
    if kernel is not None and not mock and ctx.invoked_subcommand not in ("demo", "mock"):
        raise click.UsageError("--kernel only applies with --mock (and to 'demo' and 'mock serve')")
    ctx.obj = CliState(root_option=root, mock=mock, kernel=kernel, json=json_mode, verbose=verbose,
                       on_close=ctx.call_on_close)
    ctx.call_on_close(setup_logging(verbose))


# -- list / show ------------------------------------------------------------------------------
@main.command("list")
@json_option
@click.pass_obj
def list_cmd(state: CliState) -> None:
    """List the VMBus devices: instance, class, relid, driver, uio node, monitored."""
    fs = state.sysfs()
    rows = list_devices(fs)
    Output(state.json).emit({"root": str(fs.root), "devices": rows}, lambda: render_list(rows))


@main.command()
@_DEVICE_ARG
@json_option
@click.pass_obj
def show(state: CliState, device: str) -> None:
    """Show everything about DEVICE: attributes, channels, uio maps, ring state, and how the
    host will be signalled and why."""
    dev = state.device(device)
    data = device_detail(state.root(), dev)
    Output(state.json).emit(data, lambda: render_show(data))


# -- bind / unbind / restore ---------------------------------------------------------------------
@main.command()
@_DEVICE_ARG
@click.option("--force", is_flag=True,
              help="Bind even when a guard rail refuses (a mounted disk, the default route, this SSH "
                   "session).")
@click.option("--timeout", type=_SECONDS, metavar="S", default=10.0, show_default=True,
              help="Seconds to wait for the uio node.")
@json_option
@click.pass_obj
def bind(state: CliState, device: str, force: bool, timeout: float) -> None:
    """Bind DEVICE to uio_hv_generic (remembering its driver for 'vmbus restore')."""
    from ..binding import read_record

    dev = state.device(device)
    root = state.root()
    previous = dev.driver
    already = False
    try:
        uio = state.bus().bind(dev.guid, force=force, timeout=timeout)
    except AlreadyBound:
        already = True
        uio = dev.uio_name or "?"
        record = read_record(root, dev.guid)
        previous = record.previous_driver if record is not None else None
    data = {"device": str(dev.guid), "class": _class(dev), "driver": "uio_hv_generic", "uio": uio,
            "node": str(root / "dev" / uio), "previous_driver": previous, "already": already}
    Output(state.json).emit(data, render_bind(data))


@main.command()
@_DEVICE_ARG
@click.option("--force", is_flag=True, help="Unbind even when a guard rail refuses.")
@click.option("--timeout", type=_SECONDS, metavar="S", default=10.0, show_default=True,
              help="Seconds to wait for the driver to let go.")
@json_option
@click.pass_obj
def unbind(state: CliState, device: str, force: bool, timeout: float) -> None:
    """Release DEVICE from its driver (it stays unbound; 'vmbus restore' binds it again)."""
    dev = state.device(device)
    previous = state.bus().unbind(dev.guid, force=force, timeout=timeout)
    data = {"device": str(dev.guid), "class": _class(dev), "previous_driver": previous}
    Output(state.json).emit(data, render_unbind(data))


@main.command()
@_DEVICE_ARG
@click.option("--timeout", type=_SECONDS, metavar="S", default=10.0, show_default=True,
              help="Seconds to wait for the driver to bind.")
@json_option
@click.pass_obj
def restore(state: CliState, device: str, timeout: float) -> None:
    """Give DEVICE back to the driver it had before 'vmbus bind' (and clear driver_override)."""
    dev = state.device(device)
    driver = state.bus().restore(dev.guid, timeout=timeout)
    data = {"device": str(dev.guid), "class": _class(dev), "driver": driver}
    Output(state.json).emit(data, render_restore(data))


def _class(dev: Any) -> str:
    from .state import class_label

    return class_label(dev)


# -- enable / demo ----------------------------------------------------------------------------
def _parse_sends(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[bytes, ...]:
    try:
        return tuple(parse_send(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@_DEVICE_ARG
@click.option("--count", type=click.IntRange(min=1), metavar="N", default=None,
              help="Stop after N packets (on_packet deliveries plus replies to --send).")
@click.option("--timeout", type=_SECONDS, metavar="S", default=None,
              help="Stop S seconds after the channel opens, --send requests included (with --count: "
                   "fail, exit 8, if fewer packets came).")
@click.option("--send", "sends", multiple=True, callback=_parse_sends, metavar="HEX|@FILE",
              help="Send these bytes from on_post_started and print the reply (repeatable).")
@click.option("--no-wait", is_flag=True,
              help="Send --send packets without asking for a completion (replies, if any, arrive "
                   "as packets).")
@click.option("--reply-timeout", type=_SECONDS, metavar="S", default=5.0,
              show_default=True, help="Seconds to wait for each reply.")
@click.option("--preview", type=click.IntRange(min=0), metavar="N", default=16, show_default=True,
              help="Payload bytes shown per packet.")
@click.option("--force", is_flag=True, help="Bind even when a guard rail refuses.")
@click.option("--capture", "capture_file", type=SafePath(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.pcapng",
              help="Record every packet, lifecycle event, signal and interrupt into FILE (pcapng; "
                   "'vmbus capture show FILE', Wireshark with contrib/wireshark/vmbus.lua).")
@json_option
@click.pass_obj
def enable(state: CliState, device: str, count: int | None, timeout: float | None, sends: tuple[bytes, ...],
           no_wait: bool, reply_timeout: float, preview: int, force: bool, capture_file: Path | None) -> None:
    """Open DEVICE's channel and print each lifecycle event and packet until Ctrl-C.

    Binds DEVICE to uio_hv_generic first if needed; on exit (Ctrl-C, SIGTERM, --count,
    --timeout, or the host closing the channel) it disables the channel and, if it did the
    binding, restores the driver the device had.
    """
    dev = state.device(device)
    opts = EnableOptions(count=count, timeout=timeout, reply_timeout=reply_timeout, force=force,
                         sends=tuple(SendSpec(p, wait=not no_wait) for p in sends),
                         capture=None if capture_file is None else str(capture_file))
    out = Output(state.json, preview=preview)
    out.echo(f"enabling {dev.guid} ({_class(dev)}); Ctrl-C to stop")
    run_enable(state.bus(), dev, opts, out)


@main.command()
@json_option
@click.pass_obj
def demo(state: CliState) -> None:
    """Start a mock VMBus and run 'enable' on its echo device with a few requests (seconds)."""
    run_demo(state.kernel or DEFAULT_GENERATION, Output(state.json))


# -- ring ---------------------------------------------------------------------------------------
@main.command()
@_DEVICE_ARG
@click.option("--map", "use_map", is_flag=True,
              help="Read the ring headers through the uio node (needs uio_hv_generic; adds "
                   "pending_send_size and feature bits). Opens the channel if nobody holds it open.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=Seconds(0.01, False, INTERVAL_MAX), metavar="S", default=1.0,
              show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=1), metavar="N", default=None,
              help="With --watch: stop after N refreshes.")
@json_option
@click.pass_obj
def ring(state: CliState, device: str, use_map: bool, watch: bool, interval: float,
         count: int | None) -> None:
    """Show DEVICE's ring state: indices, bytes used and free, masks, pending_send_size, feature
    bits, counters.

    Without --map the numbers come from sysfs (in_read_index, channels/N/read_avail, ...),
    which the kernel keeps for any allocated ring and anyone may read; sysfs has no
    pending_send_size or feature bits.
    """
    dev = state.device(device)
    out = Output(state.json)
    mapped = MappedRings(state.root(), dev) if use_map else None
    flag = StopFlag()
    out.on_broken = lambda: flag.stop("output closed")
    tty = sys.stdout.isatty()
    try:
        with stop_on_signals(flag):
            shown = 0
            while True:
                data = mapped.read() if mapped is not None else ring_from_sysfs(dev)
                if watch and tty and not state.json:
                    click.echo("\x1b[H\x1b[J", nl=False)
                elif watch and shown and not state.json:
                    click.echo("")
                out.emit(data, render_ring(data) if not state.json else None)
                shown += 1
                if mapped is not None and mapped.first_violation is not None and not watch:
                    raise mapped.first_violation  # shown above; exit 9 with it as the one line
                if not watch or (count is not None and shown >= count) or flag.wait(interval):
                    break
    finally:
        if mapped is not None:
            mapped.close()


# -- watch --------------------------------------------------------------------------------------
@main.command()
@click.option("--poll", "force_poll", is_flag=True, help="Diff sysfs snapshots even where udev runs.")
@click.option("--interval", type=Seconds(0.005, False, INTERVAL_MAX), metavar="S", default=0.05,
              show_default=True,
              help="Seconds between snapshots when polling.")
@click.option("--count", type=click.IntRange(min=1), metavar="N", default=None, help="Stop after N events.")
@click.option("--timeout", type=_SECONDS, metavar="S", default=None,
              help="Stop after S seconds.")
@json_option
@click.pass_obj
def watch(state: CliState, force_poll: bool, interval: float, count: int | None,
          timeout: float | None) -> None:
    """Print add, remove, bind and unbind events of VMBus devices and their uio nodes.

    On a real guest they are udev's events (pyudev); under --mock / --root, or with --poll,
    they come from diffing sysfs snapshots every --interval seconds.
    """
    root = state.root()
    out = Output(state.json)
    use_udev = not force_poll and udev_available(root)
    flag = StopFlag()
    out.on_broken = lambda: flag.stop("output closed")
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout

    def stop() -> bool:
        if deadline is not None and time.monotonic() >= deadline:
            flag.stop("timeout")
        return flag.is_set()

    source = "udev" if use_udev else "poll"
    how = "udev events" if use_udev else f"sysfs snapshots every {interval * 1000:g} ms"
    out.emit({"event": "watching", "t": 0.0, "root": str(root), "source": source},
             f"watching VMBus and uio devices under {root} ({how}); Ctrl-C to stop")
    seen = 0
    with stop_on_signals(flag):
        def nap(seconds: float) -> None:
            # Never sleep past --timeout, whatever --interval says.
            left = None if deadline is None else deadline - time.monotonic()
            flag.wait(seconds if left is None else max(0.0, min(seconds, left)))

        events = udev_events(root, stop) if use_udev else poll_events(root, stop, interval, nap)
        for ev in events:
            out.event(ev.as_dict(time.monotonic() - start))
            seen += 1
            if (count is not None and seen >= count) or flag.is_set():
                break


# -- mock serve -----------------------------------------------------------------------------------
@main.group(cls=VmbusGroup, context_settings=_HELP_SETTINGS)
def mock() -> None:
    """The mock VMBus: a fake sysfs root, mock kernel and mock host, for tests and demos."""


def _check_mock_devices(ctx: click.Context, param: click.Parameter,
                        values: tuple[str, ...]) -> tuple[str, ...]:
    from ..guid import is_guid

    known = known_device_words()
    for v in values:
        if v.lower() not in known and not is_guid(v):
            raise click.BadParameter(f"{v!r} is not a device class, mock model or class GUID; "
                                     f"known: {', '.join(known)}")
    return tuple(v if is_guid(v) else v.lower() for v in values)


@mock.command()
@click.option("--root", "serve_root", type=RootPath(), default=None,
              help="Build the mock under this new or empty folder (removed again on exit) "
                   "[default: a temporary folder].")
@click.option("--device", "devices", multiple=True, callback=_check_mock_devices,
              shell_complete=_complete_mock_device, metavar="CLASS",
              help="Offer a device of this class or mock model (repeatable) [default: network, scsi, "
                   "heartbeat, shutdown, timesync, fcopy, echo].")
@click.option("--kernel", "serve_kernel", type=click.Choice(list(GENERATIONS)), default=None,
              help=f"uio_hv_generic generation [default: the global --kernel, or {DEFAULT_GENERATION}].")
@click.option("--timeout", type=_SECONDS, metavar="S", default=None,
              help="Stop after S seconds [default: run until Ctrl-C / SIGTERM].")
@click.option("--replay", "replays", multiple=True,
              type=SafePath(dir_okay=False, exists=True, path_type=Path), metavar="FILE.pcapng",
              help="Offer the device recorded in this capture; its host plays the capture back and "
                   "checks the guest against it; the verdict is printed on exit, exit 1 on a "
                   "difference (repeatable; then no default devices).")
@json_option
@click.pass_obj
def serve(state: CliState, serve_root: Path | None, devices: tuple[str, ...], serve_kernel: str | None,
          timeout: float | None, replays: tuple[Path, ...]) -> None:
    """Run a mock VMBus in the foreground for other processes to use with --root.

    \b
    In another shell:
      vmbus --root DIR list
      vmbus --root DIR enable echo --send 68656c6c6f
      vmbus --root DIR mock fault echo rescind      (then: reoffer)
      python -c 'import pyvmbus; print(pyvmbus.Vmbus(root="DIR").devices())'
    """
    from ..mock import MockVmbus
    from .views import list_devices

    root = serve_root if serve_root is not None else state.root_option
    made: Path | None = None
    if root is not None:
        root = root.absolute()
        if root.exists() and any(root.iterdir()):
            raise click.UsageError(f"{root} is not empty: give a new or empty folder "
                                   "(an old mock root can be removed with rm -rf)")
        made = root
    kernel = serve_kernel or state.kernel or DEFAULT_GENERATION
    out = Output(state.json)
    start = time.monotonic()
    flag = StopFlag()
    out.on_broken = lambda: flag.stop("output closed")
    verdicts: list[dict[str, Any]] = []
    try:
        with stop_on_signals(flag), MockVmbus(kernel=kernel, devices=devices or
                                               (() if replays else MOCK_DEVICES), root=root) as m:
            replayed = [str(m.add_device(replay=str(f))) for f in replays]
            rows = list_devices(Sysfs(m.root))
            data = {"event": "serving", "t": round(time.monotonic() - start, 3), "root": str(m.root),
                    "kernel": m.generation.name, "pid": m.pid, "devices": rows}
            out.emit(data, lambda: (
                f"mock VMBus (kernel {m.generation.name}) serving under {m.root}\n"
                f"{render_list(rows)}\n"
                f"use it with: vmbus --root {m.root} list    (or VMBUS_ROOT={m.root}); Ctrl-C stops it"))
            deadline = None if timeout is None else start + timeout
            def on_fault(ev: dict[str, Any]) -> None:
                ev = {**ev, "t": round(time.monotonic() - start, 3)}
                out.emit(ev, lambda: f"{ev['t']:8.3f}  fault     {render_fault(ev)}")

            with MockControl(m, on_fault) as ctl:
                while not flag.is_set():
                    if not m.alive:
                        flag.stop("the mock process died")
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        flag.stop("timeout")
                        break
                    ctl.serve(0.2 if left is None else min(0.2, left))
                verdicts = [m.replay_report(g) for g in replayed if m.alive]
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    for rep in verdicts:
        data = {"event": "replay", "t": round(time.monotonic() - start, 3), **rep}
        out.emit(data, lambda data=data: render_replay(data))  # type: ignore[misc]
    out.emit({"event": "stopped", "t": round(time.monotonic() - start, 3), "why": flag.why},
             f"mock VMBus stopped ({flag.why})")
    if not all(rep["ok"] for rep in verdicts):
        from ..mock.replay import ReplayMismatch

        bad = next(rep for rep in verdicts if not rep["ok"])
        raise ReplayMismatch(bad["device"], list(bad["diffs"]), listed=True)


def render_replay(data: dict[str, Any]) -> str:
    """The text of serve's ``replay`` verdict."""
    head = (f"replay of {data['device']} ({data['source']}): "
            + ("OK" if data["ok"] else f"{len(data['diffs'])} difference(s)")
            + f": {data['matched']}/{data['expected']} guest packets as recorded, "
            f"{data['played']} host packets played")
    return "\n".join([head, *("  " + d for d in data["diffs"])])


@mock.command()
@click.argument("device", shell_complete=_complete_device)
@click.argument("kind", type=click.Choice(FAULT_KINDS))
@click.option("--root", "fault_root", type=RootPath(), default=None,
              help="The folder of the running 'vmbus mock serve' [default: the global --root / VMBUS_ROOT].")
@click.option("--arg", "fault_args", multiple=True, metavar="KEY=VALUE",
              help="An argument of a host fault (repeatable): the list above.")
@json_option
@click.pass_obj
def fault(state: CliState, device: str, kind: str, fault_root: Path | None,
          fault_args: tuple[str, ...]) -> None:
    """Make the host of a running 'vmbus mock serve' misbehave: KIND is rescind, reoffer or
    remove (the device), or a host fault (corrupt, stall, resume, storm, crash, header,
    descriptor).

    \b
    For example, while 'vmbus --root DIR enable echo' runs in another shell:
      vmbus mock fault echo rescind --root DIR     enable ends: closed, rescinded (exit 9)
      vmbus mock fault echo reoffer --root DIR     the host offers it again (a new relid)
      vmbus mock fault echo header --arg field=interrupt_mask --arg value=7 --root DIR
                                                   enable ends: closed, corrupt (exit 9)
      vmbus mock fault echo descriptor --arg offset8=1 --arg len8=4 --root DIR
    """
    root = fault_root if fault_root is not None else state.root_option
    if root is None or state.mock:
        raise click.UsageError("give the folder of a running 'vmbus mock serve' with --root DIR")
    try:
        parse_fault_args(kind, fault_args)  # the server parses them again: a typo fails here first
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    args = dict(item.partition("=")[::2] for item in fault_args)
    data = send_fault(root, device, kind, args={k.strip(): v.strip() for k, v in args.items()})
    Output(state.json).emit(data, lambda: render_fault(data))


def _fault_arg_help() -> str:
    """The --arg list of ``vmbus mock fault --help``, from :data:`FAULT_ARGS` (one source)."""
    lines = ["", "\b", "--arg KEY=VALUE, by KIND (numbers in decimal or 0x hex):"]
    for kind, keys in FAULT_ARGS.items():
        lines.append(f"  {kind}:")
        lines.extend(f"    {key}: {text}" for key, text in keys.items())
    return "\n".join(lines)


fault.help = inspect.cleandoc(fault.help or "") + "\n" + _fault_arg_help()


# -- plug-ins -----------------------------------------------------------------------------------
def _register_plugins(group: click.Group) -> None:
    """Commands that live in other modules: ``vmbus ic ...`` and ``vmbus fcopy-daemon`` (issue 6),
    ``vmbus ic kvp`` and ``vmbus kvp ...`` (issue 13), ``vmbus capture ...`` (issue 12).

    pyvmbus.cli.ic and pyvmbus.cli.kvp define ``register(main)``, which adds their commands
    to this group (in that order: kvp adds to ic's group); they take
    :class:`~pyvmbus.cli.state.CliState` with ``@click.pass_obj`` and get the same
    --root/--mock/--json handling and error mapping.
    """
    for name in ("ic", "kvp", "capture"):  # capture: ``vmbus capture show`` (pyvmbus/cli/capture.py)
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        module.register(group)


_register_plugins(main)  # <- vmbus ic ... / fcopy-daemon / kvp plug in here (pyvmbus/cli/ic.py, kvp.py)
