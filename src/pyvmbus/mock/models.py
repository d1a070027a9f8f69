"""The mock host's device models: what the host side of each device says back.

A :class:`DeviceModel` is the host end of one open channel (one instance per opened
channel, primary or subchannel), running inside the mock host process. It sees every
packet the guest sends, gets a :meth:`~DeviceModel.tick` every ~5 ms while the channel is
open, answers :meth:`~DeviceModel.command` calls forwarded from
``MockVmbus.command(guid, name, **args)``, and talks back through its
:class:`HostChannel`. :func:`register_model` puts a model class in the table that
``MockVmbus.add_device(name)`` looks names up in.

Models other than ``echo`` live elsewhere (``pyvmbus.mock.ic_models``, ``fcopy_model`` and
``kvp_model`` for the integration
services, imported by the host process when it exists, or any module named in
``MockVmbus(models=[...])``); all they need is this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

from ..guid import Guid, parse_guid
from ..packet import COMPLETION_REQUESTED, Packet, PacketType
from ..ring import PacketSpec

__all__ = [
    "ECHO_CLASS_GUID",
    "DeviceModel",
    "EchoModel",
    "HostChannel",
    "NullModel",
    "model_class",
    "model_for_class",
    "models",
    "register_model",
]

ECHO_CLASS_GUID = parse_guid("6563686f-7079-4762-8573-6d6f636b0001")
"""Class GUID the ``echo`` device is offered with ("echo" "pyvmbus mock" in hex). No kernel
knows it, so Linux treats it as HV_UNKNOWN (pref ring 0x11000 on 6.10+)."""

_INBAND = int(PacketType.DATA_INBAND)
_COMP = int(PacketType.COMP)
_M = TypeVar("_M", bound=type["DeviceModel"])

Payload = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


class HostChannel:
    """The host's end of one open channel, as a device model sees it.

    The mock host implements it (pyvmbus.mock.host); models only call these methods.
    ``send`` writes into the guest's RX ring with the kernel's signal rules (the guest is
    interrupted only on an empty -> non-empty transition of an unmasked ring) and returns
    False when the ring has no room (nothing written; the host asks the guest, through
    RX pending_send_size, to signal when it has read enough, and the model retries in
    :meth:`DeviceModel.tick`). ``post`` queues instead: queued packets go out in order as
    soon as there is room, and while any are queued the host stops reading the guest's
    TX ring (back-pressure, as a real device does).
    """

    relid: int
    subchannel_index: int
    instance: Guid
    class_guid: Guid
    monitored: bool

    def send(self, payload: Payload, type: int = PacketType.DATA_INBAND, flags: int = 0,
             transaction_id: int = 0, extra_header: bytes = b"") -> bool:
        """Write one packet into the guest's RX ring now; False if it does not fit.

        ``extra_header``: bytes between the descriptor and the payload (a transfer-page or
        GPA-direct header; a multiple of 8 long), counted by offset8."""
        raise NotImplementedError

    def complete(self, pkt: Packet, payload: Payload = b"") -> bool:
        """Send a VM_PKT_COMP (type 0xb) carrying ``pkt.transaction_id``; False if no room."""
        return self.send(payload, PacketType.COMP, 0, pkt.transaction_id)

    def post(self, payload: Payload, type: int = PacketType.DATA_INBAND, flags: int = 0,
             transaction_id: int = 0, extra_header: bytes = b"") -> None:
        """Send now if the ring has room and nothing is queued, else queue it (never lost)."""
        raise NotImplementedError

    def post_complete(self, pkt: Packet, payload: Payload = b"") -> None:
        """:meth:`post` of a VM_PKT_COMP for ``pkt``."""
        self.post(payload, PacketType.COMP, 0, pkt.transaction_id)

    def post_batch(self, packets: Sequence[PacketSpec]) -> None:
        """:meth:`post` each (payload, type, flags, transaction_id) of ``packets``, in order.

        The mock host writes what fits with one index update (and one signal decision)
        per chunk, as a host that commits several writes at once; the rest as post()."""
        for payload, type_, flags, tid in packets:
            self.post(payload, type_, flags, tid)

    @property
    def queued(self) -> int:
        """Packets waiting in :meth:`post`'s queue for room in the ring."""
        raise NotImplementedError

    @property
    def is_open(self) -> bool:
        """False once the guest closed the channel, or it was rescinded."""
        raise NotImplementedError

    def log(self, text: str) -> None:
        """Add a line to the mock's kernel log (for what a test may want to see; not per packet)."""
        raise NotImplementedError


class DeviceModel:
    """Host-side behaviour of one device class; one instance per opened channel.

    Subclass it, set ``name`` (what ``add_device`` accepts) and ``class_name`` (a class
    short name such as "heartbeat", or a class GUID), override what you need, and
    decorate with :func:`register_model`. Every method runs in the mock host process, on
    its one thread: do not block. ``monitored`` overrides the default (perf classes and
    unknown classes monitored, integration services not).
    """

    name: ClassVar[str] = ""
    class_name: ClassVar[str] = ""
    monitored: ClassVar[bool | None] = None

    def opened(self, chan: HostChannel) -> None:
        """The guest opened the channel (rings are initialised and empty)."""

    def packet(self, chan: HostChannel, pkt: Packet) -> None:
        """A guest packet arrived (already copied out of the ring)."""

    def packets(self, chan: HostChannel, pkts: list[Packet]) -> None:
        """Two or more guest packets arrived, read in one batch: :meth:`packet` for each.

        Override it to answer a batch at once (e.g. with :meth:`HostChannel.post_batch`);
        a single packet still goes to :meth:`packet`. An exception it raises is logged and
        counted once for the batch, where the default counts it per packet and goes on
        with the next."""
        for pkt in pkts:
            self.packet(chan, pkt)

    def tick(self, chan: HostChannel, now: float) -> None:
        """Called every ~5 ms while the channel is open (``now`` is time.monotonic())."""

    def command(self, chan: HostChannel, name: str, args: dict[str, Any]) -> Any:
        """Handle ``MockVmbus.command``; the result must pickle.

        The base class knows ``send`` (args: payload: bytes, type=6, flags=0,
        transaction_id=0, count=1; posts count copies and returns how many were posted).
        Subclasses should fall back to ``super().command(...)`` for names they don't know.
        """
        if name == "send":
            payload = bytes(args.get("payload", b""))
            count = int(args.get("count", 1))
            spec = (payload, int(args.get("type", PacketType.DATA_INBAND)), int(args.get("flags", 0)),
                    int(args.get("transaction_id", 0)))
            chan.post_batch([spec] * max(0, count))
            return count
        raise KeyError(f"model {self.name!r} has no command {name!r}")

    def closed(self, chan: HostChannel) -> None:
        """The channel closed (the guest's last close, a rescind or the mock shutting down)."""


_MODELS: dict[str, type[DeviceModel]] = {}


def register_model(cls: _M) -> _M:
    """Add ``cls`` to the table under ``cls.name`` (a class decorator; re-registering replaces)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if not cls.class_name:
        raise ValueError(f"model {cls.name!r} has no class_name (a class short name or a class GUID)")
    _MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type[DeviceModel]:
    """The model registered as ``name``; KeyError listing the known ones otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"no device model {name!r}; known: {', '.join(sorted(_MODELS))}") from None


def models() -> dict[str, type[DeviceModel]]:
    """A copy of the model table (name -> class)."""
    return dict(_MODELS)


def model_for_class(class_name: str, class_guid: str | None) -> type[DeviceModel]:
    """The model a device of this class runs when none is named: one registered with that
    class name (or GUID), else :class:`NullModel`."""
    for cls in _MODELS.values():
        if cls.class_name == class_name or (class_guid and cls.class_name == class_guid):
            return cls
    return NullModel


@register_model
class EchoModel(DeviceModel):
    """Answers like DESIGN.md's echo device.

    An in-band packet that asks for completion gets a VM_PKT_COMP with its transaction id
    and its bytes (payload as the ring delivered it, i.e. padded to 8); any other in-band
    packet comes back in-band with the same transaction id and flags 0. Other packet types
    are counted and dropped. Replies are posted, so none is lost when the ring is full:
    the host stops reading the guest's ring until they are out.
    """

    name = "echo"
    class_name = ECHO_CLASS_GUID
    monitored = True

    def packet(self, chan: HostChannel, pkt: Packet) -> None:
        # post_complete / completion_requested, inlined: this runs for every packet.
        if pkt.type != _INBAND:
            return
        if pkt.flags & COMPLETION_REQUESTED:
            chan.post(pkt.payload, _COMP, 0, pkt.transaction_id)
        else:
            chan.post(pkt.payload, _INBAND, 0, pkt.transaction_id)

    def packets(self, chan: HostChannel, pkts: list[Packet]) -> None:
        # The replies to one read batch go out as one post_batch: what fits in one
        # index update and signal decision per chunk, in order, the rest queued.
        replies = [(p.payload, _COMP if p.flags & COMPLETION_REQUESTED else _INBAND, 0, p.transaction_id)
                   for p in pkts if p.type == _INBAND]
        if replies:
            chan.post_batch(replies)


@register_model
class NullModel(DeviceModel):
    """Reads and counts what the guest sends and never answers (devices with no model)."""

    name = "null"
    class_name = "unknown"
