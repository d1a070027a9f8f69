"""What the KVP service reads from (and, for IP injection, does to) the running system.

- :class:`SystemInfo`: the intrinsic values of the auto pool, gathered as
  tools/hv/hv_kvp_daemon.c gathers them (``kvp_get_os_info``, ``kvp_get_domain_name``,
  ``kvp_get_ip_info``): FullyQualifiedDomainName from ``getaddrinfo(hostname,
  AI_CANONNAME)`` over IPv4, OSName / OSMajorVersion from NAME / VERSION_ID of
  /etc/os-release (quotes dropped, backslash escapes undone; the SuSE-release /
  redhat-release first three lines otherwise), OSVersion the kernel release up to its first
  '-', OSBuildNumber the whole release, ProcessorArchitecture the machine, and the
  non-loopback IPv4 / IPv6 addresses of every interface joined by ';'. The names and OS
  values are read once (the daemon caches them at start), the addresses at every request.
  IntegrationServicesVersion is "3.1", what the kernel's hv_kvp.c registers (HV_DRV_VERSION)
  and the daemon reports.
- :class:`KvpNetwork`: GET_IP_INFO and SET_IP_INFO through the daemon's helper scripts
  (``hv_get_dhcp_info``, ``hv_get_dns_info``, ``hv_set_ifconfig``), found on PATH, in the
  daemon's /usr/libexec/hypervkvpd, or given. Without them the request is answered
  ``HV_ERROR_NOT_SUPPORTED``: the host learns this guest cannot do IP injection, nothing
  is guessed (the daemon reports DHCP off and no DNS when a script is missing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .messages import (
    ADDR_FAMILY_IPV4,
    ADDR_FAMILY_IPV6,
    HV_E_FAIL,
    HV_ERROR_NOT_SUPPORTED,
    HV_GUID_NOTFOUND,
    HV_INVALIDARG,
    HV_S_OK,
    KvpIpAddrValue,
)

__all__ = [
    "HELPER_SCRIPTS",
    "INTRINSIC_KEYS",
    "IfAddress",
    "IpResult",
    "KvpNetwork",
    "LIC_VERSION",
    "SCRIPTS_DIR",
    "SystemInfo",
    "getifaddrs",
    "parse_os_release",
]

log = logging.getLogger("pyvmbus.ic.kvp")

INTRINSIC_KEYS = (
    "FullyQualifiedDomainName",
    "IntegrationServicesVersion",
    "NetworkAddressIPv4",
    "NetworkAddressIPv6",
    "OSBuildNumber",
    "OSName",
    "OSMajorVersion",
    "OSMinorVersion",
    "OSVersion",
    "ProcessorArchitecture",
)
"""The auto pool's keys by ENUMERATE index (the mapping in include/uapi/linux/hyperv.h)."""
LIC_VERSION = "3.1"
"""HV_DRV_VERSION of hv_kvp.c: what the daemon reports as IntegrationServicesVersion."""
SCRIPTS_DIR = "/usr/libexec/hypervkvpd"
"""KVP_SCRIPTS_PATH, where hv_kvp_daemon looks for its helper scripts."""
HELPER_SCRIPTS = ("hv_get_dhcp_info", "hv_get_dns_info", "hv_set_ifconfig")
_VALUE_MAX = 2048
_IFF_LOOPBACK = 0x8


@dataclass(frozen=True, slots=True)
class IfAddress:
    """One address of an interface (what getifaddrs(3) gives)."""

    ifname: str
    family: int
    """socket.AF_INET or socket.AF_INET6."""
    address: str
    netmask: str
    loopback: bool = False

    @property
    def prefixlen(self) -> int:
        """The set bits of the netmask (the daemon's hweight32 over the mask)."""
        try:
            raw = socket.inet_pton(self.family, self.netmask)
        except OSError:
            return 0
        return sum(bin(b).count("1") for b in raw)


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_char * 14)]


class _Sockaddr4(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_ubyte * 4),
                ("zero", ctypes.c_ubyte * 8)]


class _Sockaddr6(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("flowinfo", ctypes.c_uint32),
                ("addr", ctypes.c_ubyte * 16), ("scope_id", ctypes.c_uint32)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)), ("ifa_name", ctypes.c_char_p), ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)), ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)), ("ifa_data", ctypes.c_void_p),
]


def _ntop(sa: ctypes._Pointer[_Sockaddr], family: int) -> str:
    if not sa:
        return ""
    if family == socket.AF_INET:
        v4 = ctypes.cast(sa, ctypes.POINTER(_Sockaddr4)).contents
        return socket.inet_ntop(family, bytes(v4.addr))
    v6 = ctypes.cast(sa, ctypes.POINTER(_Sockaddr6)).contents
    return socket.inet_ntop(family, bytes(v6.addr))


def getifaddrs() -> list[IfAddress]:
    """The IPv4 / IPv6 addresses of every interface, in getifaddrs(3) order (as the daemon walks them)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getifaddrs: {os.strerror(err)}")
    out = []
    try:
        node = head
        while node:
            ifa = node.contents
            if ifa.ifa_addr:
                fam = ifa.ifa_addr.contents.sa_family
                if fam in (socket.AF_INET, socket.AF_INET6):
                    out.append(IfAddress((ifa.ifa_name or b"").decode(errors="replace"), fam,
                                         _ntop(ifa.ifa_addr, fam), _ntop(ifa.ifa_netmask, fam),
                                         bool(ifa.ifa_flags & _IFF_LOOPBACK)))
            node = ifa.ifa_next
    finally:
        libc.freeifaddrs(head)
    return out


def _unescape(value: str) -> str:
    out = []
    it = iter(value)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt)
        elif ch in "'\"\n":
            continue
        else:
            out.append(ch)
    return "".join(out)


def parse_os_release(text: str) -> dict[str, str]:
    """NAME=value lines as the daemon reads them: '#' lines skipped, quotes and newlines
    dropped anywhere in the value, a backslash takes the next character literally."""
    out: dict[str, str] = {}
    for line in text.splitlines(keepends=True):
        if line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        out[name] = _unescape(value)
    return out


@dataclass(slots=True)
class _OsInfo:
    name: str = ""
    major: str = ""
    minor: str = ""


class SystemInfo:
    """The intrinsic values (auto pool) of this system, gathered as hv_kvp_daemon does.

    ``root``: where /etc/os-release is read (tests give a fake tree). ``hostname``,
    ``uname``, ``addresses``: override the system calls (tests). ``lic_version``: the
    IntegrationServicesVersion value.
    """

    def __init__(self, root: str | os.PathLike[str] = "/", *, hostname: str | None = None,
                 fqdn: str | None = None, uname: platform.uname_result | None = None,
                 addresses: Callable[[], list[IfAddress]] = getifaddrs,
                 lic_version: str = LIC_VERSION) -> None:
        self.root = Path(root)
        un = uname or platform.uname()
        self.os_build = un.release
        self.os_version = un.release.split("-", 1)[0]
        self.processor_arch = un.machine
        os_info = self._os_info(un.system)
        self.os_name, self.os_major, self.os_minor = os_info.name, os_info.major, os_info.minor
        self.fqdn = fqdn if fqdn is not None else self._domain_name(hostname or socket.gethostname())
        self.lic_version = lic_version
        self._addresses = addresses

    def _os_info(self, sysname: str) -> _OsInfo:
        info = _OsInfo(name=sysname)
        try:
            text = (self.root / "etc/os-release").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = None
        if text is not None:
            fields = parse_os_release(text)
            info.name = fields.get("NAME", info.name)
            info.major = fields.get("VERSION_ID", info.major)
            return info
        for legacy in ("etc/SuSE-release", "etc/redhat-release"):
            try:
                lines = (self.root / legacy).read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for i, attr in enumerate(("name", "major", "minor")):
                if i < len(lines):
                    setattr(info, attr, lines[i])
            break
        return info

    @staticmethod
    def _domain_name(hostname: str) -> str:
        try:
            infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM, 0,
                                       socket.AI_CANONNAME)
        except socket.gaierror as exc:
            return f"getaddrinfo failed: {(exc.errno or 0) & 0xFFFFFFFF:#x} {exc.strerror}"
        return infos[0][3] if infos and infos[0][3] else hostname

    def addresses(self, family: int) -> str:
        """The non-loopback addresses of ``family`` on every interface, ';'-separated, as
        many as fit a value (the daemon stops at the first that does not)."""
        out = ""
        for a in self._addresses():
            if a.family != family or a.loopback:
                continue
            nxt = a.address if not out else f"{out};{a.address}"
            if len(nxt.encode()) > _VALUE_MAX - 2:
                break
            out = nxt
        return out

    def intrinsics(self) -> list[tuple[str, str]]:
        """(key, value) for ENUMERATE index 0..9 of the auto pool."""
        values = {
            "FullyQualifiedDomainName": self.fqdn,
            "IntegrationServicesVersion": self.lic_version,
            "NetworkAddressIPv4": self.addresses(socket.AF_INET),
            "NetworkAddressIPv6": self.addresses(socket.AF_INET6),
            "OSBuildNumber": self.os_build,
            "OSName": self.os_name,
            "OSMajorVersion": self.os_major,
            "OSMinorVersion": self.os_minor,
            "OSVersion": self.os_version,
            "ProcessorArchitecture": self.processor_arch,
        }
        return [(k, values[k]) for k in INTRINSIC_KEYS]

    def intrinsic(self, index: int) -> tuple[str, str] | None:
        """The (key, value) of auto-pool ``index``, or None past the end."""
        if not 0 <= index < len(INTRINSIC_KEYS):
            return None
        return self.intrinsics()[index]


@dataclass(slots=True)
class IpResult:
    """What a GET_IP_INFO / SET_IP_INFO did: the status for the host and why."""

    status: int
    value: KvpIpAddrValue | None = None
    reason: str = ""
    ifname: str = ""
    files: list[str] = field(default_factory=list)


def _split_list(text: str) -> list[str]:
    """The daemon's parse_ip_val_buffer: ';'-separated, leading spaces dropped, up to the
    first empty item."""
    out = []
    for item in text.split(";"):
        item = item.lstrip(" ")
        if not item:
            break
        out.append(item)
    return out


def _is_v4(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return False
    return True


def _v6_expanded(text: str) -> str | None:
    try:
        raw = socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return None
    return ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2))


class _Invalid(Exception):
    pass


class KvpNetwork:
    """GET_IP_INFO / SET_IP_INFO as hv_kvp_daemon does them, through its helper scripts.

    ``scripts``: name -> path of any helper (else looked up on ``path``, default $PATH plus
    /usr/libexec/hypervkvpd). ``root``: where /sys/class/net is read. ``config_dir``: where
    SET_IP_INFO writes ``ifcfg-<if>`` and ``<if>.nmconnection`` for hv_set_ifconfig (the
    daemon: /var/lib/hyperv). ``proc``: where the routing tables are read.
    """

    def __init__(self, *, scripts: Mapping[str, str | os.PathLike[str]] | None = None,
                 scripts_dir: str | os.PathLike[str] | None = None, path: str | None = None,
                 root: str | os.PathLike[str] = "/", config_dir: str | os.PathLike[str] = "/var/lib/hyperv",
                 proc: str | os.PathLike[str] = "/proc",
                 addresses: Callable[[], list[IfAddress]] = getifaddrs, timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.config_dir = Path(config_dir)
        self.proc = Path(proc)
        self.timeout = timeout
        self._addresses = addresses
        search = path if path is not None else os.environ.get("PATH", os.defpath)
        search = f"{search}{os.pathsep}{SCRIPTS_DIR}"
        if scripts_dir is not None:
            search = f"{os.fspath(scripts_dir)}{os.pathsep}{search}"
        given = {k: os.fspath(v) for k, v in (scripts or {}).items()}
        self.scripts: dict[str, str | None] = {}
        for name in HELPER_SCRIPTS:
            if name in given:
                p = given[name]
                self.scripts[name] = p if os.access(p, os.X_OK) else None
            else:
                self.scripts[name] = shutil.which(name, path=search)

    @property
    def net_dir(self) -> Path:
        return self.root / "sys/class/net"

    def _missing(self, *names: str) -> str:
        return ", ".join(n for n in names if not self.scripts.get(n))

    def _run(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        script = self.scripts[name]
        assert script is not None
        return subprocess.run([script, *args], capture_output=True, text=True, errors="replace",
                              timeout=self.timeout, check=False)

    def _interfaces(self) -> list[str]:
        try:
            return sorted(os.listdir(self.net_dir))
        except OSError:
            return []

    def _read(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        except OSError:
            return None

    # -- GET_IP_INFO ---------------------------------------------------------------------

    def get_ip_info(self, adapter_id: str) -> IpResult:
        """The configuration of the interface whose MAC address is ``adapter_id``."""
        missing = self._missing("hv_get_dhcp_info", "hv_get_dns_info")
        if missing:
            return IpResult(HV_ERROR_NOT_SUPPORTED, reason=f"no {missing} (install the hyperv-daemons "
                            "/ linux-cloud-tools scripts, or give --kvp-scripts)")
        result = IpResult(HV_E_FAIL, reason=f"no interface with MAC address {adapter_id!r}")
        for ifname in self._interfaces():
            mac = self._read(self.net_dir / ifname / "address")
            if mac is None or mac.upper() != adapter_id:
                continue
            result = self._ip_info(ifname, adapter_id)
            if result.status == HV_S_OK and result.value is not None and result.value.ip_addr:
                break
        return result

    def _ip_info(self, ifname: str, adapter_id: str) -> IpResult:
        family = 0
        ips: list[str] = []
        subnets: list[str] = []
        for a in self._addresses():
            # The interface and its labelled aliases (eth0:1); the daemon's prefix match
            # would also take eth01's addresses for eth0.
            if (a.ifname != ifname and not a.ifname.startswith(ifname + ":")) or a.loopback:
                continue
            if a.family == socket.AF_INET:
                family |= ADDR_FAMILY_IPV4
                subnets.append(a.netmask)
            else:
                family |= ADDR_FAMILY_IPV6
                subnets.append(f"/{a.prefixlen}")
            ips.append(a.address)
        try:
            dns = self._run("hv_get_dns_info", ifname)
            dhcp = self._run("hv_get_dhcp_info", ifname)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return IpResult(HV_E_FAIL, reason=f"running the helper scripts: {exc}", ifname=ifname)
        dns_text = "".join(line + ";" for line in dns.stdout.splitlines())
        dhcp_on = 1 if dhcp.stdout.startswith("Enabled") else 0
        value = KvpIpAddrValue(adapter_id, family, dhcp_on, ";".join(ips), ";".join(subnets),
                               "".join(g + ";" for g in self._gateways()), dns_text)
        return IpResult(HV_S_OK, value, ifname=ifname)

    def _gateways(self) -> list[str]:
        """The gateways of the default routes (IPv4, then IPv6), as the daemon collects the
        'via' addresses of 'ip route show' default lines."""
        out = []
        try:
            lines = (self.proc / "net/route").read_text().splitlines()[1:]
        except OSError:
            lines = []
        for line in lines:
            f = line.split()
            if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000" and f[2] != "00000000":
                out.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(f[2])[::-1]))
        try:
            lines6 = (self.proc / "net/ipv6_route").read_text().splitlines()
        except OSError:
            lines6 = []
        for line in lines6:
            f = line.split()
            if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[4] != "0" * 32:
                out.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[4])))
        return out

    # -- SET_IP_INFO ---------------------------------------------------------------------

    def set_ip_info(self, value: KvpIpAddrValue) -> IpResult:
        """Configure the interface whose VMBus device id is ``value.adapter_id``: write the
        ifcfg and NetworkManager keyfiles and run hv_set_ifconfig on them."""
        if self._missing("hv_set_ifconfig"):
            return IpResult(HV_ERROR_NOT_SUPPORTED, reason="no hv_set_ifconfig (install the hyperv-daemons "
                            "/ linux-cloud-tools scripts, or give --kvp-scripts)")
        ifname = next((i for i in self._interfaces()
                       if self._read(self.net_dir / i / "device/device_id") == value.adapter_id), None)
        if ifname is None:
            return IpResult(HV_GUID_NOTFOUND, reason=f"no interface with device id {value.adapter_id!r}")
        mac = self._read(self.net_dir / ifname / "address")
        if mac is None:
            return IpResult(HV_E_FAIL, reason=f"{ifname} has no MAC address", ifname=ifname)
        try:
            ifcfg = self._ifcfg(ifname, mac.upper(), value)
            keyfile = self._keyfile(ifname, mac.upper(), value)
        except _Invalid as exc:
            return IpResult(HV_INVALIDARG, reason=str(exc), ifname=ifname)
        ifcfg_path = self.config_dir / f"ifcfg-{ifname}"
        nm_path = self.config_dir / f"{ifname}.nmconnection"
        try:
            self.config_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            for p, text in ((ifcfg_path, ifcfg), (nm_path, keyfile)):
                tmp = p.with_name(p.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, p)
        except OSError as exc:
            return IpResult(HV_E_FAIL, reason=f"writing the configuration: {exc}", ifname=ifname)
        files = [str(ifcfg_path), str(nm_path)]
        try:
            done = self._run("hv_set_ifconfig", *files)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return IpResult(HV_E_FAIL, reason=f"hv_set_ifconfig: {exc}", ifname=ifname, files=files)
        if done.returncode != 0:
            return IpResult(HV_E_FAIL, reason=f"hv_set_ifconfig exited {done.returncode}: "
                            f"{done.stderr.strip()[:200]}", ifname=ifname, files=files)
        return IpResult(HV_S_OK, value, ifname=ifname, files=files)

    @staticmethod
    def _ifcfg(ifname: str, mac: str, v: KvpIpAddrValue) -> str:
        lines = ["# Generated by pyvmbus (Hyper-V KVP IP injection). Please do not modify.",
                 f"HWADDR={mac}", f"DEVICE={ifname}", f"BOOTPROTO={'dhcp' if v.dhcp_enabled else 'none'}"]
        dns_i = 0
        for kind, text in (("IPADDR", v.ip_addr), ("NETMASK", v.sub_net), ("GATEWAY", v.gate_way),
                           ("DNS", v.dns_addr)):
            i = j = 0
            for addr in _split_list(text):
                if _is_v4(addr):
                    if kind == "DNS":
                        dns_i += 1
                        name = f"DNS{dns_i}"
                    elif kind == "GATEWAY" and i == 0:
                        i += 1
                        name = "GATEWAY"
                    else:
                        name = f"{kind}{i}"
                        i += 1
                    lines.append(f"{name}={addr}")
                    continue
                expanded = _v6_expanded(addr)
                if expanded is None and kind != "NETMASK":
                    raise _Invalid(f"{kind.lower()} {addr!r} is not an IPv4 or IPv6 address")
                v6name = {"IPADDR": "IPV6ADDR", "NETMASK": "IPV6NETMASK", "GATEWAY": "IPV6_DEFAULTGW",
                          "DNS": "DNS"}[kind]
                if kind == "DNS":
                    dns_i += 1
                    name = f"DNS{dns_i}"
                elif j == 0:
                    j += 1
                    name = v6name
                else:
                    name = f"{v6name}_{j}"
                    j += 1
                lines.append(f"{name}={expanded if expanded is not None else addr}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _keyfile(ifname: str, mac: str, v: KvpIpAddrValue) -> str:
        out = ["# Generated by pyvmbus (Hyper-V KVP IP injection). Please do not modify.", "",
               "[connection]", f"interface-name={ifname}", "", "[ethernet]", f"mac-address={mac}"]
        ips, subnets = _split_list(v.ip_addr), _split_list(v.sub_net)
        for fam, section in ((4, "ipv4"), (6, "ipv6")):
            out += ["", f"[{section}]"]
            n = 0
            for ip, sn in zip(ips, subnets, strict=False):
                try:
                    version = ipaddress.ip_address(ip).version
                except ValueError:
                    continue
                if version != fam:
                    continue
                if fam == 4:
                    if not _is_v4(sn):
                        raise _Invalid(f"subnet {sn!r} of {ip} is not an IPv4 netmask")
                    plen = ipaddress.ip_network(f"0.0.0.0/{sn}").prefixlen
                else:
                    try:
                        plen = int(sn)
                    except ValueError:
                        raise _Invalid(f"subnet {sn!r} of {ip} is not an IPv6 prefix length") from None
                n += 1
                out.append(f"address{n}={ip}/{plen}")
            if fam == 4:
                out.append("method=" + ("auto" if v.dhcp_enabled else "manual" if n else "disabled"))
            else:
                out.append("method=" + ("manual" if n else "auto"))
            for key, text in (("gateway", v.gate_way), ("dns", v.dns_addr)):
                picked = []
                for a in _split_list(text):
                    try:
                        if ipaddress.ip_address(a).version == fam:
                            picked.append(a)
                    except ValueError:
                        continue
                if picked:
                    out.append(f"{key}={','.join(picked)}")
        return "\n".join(out) + "\n"
