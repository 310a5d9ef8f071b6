"""Which conntrack flows a sync makes stale (kube-proxy's UDP cleanup rules), without a kernel."""

from __future__ import annotations

from typing import Any

import pytest

from kproxyd import conntrack
from kproxyd.conntrack import ConntrackCleaner, FlowFilter, stale_udp_flows
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan, plan_service_port

NODE = NodeInfo("node1")
DNS = ServicePortName("default", "dns", "dns", Protocol.UDP)
WEB = ServicePortName("default", "web", "http", Protocol.TCP)
UDP = Protocol.UDP


def plan(name: ServicePortName = DNS, ips: tuple[str, ...] = ("10.0.0.1", "10.0.0.2"), **port: Any) -> ServicePlan:
    """A plan for 10.96.0.10:53 (plus the given ServicePort fields) with ready endpoints on port 5353."""
    service_port = ServicePort(name, port.pop("type", ServiceType.CLUSTER_IP), ("10.96.0.10",), 53, **port)
    return plan_service_port(service_port, [Endpoint(ip, 5353) for ip in ips], NODE)


def test_removed_endpoint_is_filtered_by_reply_source() -> None:
    flows = stale_udp_flows({DNS: plan()}, {DNS: plan(ips=("10.0.0.1",))}, {DNS})
    assert flows == [FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.2")]


def test_removed_endpoint_covers_every_frontend() -> None:
    frontends: dict[str, Any] = {
        "type": ServiceType.LOAD_BALANCER,
        "node_port": 30053,
        "external_ips": ("192.0.2.1",),
        "load_balancer_ips": ("198.51.100.1",),
    }
    flows = stale_udp_flows({DNS: plan(**frontends)}, {DNS: plan(ips=("10.0.0.1",), **frontends)})
    assert flows == [
        FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.2"),
        FlowFilter(UDP, 53, "192.0.2.1", "10.0.0.2"),
        FlowFilter(UDP, 53, "198.51.100.1", "10.0.0.2"),
        FlowFilter(UDP, 30053, None, "10.0.0.2"),
    ]


def test_changed_target_port_counts_as_removed() -> None:
    moved = plan_service_port(plan().port, [Endpoint("10.0.0.1", 5353), Endpoint("10.0.0.2", 5454)], NODE)
    assert stale_udp_flows({DNS: plan()}, {DNS: moved}) == [FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.2")]


def test_deleted_service_clears_flows_to_its_endpoints() -> None:
    assert stale_udp_flows({DNS: plan(ips=("10.0.0.1",))}, {}, {DNS}) == [
        FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.1")
    ]


def test_zero_to_some_endpoints_clears_every_frontend() -> None:
    frontends: dict[str, Any] = {"type": ServiceType.NODE_PORT, "node_port": 30053, "external_ips": ("192.0.2.1",)}
    flows = stale_udp_flows({DNS: plan(ips=(), **frontends)}, {DNS: plan(ips=("10.0.0.1",), **frontends)})
    assert flows == [
        FlowFilter(UDP, 53, "10.96.0.10"),
        FlowFilter(UDP, 53, "192.0.2.1"),
        FlowFilter(UDP, 30053),
    ]


def test_new_service_with_endpoints_counts_as_zero_to_some() -> None:
    assert stale_udp_flows({}, {DNS: plan(ips=("10.0.0.1",))}) == [FlowFilter(UDP, 53, "10.96.0.10")]


def test_added_endpoint_or_still_empty_is_not_stale() -> None:
    assert stale_udp_flows({DNS: plan(ips=("10.0.0.1",))}, {DNS: plan()}) == []
    assert stale_udp_flows({DNS: plan(ips=())}, {DNS: plan(ips=())}) == []


def test_tcp_is_ignored() -> None:
    assert stale_udp_flows({WEB: plan(WEB)}, {WEB: plan(WEB, ips=())}) == []
    assert stale_udp_flows({WEB: plan(WEB, ips=())}, {WEB: plan(WEB)}) == []


def test_only_changed_ports_are_looked_at() -> None:
    other = ServicePortName("default", "other", "", Protocol.UDP)
    old = {DNS: plan(), other: plan(other)}
    new = {DNS: plan(ips=("10.0.0.1",)), other: plan(other, ips=())}
    assert stale_udp_flows(old, new, {other}) == [
        FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.1"),
        FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.2"),
    ]
    assert stale_udp_flows(old, new, set()) == []


def test_filter_matching() -> None:
    by_ip = FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.2")
    assert by_ip.matches("10.96.0.10", 53, "10.0.0.2")
    assert not by_ip.matches("10.96.0.10", 53, "10.0.0.1")
    assert not by_ip.matches("10.96.0.11", 53, "10.0.0.2")
    assert not by_ip.matches("10.96.0.10", 54, "10.0.0.2")
    assert FlowFilter(UDP, 30053).matches("172.28.0.11", 30053, "172.28.0.11")


def test_nothing_to_delete_does_not_touch_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conntrack, "Conntrack", None)  # any netlink use would raise (and be logged)
    assert ConntrackCleaner().delete([]) == 0


def test_netlink_failure_is_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_: Any) -> None:
        raise OSError("netlink unavailable")

    monkeypatch.setattr(conntrack, "Conntrack", broken)
    assert ConntrackCleaner().delete([FlowFilter(UDP, 53)]) == 0


def test_on_sync_deletes_the_stale_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    deleted: list[list[FlowFilter]] = []

    def record(_self: ConntrackCleaner, filters: list[FlowFilter]) -> int:
        deleted.append(filters)
        return 0

    monkeypatch.setattr(ConntrackCleaner, "delete", record)
    ConntrackCleaner().on_sync({DNS: plan()}, {DNS: plan(ips=("10.0.0.1",))}, None)
    assert deleted == [[FlowFilter(UDP, 53, "10.96.0.10", "10.0.0.2")]]
