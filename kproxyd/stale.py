"""What a sync made stale for UDP clients: the endpoints each UDP ServicePort lost (pure; no kernel).

Shared by the conntrack cleanup (iptables, nftables, ipvs modes) and the ebpf mode's socket destroyer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set

from kproxyd.model import Endpoint, Protocol, ServicePortName
from kproxyd.plan import ServicePlan


def udp_plan_changes(
    old: Mapping[ServicePortName, ServicePlan],
    new: Mapping[ServicePortName, ServicePlan],
    changed: Set[ServicePortName] | None = None,
) -> Iterator[tuple[ServicePlan | None, ServicePlan | None]]:
    """(old plan, new plan) of every UDP ServicePort the sync may have changed (only the changed when given)."""
    names = old.keys() | new.keys() if changed is None else changed
    for name in names:
        if name.protocol == Protocol.UDP:
            yield old.get(name), new.get(name)


def removed_endpoints(old: ServicePlan, new: ServicePlan | None) -> list[Endpoint]:
    """The old plan's endpoints (by ip:port) that the new plan no longer reaches."""
    kept = {ep.address for ep in new.all_endpoints} if new is not None else set()
    return [ep for ep in old.all_endpoints if ep.address not in kept]


def removed_udp_backends(
    old: Mapping[ServicePortName, ServicePlan],
    new: Mapping[ServicePortName, ServicePlan],
    changed: Set[ServicePortName] | None = None,
) -> set[tuple[str, int]]:
    """(ip, port) of every endpoint some UDP ServicePort lost between old and new plans."""
    return {
        (ep.ip, ep.port)
        for before, after in udp_plan_changes(old, new, changed)
        if before is not None
        for ep in removed_endpoints(before, after)
    }
