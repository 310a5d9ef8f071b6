"""Plans → what the eBPF maps must hold (pure): one entry per Service frontend, with its backend slots.

The socket load balancer carries TCP and UDP cluster IPs of both families (one image per family: plans come
per family), and for the node's own processes and pods also the node IPs at node ports, external IPs and
load-balancer IPs (not those filtered by loadBalancerSourceRanges). From the network, tc serves the external
frontends it can (tc.py); the nftables fallback renders the rest (and SCTP): fallback_plans says which plans,
stripped of the cluster IPs the socket load balancer already serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from kproxyd.backends.ebpf.maglev import maglev_table
from kproxyd.model import Endpoint, Protocol, ServicePortName
from kproxyd.plan import ServicePlan

F_NO_ENDPOINTS = 1  # must match bpf/sock_lb.c
F_MAGLEV = 2
SOCKET_PROTOCOLS = (Protocol.TCP, Protocol.UDP)


@dataclass(frozen=True, slots=True, order=True)
class FrontendKey:
    """A Service address as a socket names it."""

    ip: str
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip  # as the nftables mode's counters name it
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class FrontendEntry:
    """What connect() to one frontend does: the backend slots it picks from, flags, affinity timeout."""

    slots: tuple[tuple[str, int], ...]  # (ip, port) per slot; Maglev tables repeat backends
    flags: int = 0
    affinity: int = 0  # seconds; 0: no session affinity
    service: str = ""  # its ServicePort, "ns/name:port" (pinned for `kproxyd explain`); "" in address entries


Image = dict[FrontendKey, FrontendEntry]


def family_of(ip: str) -> int:
    """4 or 6 (addresses were validated at conversion: no need to parse them on every sync)."""
    return 6 if ":" in ip else 4


ADDRESS_ENTRY = FrontendEntry((), F_NO_ENDPOINTS)


def address_key(ip: str) -> FrontendKey:
    """The entry marking ip as a cluster IP: connect() to a port it does not serve fails (REJECT in kube-proxy)."""
    return FrontendKey(ip, 0, Protocol.TCP)


def frontend_entry(plan: ServicePlan, algorithm: str) -> FrontendEntry:
    """The entry for plan's cluster IPs: its internal endpoints, or a failing entry when it has none."""
    return endpoints_entry(plan, plan.internal_endpoints, algorithm)


def local_external_entry(plan: ServicePlan, algorithm: str) -> FrontendEntry:
    """The entry for plan's external frontends when a local process (the node or a pod) connects: the
    cluster-policy endpoints, whatever the external policy. kube-proxy sends such traffic to the service chain:
    through the external chain with Cluster policy, short-circuited there with Local
    (ServicePlan.short_circuit_local_sources): its source is never one to preserve, and it must not blackhole.
    """
    return endpoints_entry(plan, plan.cluster_policy_endpoints, algorithm)


def endpoints_entry(
    plan: ServicePlan, endpoints: Sequence[Endpoint], algorithm: str, flags: int = 0
) -> FrontendEntry:
    """The entry picking from endpoints (the plan's family: the tracker splits them) with plan's affinity and
    algorithm, plus flags.
    """
    backends = tuple((ep.ip, ep.port) for ep in endpoints)
    affinity = plan.port.session_affinity_timeout or 0
    service = str(plan.port.name)
    if not backends:
        return FrontendEntry((), F_NO_ENDPOINTS | flags, affinity, service)
    if (plan.port.lb_algorithm or algorithm) == "maglev" and not affinity:
        names = [f"{ip}:{port}" for ip, port in backends]
        return FrontendEntry(tuple(backends[i] for i in maglev_table(names)), F_MAGLEV | flags, 0, service)
    return FrontendEntry(backends, flags, affinity, service)


def external_keys(plan: ServicePlan, node_ips: Iterable[str]) -> list[FrontendKey]:
    """A plan's external frontends (node IPs of its family): node IPs at the node port, external IPs and LB IPs
    at the port; LB IPs filtered by loadBalancerSourceRanges left out (the nftables fallback's firewall).
    """
    port = plan.port
    keys = [FrontendKey(ip, port.node_port, port.protocol) for ip in node_ips if port.node_port]
    lb_ips = () if port.load_balancer_source_ranges else port.load_balancer_ips
    keys += [FrontendKey(ip, port.port, port.protocol) for ip in (*port.external_ips, *lb_ips)]
    return keys


def serves_local_external(plan: ServicePlan) -> bool:
    """True when the socket load balancer holds some of plan's external frontends (as external_keys)."""
    port = plan.port
    lb_ips = port.load_balancer_ips and not port.load_balancer_source_ranges
    return bool(port.node_port or port.external_ips or lb_ips)


def needs_node_ips(plan: ServicePlan) -> bool:
    """True when plan's socket load balancer frontends include the node IPs (a node port): read them first."""
    return plan.port.protocol in SOCKET_PROTOCOLS and bool(plan.port.cluster_ips) and bool(plan.port.node_port)


def balanced_cluster_ips(plan: ServicePlan) -> tuple[str, ...]:
    """The cluster IPs plan has in the socket load balancer: the ones that get an address entry."""
    return plan.port.cluster_ips if plan.port.protocol in SOCKET_PROTOCOLS else ()


def plan_image(plan: ServicePlan, algorithm: str, node_ips: Iterable[str] = ()) -> Image:
    """The frontends one plan puts in the maps (none for SCTP): its cluster IPs, and its external frontends
    for local processes (node_ips: this node's of the plan's family, where node ports answer).
    """
    if plan.port.protocol not in SOCKET_PROTOCOLS or not plan.port.cluster_ips:
        return {}
    out = dict.fromkeys(external_keys(plan, node_ips), local_external_entry(plan, algorithm))
    entry = frontend_entry(plan, algorithm)
    out.update({FrontendKey(ip, plan.port.port, plan.port.protocol): entry for ip in plan.port.cluster_ips})
    return out


def image(plans: Mapping[ServicePortName, ServicePlan], algorithm: str, node_ips: Iterable[str] = ()) -> Image:
    """Everything the maps must hold for these plans, with their cluster IPs' address entries (only cluster
    IPs': a node IP or external IP on another port must stay reachable).
    """
    ips = tuple(node_ips)
    out = {key: entry for plan in plans.values() for key, entry in plan_image(plan, algorithm, ips).items()}
    addresses = {ip for plan in plans.values() for ip in balanced_cluster_ips(plan)}
    out.update({address_key(ip): ADDRESS_ENTRY for ip in addresses})
    return out


def fallback_plan(plan: ServicePlan) -> ServicePlan | None:
    """What nftables must still do for plan: its external frontends (cluster IPs stripped), or everything for
    protocols the socket load balancer does not carry; None when the socket load balancer does it all.
    """
    if plan.port.protocol not in SOCKET_PROTOCOLS:
        return plan
    if not plan.port.externally_accessible:
        return None
    return replace(plan, port=replace(plan.port, cluster_ips=()))


def fallback_plans(plans: Mapping[ServicePortName, ServicePlan]) -> dict[ServicePortName, ServicePlan]:
    """The plans the nftables fallback renders."""
    out = {}
    for name, plan in plans.items():
        fallback = fallback_plan(plan)
        if fallback is not None:
            out[name] = fallback
    return out


def tc_serves(plan: ServicePlan) -> bool:
    """True when tc (bpf/tc_nat.c) carries plan's external frontends from the network (either family); the
    nftables fallback keeps the rest: no endpoints (REJECT/DROP), loadBalancerSourceRanges, SCTP (the node's
    own connections are the socket load balancer's).
    """
    return (
        plan.port.protocol in SOCKET_PROTOCOLS
        and plan.port.externally_accessible
        and plan.external_verdict is None
        and not plan.port.load_balancer_source_ranges
    )


def dataplane(plans: Iterable[ServicePlan], tc: bool = False) -> str:
    """Where a Service's ports (both families' plans) are handled in ebpf mode, for `kproxyd status` (tc: the
    tc programs run): e.g. "ebpf(cluster-ip v4+v6, external from node)+tc(external v4+v6)"; nftables carries
    external frontends from the network that tc does not.
    """
    plans = list(plans)
    balanced = [plan for plan in plans if plan.port.protocol in SOCKET_PROTOCOLS]
    external = [plan for plan in balanced if plan.port.externally_accessible]
    local = ", external from node" if any(map(serves_local_external, external)) else ""
    parts = [f"ebpf(cluster-ip {_families(balanced)}{local})"] if _families(balanced) else []
    in_tc = [plan for plan in external if tc and tc_serves(plan)]
    if in_tc:
        parts.append(f"tc(external {_families(in_tc)})")
    if len(in_tc) < len(external):
        parts.append("nftables(external)")
    if len(balanced) < len(plans):
        parts.append("nftables(sctp)")
    return "+".join(parts)


def _families(plans: Iterable[ServicePlan]) -> str:
    """The IP families of plans' cluster IPs (a plan has one family), e.g. "v4+v6"; "" for none."""
    families = sorted({family_of(ip) for plan in plans for ip in plan.port.cluster_ips})
    return "+".join(f"v{family}" for family in families)


def diff(old: Image, new: Image) -> tuple[Image, list[FrontendKey]]:
    """The entries to write (new or changed) and the frontends to delete."""
    upserts = {key: entry for key, entry in new.items() if old.get(key) != entry}
    return upserts, sorted(old.keys() - new.keys())
