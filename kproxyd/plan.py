"""kube-proxy's Service semantics, decided once: which endpoints serve which traffic of each ServicePort.

Every backend renders these plans and decides nothing of its own. The endpoint selection follows
kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go): ready endpoints first, serving+terminating ones
when none is ready (KEP-1669), topology hints when every ready endpoint has one and one matches this zone,
and node-local subsets for the Local traffic policies.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from kproxyd.model import Endpoint, NodeInfo, ProxyState, ServicePort, ServicePortName


class Verdict(enum.StrEnum):
    """What happens to a new connection that has no endpoint to go to."""

    REJECT = "reject"  # the Service has no usable endpoint anywhere: refuse at once
    DROP = "drop"  # endpoints exist, but none this traffic may use (Local policy, none on this node)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """One ServicePort with its endpoints chosen, as kube-proxy's CategorizeEndpoints chooses them.

    cluster_policy_endpoints serve "Cluster" traffic policy (kube-proxy's KUBE-SVC chain), and
    local_policy_endpoints serve "Local" policy (KUBE-SVL): this node's endpoints only. Which of the two
    serves cluster-IP traffic and which serves external traffic (node ports, external and load-balancer
    IPs) follows the Service's internal and external traffic policies.
    """

    port: ServicePort
    cluster_policy_endpoints: tuple[Endpoint, ...]
    local_policy_endpoints: tuple[Endpoint, ...]
    has_any_endpoints: bool

    @property
    def name(self) -> ServicePortName:
        """The ServicePort this plan is for."""
        return self.port.name

    @property
    def internal_endpoints(self) -> tuple[Endpoint, ...]:
        """Endpoints for traffic to the cluster IPs."""
        return self.local_policy_endpoints if self.port.internal_policy_local else self.cluster_policy_endpoints

    @property
    def external_endpoints(self) -> tuple[Endpoint, ...]:
        """Endpoints for traffic from outside to node ports, external IPs and load-balancer IPs."""
        if not self.port.externally_accessible:
            return ()
        return self.local_policy_endpoints if self.port.external_policy_local else self.cluster_policy_endpoints

    @property
    def uses_cluster_policy(self) -> bool:
        """True when some traffic goes to the cluster-policy endpoint set (and it is not empty)."""
        internal = not self.port.internal_policy_local
        external = self.port.externally_accessible  # directly, or short-circuited local sources
        return bool(self.cluster_policy_endpoints) and (internal or external)

    @property
    def uses_local_policy(self) -> bool:
        """True when some traffic goes to the local-policy endpoint set (and it is not empty)."""
        external = self.port.externally_accessible and self.port.external_policy_local
        return bool(self.local_policy_endpoints) and (self.port.internal_policy_local or external)

    @property
    def all_endpoints(self) -> tuple[Endpoint, ...]:
        """Every endpoint some traffic of this port may reach, sorted: the per-endpoint state to create."""
        reachable: set[Endpoint] = set()
        if self.uses_cluster_policy:
            reachable.update(self.cluster_policy_endpoints)
        if self.uses_local_policy:
            reachable.update(self.local_policy_endpoints)
        return tuple(sorted(reachable))

    @property
    def local_ready_count(self) -> int:
        """Ready endpoints on this node: what the Service's health check node port reports."""
        return sum(1 for ep in self.local_policy_endpoints if ep.ready)

    @property
    def internal_verdict(self) -> Verdict | None:
        """None when cluster-IP traffic has endpoints, else what to do with it."""
        return _verdict(self.internal_endpoints, self.has_any_endpoints)

    @property
    def external_verdict(self) -> Verdict | None:
        """None when external traffic has endpoints, else what to do with it."""
        return _verdict(self.external_endpoints, self.has_any_endpoints)

    @property
    def uses_firewall(self) -> bool:
        """True when load-balancer traffic is filtered by loadBalancerSourceRanges."""
        port = self.port
        return self.has_any_endpoints and bool(port.load_balancer_ips and port.load_balancer_source_ranges)

    @property
    def short_circuit_local_sources(self) -> bool:
        """With externalTrafficPolicy Local, pods and the node itself still reach the cluster-policy set.

        kube-proxy sends such traffic to the cluster chain (masquerading node-originated traffic): pod
        and node traffic cannot need its source IP preserved and must not blackhole.
        """
        return self.port.externally_accessible and self.port.external_policy_local


def _verdict(endpoints: Sequence[Endpoint], has_any: bool) -> Verdict | None:
    if endpoints:
        return None
    return Verdict.DROP if has_any else Verdict.REJECT


def _select(endpoints: Iterable[Endpoint], keep: Callable[[Endpoint], bool]) -> tuple[Endpoint, ...]:
    return tuple(ep for ep in endpoints if keep(ep))


def can_use_topology(endpoints: Sequence[Endpoint], node: NodeInfo) -> bool:
    """kube-proxy's canUseTopology: every ready endpoint hinted, and one hinted for this node's zone."""
    zone = node.zone
    matched = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.zone_hints:
            return False
        if not zone:
            return False
        matched = matched or zone in ep.zone_hints
    return matched


def _cluster_endpoints(endpoints: Sequence[Endpoint], node: NodeInfo) -> tuple[Endpoint, ...]:
    topology = can_use_topology(endpoints, node)
    ready = _select(endpoints, lambda ep: ep.ready and (not topology or node.zone in (ep.zone_hints or ())))
    return ready or _select(endpoints, lambda ep: ep.serving and ep.terminating)


def _local_endpoints(endpoints: Sequence[Endpoint], node: NodeInfo) -> tuple[Endpoint, ...]:
    local = _select(endpoints, lambda ep: ep.node_name == node.name)
    return _select(local, lambda ep: ep.ready) or _select(local, lambda ep: ep.serving and ep.terminating)


def _dedup(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """One endpoint per ip:port, sorted; where slices disagree, the ready (then serving) copy wins."""
    best: dict[tuple[str, int], Endpoint] = {}
    for ep in endpoints:
        key = (ep.ip, ep.port)
        current = best.get(key)
        if current is None or (ep.ready, ep.serving) > (current.ready, current.serving):
            best[key] = ep
    return tuple(sorted(best.values()))


def plan_service_port(port: ServicePort, endpoints: Sequence[Endpoint], node: NodeInfo) -> ServicePlan:
    """Categorize the endpoints of one ServicePort for this node (kube-proxy's CategorizeEndpoints)."""
    ordered = _dedup(endpoints)
    cluster = _cluster_endpoints(ordered, node)
    has_any = bool(cluster) or any(ep.ready or (ep.serving and ep.terminating) for ep in ordered)
    return ServicePlan(
        port=port,
        cluster_policy_endpoints=cluster,
        local_policy_endpoints=_local_endpoints(ordered, node),
        has_any_endpoints=has_any,
    )


def plan_all(state: ProxyState) -> dict[ServicePortName, ServicePlan]:
    """Plan every ServicePort of a snapshot."""
    return {
        name: plan_service_port(port, state.endpoints.get(name, ()), state.node)
        for name, port in state.ports.items()
    }


def changed_plans(
    old: Mapping[ServicePortName, ServicePlan],
    new: Mapping[ServicePortName, ServicePlan],
    among: Iterable[ServicePortName] | None = None,
) -> set[ServicePortName]:
    """The ServicePorts whose plan differs between two syncs (added, removed or changed), among the given
    ones (default: all)."""
    names = old.keys() | new.keys() if among is None else among
    # Unchanged plans are the same objects (sync.py keeps them): identity first, equality only otherwise.
    return {name for name in names if (was := old.get(name)) is not (now := new.get(name)) and was != now}
