"""External frontends in tc (bpf/tc_nat.c): node ports, external IPs and load-balancer IPs reached from the
network, translated at the node's interfaces with a BPF connection table.

Pure part: which plans tc serves and the map image it needs (the same FrontendKey/FrontendEntry image as the
socket load balancer, in maps of its own). Kernel part: compile with bcc, attach to the interfaces of this
network namespace (clsact ingress and egress, one filter of our own priority, replaced in place on restart),
keep the interface address map current, detach on cleanup.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from kproxyd.backends.ebpf.image import Image, endpoints_entry, external_keys, family_of, tc_serves
from kproxyd.backends.ebpf.kernel import SockLbKernel, _ip, _ip_text, ensure_bpffs
from kproxyd.backends.iptables.backend import nodeport_ips
from kproxyd.config import ProxyConfig
from kproxyd.model import DetectLocalMode, LocalTrafficDetector, NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)

F_SNAT = 4  # must match bpf/tc_nat.c
F_POD_SOURCES = 8
SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "tc_nat.c"
PRIORITY = 0x4B50  # our filters' priority on each interface ("KP"): found and replaced or deleted by it
HANDLE = 1
FILTER_NAME = "kproxyd_tc_nat"
PARENTS = {"tc_ingress": 0xFFFFFFF2, "tc_egress": 0xFFFFFFF3}  # clsact ingress / egress
BPF_PROG_TYPE_SCHED_CLS = 3
MAP_PREFIX = "tc_"  # pinned next to the socket load balancer's maps, as tc_<name>
MAPS = ("frontends", "slots", "counters", "conns", "replies", "affinity", "ifaddrs", "pod_sources", "names")


def plan_image(plan: ServicePlan, node_ips: Iterable[str], algorithm: str) -> Image:
    """The tc frontends of one plan (node_ips: of its family): its external endpoints; masqueraded unless
    externalTrafficPolicy Local; new flows from pod sources left to nftables where the plan short-circuits them.
    """
    if not tc_serves(plan):
        return {}
    flags = 0 if plan.port.external_policy_local else F_SNAT
    flags |= F_POD_SOURCES if plan.short_circuit_local_sources else 0
    entry = endpoints_entry(plan, plan.external_endpoints, algorithm, flags)
    return dict.fromkeys(external_keys(plan, node_ips), entry)


def pod_source_cidrs(detector: LocalTrafficDetector | None, family: int = 4) -> tuple[str, ...]:
    """One family's sources tc leaves to nftables on Local-policy frontends: the detector's CIDRs; everything
    when it detects by interface (nftables applies that); nothing without a detector (no pod source is known).
    """
    if detector is None:
        return ()
    if detector.mode in (DetectLocalMode.CLUSTER_CIDR, DetectLocalMode.NODE_CIDR):
        return detector.cidrs
    return ("0.0.0.0/0",) if family == 4 else ("::/0",)


def node_port_ips(config: ProxyConfig, node: NodeInfo, local: Sequence[str], family: int = 4) -> tuple[str, ...]:
    """One family's addresses node ports answer on in tc (--nodeport-addresses among the local ones, else
    every local one), never loopback; nor IPv6 link-local addresses, one per pod's veth: their node ports
    stay with the nftables fallback rather than cost a frontend per pod and Service.
    """
    chosen = nodeport_ips(config.nodeport_addresses, node, local, family)
    ips = local if chosen is None else [cidr.split("/")[0] for cidr in chosen]
    parsed = [ipaddress.ip_address(ip) for ip in ips]
    return tuple(str(ip) for ip in parsed if not (ip.is_loopback or (ip.version == 6 and ip.is_link_local)))


def prefix_key(cidr: str) -> tuple[int, tuple[int, ...]]:
    """The pod-source LPM key of a CIDR: an IPv4 one as its IPv4-mapped prefix (96 + its length)."""
    network = ipaddress.ip_network(cidr)
    mapped = 96 if network.version == 4 else 0
    return mapped + network.prefixlen, _ip(str(network.network_address))


def running(pin_path: str) -> bool:
    """True when the daemon's tc programs run (their maps are pinned; removed when they cannot run here)."""
    return os.path.exists(os.path.join(pin_path, MAP_PREFIX + "frontends"))


Addresses = dict[int, str]  # IP family (4 or 6) → an interface's address of that family


def interfaces() -> dict[int, Addresses]:
    """ifindex → the first IPv4 and the first global-scope IPv6 address of every interface of this network
    namespace that has either, loopback addresses (and IPv6 link-local ones) left out.
    """
    from pyroute2 import IPRoute

    out: dict[int, Addresses] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            address = str(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
            family = 6 if msg["family"] == socket.AF_INET6 else 4
            if (family == 4 or msg["scope"] == 0) and not ipaddress.ip_address(address).is_loopback:
                out.setdefault(int(msg["index"]), {}).setdefault(family, address)
    return out


class TcKernel(SockLbKernel):
    """bpf/tc_nat.c: its pinned maps (tc_* in the pin directory) and its filters on this namespace's interfaces.

    The frontend, slot and counter maps have the socket load balancer's layout (16-byte addresses, IPv4
    ones IPv4-mapped): compiling, writing and reading them is inherited, and as there one instance serves
    both families' backends (one load, one revision counter; each reads back and deletes only its own
    family's frontends). Only what is specific to tc (loading its programs, attaching them to interfaces,
    the interface and pod-source maps) is here.
    """

    source_file = SOURCE
    map_names = MAPS
    map_prefix = MAP_PREFIX

    def __init__(self, pin_path: str) -> None:
        super().__init__("", pin_path)
        self._fds: dict[str, int] = {}
        self._attached: dict[int, Addresses] = {}
        self.failed = False  # a load failed: tc stays off in this process (both families' backends)

    def load(self) -> None:
        """Compile and load the programs (creating or reusing the pinned maps, recreating those of an earlier
        layout: their flows are lost), continue the revision counter, attach them to every interface.
        """
        ensure_bpffs(self.pin_path)
        self._bpf, self._tables = self._compile(), {}
        self._fds = {name: self._bpf.load_func(name.encode(), BPF_PROG_TYPE_SCHED_CLS).fd for name in PARENTS}
        self._collect_slots()
        self._attached = {}
        self.attach_interfaces()
        self.generation += 1
        addresses = sorted(ip for attached in self._attached.values() for ip in attached.values())
        log.info("tc external-frontend programs attached", interfaces=addresses)

    def attach_interfaces(self) -> None:
        """Attach to interfaces not yet attached (replacing an earlier run's filter in place), and write the
        interface address map.
        """
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        current = interfaces()
        ifaddrs = self._table("ifaddrs")
        with IPRoute() as ipr:
            for index, addresses in current.items():
                for family, address in addresses.items():
                    ifaddrs[ifaddrs.Key(index, family)] = ifaddrs.Leaf(_ip(address))
                if self._attached.get(index) == addresses:
                    continue
                with contextlib.suppress(NetlinkError):  # EEXIST: the qdisc is there (ours or another's)
                    ipr.tc("add", "clsact", index)
                for name, parent in PARENTS.items():
                    ipr.tc(
                        "replace-filter", "bpf", index, HANDLE, fd=self._fds[name], name=FILTER_NAME,
                        parent=parent, prio=PRIORITY, classid=1, direct_action=True,
                    )  # fmt: skip
                self._attached[index] = addresses
        for key in [k for k in ifaddrs if k.family not in current.get(k.ifindex, {})]:
            del ifaddrs[key]
        for index in [i for i in self._attached if i not in current]:
            del self._attached[index]

    def set_pod_sources(self, cidrs: Sequence[str], family: int = 4) -> None:
        """Replace one family's pod-source prefixes (the other family's stay)."""
        table = self._table("pod_sources")
        wanted = {prefix_key(cidr) for cidr in cidrs}
        for key in list(table.keys()):
            prefix = (key.prefixlen, tuple(key.addr))
            if family_of(_ip_text(key.addr)) == family and prefix not in wanted:
                del table[key]
        for prefixlen, addr in wanted:
            table[table.Key(prefixlen, addr)] = table.Leaf(1)

    def attached(self) -> bool:
        """True while the maps are pinned and every interface with an address has our ingress filter."""
        if not running(self.pin_path):
            return False
        current = interfaces()
        return set(current) <= set(self._attached) and all(ours(i, PARENTS["tc_ingress"]) for i in current)

    def remove(self) -> None:
        """Detach our filters everywhere and unpin the maps (tc is off: `kproxyd status` then says nftables)."""
        detach_tc()
        self.unpin_maps()


@functools.cache
def shared(pin_path: str) -> TcKernel:
    """The process's tc programs for a pin directory, shared by both families' backends."""
    return TcKernel(pin_path)


def ours(index: int, parent: int) -> bool:
    """True when the interface has a BPF filter of our priority at parent."""
    return any(_filters(index, parent))


def _filters(index: int, parent: int) -> list[Any]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            found = ipr.get_filters(index=index, parent=parent)
        except NetlinkError:  # no clsact qdisc
            return []
    return [f for f in found if f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == PRIORITY]


def detach_tc() -> list[str]:
    """Delete our filters (our priority) from every interface of this namespace; other filters stay."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    detached = []
    with IPRoute() as ipr:
        links = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for index, name in links.items():
            for parent in PARENTS.values():
                if not _filters(index, parent):
                    continue
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del-filter", "bpf", index, HANDLE, parent=parent, prio=PRIORITY)
                    detached.append(name)
    if detached:
        log.info("tc external-frontend programs detached", interfaces=sorted(set(detached)))
    return detached


def image(
    plans: Mapping[ServicePortName, ServicePlan], node_ips: Iterable[str], algorithm: str
) -> dict[ServicePortName, Image]:
    """Every plan's tc image (empty ones left out)."""
    ips = tuple(node_ips)
    out = {name: plan_image(plan, ips, algorithm) for name, plan in plans.items()}
    return {name: entries for name, entries in out.items() if entries}
