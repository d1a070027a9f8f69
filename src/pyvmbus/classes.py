"""The VMBus device classes Linux knows (include/linux/hyperv.h, channel_mgmt.c vmbus_devs[]).

Each class has a short name used by the CLI and the mock, its class GUID, the
``dev_type`` index the kernel prints in sysfs ``device``, whether it is a performance
device, and its preferred ring size (``pref_ring_size``; 0 means the 2 MiB default).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidGuid
from .guid import Guid, parse_guid

__all__ = [
    "CLASSES",
    "DEFAULT_RING_SIZE",
    "HYPERV_INSTANCE_GUIDS",
    "DeviceClass",
    "UNKNOWN",
    "class_by_guid",
    "class_by_name",
    "lookup_class",
]

DEFAULT_RING_SIZE = 2 * 1024 * 1024
"""uio_hv_generic's ring size per direction when the class prefers none (SZ_2M)."""


@dataclass(frozen=True)
class DeviceClass:
    """One row of the kernel's vmbus_devs[] table."""

    name: str
    description: str
    guid: Guid | None
    dev_type: int
    perf_device: bool
    pref_ring_size: int = 0
    storage: bool = False
    network: bool = False

    @property
    def ring_size(self) -> int:
        """Requested ring size per direction before page alignment (6.10+ kernels)."""
        return self.pref_ring_size or DEFAULT_RING_SIZE


def _c(name: str, desc: str, guid: str | None, dev_type: int, perf: bool, **kw: object) -> DeviceClass:
    return DeviceClass(name, desc, parse_guid(guid) if guid else None, dev_type, perf, **kw)  # type: ignore[arg-type]


CLASSES: tuple[DeviceClass, ...] = (
    _c("ide", "IDE disk", "32412632-86cb-44a2-9b5c-50d1417354f5", 0, True, storage=True),
    _c("scsi", "SCSI storage (storvsc)", "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f", 1, True, storage=True),
    _c("fc", "synthetic Fibre Channel", "2f9bcc4a-0069-4af3-b76b-6fd0be528cda", 2, True, storage=True),
    _c("network", "network (netvsc)", "f8615163-df3e-46c5-913f-f2d2f965ed0e", 3, True, network=True),
    _c("nd", "NetworkDirect (RDMA)", "8c2eaf3d-32a7-4b09-ab99-bd1f1c86b501", 4, True),
    _c("pci", "PCI Express pass-through", "44c4f61d-4444-4400-9d52-802e27ede19f", 5, True),
    _c("video", "synthetic video", "da0a7802-e377-4aac-8e77-0558eb1073f8", 6, False),
    _c("keyboard", "synthetic keyboard", "f912ad6d-2b17-48ea-bd65-f927a61c7684", 7, False),
    _c("mouse", "synthetic mouse", "cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a", 8, False),
    _c("kvp", "key-value pair exchange", "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6", 9, False),
    _c("timesync", "time synchronization", "9527e630-d0ae-497b-adce-e80ab0175caf", 10, False),
    _c("heartbeat", "heartbeat", "57164f39-9115-4e78-ab55-382f3bd5422d", 11, False),
    _c("shutdown", "guest shutdown", "0e0b6031-5213-4934-818b-38d90ced39db", 12, False),
    _c("fcopy", "guest file copy", "34d14be3-dee4-41c8-9ae7-6b174977c192", 13, False, pref_ring_size=0x4000),
    _c("vss", "volume shadow copy (backup)", "35fa2e29-ea23-4236-96ae-3a6ebacba440", 14, False),
    _c("balloon", "dynamic memory", "525074dc-8985-46e2-8057-a307dc18a502", 15, False),
)

HYPERV_INSTANCE_GUIDS: dict[str, Guid] = {
    name: parse_guid(guid)
    for name, guid in (
        ("heartbeat", "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0"),
        ("kvp", "242ff919-07db-4180-9c2e-b86cb68c8c55"),
        ("shutdown", "b6650ff7-33bc-4840-8048-e0676786f393"),
        ("timesync", "2dd1ce17-079e-403c-b352-a1921ee207ee"),
        ("vss", "2450ee40-33bf-4fbd-892e-9fb06e9214cf"),
        ("fcopy", "eb765408-105f-49b6-b4aa-c123b64d17d4"),
    )
}
"""The fixed instance GUIDs Hyper-V gives its integration devices in every VM.

Tools open them by name: the kernel's tools/hv/hv_fcopy_uio_daemon.c hard-codes the fcopy
one. Read from published ``lsvmbus -vv`` outputs (Device_ID lines) and a FreeBSD
``devinfo`` listing of the same devices (pnpinfo deviceid=); see docs/kernels.md."""

UNKNOWN = DeviceClass("unknown", "unknown device class", None, 16, False, pref_ring_size=0x11000)
"""What the kernel calls HV_UNKNOWN: any class GUID not in the table."""

_BY_NAME = {c.name: c for c in CLASSES}
_BY_GUID = {c.guid: c for c in CLASSES if c.guid}


def class_by_name(name: str) -> DeviceClass:
    """The class with this short name; KeyError listing the known names otherwise."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown device class {name!r}; known: {', '.join(sorted(_BY_NAME))}"
        ) from None


def class_by_guid(guid: str) -> DeviceClass:
    """The class for a class GUID, or :data:`UNKNOWN` when the kernel would not know it."""
    return _BY_GUID.get(parse_guid(guid), UNKNOWN)


def lookup_class(name_or_guid: str) -> DeviceClass:
    """Accept a short name or a class GUID (any spelling)."""
    if name_or_guid.lower() in _BY_NAME:
        return _BY_NAME[name_or_guid.lower()]
    try:
        guid = parse_guid(name_or_guid)
    except InvalidGuid:
        raise KeyError(
            f"{name_or_guid!r} is neither a class GUID nor a known class name; "
            f"known: {', '.join(sorted(_BY_NAME))}"
        ) from None
    return _BY_GUID.get(guid, DeviceClass("unknown", "unknown device class", guid, 16, False, 0x11000))
