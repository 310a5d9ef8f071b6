"""Render ServicePlans as kube-proxy's IPVS mode programs them: virtual services, addresses, ipsets, iptables.

Pure: no kernel. The layout follows pkg/proxy/ipvs/proxier.go (v1.30): every service address (cluster,
external and load-balancer IPs) is bound to the dummy kube-ipvs0; each frontend is a NAT virtual service
whose real servers are the plan's endpoints for that traffic; masquerading, hairpin, source ranges and the
VIP access filter are a constant set of iptables rules matching kube-proxy's ipsets. diff_services turns
desired and live virtual services into the few netlink operations a sync needs, removing endpoints
gracefully (weight 0 until their TCP connections drain) as kube-proxy's graceful termination manager does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from kproxyd.backends.common import firewall_sources, pod_traffic
from kproxyd.backends.ipvs import names
from kproxyd.backends.ipvs.names import SetKind, set_name
from kproxyd.model import Endpoint, LocalTrafficDetector, Protocol
from kproxyd.plan import ServicePlan

DEFAULT_SCHEDULER = "rr"
_Adder = Callable[[SetKind, str], None]  # adds one member to one of the port's ipsets
_NODE_PORT_SETS = {
    Protocol.TCP: (names.NODE_PORT_TCP, names.NODE_PORT_LOCAL_TCP),
    Protocol.UDP: (names.NODE_PORT_UDP, names.NODE_PORT_LOCAL_UDP),
    Protocol.SCTP: (names.NODE_PORT_SCTP, names.NODE_PORT_LOCAL_SCTP),
}


@dataclass(frozen=True, slots=True, order=True)
class VirtualServerKey:
    """What identifies an IPVS virtual service: protocol, address and port."""

    protocol: Protocol
    ip: str
    port: int

    def __str__(self) -> str:
        """ "TCP/10.96.0.10:80", bracketed for IPv6."""
        address = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.protocol}/{address}:{self.port}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    """One destination (real server) of a virtual service."""

    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """A NAT virtual service as kproxyd wants it."""

    scheduler: str
    persistence: int | None  # seconds of ClientIP affinity (IPVS persistence); None: none
    destinations: frozenset[RealServer]
    service: str  # "ns/name:port", for logs and counters


@dataclass(frozen=True, slots=True)
class LiveDestination:
    """A real server as the kernel holds it."""

    weight: int
    connections: int  # active + inactive


@dataclass(frozen=True, slots=True)
class LiveService:
    """A virtual service as the kernel holds it."""

    scheduler: str
    persistence: int | None
    destinations: Mapping[RealServer, LiveDestination]
    connections: int = 0  # connections scheduled since the virtual service was created


@dataclass(frozen=True, slots=True)
class IpvsRenderOptions:
    """Node-wide settings of the IPVS backend (kube-proxy's flags of the same meaning)."""

    family: int = 4
    scheduler: str = DEFAULT_SCHEDULER
    masquerade_bit: int = 14
    masquerade_all: bool = False
    local_detector: LocalTrafficDetector | None = None
    node_name: str = ""
    nodeport_addresses: tuple[str, ...] = ()  # the node IPs that get a virtual service per node port
    node_ips: tuple[str, ...] = ()  # for the LB source-range rule admitting the node itself

    @property
    def masquerade_mark(self) -> str:
        """The fwmark bit as iptables prints it, e.g. "0x4000"."""
        return f"{1 << self.masquerade_bit:#x}"


@dataclass(frozen=True, slots=True)
class PortState:
    """What one ServicePort contributes: its virtual services, bound addresses and ipset members."""

    services: Mapping[VirtualServerKey, VirtualServer]
    addresses: frozenset[str]
    members: Mapping[SetKind, frozenset[str]]


@dataclass(frozen=True, slots=True)
class IpvsState:
    """Everything one IP family's sync wants in the kernel."""

    services: Mapping[VirtualServerKey, VirtualServer]
    addresses: frozenset[str]  # on kube-ipvs0
    sets: Mapping[str, frozenset[str]]  # ipset name -> members, every set of the family (empty ones too)
    set_types: Mapping[str, str]
    iptables: str  # iptables-restore --noflush input for nat and filter


@dataclass(slots=True)
class ServiceChanges:
    """The netlink operations that take live virtual services to the desired ones."""

    create: dict[VirtualServerKey, VirtualServer] = field(default_factory=dict)
    update: dict[VirtualServerKey, VirtualServer] = field(default_factory=dict)  # scheduler or persistence
    delete: list[VirtualServerKey] = field(default_factory=list)
    add_destinations: list[tuple[VirtualServerKey, RealServer]] = field(default_factory=list)
    restore_destinations: list[tuple[VirtualServerKey, RealServer]] = field(default_factory=list)  # weight 1
    drain_destinations: list[tuple[VirtualServerKey, RealServer]] = field(default_factory=list)  # weight 0
    delete_destinations: list[tuple[VirtualServerKey, RealServer]] = field(default_factory=list)
    draining: set[tuple[VirtualServerKey, RealServer]] = field(default_factory=set)  # weight 0 afterwards

    def __len__(self) -> int:
        """How many netlink requests these changes take."""
        pairs = (
            self.add_destinations,
            self.restore_destinations,
            self.drain_destinations,
            self.delete_destinations,
        )
        return len(self.create) + len(self.update) + len(self.delete) + sum(len(p) for p in pairs)


def _net(cidr: str) -> str:
    """A CIDR as ipset save prints it: a host route is a bare address."""
    net = ipaddress.ip_network(cidr.strip(), strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _entry(ip: str, protocol: Protocol, port: int) -> str:
    """An ipset ip,port member as ipset spells it."""
    return f"{ip},{protocol.lower()}:{port}"


class IpvsRenderer:
    """Turns ServicePlans into kube-proxy's IPVS-mode state; decides no Service semantics itself."""

    def __init__(self, options: IpvsRenderOptions) -> None:
        """Precompute the option-derived fragments every render uses."""
        self._options = options
        self._family = options.family
        self._node_ips = tuple(ipaddress.ip_address(ip) for ip in options.node_ips)

    def port(self, plan: ServicePlan) -> PortState:
        """One ServicePort's virtual services, addresses and ipset members."""
        port = plan.port
        members: dict[SetKind, set[str]] = {}

        def add(kind: SetKind, member: str) -> None:
            members.setdefault(kind, set()).add(member)

        services: dict[VirtualServerKey, VirtualServer] = {}
        internal = self._virtual_server(plan, plan.internal_endpoints)
        external = self._virtual_server(plan, plan.external_endpoints)
        cluster_ips = port.cluster_ips
        external_ips = port.external_ips if port.externally_accessible else ()
        lb_ips = port.load_balancer_ips if port.externally_accessible else ()
        for ip in cluster_ips:
            services[VirtualServerKey(port.protocol, ip, port.port)] = internal
            add(names.CLUSTER_IP, _entry(ip, port.protocol, port.port))
        local = port.external_policy_local
        for ip in external_ips:
            services[VirtualServerKey(port.protocol, ip, port.port)] = external
            add(names.EXTERNAL_IP_LOCAL if local else names.EXTERNAL_IP, _entry(ip, port.protocol, port.port))
        for ip in lb_ips:
            services[VirtualServerKey(port.protocol, ip, port.port)] = external
            entry = _entry(ip, port.protocol, port.port)
            add(names.LOAD_BALANCER, entry)
            if local:
                add(names.LOAD_BALANCER_LOCAL, entry)
            if port.load_balancer_source_ranges:
                add(names.LOAD_BALANCER_FW, entry)
                self._source_ranges(plan, entry, add)
        if port.node_port is not None:
            self._node_port(plan, external, services, add)
        if port.health_check_node_port is not None:
            add(names.HEALTH_CHECK_NODE_PORT, str(port.health_check_node_port))
        for ep in plan.all_endpoints:
            if ep.node_name == self._options.node_name:
                add(names.LOOP_BACK, f"{ep.ip},{port.protocol.lower()}:{ep.port},{ep.ip}")
        addresses = frozenset((*cluster_ips, *external_ips, *lb_ips))
        return PortState(services, addresses, {kind: frozenset(m) for kind, m in members.items()})

    def _virtual_server(self, plan: ServicePlan, endpoints: tuple[Endpoint, ...]) -> VirtualServer:
        servers = (RealServer(ep.ip, ep.port) for ep in endpoints)
        return VirtualServer(
            self._options.scheduler, plan.port.session_affinity_timeout, frozenset(servers), str(plan.name)
        )

    def _source_ranges(self, plan: ServicePlan, entry: str, add: _Adder) -> None:
        """loadBalancerSourceRanges as ipset members: CIDRs, and the LB IPs when a range holds a node IP."""
        port = plan.port
        lb_ips = port.load_balancer_ips
        ranges = [
            r for r in port.load_balancer_source_ranges if ipaddress.ip_network(r, False).version == self._family
        ]
        for source in firewall_sources(ranges, lb_ips, self._node_ips):
            if "/" in source:
                add(names.LOAD_BALANCER_SOURCE_CIDR, f"{entry},{_net(source)}")
            else:
                add(names.LOAD_BALANCER_SOURCE_IP, f"{entry},{source}")

    def _node_port(
        self,
        plan: ServicePlan,
        external: VirtualServer,
        services: dict[VirtualServerKey, VirtualServer],
        add: _Adder,
    ) -> None:
        """One virtual service per node-port address, and the node port in its masquerade set."""
        port = plan.port
        assert port.node_port is not None
        everyone, local = _NODE_PORT_SETS[port.protocol]
        for ip in self._options.nodeport_addresses:
            services[VirtualServerKey(port.protocol, ip, port.node_port)] = external
            if port.protocol is Protocol.SCTP:
                add(everyone, _entry(ip, port.protocol, port.node_port))
                if port.external_policy_local:
                    add(local, _entry(ip, port.protocol, port.node_port))
        if port.protocol is not Protocol.SCTP:
            add(everyone, str(port.node_port))
            if port.external_policy_local:
                add(local, str(port.node_port))

    def state(self, ports: Iterable[PortState]) -> IpvsState:
        """The whole family's desired state from every ServicePort's part."""
        services: dict[VirtualServerKey, VirtualServer] = {}
        addresses: set[str] = set()
        members: dict[SetKind, set[str]] = {kind: set() for kind in names.SET_KINDS}
        for part in ports:
            services.update(part.services)
            addresses |= part.addresses
            for kind, entries in part.members.items():
                members[kind] |= entries
        members[names.IPVS_IPS] = set(addresses)
        family = self._family
        return IpvsState(
            services=services,
            addresses=frozenset(addresses),
            sets={set_name(kind, family): frozenset(m) for kind, m in members.items()},
            set_types={set_name(kind, family): kind.type for kind in names.SET_KINDS},
            iptables=self.iptables({kind for kind, m in members.items() if m}),
        )

    def iptables(self, non_empty: Collection[SetKind]) -> str:
        """kube-proxy's IPVS-mode nat and filter rules; rules for an empty ipset are left out, as upstream."""
        nat, filt = _Rules(), _Rules()
        self._nat(nat, non_empty)
        self._filter(filt)
        lines = [
            "*nat",
            *(f":{chain} - [0:0]" for chain in names.NAT_CHAINS),
            *nat.lines,
            "COMMIT",
            "*filter",
            *(f":{chain} - [0:0]" for chain in names.FILTER_CHAINS),
            *filt.lines,
            "COMMIT",
        ]
        return "\n".join([*lines, ""])

    def _set(self, kind: SetKind, match: str) -> str:
        return f'-m comment --comment "{kind.comment}" -m set --match-set {set_name(kind, self._family)} {match}'

    def _nat(self, nat: _Rules, non_empty: Collection[SetKind]) -> None:
        mark = self._options.masquerade_mark
        if names.LOOP_BACK in non_empty:
            nat.add(names.KUBE_POSTROUTING, self._set(names.LOOP_BACK, "dst,dst,src"), "-j MASQUERADE")
        nat.add(names.KUBE_POSTROUTING, f"-m mark ! --mark {mark}/{mark}", "-j RETURN")
        nat.add(names.KUBE_POSTROUTING, "", f"-j MARK --xor-mark {mark}")
        nat.add(
            names.KUBE_POSTROUTING,
            '-m comment --comment "kubernetes service traffic requiring SNAT"',
            "-j MASQUERADE --random-fully",
        )
        nat.add(names.KUBE_MARK_MASQ, "", f"-j MARK --or-mark {mark}")
        # kube-proxy's ipsetWithIptablesChain, in its order.
        if names.LOAD_BALANCER in non_empty:
            nat.add(
                names.KUBE_SERVICES, self._set(names.LOAD_BALANCER, "dst,dst"), f"-j {names.KUBE_LOAD_BALANCER}"
            )
        if names.LOAD_BALANCER_LOCAL in non_empty:
            nat.add(names.KUBE_LOAD_BALANCER, self._set(names.LOAD_BALANCER_LOCAL, "dst,dst"), "-j RETURN")
        for protocol, (everyone, local) in _NODE_PORT_SETS.items():
            match = "dst,dst" if protocol is Protocol.SCTP else "dst"
            proto = f"-p {protocol.lower()} "
            if local in non_empty:
                nat.add(names.KUBE_NODE_PORT, proto + self._set(local, match), "-j RETURN")
            if everyone in non_empty:
                nat.add(names.KUBE_NODE_PORT, proto + self._set(everyone, match), f"-j {names.KUBE_MARK_MASQ}")
        self._cluster_ip_masquerade(nat)
        for kind in (names.EXTERNAL_IP, names.EXTERNAL_IP_LOCAL):
            if kind not in non_empty:
                continue
            if kind is names.EXTERNAL_IP:
                nat.add(names.KUBE_SERVICES, self._set(kind, "dst,dst"), f"-j {names.KUBE_MARK_MASQ}")
            # Off-machine traffic, and traffic to an external IP that is local, stays with IPVS.
            nat.add(
                names.KUBE_SERVICES, self._set(kind, "dst,dst") + " -m addrtype ! --src-type LOCAL", "-j ACCEPT"
            )
            nat.add(names.KUBE_SERVICES, self._set(kind, "dst,dst") + " -m addrtype --dst-type LOCAL", "-j ACCEPT")
        nat.add(names.KUBE_SERVICES, "-m addrtype --dst-type LOCAL", f"-j {names.KUBE_NODE_PORT}")
        nat.add(names.KUBE_LOAD_BALANCER, "", f"-j {names.KUBE_MARK_MASQ}")
        for kind in (names.CLUSTER_IP, names.LOAD_BALANCER):  # acceptIPVSTraffic: last in KUBE-SERVICES
            if kind in non_empty:
                nat.add(
                    names.KUBE_SERVICES, f"-m set --match-set {set_name(kind, self._family)} dst,dst", "-j ACCEPT"
                )

    def _cluster_ip_masquerade(self, nat: _Rules) -> None:
        """Masquerade off-cluster traffic to cluster IPs (all of it with masquerade-all), as kube-proxy."""
        options = self._options
        pod = pod_traffic(options.local_detector, wildcard="+")
        if options.masquerade_all:
            match = self._set(names.CLUSTER_IP, "dst,dst")
        elif pod is not None:
            option = "-s" if pod.by_source else "-i"
            match = f"{self._set(names.CLUSTER_IP, 'dst,dst')} ! {option} {pod.value}"
        else:  # nothing tells pod traffic apart: masquerade node traffic sourced from a service IP
            match = self._set(names.CLUSTER_IP, "src,dst")
        nat.add(names.KUBE_SERVICES, match, f"-j {names.KUBE_MARK_MASQ}")

    def _filter(self, filt: _Rules) -> None:
        mark = self._options.masquerade_mark
        filt.add(
            names.KUBE_FORWARD,
            f'-m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark}',
            "-j ACCEPT",
        )
        filt.add(
            names.KUBE_FORWARD,
            '-m comment --comment "kubernetes forwarding conntrack rule"'
            " -m conntrack --ctstate RELATED,ESTABLISHED",
            "-j ACCEPT",
        )
        filt.add(names.KUBE_NODE_PORT, self._set(names.HEALTH_CHECK_NODE_PORT, "dst"), "-j ACCEPT")
        filt.add(
            names.KUBE_PROXY_FIREWALL,
            self._set(names.LOAD_BALANCER_FW, "dst,dst"),
            f"-j {names.KUBE_SOURCE_RANGES_FIREWALL}",
        )
        for kind in (names.LOAD_BALANCER_SOURCE_CIDR, names.LOAD_BALANCER_SOURCE_IP):
            filt.add(names.KUBE_SOURCE_RANGES_FIREWALL, self._set(kind, "dst,dst,src"), "-j RETURN")
        filt.add(names.KUBE_SOURCE_RANGES_FIREWALL, "", "-j DROP")
        # Only the service ports of a service IP are reachable through it (kubernetes#72236).
        for kind, match in (
            (names.LOAD_BALANCER, "dst,dst"),
            (names.CLUSTER_IP, "dst,dst"),
            (names.EXTERNAL_IP, "dst,dst"),
            (names.EXTERNAL_IP_LOCAL, "dst,dst"),
            (names.HEALTH_CHECK_NODE_PORT, "dst"),
        ):
            filt.add(
                names.KUBE_IPVS_FILTER, f"-m set --match-set {set_name(kind, self._family)} {match}", "-j RETURN"
            )
        filt.add(
            names.KUBE_IPVS_FILTER,
            f"-m conntrack --ctstate NEW -m set --match-set {set_name(names.IPVS_IPS, self._family)} dst",
            "-j REJECT",
        )


@dataclass(slots=True)
class _Rules:
    lines: list[str] = field(default_factory=list)

    def add(self, chain: str, match: str, target: str) -> None:
        self.lines.append(" ".join(part for part in (f"-A {chain}", match, target) if part))


def _needs_graceful_removal(protocol: Protocol) -> bool:
    """kube-proxy drains only TCP real servers; UDP and SCTP ones go at once (expire_nodest_conn ends flows)."""
    return protocol is Protocol.TCP


def diff_services(
    desired: Mapping[VirtualServerKey, VirtualServer],
    live: Mapping[VirtualServerKey, LiveService],
    keys: Collection[VirtualServerKey] | None = None,
    keep: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> ServiceChanges:
    """The operations taking live to desired, over keys (all when None); live services in keep stay.

    keep is --ipvs-exclude-cidrs: virtual services there are someone else's and never deleted.
    """
    changes = ServiceChanges()
    scope = (desired.keys() | live.keys()) if keys is None else keys
    for key in sorted(scope):
        want, have = desired.get(key), live.get(key)
        if want is None:
            if have is not None and not any(ipaddress.ip_address(key.ip) in net for net in keep):
                changes.delete.append(key)
            continue
        if have is None:
            changes.create[key] = want
            changes.add_destinations.extend((key, server) for server in sorted(want.destinations))
            continue
        if (have.scheduler, have.persistence) != (want.scheduler, want.persistence):
            changes.update[key] = want
        _diff_destinations(changes, key, want, have)
    return changes


def _diff_destinations(
    changes: ServiceChanges, key: VirtualServerKey, want: VirtualServer, have: LiveService
) -> None:
    for server in sorted(want.destinations):
        current = have.destinations.get(server)
        if current is None:
            changes.add_destinations.append((key, server))
        elif current.weight == 0:
            changes.restore_destinations.append((key, server))
    for server, current in sorted(have.destinations.items()):
        if server in want.destinations:
            continue
        if _needs_graceful_removal(key.protocol) and current.connections > 0:
            changes.draining.add((key, server))
            if current.weight != 0:
                changes.drain_destinations.append((key, server))
        else:
            changes.delete_destinations.append((key, server))


def _create_line(name: str, set_type: str, family: int) -> str:
    """kube-proxy's ipset create options: bitmap:port over every port, hash sets of one family."""
    if set_type == "bitmap:port":
        return f"create {name} {set_type} range 0-65535"
    inet = "inet" if family == 4 else "inet6"
    return f"create {name} {set_type} family {inet} hashsize 1024 maxelem 65536"


@dataclass(frozen=True, slots=True)
class IpsetChanges:
    """ipset restore inputs: missing sets and new members (before the addresses), and stale members (after)."""

    additions: str
    deletions: str


def ipset_changes(state: IpvsState, live: Mapping[str, Collection[str]], family: int) -> IpsetChanges:
    """What takes the live sets to the state's: missing sets and additions, then deletions, as separate inputs."""
    additions = [_create_line(name, state.set_types[name], family) for name in state.sets if name not in live]
    deletions: list[str] = []
    for name, members in state.sets.items():
        have = set(live.get(name, ()))
        deletions += [f"del {name} {member}" for member in sorted(have - members)]
        additions += [f"add {name} {member}" for member in sorted(members - have)]
    return IpsetChanges(*("\n".join([*lines, ""]) if lines else "" for lines in (additions, deletions)))


_TARGET = re.compile(r" -j (\S+)")


def cleanup_rules(saved: Mapping[str, str]) -> str:
    """iptables-restore input removing IPVS mode from iptables-save outputs (table -> text).

    Rules that jump to an IPVS-only chain, or match one of our ipsets in a KUBE- chain, are deleted; the
    IPVS-only chains are flushed and deleted. The chains iptables mode shares (KUBE-SERVICES...) stay.
    """
    ours = set(names.IPVS_ONLY_CHAINS)
    out: list[str] = []
    for table, text in saved.items():
        present = [line[1:].split(" ", 1)[0] for line in text.splitlines() if line.startswith(":")]
        chains = [chain for chain in present if chain in ours]
        deletes = []
        for line in text.splitlines():
            if not line.startswith("-A "):
                continue
            chain = line.split(" ", 2)[1]
            target = _TARGET.search(line)
            jumps_to_ours = target is not None and target.group(1) in ours
            matches_our_set = chain.startswith("KUBE-") and " --match-set KUBE-" in line
            if chain not in ours and (jumps_to_ours or matches_our_set):
                deletes.append("-D " + line[3:])
        if chains or deletes:
            out += [
                f"*{table}",
                *(f":{c} - [0:0]" for c in chains),
                *deletes,
                *(f"-X {c}" for c in chains),
                "COMMIT",
            ]
    return "\n".join([*out, ""]) if out else ""
