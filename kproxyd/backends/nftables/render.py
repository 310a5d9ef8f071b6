"""Render ServicePlans as kube-proxy's nftables objects: the static skeleton and each ServicePort's share.

Pure: no subprocess, no kernel. The layout follows pkg/proxy/nftables/proxier.go (v1.31): verdict maps
keyed by destination send new connections to per-ServicePort chains, which spread them over per-endpoint
chains. One deliberate difference: the endpoint spread is a run of `numgen random mod k == 0 goto` rules
(the last one unconditional) instead of kube-proxy's inline anonymous vmap, whose thousands of anonymous
sets make one large transaction quadratic in the kernel (bench/results/nftables_sync.json).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from kproxyd.backends.common import cluster_ip_masquerade, firewall_sources, pod_traffic
from kproxyd.backends.nftables.names import (
    CLUSTER_IPS,
    CLUSTER_IPS_CHECK,
    FIREWALL_CHECK,
    FIREWALL_IPS,
    MARK_FOR_MASQUERADE,
    MASQUERADING,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    NODEPORT_ENDPOINTS_CHECK,
    NODEPORT_IPS,
    REJECT_CHAIN,
    SERVICE_ENDPOINTS_CHECK,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    SERVICES,
    PortChains,
    affinity_set,
    endpoint_chain,
    port_chains,
)
from kproxyd.backends.nftables.rules import (
    Addr,
    AddrIn,
    AddrNotInAnonymous,
    CtStateNew,
    Dnat,
    FibLocal,
    IifName,
    L4Proto,
    MarkClear,
    MarkSet,
    Masquerade,
    Numgen,
    PortMatch,
    Reject,
    Rule,
    Stmt,
    UpdateSet,
    Vmap,
    rule,
)
from kproxyd.backends.nftables.rules import Verdict as Action
from kproxyd.model import Endpoint, LocalTrafficDetector
from kproxyd.plan import ServicePlan, Verdict

_VERDICT = {Verdict.REJECT: f"goto {REJECT_CHAIN}", Verdict.DROP: "drop"}


@dataclass(frozen=True, slots=True)
class Family:
    """What differs between the ip and ip6 tables: the table family, address type, match, loopback."""

    name: str
    addr_type: str
    addr: str
    loopback: str
    version: int


IPV4 = Family("ip", "ipv4_addr", "ip", "127.0.0.0/8", 4)
IPV6 = Family("ip6", "ipv6_addr", "ip6", "::1", 6)
FAMILIES = {4: IPV4, 6: IPV6}


@dataclass(frozen=True, slots=True)
class BaseChain:
    """A chain on a netfilter hook: kube-proxy's "${type}-${hook}" chains and priorities."""

    name: str
    type: str
    hook: str
    priority: int


# kube-proxy's nftablesBaseChains: filtering before DNAT (dstnat - 10), NAT at dstnat and srcnat.
BASE_CHAINS = (
    BaseChain("filter-prerouting", "filter", "prerouting", -110),
    BaseChain("filter-input", "filter", "input", -110),
    BaseChain("filter-forward", "filter", "forward", -110),
    BaseChain("filter-output", "filter", "output", -110),
    BaseChain("filter-output-post-dnat", "filter", "output", -90),
    BaseChain("nat-prerouting", "nat", "prerouting", -100),
    BaseChain("nat-output", "nat", "output", -100),
    BaseChain("nat-postrouting", "nat", "postrouting", 100),
)

# kube-proxy's nftablesJumpChains, but the node's own traffic is checked for "no endpoints" after DNAT
# (as iptables mode does): short-circuited external destinations of a Local-policy Service must pass.
JUMPS = (  # (from chain, only new connections, to chain)
    ("filter-input", True, NODEPORT_ENDPOINTS_CHECK),
    ("filter-input", True, SERVICE_ENDPOINTS_CHECK),
    ("filter-forward", True, SERVICE_ENDPOINTS_CHECK),
    ("filter-output-post-dnat", True, SERVICE_ENDPOINTS_CHECK),
    ("filter-prerouting", True, FIREWALL_CHECK),
    ("filter-output", True, FIREWALL_CHECK),
    ("nat-output", False, SERVICES),
    ("nat-prerouting", False, SERVICES),
    ("nat-postrouting", False, MASQUERADING),
    ("filter-forward", True, CLUSTER_IPS_CHECK),
    ("filter-output-post-dnat", True, CLUSTER_IPS_CHECK),
)


@dataclass(frozen=True, slots=True)
class NftRenderOptions:
    """Node-wide settings of the nftables backend (kube-proxy's flags of the same meaning)."""

    family: Family = IPV4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    local_detector: LocalTrafficDetector | None = None
    nodeport_addresses: tuple[str, ...] | None = None  # local IPs node ports answer on; None: every one
    node_ips: tuple[str, ...] = ()  # for the LB source-range rule admitting the node itself

    @property
    def masquerade_mark(self) -> str:
        """The fwmark bit as nft prints it, e.g. "0x00004000"."""
        return f"{1 << self.masquerade_bit:#010x}"


_COUNTED = (SERVICE_IPS, SERVICE_NODEPORTS)


@dataclass(frozen=True, slots=True)
class SetSpec:
    """A named set or map: "set"/"map", its name, key type (": verdict" for a map) and options."""

    kind: str
    name: str
    key: str
    counter: bool = False
    comment: str = ""
    timeout: int | None = None  # seconds: a dynamic set whose entries expire

    @property
    def body(self) -> str:
        """The body of its nft declaration, e.g. "type ipv4_addr ; flags dynamic,timeout ; timeout 10s ;"."""
        parts = [f"type {self.key} ;"]
        if self.timeout is not None:
            parts.append(f"flags dynamic,timeout ; timeout {self.timeout}s ;")
        if self.counter:
            parts.append("counter ;")
        if self.comment:
            parts.append(f'comment "{self.comment}" ;')
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class StaticRules:
    """The table's skeleton, rewritten on every full sync: base chains, top-level chains, sets and maps."""

    base_chains: tuple[BaseChain, ...]
    chains: tuple[tuple[str, tuple[Rule, ...]], ...]
    sets: tuple[SetSpec, ...]
    nodeport_ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PortRules:
    """What one ServicePort owns in the table: its chains and rules, map/set elements, affinity sets."""

    chains: tuple[tuple[str, tuple[Rule, ...]], ...]
    elements: tuple[tuple[str, str, str], ...]  # (set or map, key, verdict; "" in a set)
    affinity_sets: tuple[SetSpec, ...] = ()


@dataclass(slots=True)
class _PortBuilder:
    chains: dict[str, list[Rule]] = field(default_factory=dict)
    elements: list[tuple[str, str, str]] = field(default_factory=list)
    sets: list[SetSpec] = field(default_factory=list)

    def rule(self, chain: str, *stmts: Stmt, comment: str | None = None) -> None:
        self.chains.setdefault(chain, []).append(rule(*stmts, comment=comment))

    def element(self, target: str, key: str, value: str = "") -> None:
        self.elements.append((target, key, value))

    def build(self) -> PortRules:
        chains = tuple((name, tuple(rules)) for name, rules in self.chains.items())
        return PortRules(chains, tuple(self.elements), tuple(self.sets))


def _detector_matches(detector: LocalTrafficDetector | None, addr: str) -> tuple[Stmt, Stmt] | None:
    """kube-proxy's LocalTrafficDetector IfLocalNFT/IfNotLocalNFT, or None when not implemented."""
    pod = pod_traffic(detector, wildcard="*")
    if pod is None:
        return None
    if pod.by_source:
        return Addr(addr, "saddr", pod.value), Addr(addr, "saddr", pod.value, negate=True)
    return IifName(pod.value), IifName(pod.value, negate=True)


class NftRenderer:
    """Turns ServicePlans into kube-proxy's nftables objects; decides no Service semantics itself."""

    def __init__(self, options: NftRenderOptions) -> None:
        """Precompute the option-derived fragments every render uses."""
        self._options = options
        self._addr = options.family.addr
        self._detector = _detector_matches(options.local_detector, self._addr)
        self._off_cluster = None if self._detector is None else (self._detector[1],)
        self._node_ips = tuple(ipaddress.ip_address(ip) for ip in options.node_ips)

    def static(self) -> StaticRules:
        """The skeleton: base chains with their jumps, masquerading, the checks and dispatch by maps."""
        chains: dict[str, list[Rule]] = {chain.name: [] for chain in BASE_CHAINS}
        for source, new_only, target in JUMPS:
            chains.setdefault(target, [])
            jump = Action("jump", target)
            chains[source].append(rule(CtStateNew(), jump) if new_only else rule(jump))
        chains.update(self._top_level_rules())
        return StaticRules(
            BASE_CHAINS,
            tuple((name, tuple(rules)) for name, rules in chains.items()),
            self._sets(),
            self._options.nodeport_addresses or (),
        )

    def _top_level_rules(self) -> dict[str, list[Rule]]:
        addr, mark = self._addr, 1 << self._options.masquerade_bit
        nodeports: tuple[Stmt, ...]
        local_nodeports: tuple[Stmt, ...]
        if self._options.nodeport_addresses is None:
            nodeports = (Addr(addr, "daddr", self._options.family.loopback, negate=True),)
            local_nodeports = (FibLocal("daddr"), *nodeports)
        else:
            nodeports = local_nodeports = (AddrIn(addr, "daddr", NODEPORT_IPS),)
        return {
            MARK_FOR_MASQUERADE: [rule(MarkSet("or", mark))],
            MASQUERADING: [
                rule(MarkClear(mark), Action("return")),
                rule(MarkSet("xor", mark)),
                rule(Masquerade()),
            ],
            CLUSTER_IPS_CHECK: [
                rule(
                    AddrIn(addr, "daddr", CLUSTER_IPS),
                    Reject(addr),
                    comment="Reject traffic to invalid ports of ClusterIPs",
                )
            ],
            REJECT_CHAIN: [rule(Reject(addr))],
            SERVICE_ENDPOINTS_CHECK: [rule(Vmap(addr, NO_ENDPOINT_SERVICES))],
            NODEPORT_ENDPOINTS_CHECK: [rule(*nodeports, Vmap(None, NO_ENDPOINT_NODEPORTS))],
            FIREWALL_CHECK: [rule(Vmap(addr, FIREWALL_IPS))],
            SERVICES: [rule(Vmap(addr, SERVICE_IPS)), rule(*local_nodeports, Vmap(None, SERVICE_NODEPORTS))],
        }

    def _sets(self) -> tuple[SetSpec, ...]:
        addr_type = self._options.family.addr_type
        destination = f"{addr_type} . inet_proto . inet_service : verdict"
        nodeport = "inet_proto . inet_service : verdict"
        return tuple(
            # The dispatch maps count per element: new connections per frontend (kproxyd's extra metric).
            SetSpec(kind, name, key, counter=name in _COUNTED, comment=comment)
            for kind, name, key, comment in (
                ("set", CLUSTER_IPS, addr_type, "Active ClusterIPs"),
                ("set", NODEPORT_IPS, addr_type, "IPs that accept NodePort traffic"),
                ("map", SERVICE_IPS, destination, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
                ("map", SERVICE_NODEPORTS, nodeport, "NodePort traffic"),
                ("map", FIREWALL_IPS, destination, "destinations that are subject to LoadBalancerSourceRanges"),
                (
                    "map",
                    NO_ENDPOINT_SERVICES,
                    destination,
                    "vmap to drop or reject packets to services with no endpoints",
                ),
                (
                    "map",
                    NO_ENDPOINT_NODEPORTS,
                    nodeport,
                    "vmap to drop or reject packets to service nodeports with no endpoints",
                ),
            )
        )

    def port(self, plan: ServicePlan) -> PortRules:
        """One ServicePort's chains (EXT, FW, SVC, SVL, one per endpoint), elements and affinity sets."""
        out = _PortBuilder()
        chains = port_chains(plan.name)
        self._write_internal_masquerade(out, plan, chains)
        if plan.has_any_endpoints and plan.port.externally_accessible:
            self._write_external_chain(out, plan, chains)
        if plan.uses_firewall:
            self._write_firewall_chain(out, plan, chains)
        seps = {ep: endpoint_chain(plan.name, ep) for ep in plan.all_endpoints}
        if plan.uses_cluster_policy:
            self._write_dispatch(out, plan, chains.cluster, plan.cluster_policy_endpoints, seps)
        if plan.uses_local_policy:
            self._write_dispatch(out, plan, chains.local, plan.local_policy_endpoints, seps)
        for ep, sep in seps.items():
            self._write_endpoint(out, plan, ep, sep)
        self._write_elements(out, plan, chains)
        return out.build()

    def _write_internal_masquerade(self, out: _PortBuilder, plan: ServicePlan, chains: PortChains) -> None:
        """Masquerade cluster-IP traffic from off-cluster sources (or all of it with masquerade_all)."""
        source = cluster_ip_masquerade(plan, self._options.masquerade_all, self._off_cluster, ())
        if source is None:
            return
        port = plan.port
        chain = chains.local if port.internal_policy_local else chains.cluster
        match = PortMatch(port.protocol.lower(), port.port)
        for ip in port.cluster_ips:
            out.rule(chain, Addr(self._addr, "daddr", ip), match, *source, Action("jump", MARK_FOR_MASQUERADE))

    def _write_external_chain(self, out: _PortBuilder, plan: ServicePlan, chains: PortChains) -> None:
        """external-: masquerade (Cluster policy) or short-circuit local sources (Local), then the policy."""
        ext, mark = chains.external, Action("jump", MARK_FOR_MASQUERADE)
        if not plan.short_circuit_local_sources:
            out.rule(ext, mark)
        else:
            cluster = Action("goto", chains.cluster)
            if self._detector is not None:
                out.rule(ext, self._detector[0], cluster, comment="short-circuit pod traffic")
            out.rule(ext, FibLocal("saddr"), mark, comment="masquerade local traffic")
            out.rule(ext, FibLocal("saddr"), cluster, comment="short-circuit local traffic")
        if plan.external_verdict is None:
            out.rule(ext, Action("goto", chains.local if plan.port.external_policy_local else chains.cluster))

    def _write_firewall_chain(self, out: _PortBuilder, plan: ServicePlan, chains: PortChains) -> None:
        """firewall-: drop what loadBalancerSourceRanges does not admit (the node's own LB IPs admitted)."""
        port = plan.port
        ranges = [cidr.strip() for cidr in port.load_balancer_source_ranges]
        sources = firewall_sources(ranges, port.load_balancer_ips, self._node_ips)
        out.rule(chains.firewall, AddrNotInAnonymous(self._addr, "saddr", tuple(sources)), Action("drop"))

    def _write_dispatch(
        self,
        out: _PortBuilder,
        plan: ServicePlan,
        chain: str,
        endpoints: tuple[Endpoint, ...],
        seps: Mapping[Endpoint, str],
    ) -> None:
        """A service-/local- chain: affinity checks, then a uniform random spread over the endpoints."""
        if plan.port.session_affinity_timeout is not None:
            for ep in endpoints:
                out.rule(chain, AddrIn(self._addr, "saddr", affinity_set(plan.name, ep)), Action("goto", seps[ep]))
        last = len(endpoints) - 1
        for i, ep in enumerate(endpoints):
            spread = () if i == last else (Numgen(last + 1 - i),)
            out.rule(chain, *spread, Action("goto", seps[ep]))

    def _write_endpoint(self, out: _PortBuilder, plan: ServicePlan, ep: Endpoint, sep: str) -> None:
        """An endpoint- chain: masquerade hairpin traffic, remember affinity, DNAT to the endpoint."""
        out.rule(sep, Addr(self._addr, "saddr", ep.ip), Action("jump", MARK_FOR_MASQUERADE))
        timeout = plan.port.session_affinity_timeout
        if timeout is not None:
            name = affinity_set(plan.name, ep)
            out.sets.append(SetSpec("set", name, self._options.family.addr_type, timeout=timeout))
            out.rule(sep, UpdateSet(self._addr, name))
        out.rule(sep, L4Proto(plan.port.protocol.lower()), Dnat(self._addr, ep.ip, ep.port))

    def _write_elements(self, out: _PortBuilder, plan: ServicePlan, chains: PortChains) -> None:
        """The port's destinations in the dispatch maps, or in the no-endpoint maps with their verdict."""
        port = plan.port
        proto = port.protocol.lower()
        internal = chains.local if port.internal_policy_local else chains.cluster
        for ip in port.cluster_ips:
            out.element(CLUSTER_IPS, ip)
            target = internal if plan.internal_verdict is None else None
            self._destination(out, f"{ip} . {proto} . {port.port}", target, plan.internal_verdict)
        for ip in (*port.external_ips, *port.load_balancer_ips):
            target = chains.external if plan.has_any_endpoints else None
            self._destination(out, f"{ip} . {proto} . {port.port}", target, plan.external_verdict)
        if plan.uses_firewall:
            for ip in port.load_balancer_ips:
                out.element(FIREWALL_IPS, f"{ip} . {proto} . {port.port}", f"goto {chains.firewall}")
        if port.node_port is not None:
            target = chains.external if plan.has_any_endpoints else None
            key = f"{proto} . {port.node_port}"
            if target is not None:
                out.element(SERVICE_NODEPORTS, key, f"goto {target}")
            if plan.external_verdict is not None:
                out.element(NO_ENDPOINT_NODEPORTS, key, _VERDICT[plan.external_verdict])

    @staticmethod
    def _destination(out: _PortBuilder, key: str, target: str | None, verdict: Verdict | None) -> None:
        """Dispatch a destination to its chain, and/or give it a no-endpoint verdict."""
        if target is not None:
            out.element(SERVICE_IPS, key, f"goto {target}")
        if verdict is not None:
            out.element(NO_ENDPOINT_SERVICES, key, _VERDICT[verdict])
