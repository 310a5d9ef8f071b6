"""The lab network itself, proved with real packets between namespaces (no kproxyd involved)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest

from kproxyd.lab import nsutil
from kproxyd.lab.netlab import STATE_DIR, LabPod, NetLab, Reply

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to build network namespaces"),
]


def root_netns_snapshot() -> tuple[str, str, str]:
    """The root namespace's addresses and routes (v4 and v6), which the lab must never change."""
    addr, route, route6 = (nsutil.run(["ip", *args]).stdout for args in (["addr"], ["route"], ["-6", "route"]))
    return addr, route, route6


def lab_namespaces(prefix: str) -> list[str]:
    """Namespaces (by name) carrying a lab's prefix."""
    return [ns for ns in os.listdir(nsutil.NETNS_RUN_DIR) if ns.startswith(prefix + "-")]


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    """Two nodes, pods a and b on node1, c on node2, and an external client; root namespace untouched."""
    before = root_netns_snapshot()
    with NetLab() as lab:
        lab.add_node("node1")
        lab.add_node("node2")
        lab.add_pod("node1", "a", tcp_ports=(8080, 9090), udp_ports=(5353,))
        lab.add_pod("node1", "b", tcp_ports=(8080,), udp_ports=(5353,))
        lab.add_pod("node2", "c-with-a-rather-long-pod-name-0123456789", tcp_ports=(8080,), udp_ports=(5353,))
        lab.add_external_client()
        yield lab
    assert root_netns_snapshot() == before
    assert lab_namespaces(lab.prefix) == []


def pod(lab: NetLab, name: str) -> LabPod:
    """A pod of the module lab by name (the long one is called "c" in tests)."""
    return lab.pod("c-with-a-rather-long-pod-name-0123456789" if name == "c" else name)


def test_addresses_and_routes(lab: NetLab) -> None:
    node1, node2 = lab.nodes
    assert (node1.ip, node1.pod_cidr, node1.gateway) == ("172.28.0.11", "10.244.1.0/24", "172.28.0.1")
    assert (node2.ip, node2.pod_cidr) == ("172.28.0.12", "10.244.2.0/24")
    assert (pod(lab, "a").ip, pod(lab, "b").ip, pod(lab, "c").ip) == ("10.244.1.2", "10.244.1.3", "10.244.2.2")
    assert lab.host("ext").ip == "172.28.0.200"
    routes = lab.exec("node1", ["ip", "route"]).stdout
    assert "default via 172.28.0.1" in routes and "10.244.2.0/24 via 172.28.0.12" in routes
    sysctl = lab.exec("node1", ["sysctl", "-n", "net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"])
    assert sysctl.stdout.split() == ["1", "1"]
    assert all(len(ns) <= 40 and ns.startswith(lab.prefix + "-") for ns in lab_namespaces(lab.prefix))


def test_pod_to_pod_same_node(lab: NetLab) -> None:
    reply = lab.request("a", pod(lab, "b").ip, 8080)
    assert (reply.pod, reply.source_ip) == ("b", pod(lab, "a").ip)


def test_pod_to_pod_across_nodes_tcp_and_udp(lab: NetLab) -> None:
    c = pod(lab, "c")
    for proto, port in (("TCP", 8080), ("UDP", 5353)):
        reply = lab.request("a", c.ip, port, proto)
        assert (reply.pod, reply.source_ip) == (c.name, pod(lab, "a").ip)
        back = lab.request(c.name, pod(lab, "a").ip, port if proto == "TCP" else 5353, proto)
        assert (back.pod, back.source_ip) == ("a", c.ip)


def test_node_to_pods(lab: NetLab) -> None:
    """A node reaches its own pods from cbr0's address and other nodes' pods from its eth0 address."""
    assert lab.request("node1", pod(lab, "a").ip, 8080).source_ip == "10.244.1.1"
    assert lab.request("node1", pod(lab, "c").ip, 8080).source_ip == "172.28.0.11"


def test_external_client_reaches_nodes_not_pods(lab: NetLab) -> None:
    """The LAN gateway does not forward, so pod IPs are unreachable from outside: the packets vanish."""
    with pytest.raises(ConnectionRefusedError):  # the node answers: nothing listens on port 80 there
        lab.request("ext", "172.28.0.11", 80)
    with pytest.raises(TimeoutError):
        lab.request("ext", pod(lab, "a").ip, 8080, timeout=0.3)


def test_closed_port_is_refused_quickly(lab: NetLab) -> None:
    for proto in ("TCP", "UDP"):
        for _ in range(5):  # repeatedly: ICMP answers must not be rate-limited
            start = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                lab.request("a", pod(lab, "c").ip, 7, proto)
            assert time.monotonic() - start < 0.2


def test_source_port_and_request_many(lab: NetLab) -> None:
    assert lab.request("a", pod(lab, "b").ip, 8080, source_port=40123).source_port == 40123
    results = lab.request_many("b", pod(lab, "a").ip, 9090, "TCP", count=5)
    assert all(isinstance(r, Reply) and r.pod == "a" for r in results)
    assert len({r.source_port for r in results if isinstance(r, Reply)}) == 5
    refused = lab.request_many("b", pod(lab, "a").ip, 7, "UDP", count=2)
    assert all(isinstance(r, ConnectionRefusedError) for r in refused)


def test_pod_server_speaks_http(lab: NetLab) -> None:
    a = pod(lab, "a")
    with nsutil.socket_in_netns(lab.host("b").netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect((a.ip, 8080))
        client_port = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: test\r\n\r\n")
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.0 200 OK\r\n")
    assert response.endswith(f"\r\n\r\na {pod(lab, 'b').ip} {client_port}\n".encode())


def test_removed_pod_stops_answering_and_its_ip_is_not_reused_at_once(lab: NetLab) -> None:
    d = lab.add_pod("node2", "d")
    assert lab.request("a", d.ip, 8080).pod == "d"
    lab.remove_pod("d")
    assert not nsutil.netns_exists(d.netns)
    with pytest.raises(TimeoutError):
        lab.request("a", d.ip, 8080, timeout=0.3)
    e = lab.add_pod("node2", "e")
    assert e.ip != d.ip
    lab.remove_pod("e")


def test_pod_bridge_keeps_its_mac_as_pods_come_and_go(lab: NetLab) -> None:
    """A bridge takes its lowest port's MAC unless set; pods caching the old gateway MAC would go deaf."""

    def cbr0_mac() -> str:
        return str(json.loads(lab.exec("node1", ["ip", "-j", "link", "show", "cbr0"]).stdout)[0]["address"])

    before = cbr0_mac()
    assert lab.request("a", pod(lab, "c").ip, 8080).pod.startswith("c-")  # a caches its gateway's MAC
    lab.add_pod("node1", "low")
    ports = json.loads(lab.exec("node1", ["ip", "-j", "link", "show", "master", "cbr0"]).stdout)
    newest = max(ports, key=lambda port: port["ifindex"])["ifname"]
    lab.exec("node1", ["ip", "link", "set", newest, "address", "00:00:5e:00:53:01"])  # lower than any port
    try:
        assert cbr0_mac() == before
        assert lab.request("a", pod(lab, "c").ip, 8080, timeout=1).pod.startswith("c-")
    finally:
        lab.remove_pod("low")
    assert cbr0_mac() == before


def test_close_removes_everything() -> None:
    lab = NetLab()
    lab.add_node("n")
    p = lab.add_pod("n", "p")
    server = lab.popen("n", ["sleep", "60"])
    pids = nsutil.netns_pids(p.netns)
    assert pids and lab_namespaces(lab.prefix)
    lab.close()
    lab.close()  # idempotent
    assert lab_namespaces(lab.prefix) == []
    assert server.poll() is not None
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not os.path.exists(os.path.join(STATE_DIR, lab.prefix + ".json"))


def test_stale_lab_of_dead_process_is_cleaned_up() -> None:
    prefix = next(
        f"kp{i:04x}"
        for i in range(0xFFFF, 0, -1)
        if not lab_namespaces(f"kp{i:04x}") and not os.path.exists(f"{STATE_DIR}/kp{i:04x}.json")
    )
    netns = f"{prefix}-lan"
    nsutil.run(["ip", "netns", "add", netns])
    state = os.path.join(STATE_DIR, prefix + ".json")
    try:
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(state, "x") as f:
            json.dump({"prefix": prefix, "pid": 2**22 + 1, "start": "1"}, f)  # beyond pid_max: dead
        with NetLab():
            assert not nsutil.netns_exists(netns)
            assert not os.path.exists(state)
    finally:
        nsutil.run(["ip", "netns", "del", netns], check=False)
        if os.path.exists(state):
            os.unlink(state)
