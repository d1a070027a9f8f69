"""``vmbus mock fault``: reach the mock host of a running ``vmbus mock serve`` from another shell.

``vmbus mock serve`` owns its :class:`~pyvmbus.mock.MockVmbus` (the control connection to
the mock process is a socket pair only it holds), so other processes cannot call
``rescind`` or ``fault`` on it. :class:`MockControl` lets them: ``serve`` listens on
``ROOT/run/mock/serve.sock`` (inside the mock's root, so it goes away with it) for one
JSON line per connection, ``{"device": ..., "kind": ..., "args": {KEY: "VALUE", ...}}``,
applies it and answers one JSON line. The arguments travel as the strings the user typed
and are parsed by the server (:func:`parse_fault_args`: one place for their rules); the
CLI parses them first too, so a typo is a usage error before anything is sent. That is
what a newcomer needs to see a device rescinded under ``vmbus enable`` without writing
Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import DeviceNotFound, NotPermitted, VmbusError
from ..sysfs import Sysfs
from .errors import NoVmbus, error_line, exit_code
from .state import class_label, resolve_device

if TYPE_CHECKING:
    from ..mock import MockVmbus

__all__ = ["DEVICE_KINDS", "FAULT_ARGS", "FAULT_KINDS", "MockControl", "MockControlError", "control_path",
           "parse_fault_args", "render_fault", "send_fault"]

DEVICE_KINDS = ("rescind", "reoffer", "remove")
"""What happens to the device itself (MockVmbus.rescind / reoffer / remove_device)."""
FAULT_KINDS = (*DEVICE_KINDS, "corrupt", "stall", "resume", "storm", "crash", "header", "descriptor")
"""Every KIND of ``vmbus mock fault`` (the rest are :data:`pyvmbus.mock.FAULTS`)."""

_WHERE = {"subchannel": "0 (default): the primary; n: the n-th subchannel",
          "interrupt": "interrupt the guest afterwards: 1 (default) or 0"}
FAULT_ARGS: Mapping[str, Mapping[str, str]] = {
    "corrupt": {"count": "the next N descriptors lie: len8 0x200, 24 B published (default 1)"},
    "storm": {"count": "N interrupts with nothing new (default 1000)"},
    "header": {"field": "write_index, read_index, interrupt_mask, pending_send_sz or "
                        "feature_bits (required)",
               "ring": "rx (default: the guest's RX ring) or tx",
               "value": "the u32 the host stores there, whoever owns the word",
               "add": "or: add this to the word (mod 2**32)", **_WHERE},
    "descriptor": {"offset8": "the descriptor's offset8 (required)", "len8": "its len8 (required)",
                   "type": "its type (default 6, in-band data)", "flags": "its flags (default 0)",
                   "transaction_id": "its transaction id (default 0)",
                   "publish": "bytes published: a multiple of 8, >= 24 (default 32)",
                   **_WHERE},
}
"""The ``--arg KEY=VALUE`` each host fault takes (kinds not listed take none): numbers in
decimal or 0x hex, checked here; the mock host checks what needs the ring (room, u32 range)."""

_REQUIRED = {"header": ("field",), "descriptor": ("offset8", "len8")}
_WORDS = ("write_index", "read_index", "interrupt_mask", "pending_send_sz", "feature_bits")
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_fault_args(kind: str, items: Mapping[str, str] | Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (or a KEY -> VALUE mapping) as :meth:`MockVmbus.fault` takes them.

    ValueError names the key and what it takes: a key the kind does not take, a number
    that is not one, a required key missing, ``header`` without exactly one of value / add.
    """
    pairs: list[tuple[str, str]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        for item in items:
            key, eq, value = str(item).partition("=")
            if not eq or not key:
                raise ValueError(f"--arg {item!r}: give KEY=VALUE")
            pairs.append((key.strip(), value.strip()))
    known = FAULT_ARGS.get(kind, {})
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in known:
            takes = f"takes {', '.join(known)}" if known else "takes no --arg"
            raise ValueError(f"fault {kind!r} {takes}, not {key!r}")
        if key in out:
            raise ValueError(f"--arg {key} given twice")
        if key == "ring":
            if value not in ("rx", "tx"):
                raise ValueError(f"ring must be rx or tx, not {value!r}")
            out[key] = value
        elif key == "field":
            if value not in _WORDS:
                raise ValueError(f"field must be one of {', '.join(_WORDS)}, not {value!r}")
            out[key] = value
        elif key == "interrupt":
            if value.lower() not in _BOOLS:
                raise ValueError(f"interrupt must be 1 or 0, not {value!r}")
            out[key] = _BOOLS[value.lower()]
        else:
            try:
                number = int(value, 0)
            except ValueError:
                raise ValueError(f"{key} must be a number (decimal or 0x hex), not {value!r}") from None
            if number < 0 or number > 0xFFFFFFFFFFFFFFFF:
                raise ValueError(f"{key} must be between 0 and 2**64 - 1, not {value}")
            if key == "count" and not 1 <= number <= 1_000_000:
                raise ValueError(f"count must be between 1 and 1000000, not {value}")
            out[key] = number
    missing = [k for k in _REQUIRED.get(kind, ()) if k not in out]
    if missing:
        raise ValueError(f"fault {kind!r} needs --arg {missing[0]}=...")
    if kind == "header" and ("value" in out) == ("add" in out):
        raise ValueError("fault 'header' needs exactly one of --arg value=... or --arg add=...")
    return out

_PAST = {"rescind": "rescinded", "reoffer": "offered again", "remove": "removed", "corrupt": "corrupting",
         "stall": "stalled", "resume": "resumed", "storm": "storming", "crash": "crashed"}
_MAX_REQUEST = 4096


def control_path(root: str | os.PathLike[str]) -> Path:
    """Where ``vmbus mock serve`` listens under its root."""
    return Path(root) / "run" / "mock" / "serve.sock"


def render_fault(data: dict[str, Any]) -> str:
    """The text line of ``vmbus mock fault`` (and of serve's ``fault`` event)."""
    kind = data["kind"]
    what = f"{data['device']} ({data['class']})"
    if kind == "reoffer":
        return f"{what} offered again as relid {data['relid']}"
    if kind in DEVICE_KINDS:
        return f"{what} {_PAST[kind]} by the host"
    args = data.get("args") or {}
    given = f" ({', '.join(f'{k}={v}' for k, v in args.items())})" if args else ""
    return f"host fault '{kind}'{given} on {what}"


class MockControl:
    """The listening side, run by ``vmbus mock serve`` between its other duties."""

    def __init__(self, mock: MockVmbus, on_fault: Callable[[dict[str, Any]], object]) -> None:
        self.mock = mock
        self.on_fault = on_fault
        self.path = control_path(mock.root)
        self._gone: dict[str, str] = {}
        """Rescinded devices (guid -> class): their directory may be gone, reoffer needs them."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(4)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ)

    def __enter__(self) -> MockControl:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._sel.close()
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def serve(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for one request and answer it (nothing here may raise)."""
        if not self._sel.select(timeout):
            return
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2.0)
            try:
                request = json.loads(conn.recv(_MAX_REQUEST) or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("the request is not a JSON object")
                args = request.get("args") or {}
                if not isinstance(args, dict):
                    raise ValueError("args is not a JSON object")
                reply = self._apply(str(request.get("device", "")), str(request.get("kind", "")), args)
            except (VmbusError, OSError, ValueError) as exc:
                reply = {"ok": False, "error": error_line(exc), "type": type(exc).__name__,
                         "exit_code": exit_code(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _resolve(self, query: str) -> tuple[str, str]:
        try:
            dev = resolve_device(Sysfs(self.mock.root), query)
            return str(dev.guid), class_label(dev)
        except DeviceNotFound:
            q = query.strip().strip("{}").lower()
            for guid, cls in self._gone.items():
                if guid.startswith(q) or cls == q:
                    return guid, cls
            raise

    def _apply(self, query: str, kind: str, raw_args: Mapping[str, str]) -> dict[str, Any]:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        args = parse_fault_args(kind, raw_args)
        guid, cls = self._resolve(query)
        data: dict[str, Any] = {"device": guid, "class": cls, "kind": kind, "relid": None,
                                "args": {k: str(v) for k, v in raw_args.items()}}
        if kind == "rescind":
            self._gone[guid] = cls
            self.mock.rescind(guid)
        elif kind == "remove":
            self._gone.pop(guid, None)
            self.mock.remove_device(guid)
        elif kind == "reoffer":
            data["relid"] = self.mock.reoffer(guid)
            self._gone.pop(guid, None)
        else:
            self.mock.fault(guid, kind, **args)
        self.on_fault({"event": "fault", **data})
        return {"ok": True, **data}


def send_fault(root: str | os.PathLike[str], device: str, kind: str, timeout: float = 30.0,
               args: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ask the ``vmbus mock serve`` under ``root`` to apply ``kind`` to ``device`` (with
    ``args``: KEY -> VALUE strings, see :data:`FAULT_ARGS`); its answer.

    Raises :class:`~pyvmbus.cli.errors.NoVmbus` when nothing serves there,
    :class:`~pyvmbus.errors.NotPermitted` when its socket is another user's (connect needs
    write permission on it), and the server's error (as :class:`MockControlError`) when
    it refused.
    """
    path = control_path(root)
    if not path.exists():
        raise NoVmbus(root) if not (Path(root) / "sys" / "bus" / "vmbus").is_dir() else _NotServed(root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            request = {"device": device, "kind": kind, "args": dict(args or {})}
            sock.sendall(json.dumps(request).encode() + b"\n")
            raw = b""
            while not raw.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except PermissionError:
            raise NotPermitted(str(path), "connect to") from None
        except OSError as exc:
            raise _NotServed(root, str(exc)) from None
    try:
        reply = json.loads(raw or b"{}")
    except ValueError:
        reply = {"error": f"the mock under {root} answered something else than JSON: {raw[:60]!r}"}
    if not isinstance(reply, dict):
        reply = {"error": f"the mock under {root} answered {raw[:60]!r}"}
    if not reply.get("ok"):
        code = reply.get("exit_code")
        raise MockControlError(str(reply.get("error", "no answer")), code if isinstance(code, int) else 1)
    reply.pop("ok")
    return dict(reply)


class MockControlError(VmbusError):
    """The serving mock refused a ``vmbus mock fault`` request (its one-line reason)."""

    def __init__(self, message: str, code: int) -> None:
        self.cli_exit_code = code
        super().__init__(message)


class _NotServed(NoVmbus):
    def __init__(self, root: str | os.PathLike[str], detail: str = "") -> None:
        super().__init__(root)
        why = f" ({detail})" if detail else ""
        self.args = (f"no 'vmbus mock serve' answers under {root}{why}: start one with "
                     f"'vmbus mock serve --root {root}' (a bus from MockVmbus() in Python has no "
                     "control socket: call its rescind() / fault() instead)",)
