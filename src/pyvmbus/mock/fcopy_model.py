"""The file copy host (Copy-VMFile): sends a file as Hyper-V does, checks each answer.

:class:`FcopySender` is the sans-I/O host side (START_FILE_COPY, WRITE_TO_FILE fragments,
COMPLETE_FCOPY or CANCEL_FCOPY, one outstanding at a time, over the framing of
:class:`~pyvmbus.mock.ic_models.IcHost`); :class:`FcopyModel` puts it on a mock channel as
the ``fcopy`` device model. Tests drive the sender in-process with
:func:`~pyvmbus.mock.ic_models.pump`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..ic.messages import (
    DATA_FRAGMENT,
    HV_S_OK,
    UTIL_FW_VERSION,
    UTIL_WS2K8_FW_VERSION,
    WIN8_SRV_VERSION,
    Buffer,
    CopyFlags,
    DoFcopy,
    FcopyHdr,
    FcopyOp,
    IcMsgType,
    StartFcopy,
    status_name,
    version,
)
from .ic_models import HostRequest, IcHost, IcModel
from .models import register_model

__all__ = ["FcopyModel", "FcopySender"]

class FcopySender(IcHost):
    """Sends one file at a time as Copy-VMFile does: START_FILE_COPY, WRITE_TO_FILE
    fragments of ``fragment`` bytes (6 KiB), COMPLETE_FCOPY, each after the previous answer.
    :meth:`cancel` (or ``cancel_after`` fragments) sends CANCEL_FCOPY instead of the rest.
    A non-zero status ends the transfer as "failed" (``status``/``failed_op`` say why).

    ``fragments`` (tests of a misbehaving host) replaces the in-order split: the given
    ``(file offset, bytes)`` pairs are sent as they are, in that order (gaps, overlaps and
    repeats included), and ``file_size`` is announced (default: the end of the last one)."""

    message_type = IcMsgType.FCOPY
    default_service_versions = (version(1, 0), WIN8_SRV_VERSION)

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("framework_versions", (UTIL_WS2K8_FW_VERSION, UTIL_FW_VERSION))
        super().__init__(**kw)
        self.transfer_state = "idle"
        self.status: int | None = None
        self.failed_op: str | None = None
        self.bytes_sent = 0
        self.fragments_sent = 0
        self._data = memoryview(b"")
        self._start: StartFcopy | None = None
        self._offset = 0
        self._fragment = DATA_FRAGMENT
        self._cancel_after: int | None = None
        self._cancel = False
        self._frags: list[tuple[int, bytes]] | None = None

    @property
    def busy(self) -> bool:
        return self.transfer_state in ("starting", "writing", "completing", "cancelling")

    def send_file(
        self,
        data: Buffer,
        file_name: str,
        path_name: str,
        *,
        flags: int = CopyFlags.NONE,
        file_size: int | None = None,
        fragment: int = DATA_FRAGMENT,
        cancel_after: int | None = None,
        fragments: Sequence[tuple[int, Buffer]] | None = None,
    ) -> None:
        """Start sending ``data`` as ``path_name``/``file_name`` (``file_size`` overrides the
        size announced, ``fragments`` the in-order split: for tests)."""
        if self.busy:
            raise RuntimeError(f"a transfer is in progress ({self.transfer_state})")
        if not 0 < fragment <= DATA_FRAGMENT:
            raise ValueError(f"fragment must be 1..{DATA_FRAGMENT} bytes")
        self._frags = None
        if fragments is not None:
            frags = [(int(off), bytes(chunk)) for off, chunk in fragments]
            for off, chunk in frags:
                if off < 0 or len(chunk) > DATA_FRAGMENT:
                    raise ValueError(f"fragment at {off} of {len(chunk)} bytes: offsets >= 0, "
                                     f"at most {DATA_FRAGMENT} bytes each")
            self._frags = frags
            data = b""
            if file_size is None:
                file_size = max((off + len(chunk) for off, chunk in frags), default=0)
        self._data = memoryview(data).cast("B")
        size = len(self._data) if file_size is None else file_size
        self._start = StartFcopy(file_name, path_name, int(flags), size)
        self._start.pack()  # names too long: fail here, not later
        self._offset = 0
        self._fragment = fragment
        self._cancel_after = cancel_after
        self._cancel = False
        self.status = None
        self.failed_op = None
        self.bytes_sent = self.fragments_sent = 0
        self.transfer_state = "starting"

    def cancel(self) -> None:
        """Send CANCEL_FCOPY next (after the answer to the message in flight)."""
        if self.busy:
            self._cancel = True

    def _produce(self) -> HostRequest | None:
        st = self.transfer_state
        if st == "starting" and self._start is not None:
            start = self._start
            self.transfer_state = "writing"
            return self._req("start", start.pack)
        if st == "writing":
            if self._cancel or (self._cancel_after is not None and self.fragments_sent >= self._cancel_after):
                self.transfer_state = "cancelling"
                return self._req("cancel", FcopyHdr(FcopyOp.CANCEL_FCOPY).pack)
            if self._frags is not None:
                if self.fragments_sent < len(self._frags):
                    off, piece = self._frags[self.fragments_sent]
                    self.fragments_sent += 1
                    self.bytes_sent += len(piece)
                    return self._req("write", lambda: DoFcopy(off, piece).pack())
            elif self._offset < len(self._data):
                off = self._offset
                chunk = self._data[off : off + self._fragment]
                self._offset += len(chunk)
                self.fragments_sent += 1
                self.bytes_sent += len(chunk)
                return self._req("write", lambda: DoFcopy(off, bytes(chunk)).pack())
            self.transfer_state = "completing"
            return self._req("complete", FcopyHdr(FcopyOp.COMPLETE_FCOPY).pack)
        return None

    def _req(self, op: str, body: Callable[[], bytes]) -> HostRequest:
        return HostRequest(op, body, IcMsgType.FCOPY, lambda r, st, d: self._answer(op, st))

    def _answer(self, op: str, status: int) -> None:
        self.status = status
        if status != HV_S_OK:
            self.transfer_state = "failed"
            self.failed_op = op
        elif op == "complete":
            self.transfer_state = "done"
        elif op == "cancel":
            self.transfer_state = "cancelled"

    def no_answer(self) -> None:
        was = self._outstanding
        super().no_answer()
        if was is not None and was.msgtype == IcMsgType.FCOPY and self.busy:
            self.transfer_state = "failed"
            self.failed_op = was.kind

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            "transfer": self.transfer_state,
            "status": status_name(self.status) if self.status is not None else None,
            "failed_op": self.failed_op,
            "bytes_sent": self.bytes_sent,
            "fragments_sent": self.fragments_sent,
        }


@register_model
class FcopyModel(IcModel[FcopySender]):
    """File copy host. Commands: ``send_file`` (data=bytes or source=a file the host process
    reads; file_name, dest (the guest directory), flags=0, cancel_after=None, file_size=None,
    fragments=None: [(offset, bytes), ...] sent as given instead of the data),
    ``cancel``; ``stats`` shows the transfer ("transfer": done / failed / cancelled ...)."""

    name = "fcopy"
    class_name = "fcopy"

    def make_host(self) -> FcopySender:
        return FcopySender()

    def host_command(self, name: str, args: dict[str, Any]) -> Any:
        host = self.host
        if name == "send_file":
            if "source" in args:
                with open(str(args["source"]), "rb") as f:
                    data = f.read()
            else:
                data = bytes(args.get("data", b""))
            cancel_after = args.get("cancel_after")
            file_size = args.get("file_size")
            fragments = args.get("fragments")
            host.send_file(
                data, str(args["file_name"]), str(args["dest"]), flags=int(args.get("flags", 0)),
                cancel_after=None if cancel_after is None else int(cancel_after),
                file_size=None if file_size is None else int(file_size),
                fragments=None if fragments is None else [(int(o), bytes(b)) for o, b in fragments],
            )
            return None
        if name == "cancel":
            host.cancel()
            return None
        return super().host_command(name, args)
