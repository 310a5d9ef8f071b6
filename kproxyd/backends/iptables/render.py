"""Render ServicePlans as iptables-restore input, rule for rule as kube-proxy's iptables mode writes it.

Pure: no subprocess, no kernel. The layout follows syncProxyRules in pkg/proxy/iptables/proxier.go
(v1.30): top-level chains are rewritten on every sync, per-ServicePort chains only when their plan
changed (KEP-3453 partial sync), and chains no longer wanted are flushed and deleted. A large sync may
write the per-ServicePort chains first in batches (render_batches), then the rest with changed=set().
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection, Iterator, Mapping, Set
from dataclasses import dataclass, field

import structlog

from kproxyd.backends.common import cluster_ip_masquerade, firewall_sources, pod_traffic
from kproxyd.backends.iptables.names import (
    FILTER_CHAINS,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FIREWALL,
    KUBE_FORWARD,
    KUBE_MARK_MASQ,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    NAT_CHAINS,
    ServiceChains,
    endpoint_chain,
    is_service_chain,
    service_chains,
)
from kproxyd.model import Endpoint, LocalTrafficDetector, Protocol, ServicePortName
from kproxyd.plan import ServicePlan, Verdict

log = structlog.get_logger(__name__)

_PROTO_MATCH = {proto: f"-m {proto.lower()} -p {proto.lower()}" for proto in Protocol}
_VERDICT_TARGET = {Verdict.REJECT: "REJECT", Verdict.DROP: "DROP"}
_VERDICT_COMMENT = {Verdict.REJECT: "has no endpoints", Verdict.DROP: "has no local endpoints"}
_NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


@dataclass(frozen=True, slots=True)
class IptablesRenderOptions:
    """Node-wide settings of the iptables backend (kube-proxy's flags of the same meaning)."""

    masquerade_bit: int = 14
    masquerade_all: bool = False
    local_detector: LocalTrafficDetector | None = None
    nodeport_addresses: tuple[str, ...] | None = None  # local IPs node ports answer on; None: every one
    node_ips: tuple[str, ...] = ()  # for the LB source-range rule admitting the node itself
    large_cluster_endpoints: int = 1000  # above this many endpoints, per-endpoint comments are dropped
    localhost_nodeports: bool = False  # node ports on 127.0.0.1 (route_localnet), with kube-proxy's guard

    @property
    def masquerade_mark(self) -> str:
        """The fwmark bit as iptables prints it, e.g. "0x4000"."""
        return f"{1 << self.masquerade_bit:#x}"


@dataclass(frozen=True, slots=True)
class RenderResult:
    """One iptables-restore --noflush input and what the tables hold once it is applied."""

    text: str
    chains: frozenset[str]  # every kproxyd chain (filter and nat) after applying
    rule_count: Mapping[str, int]  # rules per table after applying, unchanged chains included


@dataclass(frozen=True, slots=True)
class _Frontend:
    """One destination of a ServicePort (cluster IP, external IP, LB IP or node port) and its rules."""

    nat_chain: str
    comment: str
    match: str
    target: str | None  # the chain traffic is sent to; None when there is nothing to send it to
    filter_chain: str
    filter_match: str
    verdict: Verdict | None  # what the filter table does when there are no endpoints


@dataclass(slots=True)
class _Sync:
    """The lines of one render, by table; chain declarations come before all rules."""

    filter_chains: list[str] = field(default_factory=list)
    filter_rules: list[str] = field(default_factory=list)
    nat_chains: list[str] = field(default_factory=list)
    nat_rules: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    skipped_nat_rules: int = 0
    cluster_ips: dict[str, str] = field(default_factory=dict)  # cluster IP -> its Service's "ns/name"

    def text(self) -> str:
        """The restore input: every table with lines, each committed."""
        tables = (("filter", self.filter_chains, self.filter_rules), ("nat", self.nat_chains, self.nat_rules))
        lines = [line for name, chains, rules in tables if chains or rules for line in _table(name, chains, rules)]
        return "\n".join([*lines, ""])


def _table(name: str, chains: list[str], rules: list[str]) -> list[str]:
    return [f"*{name}", *chains, *rules, "COMMIT"]


@dataclass(slots=True)
class _NatLines:
    """Where one ServicePort's own nat chains go: into the sync, or counted and dropped when unchanged."""

    chains: list[str]
    rules: list[str]

    def declare(self, chain: str) -> None:
        """Declare (and so create or flush) a chain."""
        self.chains.append(f":{chain} - [0:0]")


@functools.lru_cache(maxsize=256)
def _probability(n: int) -> str:
    return f"{1.0 / n:0.10f}"


def _detector_matches(detector: LocalTrafficDetector | None) -> tuple[str, str] | None:
    """kube-proxy's LocalTrafficDetector IfLocal/IfNotLocal arguments, or None when not implemented."""
    pod = pod_traffic(detector, wildcard="+")
    if pod is None:
        return None
    option = "-s" if pod.by_source else "-i"
    return f"{option} {pod.value}", f"! {option} {pod.value}"


class IptablesRenderer:
    """Turns ServicePlans into kube-proxy's iptables ruleset; decides no Service semantics itself."""

    def __init__(self, options: IptablesRenderOptions) -> None:
        """Precompute the option-derived fragments every render uses."""
        self._options = options
        self._mark = options.masquerade_mark
        self._detector = _detector_matches(options.local_detector)
        self._off_cluster = None if self._detector is None else f" {self._detector[1]}"
        self._node_ips = tuple(ipaddress.ip_address(ip) for ip in options.node_ips)

    def render(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: Set[ServicePortName] | None,
        existing_chains: Set[str],
    ) -> RenderResult:
        """Render every plan; with `changed`, rewrite only the per-ServicePort chains of those ports."""
        sync = _Sync()
        self._write_static(sync)
        endpoints = _endpoint_count(plans)
        large = endpoints > self._options.large_cluster_endpoints
        for name in sorted(plans, key=_sort_key):
            plan = plans[name]
            chains = service_chains(name)
            self._write_frontends(sync, plan, chains)
            self._write_port_chains(sync, plan, chains, large, rewrite=changed is None or name in changed)
        deleted = self._delete_stale(sync, existing_chains)
        self._write_trailer(sync)
        log.debug("iptables rules rendered", ports=len(plans), endpoints=endpoints, deleted_chains=deleted)
        return RenderResult(
            text=sync.text(),
            chains=frozenset((*FILTER_CHAINS, *NAT_CHAINS, *sync.active)),
            rule_count={
                "filter": len(sync.filter_rules),
                "nat": len(sync.nat_rules) - deleted + sync.skipped_nat_rules,
            },
        )

    def render_batches(
        self, plans: Mapping[ServicePortName, ServicePlan], names: Collection[ServicePortName], max_chains: int
    ) -> Iterator[str]:
        """Only the nat chains of the ports `names`, in inputs of about max_chains chains; a port never split."""
        large = _endpoint_count(plans) > self._options.large_cluster_endpoints
        sync = _Sync()
        for name in sorted(names, key=_sort_key):
            self._write_port_chains(sync, plans[name], service_chains(name), large, rewrite=True)
            if len(sync.active) >= max_chains:
                yield sync.text()
                sync = _Sync()
        if sync.active:
            yield sync.text()

    def _write_port_chains(
        self, sync: _Sync, plan: ServicePlan, chains: ServiceChains, large: bool, rewrite: bool
    ) -> None:
        """Write the port's own chains into the sync, or (not rewrite) only count their rules as kept."""
        nat = _NatLines(sync.nat_chains, sync.nat_rules) if rewrite else _NatLines([], [])
        self._write_service_chains(sync, nat, plan, chains, large)
        if not rewrite:
            sync.skipped_nat_rules += len(nat.rules)

    def _write_static(self, sync: _Sync) -> None:
        """Declare the top-level chains and write the masquerade machinery."""
        sync.filter_chains.extend(f":{chain} - [0:0]" for chain in FILTER_CHAINS)
        sync.nat_chains.extend(f":{chain} - [0:0]" for chain in NAT_CHAINS)
        mark = self._mark
        sync.nat_rules += [
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
            f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT"'
            " -j MASQUERADE --random-fully",
            f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
        ]

    def _write_trailer(self, sync: _Sync) -> None:
        """The rules that must come last: the jump to node ports, and the forwarding rules."""
        addresses = self._options.nodeport_addresses
        every_local = ("-m addrtype --dst-type LOCAL",)
        destinations = every_local if addresses is None else tuple(f"-d {ip}" for ip in addresses)
        sync.nat_rules.extend(
            f"-A {KUBE_SERVICES} -m comment --comment {_NODEPORTS_COMMENT} {dst} -j {KUBE_NODEPORTS}"
            for dst in destinations
        )
        # Whatever reaches a cluster IP undiverted is for a port or protocol the Service does not serve:
        # refuse it at once rather than let it wander off along the default route.
        sync.filter_rules.extend(
            f'-A {KUBE_SERVICES} -m comment --comment "{service} cluster IP with no such port" -d {ip} -j REJECT'
            for ip, service in sorted(sync.cluster_ips.items())
        )
        if self._options.localhost_nodeports:
            # CVE-2020-8558: with route_localnet, packets to 127/8 from elsewhere must not get in.
            sync.filter_chains.append(f":{KUBE_FIREWALL} - [0:0]")
            sync.filter_rules.append(
                f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections"'
                " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            )
        mark = self._mark
        sync.filter_rules += [
            f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules"'
            f" -m mark --mark {mark}/{mark} -j ACCEPT",
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule"'
            " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]

    def _delete_stale(self, sync: _Sync, existing_chains: Set[str]) -> int:
        """Flush and delete per-service chains that exist but are no longer wanted; return how many."""
        stale = sorted(chain for chain in existing_chains - sync.active if is_service_chain(chain))
        sync.nat_chains.extend(f":{chain} - [0:0]" for chain in stale)
        sync.nat_rules.extend(f"-X {chain}" for chain in stale)
        return len(stale)

    def _write_frontends(self, sync: _Sync, plan: ServicePlan, chains: ServiceChains) -> None:
        """The top-level rules of one ServicePort: captures in nat, verdicts and firewall in filter."""
        label = str(plan.name)
        for fe in _frontends(plan, chains, plan.uses_firewall):
            if fe.target is not None:
                sync.nat_rules.append(
                    f"-A {fe.nat_chain} -m comment --comment {fe.comment} {fe.match} -j {fe.target}"
                )
            if fe.verdict is not None:
                sync.filter_rules.append(
                    f'-A {fe.filter_chain} -m comment --comment "{label} {_VERDICT_COMMENT[fe.verdict]}"'
                    f" {fe.filter_match} -j {_VERDICT_TARGET[fe.verdict]}"
                )
        port = plan.port
        for ip in port.cluster_ips:
            sync.cluster_ips.setdefault(ip, plan.name.service_key)
        if plan.uses_firewall:
            sync.filter_rules.extend(
                f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{label} traffic not accepted by'
                f' {chains.firewall}" {_PROTO_MATCH[port.protocol]} -d {ip} --dport {port.port} -j DROP'
                for ip in port.load_balancer_ips
            )
        if port.health_check_node_port is not None:
            sync.filter_rules.append(
                f'-A {KUBE_NODEPORTS} -m comment --comment "{label} health check node port"'
                f" -m tcp -p tcp --dport {port.health_check_node_port} -j ACCEPT"
            )

    def _write_service_chains(
        self, sync: _Sync, nat: _NatLines, plan: ServicePlan, chains: ServiceChains, large: bool
    ) -> None:
        """The ServicePort's own nat chains: masquerading, EXT, FW, SVC, SVL and one SEP per endpoint."""
        self._write_internal_masquerade(nat, plan, chains)
        used: list[str] = []
        if plan.has_any_endpoints and plan.port.externally_accessible:
            used.append(chains.external)
            self._write_external_chain(nat, plan, chains)
        if plan.uses_firewall:
            used.append(chains.firewall)
            self._write_firewall_chain(nat, plan, chains)
        seps = {ep: endpoint_chain(plan.name, ep) for ep in plan.all_endpoints}
        comment = "" if large else f" -m comment --comment {plan.name}"
        if plan.uses_cluster_policy:
            used.append(chains.cluster)
            _write_dispatch(nat, plan, chains.cluster, plan.cluster_policy_endpoints, seps, large)
        if plan.uses_local_policy:
            used.append(chains.local)
            _write_dispatch(nat, plan, chains.local, plan.local_policy_endpoints, seps, large)
        for ep, sep in seps.items():
            used.append(sep)
            _write_endpoint(nat, plan, ep, sep, comment)
        for chain in used:
            nat.declare(chain)
        sync.active.update(used)

    def _write_internal_masquerade(self, nat: _NatLines, plan: ServicePlan, chains: ServiceChains) -> None:
        """Masquerade cluster-IP traffic from off-cluster sources (or all of it with masquerade_all)."""
        source = cluster_ip_masquerade(plan, self._options.masquerade_all, self._off_cluster, "")
        if source is None:
            return
        port = plan.port
        chain = chains.local if port.internal_policy_local else chains.cluster
        nat.rules.extend(
            f'-A {chain} -m comment --comment "{plan.name} cluster IP" {_PROTO_MATCH[port.protocol]}'
            f" -d {ip} --dport {port.port}{source} -j {KUBE_MARK_MASQ}"
            for ip in port.cluster_ips
        )

    def _write_external_chain(self, nat: _NatLines, plan: ServicePlan, chains: ServiceChains) -> None:
        """KUBE-EXT: masquerade (Cluster policy) or short-circuit local sources (Local), then the policy."""
        ext, label = chains.external, plan.name
        if not plan.short_circuit_local_sources:
            nat.rules.append(
                f'-A {ext} -m comment --comment "masquerade traffic for {label} external destinations"'
                f" -j {KUBE_MARK_MASQ}"
            )
        else:
            if self._detector is not None:
                nat.rules.append(
                    f'-A {ext} -m comment --comment "pod traffic for {label} external destinations"'
                    f" {self._detector[0]} -j {chains.cluster}"
                )
            nat.rules += [
                f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {label} external destinations"'
                f" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}",
                f'-A {ext} -m comment --comment "route LOCAL traffic for {label} external destinations"'
                f" -m addrtype --src-type LOCAL -j {chains.cluster}",
            ]
        if plan.external_verdict is None:
            policy = chains.local if plan.port.external_policy_local else chains.cluster
            nat.rules.append(f"-A {ext} -j {policy}")

    def _write_firewall_chain(self, nat: _NatLines, plan: ServicePlan, chains: ServiceChains) -> None:
        """KUBE-FW: admit loadBalancerSourceRanges to KUBE-EXT; the rest falls to KUBE-PROXY-FIREWALL."""
        port = plan.port
        prefix = f'-A {chains.firewall} -m comment --comment "{plan.name} loadbalancer IP"'
        sources = firewall_sources(port.load_balancer_source_ranges, port.load_balancer_ips, self._node_ips)
        nat.rules.extend(f"{prefix} -s {source} -j {chains.external}" for source in sources)
        nat.rules.append(
            f'-A {chains.firewall} -m comment --comment "other traffic to {plan.name} will be dropped'
            f' by {KUBE_PROXY_FIREWALL}"'
        )


def _endpoint_count(plans: Mapping[ServicePortName, ServicePlan]) -> int:
    return sum(len(plan.all_endpoints) for plan in plans.values())


def _sort_key(name: ServicePortName) -> tuple[str, str, str, str]:
    return (name.namespace, name.name, name.port, name.protocol)


def _frontends(plan: ServicePlan, chains: ServiceChains, firewall: bool) -> Iterator[_Frontend]:
    """Every destination of the ServicePort, in kube-proxy's order, with its capture and verdict."""
    port, label = plan.port, plan.name
    proto = _PROTO_MATCH[port.protocol]
    internal = chains.local if port.internal_policy_local else chains.cluster
    external = chains.external if plan.has_any_endpoints else None
    for ip in port.cluster_ips:
        match = f"{proto} -d {ip} --dport {port.port}"
        target = internal if plan.internal_verdict is None else None
        yield _Frontend(
            KUBE_SERVICES, f'"{label} cluster IP"', match, target, KUBE_SERVICES, match, plan.internal_verdict
        )
    lb_target = chains.firewall if firewall else external
    for kind, ips, target in (
        ("external IP", port.external_ips, external),
        ("loadbalancer IP", port.load_balancer_ips, lb_target),
    ):
        for ip in ips:
            match = f"{proto} -d {ip} --dport {port.port}"
            comment = f'"{label} {kind}"'
            yield _Frontend(
                KUBE_SERVICES, comment, match, target, KUBE_EXTERNAL_SERVICES, match, plan.external_verdict
            )
    if port.node_port is not None:
        match = f"{proto} --dport {port.node_port}"
        local_match = f"-m addrtype --dst-type LOCAL {match}"
        yield _Frontend(
            KUBE_NODEPORTS, str(label), match, external, KUBE_EXTERNAL_SERVICES, local_match, plan.external_verdict
        )


def _write_dispatch(
    nat: _NatLines,
    plan: ServicePlan,
    chain: str,
    endpoints: tuple[Endpoint, ...],
    seps: Mapping[Endpoint, str],
    large: bool,
) -> None:
    """A KUBE-SVC/SVL chain: affinity checks, then a random spread with the last endpoint unconditional."""

    def comment(ep: Endpoint) -> str:
        return "" if large else f' -m comment --comment "{plan.name} -> {ep.address}"'

    timeout = plan.port.session_affinity_timeout
    if timeout is not None:
        nat.rules.extend(
            f"-A {chain}{comment(ep)} -m recent --name {seps[ep]} --rcheck --seconds {timeout} --reap"
            f" -j {seps[ep]}"
            for ep in endpoints
        )
    last = len(endpoints) - 1
    for i, ep in enumerate(endpoints):
        spread = "" if i == last else f" -m statistic --mode random --probability {_probability(last + 1 - i)}"
        nat.rules.append(f"-A {chain}{comment(ep)}{spread} -j {seps[ep]}")


def _write_endpoint(nat: _NatLines, plan: ServicePlan, ep: Endpoint, sep: str, comment: str) -> None:
    """A KUBE-SEP chain: masquerade hairpin traffic, remember affinity, DNAT to the endpoint."""
    recent = "" if plan.port.session_affinity_timeout is None else f" -m recent --name {sep} --set"
    nat.rules += [
        f"-A {sep}{comment} -s {ep.ip} -j {KUBE_MARK_MASQ}",
        f"-A {sep}{comment}{recent} {_PROTO_MATCH[plan.port.protocol]} -j DNAT --to-destination {ep.address}",
    ]
