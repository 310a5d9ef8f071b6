"""Dual-stack: IPv6 Services and endpoints, one plan and one ruleset per IP family, with real packets.

The lab is dual-stack throughout (nodes fd00:28::11/12, pods fd00:244:<node>::/64); kproxyd proxies both
families when the kernel has IPv6, as kube-proxy's dual-stack mode does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply

BACKENDS = {"backend-0", "backend-1"}


def svc(name: str, app: str = "backend", **spec: Any) -> dict[str, Any]:
    """A Service with a TCP and a UDP port."""
    ports = [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "udp", "port": 53, "targetPort": 8080, "protocol": "UDP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": app}, "ports": ports, **spec},
    }


@pytest.fixture(scope="module")
def cluster(lab: LabCluster) -> Iterator[LabCluster]:
    """Backends on both nodes, a client pod on each, dual-stack, IPv6-only and empty Services."""
    ports = [{"name": "http", "containerPort": 8080}, {"name": "udp", "containerPort": 8080, "protocol": "UDP"}]
    lab.add_pod("backend-0", "node1", {"app": "backend"}, ports=ports)
    lab.add_pod("backend-1", "node2", {"app": "backend"}, ports=ports)
    lab.add_pod("client1", "node1", {"app": "client"})
    lab.add_pod("client2", "node2", {"app": "client"})
    lab.create_service(svc("dual", ipFamilyPolicy="RequireDualStack", type="NodePort"))
    lab.create_service(svc("only6", ipFamilies=["IPv6"]))
    lab.create_service(svc("empty6", "nothing", ipFamilies=["IPv6"]))
    for node in ("node1", "node2"):
        lab.start_proxy(node, [f"--proxy-mode={lab.mode}"])  # type: ignore[attr-defined]
    for src in ("client1", "client2"):
        wait_until(lambda s=src: answers_all(lab, s, ip6(lab, "only6")), timeout=30, what=f"IPv6 sync from {src}")
    yield lab


def ip6(lab: LabCluster, name: str) -> str:
    """A Service's IPv6 cluster IP."""
    return next(ip for ip in lab.service(name)["spec"]["clusterIPs"] if ":" in ip)


def answers_all(lab: LabCluster, src: str, ip: str, port: int = 80, proto: str = "TCP") -> bool:
    return all(isinstance(r, Reply) for r in lab.answers(src, ip, port, proto, count=5, timeout=0.5))


def replies(lab: LabCluster, src: str, ip: str, port: int, proto: str = "TCP") -> list[Reply]:
    results = lab.answers(src, ip, port, proto, count=30)
    assert all(isinstance(r, Reply) for r in results), [r for r in results if not isinstance(r, Reply)][:3]
    return [r for r in results if isinstance(r, Reply)]


def test_dual_stack_service_gets_both_families(cluster: LabCluster) -> None:
    spec = cluster.service("dual")["spec"]
    assert spec["ipFamilies"] == ["IPv4", "IPv6"]
    v4, v6 = spec["clusterIPs"]
    assert ":" not in v4 and ":" in v6


@pytest.mark.parametrize(("src", "proto"), [("client1", "TCP"), ("client2", "TCP"), ("client1", "UDP")])
def test_ipv6_cluster_ip_from_pods(cluster: LabCluster, src: str, proto: str) -> None:
    port = 80 if proto == "TCP" else 53
    got = replies(cluster, src, ip6(cluster, "dual"), port, proto)
    assert {r.pod for r in got} == BACKENDS
    assert {r.source_ip for r in got} == {cluster.net.pod(src).ip6}  # the pod's IPv6 address, not SNATed


def test_ipv4_of_the_same_service(cluster: LabCluster) -> None:
    v4 = cluster.service("dual")["spec"]["clusterIPs"][0]
    assert {r.pod for r in replies(cluster, "client2", v4, 80)} == BACKENDS


def test_ipv6_only_service(cluster: LabCluster) -> None:
    assert cluster.service("only6")["spec"]["clusterIPs"] == [ip6(cluster, "only6")]
    assert {r.pod for r in replies(cluster, "client1", ip6(cluster, "only6"), 80)} == BACKENDS


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_ipv6_node_port_from_outside(cluster: LabCluster, node: str) -> None:
    port = next(p["nodePort"] for p in cluster.service("dual")["spec"]["ports"] if p["name"] == "http")
    got = replies(cluster, "ext", cluster.net.node(node).ip6, port)
    assert {r.pod for r in got} == BACKENDS
    assert cluster.net.host("ext").ip6 not in {r.source_ip for r in got}  # masqueraded


def test_ipv6_without_endpoints_is_refused(cluster: LabCluster) -> None:
    # Over veth the first ICMPv6 error can arrive while connect() still owns the socket, and Linux drops it
    # (TcpExtLockDroppedIcmps); the SYN retransmitted after 1 s is refused. Hence the longer timeout.
    results = cluster.answers("client1", ip6(cluster, "empty6"), 80, count=5, timeout=3.0)
    assert all(isinstance(r, ConnectionRefusedError) for r in results), results


def test_ipv6_rules_read_like_kube_proxy(cluster: LabCluster) -> None:
    if cluster.mode in ("nftables", "ebpf"):  # type: ignore[attr-defined]  # ebpf: IPv6 is nftables
        rules = cluster.net.exec("node1", ["nft", "list", "table", "ip6", "kube-proxy"]).stdout
        assert "service-" in rules and "default/dual/tcp/http" in rules and "dnat to [fd00:244:" in rules
        return
    nat = cluster.net.exec("node1", ["ip6tables-save", "-t", "nat"]).stdout
    assert (
        '"default/dual:http cluster IP"' in nat
        and "KUBE-SVC-" in nat
        and "DNAT --to-destination [fd00:244:" in nat
    )
