"""kube-proxy's UDP conntrack cleanup (pkg/proxy/conntrack/cleanup.go): delete flows a sync made stale.

UDP has no close, so a conntrack entry keeps steering a client that reuses its source port: to an endpoint
that is gone, or (created while the Service had no endpoints) past the DNAT rules added since. After each
successful sync, stale_udp_flows compares the old and new plans and ConntrackCleaner deletes the matches.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any

import structlog
from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from kproxyd.model import Protocol, ServicePort, ServicePortName
from kproxyd.plan import ServicePlan
from kproxyd.stale import removed_endpoints, udp_plan_changes

log = structlog.get_logger(__name__)

_IPPROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: socket.IPPROTO_SCTP}


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Conntrack entries to delete: protocol and original destination port, optionally dst IP and reply src."""

    protocol: Protocol
    orig_dst_port: int
    orig_dst_ip: str | None = None  # None: any destination (a node port, on every local address)
    reply_src_ip: str | None = None  # None: whatever answers (or nothing DNATed at all)

    def matches(self, orig_dst_ip: str, orig_dst_port: int, reply_src_ip: str) -> bool:
        """True when an entry of this filter's protocol with these addresses must go."""
        return (
            orig_dst_port == self.orig_dst_port
            and self.orig_dst_ip in (None, orig_dst_ip)
            and self.reply_src_ip in (None, reply_src_ip)
        )

    def sort_key(self) -> tuple[str, int, str, str]:
        """A total order (None sorts first)."""
        return (self.protocol, self.orig_dst_port, self.orig_dst_ip or "", self.reply_src_ip or "")


def _frontend_filters(port: ServicePort, reply_src_ip: str | None) -> set[FlowFilter]:
    """Filters for every frontend of a port: its cluster, external and LB IPs on its port, and its node port."""
    ips = (*port.cluster_ips, *port.external_ips, *port.load_balancer_ips)
    filters = {FlowFilter(port.protocol, port.port, ip, reply_src_ip) for ip in ips}
    if port.node_port is not None:
        filters.add(FlowFilter(port.protocol, port.node_port, None, reply_src_ip))
    return filters


def _port_filters(old: ServicePlan | None, new: ServicePlan | None) -> set[FlowFilter]:
    """The stale flows of one UDP ServicePort between two plans of it."""
    filters: set[FlowFilter] = set()
    if old is not None:
        for ip in {ep.ip for ep in removed_endpoints(old, new)}:
            filters |= _frontend_filters(old.port, ip)
    if new is not None and new.all_endpoints and (old is None or not old.all_endpoints):
        filters |= _frontend_filters(new.port, None)
    return filters


def stale_udp_flows(
    old: Mapping[ServicePortName, ServicePlan],
    new: Mapping[ServicePortName, ServicePlan],
    changed: Set[ServicePortName] | None = None,
) -> list[FlowFilter]:
    """Flows to delete after moving from old to new plans (only the changed ports when given), sorted."""
    filters: set[FlowFilter] = set()
    for before, after in udp_plan_changes(old, new, changed):
        filters |= _port_filters(before, after)
    return sorted(filters, key=FlowFilter.sort_key)


class ConntrackCleaner:
    """Deletes conntrack entries matching FlowFilters in the current network namespace, over netlink."""

    def __init__(self, family: int = socket.AF_INET) -> None:
        self._family = family

    def on_sync(
        self,
        old: Mapping[ServicePortName, ServicePlan],
        new: Mapping[ServicePortName, ServicePlan],
        changed: Set[ServicePortName] | None,
    ) -> None:
        """A Proxier sync observer: delete the flows this sync made stale."""
        self.delete(stale_udp_flows(old, new, changed))

    def delete(self, filters: Iterable[FlowFilter]) -> int:
        """Delete every entry a filter matches and return how many; never raises (errors are logged)."""
        wanted = list(filters)
        if not wanted:
            return 0
        try:
            deleted = self._delete(wanted)
        except Exception:
            log.exception("conntrack cleanup failed", filters=len(wanted))
            return 0
        log.info("conntrack entries deleted", filters=len(wanted), deleted=deleted)
        return deleted

    def _delete(self, filters: list[FlowFilter]) -> int:
        deleted = 0
        with Conntrack(nfgen_family=self._family) as ct:
            for protocol in {f.protocol for f in filters}:
                matching = [f for f in filters if f.protocol == protocol]
                for entry in self._stale_entries(ct, protocol, matching):
                    deleted += _delete_entry(ct, entry)
        return deleted

    def _stale_entries(self, ct: Any, protocol: Protocol, filters: list[FlowFilter]) -> list[Any]:
        """One dump of the protocol's entries (filtered in the kernel), those some filter matches."""
        only = NFCTAttrTuple(family=self._family, proto=_IPPROTO[protocol])
        return [
            entry
            for entry in ct.dump_entries(tuple_orig=only)
            if any(
                f.matches(entry.tuple_orig.daddr, entry.tuple_orig.dport, entry.tuple_reply.saddr) for f in filters
            )
        ]


def _delete_entry(ct: Any, entry: Any) -> int:
    """Delete one entry by its original tuple; 0 when it expired meanwhile."""
    try:
        ct.delete(entry)
    except NetlinkError as exc:
        if exc.code != errno.ENOENT:
            raise
        return 0
    return 1
