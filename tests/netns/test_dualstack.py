"""Dual-stack: IPv6 Services and endpoints, one plan and one ruleset per IP family, with real packets.

The lab is dual-stack throughout (nodes fd00:28::11/12, pods fd00:244:<node>::/64); kproxyd proxies both
families when the kernel has IPv6, as kube-proxy's dual-stack mode does.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply
from tests.netns.expect import assert_served_by_tc, refused_error, tc_connections, wait_for_dataplane

BACKENDS = {"backend-0", "backend-1"}
ON_NODE = {"node1": "backend-0", "node2": "backend-1"}
EXTERNAL_IP6 = "fd00:29::10"  # routed to node1 by the outside world


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
    """Backends on both nodes, a client pod on each, dual-stack, IPv6-only and empty Services, an IPv6
    external IP routed to node1.
    """
    ports = [{"name": "http", "containerPort": 8080}, {"name": "udp", "containerPort": 8080, "protocol": "UDP"}]
    lab.add_pod("backend-0", "node1", {"app": "backend"}, ports=ports)
    lab.add_pod("backend-1", "node2", {"app": "backend"}, ports=ports)
    lab.add_pod("client1", "node1", {"app": "client"})
    lab.add_pod("client2", "node2", {"app": "client"})
    lab.create_service(svc("dual", ipFamilyPolicy="RequireDualStack", type="NodePort"))
    lab.create_service(svc("only6", ipFamilies=["IPv6"]))
    lab.create_service(svc("empty6", "nothing", ipFamilies=["IPv6"]))
    lab.create_service(svc("sticky6", ipFamilies=["IPv6"], sessionAffinity="ClientIP"))
    lab.create_service(svc("counted6", ipFamilies=["IPv6"]))  # only test_ipv6_cluster_ips_are_socket_balanced's
    lab.create_service(svc("local6", ipFamilies=["IPv6"], type="NodePort", externalTrafficPolicy="Local"))
    lab.create_service(svc("extip6", ipFamilies=["IPv6"], externalIPs=[EXTERNAL_IP6]))
    lab.route_from_outside(f"{EXTERNAL_IP6}/128", "node1")
    for node in ("node1", "node2"):
        lab.start_proxy(node, [f"--proxy-mode={lab.mode}"])  # type: ignore[attr-defined]
    wait_for_dataplane(lab, ("node1", "node2"))
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


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_ipv4_cluster_ip_from_an_ipv6_socket(cluster: LabCluster, proto: str) -> None:
    """A dual-stack (AF_INET6) socket naming ::ffff:<IPv4 cluster IP>: the kernel runs connect6, not connect4."""
    v4 = cluster.service("dual")["spec"]["clusterIPs"][0]
    got = replies(cluster, "client1", f"::ffff:{v4}", 80 if proto == "TCP" else 53, proto)
    assert {r.pod for r in got} == BACKENDS
    assert {r.source_ip for r in got} == {cluster.net.pod("client1").ip}  # IPv4 on the wire, not SNATed


def test_ipv6_only_service(cluster: LabCluster) -> None:
    assert cluster.service("only6")["spec"]["clusterIPs"] == [ip6(cluster, "only6")]
    assert {r.pod for r in replies(cluster, "client1", ip6(cluster, "only6"), 80)} == BACKENDS


@pytest.mark.parametrize("src", ["client1", "client2"])
def test_ipv6_session_affinity(cluster: LabCluster, src: str) -> None:
    assert len({r.pod for r in replies(cluster, src, ip6(cluster, "sticky6"), 80)}) == 1


def node_port(lab: LabCluster, name: str, port: str = "http") -> int:
    return int(next(p["nodePort"] for p in lab.service(name)["spec"]["ports"] if p["name"] == port))


def served_by_tc(lab: LabCluster, node: str, ip: str, port: int, proto: str = "TCP") -> None:
    """ebpf mode: the external client's flows to ip:port are node's tc program's (its tc_counters)."""
    if lab.mode == "ebpf":  # type: ignore[attr-defined]
        assert_served_by_tc(lab, "ext", node, ip, port, proto)


@pytest.mark.parametrize(("node", "proto"), [("node1", "TCP"), ("node2", "TCP"), ("node1", "UDP")])
def test_ipv6_node_port_from_outside(cluster: LabCluster, node: str, proto: str) -> None:
    """externalTrafficPolicy Cluster: masqueraded to the address of the interface towards the backend (the
    pod bridge for a pod on this node, the LAN for the other node's).
    """
    lab_node = cluster.net.node(node)
    port = node_port(cluster, "dual", "http" if proto == "TCP" else "udp")
    got = replies(cluster, "ext", lab_node.ip6, port, proto)
    assert {r.pod for r in got} == BACKENDS
    local = ON_NODE[node]
    assert {r.source_ip for r in got if r.pod == local} == {lab_node.pod_gateway6}
    assert {r.source_ip for r in got if r.pod != local} == {lab_node.ip6}
    served_by_tc(cluster, node, lab_node.ip6, port, proto)


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_ipv6_local_policy_node_port_keeps_the_client(cluster: LabCluster, node: str) -> None:
    ip, port = cluster.net.node(node).ip6, node_port(cluster, "local6")
    got = replies(cluster, "ext", ip, port)
    assert {r.pod for r in got} == {ON_NODE[node]}
    assert {r.source_ip for r in got} == {cluster.net.host("ext").ip6}
    served_by_tc(cluster, node, ip, port)


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_ipv6_node_port_from_a_pod(cluster: LabCluster, node: str) -> None:
    """A pod to the other node's node port (ebpf: tc at that node's LAN interface) and to its own node's. The
    latter is nftables' in ebpf mode too: with bridge-nf-call-ip6tables=1 (the lab's, as most bridge CNIs')
    br_netfilter runs the fallback's prerouting DNAT as the packet enters the pod bridge, before the bridge
    device's tc ingress sees it (IPv4 alike).
    """
    ip, port = cluster.net.node(node).ip6, node_port(cluster, "dual")
    assert {r.pod for r in replies(cluster, "client1", ip, port)} == BACKENDS
    if cluster.mode == "ebpf" and node == "node2":  # type: ignore[attr-defined]
        assert_served_by_tc(cluster, "client1", node, ip, port)


PADDING_DSTOPTS = bytes([0, 0, 1, 4, 0, 0, 0, 0])  # a destination options header holding one PadN option


def test_ipv6_with_an_extension_header_is_left_to_the_nftables_fallback(cluster: LabCluster) -> None:
    """ebpf mode: tc does not walk IPv6 extension headers; such a connection is the fallback's (its conntrack
    entry on the node), not counted by tc, and served all the same.
    """
    if cluster.mode != "ebpf":  # type: ignore[attr-defined]
        pytest.skip("the tc programs are ebpf mode's")
    ip, port = cluster.net.node("node1").ip6, node_port(cluster, "dual")
    frontend = f"[{ip}]:{port}/TCP"
    before = tc_connections(cluster, "node1").get(frontend, 0)
    with cluster.net.socket("ext", socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, PADDING_DSTOPTS)
        sock.settimeout(5)
        sock.connect((ip, port))
        sock.sendall(b"HELLO\n")
        assert sock.recv(4096).split()[0].decode() in BACKENDS
        source_port = sock.getsockname()[1]
        tracked = cluster.net.exec(
            "node1", ["conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--sport", str(source_port)], check=False
        ).stdout
    assert f"dport={port}" in tracked, tracked
    assert tc_connections(cluster, "node1").get(frontend, 0) == before


def test_ipv6_local_policy_node_port_from_a_pod_reaches_every_endpoint(cluster: LabCluster) -> None:
    """Pods are short-circuited to the cluster-policy endpoints (kube-proxy's local-traffic detector); in
    ebpf mode tc leaves the pod's flows (its IPv6 pod-source prefix) to the nftables fallback, which does that.
    """
    got = replies(cluster, "client1", cluster.net.node("node1").ip6, node_port(cluster, "local6"))
    assert {r.pod for r in got} == BACKENDS


def test_ipv6_external_ip_from_outside(cluster: LabCluster) -> None:
    got = replies(cluster, "ext", EXTERNAL_IP6, 80)
    assert {r.pod for r in got} == BACKENDS
    assert cluster.net.host("ext").ip6 not in {r.source_ip for r in got}  # masqueraded
    served_by_tc(cluster, "node1", EXTERNAL_IP6, 80)


def test_ipv6_without_endpoints_is_refused(cluster: LabCluster) -> None:
    # Over veth the first ICMPv6 error can arrive while connect() still owns the socket, and Linux drops it
    # (TcpExtLockDroppedIcmps); the SYN retransmitted after 1 s is refused. Hence the longer timeout.
    error = refused_error(cluster.mode, socket_lb=True)  # type: ignore[attr-defined]
    results = cluster.answers("client1", ip6(cluster, "empty6"), 80, count=5, timeout=3.0)
    assert all(isinstance(r, error) for r in results), results


def _mentions(rules: str, ip: str) -> bool:
    return re.search(rf"(?<![0-9a-f:]){re.escape(ip)}(?![0-9a-f:])", rules) is not None


def test_ipv6_cluster_ips_are_socket_balanced(cluster: LabCluster) -> None:
    """ebpf mode: the socket load balancer translates IPv6 cluster IPs (its per-frontend counters count each
    connection) and the nftables fallback holds none of them, only the node port.
    """
    if cluster.mode != "ebpf":  # type: ignore[attr-defined]
        pytest.skip("only ebpf mode has a socket load balancer")
    ip = ip6(cluster, "counted6")
    results: list[Reply | Exception] = []  # every connection made to counted6 (only here)

    def served() -> bool:
        results.extend(cluster.answers("client1", ip, 80, count=5, timeout=0.5))
        return all(isinstance(r, Reply) for r in results[-5:])

    wait_until(served, timeout=30, what="counted6 served")
    results.extend(cluster.answers("client1", ip, 80, count=30))
    translated = sum(isinstance(r, Reply) for r in results)
    assert {r.pod for r in results[-30:] if isinstance(r, Reply)} == BACKENDS
    counted = ("default/counted6:http", f"[{ip}]:80/TCP")
    wait_until(lambda: connections(cluster, *counted) >= translated, timeout=30, what="the eBPF counter")
    assert connections(cluster, *counted) <= len(results)
    rules = cluster.net.exec("node1", ["nft", "list", "table", "ip6", "kube-proxy"]).stdout
    assert "default/dual/tcp/http" in rules and "dnat to [fd00:244:" in rules  # the node port falls back
    assert not any(_mentions(rules, ip6(cluster, name)) for name in ("dual", "only6", "empty6", "counted6"))


def connections(lab: LabCluster, service: str, frontend: str) -> float:
    """node1's kproxyd_service_connections_total for one Service frontend (0 until it shows)."""
    metrics = lab.http_get("node1", "127.0.0.1", 10249, "/metrics", timeout=10.0)[1]  # a busy CI machine
    labels = f'{{frontend="{frontend}",service="{service}"}}'
    found = re.search(rf"^kproxyd_service_connections_total{re.escape(labels)} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_ipv6_rules_read_like_kube_proxy(cluster: LabCluster) -> None:
    if cluster.mode in ("nftables", "ebpf"):  # type: ignore[attr-defined]  # ebpf: the node port's rules
        rules = cluster.net.exec("node1", ["nft", "list", "table", "ip6", "kube-proxy"]).stdout
        assert "service-" in rules and "default/dual/tcp/http" in rules and "dnat to [fd00:244:" in rules
        return
    nat = cluster.net.exec("node1", ["ip6tables-save", "-t", "nat"]).stdout
    assert (
        '"default/dual:http cluster IP"' in nat
        and "KUBE-SVC-" in nat
        and "DNAT --to-destination [fd00:244:" in nat
    )
