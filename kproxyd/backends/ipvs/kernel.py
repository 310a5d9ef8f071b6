"""The IPVS backend's contact with the kernel: IPVS and kube-ipvs0 over netlink (pyroute2), ipset, iptables.

Thin on purpose: what to write comes from render.py; this module only reads and writes it. Everything acts
on the network namespace of the process, as kproxyd runs in the node's (or a lab node's) namespace.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

from kproxyd.backends import BackendUnavailableError
from kproxyd.backends.iptables.kernel import CANARY_CHAINS, JUMPS, IptablesKernel, Jump, Variant
from kproxyd.backends.ipvs import names
from kproxyd.backends.ipvs.render import (
    LiveDestination,
    LiveService,
    RealServer,
    ServiceChanges,
    VirtualServer,
    VirtualServerKey,
)
from kproxyd.model import Protocol

log = structlog.get_logger(__name__)

_PROC_IPVS = Path("/proc/net/ip_vs")
_PROTOCOLS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: 132}
_BY_NUMBER = {number: protocol for protocol, number in _PROTOCOLS.items()}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
_MASQ = 0  # IP_VS_CONN_F_MASQ: NAT forwarding (pyroute2's IPVSDest defaults to 3, direct routing)
_MODULES = ("ip_vs", "nf_conntrack")
# kube-proxy's sysctls for IPVS mode (pkg/proxy/ipvs/proxier.go NewProxier).
_SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",  # keep conntrack for IPVS connections, or masquerading fails
    "net/ipv4/vs/expire_nodest_conn": "1",  # end flows to a deleted real server at their next packet
    "net/ipv4/vs/expire_quiescent_template": "1",  # persistence templates of weight-0 servers expire
    "net/ipv4/ip_forward": "1",
}
# Before 5.9, reusing a connection's port stalled for a second unless conn_reuse_mode=0; kube-proxy sets it
# there only: on later kernels mode 0 sends a reused port to its old real server, past NAT and masquerade.
_OLD_KERNEL_SYSCTLS = {"net/ipv4/vs/conn_reuse_mode": "0"}
_STRICT_ARP = {"net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2"}

# Jumps shared with iptables mode use its spelling, so either mode finds and keeps them.
SHARED_JUMPS = tuple(
    jump for jump in JUMPS if jump.table == "nat" or jump.target in ("KUBE-FORWARD", "KUBE-PROXY-FIREWALL")
)
IPVS_JUMPS = (
    Jump("filter", "INPUT", names.KUBE_NODE_PORT, "kubernetes health check rules"),
    Jump("filter", "INPUT", names.KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
)
_CHAINS = (
    *CANARY_CHAINS,
    *(("nat", chain) for chain in names.NAT_CHAINS),
    *(("filter", chain) for chain in names.FILTER_CHAINS),
)


class IpvsUnavailableError(BackendUnavailableError):
    """The kernel has no IPVS: ipvs mode cannot run here."""


def ipvs_available(load: bool = True) -> bool:
    """True when this kernel has IPVS (after trying `modprobe ip_vs` when load and it is not there yet)."""
    if _PROC_IPVS.exists():
        return True
    if load:
        _modprobe("ip_vs")
    return _PROC_IPVS.exists()


def require_ipvs() -> None:
    """Raise IpvsUnavailableError, saying why, unless the kernel has IPVS."""
    if not ipvs_available():
        raise IpvsUnavailableError(
            "proxy mode ipvs needs IPVS in the kernel (CONFIG_IP_VS and the ip_vs module): /proc/net/ip_vs"
            " is missing and `modprobe ip_vs` did not load it; use --proxy-mode=iptables or nftables"
        )


def _modprobe(module: str) -> None:
    """Load a module with the helper the kernel itself runs for module requests (else modprobe)."""
    helper = Path("/proc/sys/kernel/modprobe")
    binary = helper.read_text().strip() if helper.exists() else ""
    # No modprobe, or no modules: what is built in is all there is.
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([binary or "modprobe", "-q", module], capture_output=True, check=False, timeout=10)


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel (or of a `uname -r` string)."""
    numbers = re.findall(r"\d+", release if release is not None else os.uname().release)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else (0, 0)


def prepare_kernel(scheduler: str, strict_arp: bool) -> None:
    """Load the scheduler's module and set kube-proxy's IPVS sysctls, writing only what differs."""
    for module in (*_MODULES, f"ip_vs_{scheduler}"):
        _modprobe(module)
    old_kernel = kernel_version() < (5, 9)
    wanted = {**_SYSCTLS, **(_OLD_KERNEL_SYSCTLS if old_kernel else {}), **(_STRICT_ARP if strict_arp else {})}
    for key, value in wanted.items():
        path = Path("/proc/sys") / key
        if path.exists() and path.read_text().strip() != value:
            path.write_text(value)


class IpvsKernel:
    """IPVS virtual services and the kube-ipvs0 dummy link of one IP family, over netlink."""

    def __init__(self, family: int = 4) -> None:
        """Open the netlink sockets lazily: importing pyroute2 is slow on small machines."""
        self.family = family
        self._ipvs: Any = None

    def _socket(self) -> Any:
        if self._ipvs is None:
            from pyroute2 import IPVS

            self._ipvs = IPVS()
        return self._ipvs

    def services(self, keys: Iterable[VirtualServerKey] | None = None) -> dict[VirtualServerKey, LiveService]:
        """The live virtual services of this family (only those of keys, when given) with their servers."""
        from pyroute2 import IPVSService

        ipvs = self._socket()
        af = _FAMILIES[self.family]
        wanted = None if keys is None else set(keys)
        live: dict[VirtualServerKey, LiveService] = {}
        for message in ipvs.service("dump"):
            service = IPVSService.from_message(message)
            if service.get("af") != af or service.get("fwmark"):
                continue
            key = VirtualServerKey(
                _BY_NUMBER.get(service["protocol"], Protocol.TCP), service["addr"], service["port"]
            )
            if service["protocol"] not in _BY_NUMBER or (wanted is not None and key not in wanted):
                continue
            live[key] = self._live_service(ipvs, service)
        return live

    def _live_service(self, ipvs: Any, service: Any) -> LiveService:
        from pyroute2 import IPVSService

        destinations: dict[RealServer, LiveDestination] = {}
        key = IPVSService(
            af=service["af"], protocol=service["protocol"], addr=service["addr"], port=service["port"]
        )
        for message in ipvs.dest("dump", service=key):
            attrs = message.get("IPVS_CMD_ATTR_DEST")
            server = RealServer(str(attrs.get("IPVS_DEST_ATTR_ADDR")), int(attrs.get("IPVS_DEST_ATTR_PORT")))
            connections = int(attrs.get("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0) + int(
                attrs.get("IPVS_DEST_ATTR_INACT_CONNS") or 0
            )
            destinations[server] = LiveDestination(int(attrs.get("IPVS_DEST_ATTR_WEIGHT") or 0), connections)
        # pyroute2's from_message keeps flags and timeout under their attribute names only.
        flags = service.get("IPVS_SVC_ATTR_FLAGS")
        persistent = flags is not None and int(flags.get("flags", 0)) & _PERSISTENT
        timeout = int(service.get("IPVS_SVC_ATTR_TIMEOUT") or 0)
        stats = service.get("IPVS_SVC_ATTR_STATS64") or service.get("IPVS_SVC_ATTR_STATS")
        connections = stats.get("conns") if stats is not None else 0
        return LiveService(
            scheduler=str(service.get("sched_name", "")),
            persistence=timeout if persistent else None,
            destinations=destinations,
            connections=int(connections or 0),
        )

    def apply(self, changes: ServiceChanges) -> None:
        """Carry out the changes: deletions first, so a re-created key never collides."""
        ipvs = self._socket()
        for key in changes.delete:
            self._ignore(errno.ESRCH, ipvs.service, "del", self._service(key))
        for key, server in changes.delete_destinations:
            self._ignore(errno.ENOENT, ipvs.dest, "del", self._service(key), self._dest(server))
        for key, virtual in changes.create.items():
            self._ignore(errno.EEXIST, ipvs.service, "add", self._service(key, virtual))
        for key, virtual in changes.update.items():
            ipvs.service("set", self._service(key, virtual))
        for key, server in changes.add_destinations:
            self._ignore(errno.EEXIST, ipvs.dest, "add", self._service(key), self._dest(server))
        for key, server in changes.restore_destinations:
            ipvs.dest("set", self._service(key), self._dest(server))
        for key, server in changes.drain_destinations:
            ipvs.dest("set", self._service(key), self._dest(server, weight=0))

    @staticmethod
    def _ignore(code: int, call: Any, *args: Any) -> None:
        """Run a netlink request; an error `code` means it is done already (a lost race with ourselves)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            call(*args)
        except NetlinkError as err:
            if err.code != code:
                raise

    def _service(self, key: VirtualServerKey, virtual: VirtualServer | None = None) -> Any:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = {
            "af": _FAMILIES[self.family],
            "protocol": _PROTOCOLS[key.protocol],
            "addr": key.ip,
            "port": key.port,
            # IPv6: the prefix length as the kernel reads the attribute's raw 32 bits (128).
            "netmask": "255.255.255.255" if self.family == 4 else socket.inet_ntoa(struct.pack("=I", 128)),
        }
        if virtual is not None:
            fields["sched_name"] = virtual.scheduler
            if virtual.persistence is not None:
                fields["flags"] = {"flags": _PERSISTENT, "mask": 0xFFFFFFFF}
                fields["timeout"] = virtual.persistence
            else:
                fields["flags"] = {"flags": 0, "mask": 0xFFFFFFFF}
        return IPVSService(**fields)

    def _dest(self, server: RealServer, weight: int = 1) -> Any:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=server.ip, port=server.port, fwd_method=_MASQ, weight=weight)

    def set_timeouts(self, tcp: int, tcp_fin: int, udp: int) -> None:
        """IPVS connection timeouts in seconds (ipvsadm --set); 0 leaves a timeout unchanged."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.generic import ipvs as genl

        if not (tcp or tcp_fin or udp):
            return
        ipvs = self._socket()
        msg = genl.ipvsmsg()
        msg["cmd"] = genl.IPVS_CMD_SET_CONFIG
        msg["version"] = genl.GENL_VERSION
        msg["attrs"] = [
            (name, struct.pack("=I", seconds))
            for name, seconds in (
                ("IPVS_CMD_ATTR_TIMEOUT_TCP", tcp),
                ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", tcp_fin),
                ("IPVS_CMD_ATTR_TIMEOUT_UDP", udp),
            )
            if seconds
        ]
        ipvs.nlm_request(msg, msg_type=ipvs.asyncore.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)

    def delete_services(self, keys: Iterable[VirtualServerKey]) -> None:
        """Delete these virtual services (gone already is fine)."""
        ipvs = self._socket()
        for key in keys:
            self._ignore(errno.ESRCH, ipvs.service, "del", self._service(key))

    def close(self) -> None:
        """Close the netlink socket."""
        if self._ipvs is not None:
            self._ipvs.close()
            self._ipvs = None


class DummyLink:
    """The kube-ipvs0 dummy link holding every service IP (never up: it only makes them local)."""

    def __init__(self, name: str = names.DUMMY_DEVICE) -> None:
        """The link is created on the first ensure()."""
        self.name = name

    def ensure(self) -> int:
        """Create the dummy link when missing; its index."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                ipr.link("add", ifname=self.name, kind="dummy")
                found = ipr.link_lookup(ifname=self.name)
            return int(found[0])

    def exists(self) -> bool:
        """True when the link is there."""
        return Path("/sys/class/net", self.name).exists()

    def addresses(self, family: int) -> set[str]:
        """The addresses of one family bound to the link."""
        from pyroute2 import IPRoute

        if not self.exists():
            return set()
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            messages = ipr.get_addr(family=_FAMILIES[family], index=index)
            return {str(m.get_attr("IFA_ADDRESS")) for m in messages}

    def update(self, family: int, add: Iterable[str], remove: Iterable[str]) -> None:
        """Bind and unbind addresses (host routes: /32 or /128)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        index = self.ensure()
        prefix = 32 if family == 4 else 128
        with IPRoute() as ipr:
            for ip in add:
                try:
                    ipr.addr("add", index=index, address=ip, prefixlen=prefix)
                except NetlinkError as err:
                    if err.code != errno.EEXIST:
                        raise
            for ip in remove:
                try:
                    ipr.addr("del", index=index, address=ip, prefixlen=prefix)
                except NetlinkError as err:
                    if err.code != errno.EADDRNOTAVAIL:
                        raise

    def delete(self) -> None:
        """Remove the link and so every address on it."""
        from pyroute2 import IPRoute

        if not self.exists():
            return
        with IPRoute() as ipr:
            ipr.link("del", ifname=self.name)


def node_addresses(family: int, exclude: str = names.DUMMY_DEVICE) -> list[str]:
    """This namespace's addresses of one family, except those on `exclude` and link-local ones."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        skip = set(ipr.link_lookup(ifname=exclude))
        out = []
        for message in ipr.get_addr(family=_FAMILIES[family]):
            if message["index"] in skip:
                continue
            ip = str(message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS"))
            if not ipaddress.ip_address(ip).is_link_local:
                out.append(ip)
        return out


class IpsetError(RuntimeError):
    """An ipset command failed."""


class Ipset:
    """The ipset command: read our sets, restore changes, destroy sets."""

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        """Run ipset as prefix + argv (e.g. ip netns exec NAME)."""
        self._prefix = tuple(prefix)

    def sets(self, wanted: Iterable[str]) -> dict[str, set[str]]:
        """The members of those of the wanted sets that exist."""
        names_ = set(wanted)
        proc = _run([*self._prefix, "ipset", "save"])
        if proc.returncode != 0:
            raise IpsetError(f"ipset save: {proc.stderr.strip()}")
        members: dict[str, set[str]] = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] in names_:
                if parts[0] == "create":
                    members.setdefault(parts[1], set())
                elif parts[0] == "add" and len(parts) >= 3:
                    members.setdefault(parts[1], set()).add(parts[2])
        return members

    def restore(self, text: str) -> None:
        """ipset restore -exist: creating an existing set or adding a present member is no error."""
        if not text:
            return
        proc = _run([*self._prefix, "ipset", "restore", "-exist"], text)
        if proc.returncode != 0:
            raise IpsetError(f"ipset restore: {proc.stderr.strip()}")

    def destroy(self, sets: Iterable[str]) -> None:
        """Destroy these sets where they exist (a set still referenced by a rule stays, with a warning)."""
        present = set(self.sets(sets))
        for name in sorted(present):
            proc = _run([*self._prefix, "ipset", "destroy", name])
            if proc.returncode != 0:
                log.warning("ipset not destroyed", set=name, error=proc.stderr.strip())


def iptables_kernel(variant: Variant, family: int, prefix: Sequence[str] = ()) -> IptablesKernel:
    """An iptables kernel whose ensure_jumps creates IPVS mode's chains and jumps."""
    return IptablesKernel(variant, prefix, family, jumps=(*SHARED_JUMPS, *IPVS_JUMPS), chains=_CHAINS)
