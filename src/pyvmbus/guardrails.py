"""What taking a device away from its driver would break: the guard rails of binding.

:func:`guard_rails` reads, under ``root``, which mounts, swaps, routes and SSH session
depend on a VMBus device, and says in words what binding it would take away ([] = safe).
:mod:`pyvmbus.binding` refuses to bind or unbind unless forced when the list is not
empty; ``vmbus show`` prints it. Nothing here writes anything.

The rails:

- storage (any class: ide, scsi, fc, and pci pass-through with NVMe behind it): a disk
  behind the device (``root/sys/block/*/device`` resolves into the device's directory)
  whose disk, partition or holder (device mapper) is mounted (``root/proc/self/mountinfo``,
  matched by major:minor and by source name) or used as swap (``root/proc/swaps``);
- network: an interface of the device (``<device>/net/<ifname>``) holds the IPv4 or IPv6
  default route (``root/proc/net/route``, ``root/proc/net/ipv6_route``), or carries the
  SSH session. The SSH check takes the local address from ``SSH_CONNECTION`` and finds
  its interface with ``ip -j addr`` when ``root`` is ``/``, else from the connected
  (gateway-less) route whose subnet holds it (``proc/net/route``) or from
  ``proc/net/if_inet6`` for IPv6; when no interface can be found and the device's
  interface is the only one in ``root/sys/class/net`` (besides ``lo``), it is refused too.

Imports: sysfs and guid only (what the kernel and /proc show), never binding.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .sysfs import Sysfs, VmbusDevice, is_real_root, read_attr

__all__ = ["guard_rails"]

_RTF_UP = 0x0001
_RTF_REJECT = 0x0200


def guard_rails(root: str | os.PathLike[str], guid: str) -> list[str]:
    """Why taking this device from its driver would hurt the running system ([] = safe)."""
    rootp = Path(root)
    dev = Sysfs(rootp).device(guid)
    reasons: list[str] = []
    cls = dev.device_class
    # Every class, not just ide/scsi/fc: a PCI pass-through device (class "pci") carries
    # the PCI bus of NVMe disks (the OS disk on newer Azure sizes) below its directory.
    reasons += _storage_in_use(rootp, dev)
    if cls.network or dev.net_interfaces:
        reasons += _network_in_use(rootp, dev)
    return reasons


def _resolve(root: Path, path: Path) -> Path | None:
    """realpath inside ``root``: absolute link targets are taken as relative to the root."""
    base = os.path.abspath(root)
    try:
        parts = list(Path(os.path.abspath(path)).relative_to(base).parts)
    except ValueError:
        return None
    cur = base
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if cur != base:
                cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = base
                parts = list(Path(target).parts[1:]) + parts
            else:
                parts = list(Path(target).parts) + parts
            continue
        if not os.path.lexists(nxt):
            return None
        cur = nxt
    return Path(cur)


def _disks_of(root: Path, dev: VmbusDevice) -> list[tuple[str, Path]]:
    """(name, real block dir) of every disk whose ``device`` link leads into the device."""
    dev_real = _resolve(root, dev.path)
    out = []
    try:
        entries = sorted((root / "sys" / "block").iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        target = _resolve(root, entry / "device")
        if target is None:
            continue
        inside = dev_real is not None and (target == dev_real or dev_real in target.parents)
        if inside or dev.guid in target.parts:
            real = _resolve(root, entry)
            if real is not None:
                out.append((entry.name, real))
    return out


def _block_names(root: Path, disk: str, path: Path) -> Iterator[tuple[str, Path]]:
    """The disk, its partitions and (recursively) their holders such as dm-0: (name, dir)."""
    seen: set[str] = set()
    todo = [(disk, path)]
    while todo:
        name, p = todo.pop()
        if name in seen or len(seen) > 256:
            continue
        seen.add(name)
        yield name, p
        with contextlib.suppress(OSError):
            for sub in p.iterdir():
                if (sub / "partition").exists():
                    todo.append((sub.name, sub))
        with contextlib.suppress(OSError):
            for holder in (p / "holders").iterdir():
                real = _resolve(root, root / "sys" / "block" / holder.name)
                if real is not None:
                    todo.append((holder.name, real))


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts(root: Path) -> list[tuple[str, str, str, str]]:
    """(major:minor, mount point, fstype, source) of every line of proc/self/mountinfo."""
    out = []
    text = read_attr(root / "proc" / "self" / "mountinfo") or ""
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        out.append((fields[2], _unescape(fields[4]), after[0] if after else "?",
                    _unescape(after[1]) if len(after) > 1 else ""))
    return out


def _storage_in_use(root: Path, dev: VmbusDevice) -> list[str]:
    reasons = []
    mounts = _mounts(root)
    swaps = [line.split()[0] for line in (read_attr(root / "proc" / "swaps") or "").splitlines()[1:]
             if line.split()]
    for disk, path in _disks_of(root, dev):
        by_num: dict[str, str] = {}
        by_name: dict[str, str] = {}
        for name, p in _block_names(root, disk, path):
            by_name[name] = name
            num = read_attr(p / "dev")
            if num:
                by_num[num] = name
            dm = read_attr(p / "dm" / "name")
            if dm:
                by_name[f"mapper/{dm}"] = name
        uses = []
        for majmin, point, fstype, source in mounts:
            hit = by_num.get(majmin) or (by_name.get(source[5:]) if source.startswith("/dev/") else None)
            if hit:
                uses.append(f"{hit} is mounted on {point} ({fstype})")
        uses += [f"{s[5:]} is in use as swap" for s in swaps if s.startswith("/dev/") and s[5:] in by_name]
        if uses:
            reasons.append(f"its disk {disk} is in use: {', '.join(uses)}; unmount it (swapoff) first")
    return reasons


def _hex_to_ipv4(text: str) -> ipaddress.IPv4Address:
    """/proc/net/route prints a __be32 as a host-order %08X."""
    return ipaddress.IPv4Address(int(text, 16).to_bytes(4, sys.byteorder))


def _routes(root: Path) -> list[tuple[str, ipaddress.IPv4Address, ipaddress.IPv4Address, int, int]]:
    """(iface, destination, mask, flags, gateway as int) of proc/net/route."""
    out = []
    for line in (read_attr(root / "proc" / "net" / "route") or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            out.append((f[0], _hex_to_ipv4(f[1]), _hex_to_ipv4(f[7]), int(f[3], 16), int(f[2], 16)))
        except ValueError:
            continue
    return out


def _default_route_ifaces(root: Path) -> set[str]:
    zero = ipaddress.IPv4Address(0)
    out = {i for i, dst, mask, flags, _ in _routes(root) if dst == zero and mask == zero and flags & _RTF_UP}
    for line in (read_attr(root / "proc" / "net" / "ipv6_route") or "").splitlines():
        f = line.split()
        if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00":
            flags = int(f[8], 16)
            if flags & _RTF_UP and not flags & _RTF_REJECT and f[9] != "lo":
                out.add(f[9])
    return out


def _iface_of_address(root: Path, text: str) -> str | None:
    """The interface that owns local address ``text`` (see the module docstring for how)."""
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if is_real_root(root):
        try:
            res = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=3,
                                 check=True)
            for link in json.loads(res.stdout):
                for info in link.get("addr_info", ()):
                    if ipaddress.ip_address(info.get("local", "::")) == addr:
                        return str(link.get("ifname"))
        except (OSError, subprocess.SubprocessError, ValueError, TypeError):
            pass
    if isinstance(addr, ipaddress.IPv4Address):
        best: tuple[int, str] | None = None
        for iface, dst, mask, _, gateway in _routes(root):
            bits = bin(int(mask)).count("1")
            on_link = gateway == 0 and bits and int(addr) & int(mask) == int(dst)
            if on_link and (best is None or bits > best[0]):
                best = (bits, iface)
        return best[1] if best else None
    for line in (read_attr(root / "proc" / "net" / "if_inet6") or "").splitlines():
        f = line.split()
        if len(f) >= 6 and f[0] == addr.packed.hex():
            return f[5]
    return None


def _network_in_use(root: Path, dev: VmbusDevice) -> list[str]:
    ifaces = dev.net_interfaces
    if not ifaces:
        return []
    reasons = []
    default = _default_route_ifaces(root)
    reasons += [f"its interface {i} holds the default route; move the route to another interface first"
                for i in ifaces if i in default]
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    if len(ssh) >= 4:
        local = ssh[2]
        owner = _iface_of_address(root, local)
        if owner in ifaces:
            reasons.append(f"its interface {owner} carries this SSH session (local address {local}); "
                           "connect through another interface or the console")
        elif owner is None:
            try:
                others = {e.name for e in (root / "sys" / "class" / "net").iterdir()} - {"lo", *ifaces}
            except OSError:
                others = set()
            if not others:
                reasons.append(f"its interface {', '.join(ifaces)} is the only one, so it must carry this "
                               f"SSH session (local address {local}); use the console")
    return reasons
