"""What the ``vmbus`` command's global options set up: the root, the mock, the output mode.

:class:`CliState` is the click context object (``ctx.obj``). Commands ask it for the bus
(:meth:`CliState.bus`), which starts the ``--mock`` bus on first use (so ``--help``,
``demo`` and ``mock serve`` never start one) and stops it when the command ends. Plug-in
command modules (``pyvmbus.cli.ic``) use it the same way::

    @click.command()
    @click.pass_obj
    def heartbeat(state: CliState) -> None:
        dev = state.device("heartbeat")     # --root / --mock honoured, errors handled centrally
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..classes import CLASSES
from ..errors import AmbiguousDevice, DeviceNotFound
from ..guid import is_guid, parse_guid
from ..sysfs import Sysfs, VmbusDevice

if TYPE_CHECKING:
    from ..bus import Vmbus
    from ..mock import MockVmbus

__all__ = [
    "MOCK_DEVICES",
    "CliState",
    "class_label",
    "device_names",
    "json_option",
    "known_device_words",
    "mock_model_classes",
    "resolve_device",
    "setup_logging",
]

MOCK_DEVICES: tuple[str, ...] = ("network", "scsi", "heartbeat", "shutdown", "timesync", "fcopy", "kvp",
                                 "echo")
"""What ``--mock`` offers (and ``vmbus mock serve`` without ``--device``)."""

_log = logging.getLogger("pyvmbus.cli")

_F = TypeVar("_F", bound=Callable[..., Any])


def mock_model_classes() -> dict[str, str]:
    """Mock device model name -> class GUID, for models whose class no kernel knows (echo).

    Lets ``vmbus enable echo`` and the ``CLASS`` column name the mock's own devices; on a
    real guest no device has these class GUIDs, so nothing changes there.
    """
    from ..mock.models import models

    out: dict[str, str] = {}
    for name, cls in models().items():
        if is_guid(str(cls.class_name)):
            out[name] = str(parse_guid(str(cls.class_name)))
    return out


def class_label(dev: VmbusDevice) -> str:
    """Short class name of a device: the kernel's name, a mock model's name, or ``unknown``."""
    cls = dev.device_class
    if cls.name != "unknown":
        return cls.name
    guid = str(dev.class_guid)
    for name, class_guid in mock_model_classes().items():
        if class_guid == guid:
            return name
    return "unknown"


def device_names(fs: Sysfs) -> list[str]:
    """Every GUID and every class name (kernel or mock model) present under ``fs``."""
    names: list[str] = []
    for dev in fs.devices():
        names.append(dev.guid)
        try:
            names.append(class_label(dev))
        except Exception:  # a device vanishing mid-listing is not worth failing for
            continue
    return names


def resolve_device(fs: Sysfs, query: str) -> VmbusDevice:
    """:meth:`Sysfs.device`, plus mock model names (``echo``) and their nearest matches."""
    try:
        return fs.device(query)
    except AmbiguousDevice:
        raise
    except DeviceNotFound as exc:
        q = query.strip().lower()
        models = mock_model_classes()
        if q in models:
            try:
                return fs.device(models[q])
            except AmbiguousDevice as inner:
                raise AmbiguousDevice(query, f"{q} devices", inner.candidates, inner.where,
                                      "give the instance GUID", (q,) * len(inner.candidates)) from None
            except DeviceNotFound as inner:
                raise DeviceNotFound(query, inner.nearest, inner.where) from None
        present = {class_label(d) for d in fs.devices()} - {"unknown"}
        extra = tuple(n for n in difflib.get_close_matches(q, sorted(present), n=3, cutoff=0.6)
                      if n not in exc.nearest)
        if extra:
            raise DeviceNotFound(query, tuple(exc.nearest) + extra, exc.where) from None
        raise


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging(verbose: int) -> Callable[[], None]:
    """-v: INFO, -vv: DEBUG from pyvmbus's loggers, on stderr (nothing without -v).

    Returns the undo (the command registers it to run when it ends).
    """
    logger = logging.getLogger("pyvmbus")
    if verbose <= 0:
        return lambda: None
    old_level = logger.level
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    return undo


@dataclass
class CliState:
    """The global options of one ``vmbus`` invocation, and the mock it may run."""

    root_option: Path | None = None
    mock: bool = False
    kernel: str | None = None
    json: bool = False
    verbose: int = 0
    on_close: Callable[[Callable[[], object]], object] | None = None
    """Registers a cleanup to run when the command ends (click's ``ctx.call_on_close``)."""
    _mock: MockVmbus | None = field(default=None, repr=False)

    @property
    def mock_vmbus(self) -> MockVmbus | None:
        """The running ``--mock`` bus, once :meth:`root` started it."""
        return self._mock

    def start_mock(self, devices: tuple[str, ...] = MOCK_DEVICES) -> MockVmbus:
        """Start the ``--mock`` bus (once) and schedule its shutdown for the end of the command."""
        if self._mock is None:
            from ..mock import MockVmbus
            from ..mock.generations import DEFAULT_GENERATION

            mock = MockVmbus(kernel=self.kernel or DEFAULT_GENERATION, devices=devices)
            _log.info("starting a mock VMBus (kernel %s) with %s", mock.generation.name, ", ".join(devices))
            mock.start()
            self._mock = mock
            if self.on_close is not None:
                self.on_close(mock.close)
        return self._mock

    def close(self) -> None:
        """Stop the mock, if one runs (also registered with click; idempotent)."""
        if self._mock is not None:
            self._mock.close()

    def root(self) -> Path:
        """The root to work under: ``--root``, the ``--mock`` bus's root, or ``/``.

        Raises :class:`~pyvmbus.cli.errors.NoVmbus` when there is no VMBus there.
        """
        from .errors import NoVmbus

        if self.mock:
            return self.start_mock().root
        root = self.root_option if self.root_option is not None else Path("/")
        if not (root / "sys" / "bus" / "vmbus").is_dir():
            raise NoVmbus(root)
        if root != Path("/"):
            from ..mock.sysfs_tree import mock_liveness

            live = mock_liveness(root)
            if live is not None and not live[0]:
                raise NoVmbus(root, dead_mock=live[1] or 0)
        return root

    def sysfs(self) -> Sysfs:
        return Sysfs(self.root())

    def bus(self) -> Vmbus:
        from ..bus import Vmbus

        return Vmbus(self.root())

    def device(self, query: str) -> VmbusDevice:
        """The one device ``query`` names (GUID, unique prefix, class or mock model name)."""
        return resolve_device(self.sysfs(), query)


def known_device_words() -> list[str]:
    """Class names and mock model names, for completion when no bus can be read."""
    words = [c.name for c in CLASSES]
    for name in mock_model_classes():
        if name not in words:
            words.append(name)
    return words


def json_option(f: _F) -> _F:
    """``--json`` after the command too (``vmbus list --json`` = ``vmbus --json list``); every
    command, the plug-in ones included, takes it from here."""

    def set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        state = ctx.find_object(CliState)
        if value and state is not None:
            state.json = True

    return click.option("--json", "json_flag", is_flag=True, expose_value=False, callback=set_json,
                        help="Print JSON lines (same as 'vmbus --json ...').")(f)
