"""kube-proxy's Service semantics with real packets: load balancers, external IPs, affinity, traffic policies,
terminating endpoints, topology, masquerading, REJECT/DROP, labels. One row per flow, every proxy mode.

Lab: node1 (zone-a) runs backend-0, backend-2, only1-*; node2 (zone-b) runs backend-1. client1 is a pod on
node1, client2 a pod on node2, ext (172.28.0.200) and ext2 (172.28.0.201) are machines on the node network.
Load-balancer and external IPs live in 172.29.0.0/24, routed by the outside world to node1.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import TIME_SCALE, Reply
from kproxyd.lab.nsutil import socket_in_netns
from tests.netns.expect import assert_served_by_tc, dropped_error, masqueraded, refused_error, wait_for_dataplane

BACKENDS = frozenset({"backend-0", "backend-1", "backend-2"})
ON_NODE1 = frozenset({"backend-0", "backend-2"})
ONLY1 = frozenset({"only1-0", "only1-1"})
HTTP = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
LB_IP, LB_RANGES_IP, EXTERNAL_IP, EMPTY_LB_IP, EMPTY_EXTERNAL_IP, ONLY1_LB_IP = (
    "172.29.0.10",
    "172.29.0.11",
    "172.29.0.20",
    "172.29.0.30",
    "172.29.0.31",
    "172.29.0.40",
)
EXT, EXT2 = "172.28.0.200", "172.28.0.201"


def svc(name: str, app: str = "backend", ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """A Service in the default namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": app}, "ports": ports or [HTTP], **spec},
    }


@dataclass(frozen=True)
class Flow:
    """From src to dst:port, which pods answer ("refused" / "dropped" when none), and whether SNATed."""

    src: str
    dst: str  # an IP, or "<service>" for its cluster IP, or "<node>:<service>" for its node port on a node
    port: int | None = 80  # None: the Service's node port
    expect: frozenset[str] | str = BACKENDS
    masqueraded: bool | None = None
    proto: str = "TCP"
    ipvs: frozenset[str] | str | None = None  # what kube-proxy's IPVS mode does instead, where it differs

    def expected(self, mode: str) -> frozenset[str] | str:
        """The expectation in a proxy mode."""
        return self.ipvs if mode == "ipvs" and self.ipvs is not None else self.expect

    def __str__(self) -> str:
        return f"{self.src}->{self.dst}:{self.port or 'nodePort'}/{self.proto}"


FLOWS = [
    # LoadBalancer ingress IP, from outside and from inside; masqueraded (externalTrafficPolicy Cluster).
    Flow("ext", LB_IP, masqueraded=True),
    Flow("client1", LB_IP, masqueraded=True),  # kube-proxy SNATs pod traffic to external addresses too
    Flow("node1", LB_IP),
    # loadBalancerSourceRanges: ext is allowed, ext2 is dropped; the node port is not filtered.
    Flow("ext", LB_RANGES_IP),
    Flow("ext2", LB_RANGES_IP, expect="dropped"),
    Flow("ext2", "node1:lb-ranges", port=None),
    # externalIPs.
    Flow("ext", EXTERNAL_IP, masqueraded=True),
    Flow("client2", EXTERNAL_IP, masqueraded=True),
    # externalTrafficPolicy Local: only this node's endpoints, client source kept; DROP where none.
    Flow("ext", "node1:etp-local", port=None, expect=ON_NODE1, masqueraded=False),
    Flow("ext", "node2:etp-local", port=None, expect=frozenset({"backend-1"}), masqueraded=False),
    # IPVS: the node port's virtual service has no real server, and IPVS answers port unreachable.
    Flow("ext", "node2:only1-lb", port=None, expect="dropped", ipvs="refused"),
    Flow("ext", "node1:only1-lb", port=None, expect=ONLY1, masqueraded=False),
    Flow("ext", ONLY1_LB_IP, expect=ONLY1, masqueraded=False),
    # ...while pods and the node itself are short-circuited to every endpoint (not in kube-proxy's IPVS
    # mode: a virtual service has one set of real servers whatever the source, here none).
    Flow("client2", "node2:only1-lb", port=None, expect=ONLY1, ipvs="refused"),
    Flow("node2", "node2:only1-lb", port=None, expect=ONLY1, ipvs="refused"),
    Flow("client1", "only1-lb", expect=ONLY1, masqueraded=False),
    Flow("client1", "node1:etp-local", port=None, ipvs=ON_NODE1),  # a pod, where local endpoints exist too
    # internalTrafficPolicy Local: cluster traffic to this node's endpoints only, DROP where none.
    Flow("client1", "itp-local", expect=ON_NODE1, masqueraded=False),
    Flow("client2", "itp-local", expect=frozenset({"backend-1"}), masqueraded=False),
    Flow("client2", "itp-only1", expect="dropped", ipvs="refused"),  # IPVS: no real server, port unreachable
    Flow("client1", "itp-only1", expect=ONLY1),
    # Topology (trafficDistribution: PreferClose): each zone keeps its traffic.
    Flow("client1", "topology", expect=ON_NODE1),
    Flow("client2", "topology", expect=frozenset({"backend-1"})),
    # Masquerade: traffic from outside the pod network to a cluster IP is SNATed; pod traffic is not.
    Flow("ext", "web", masqueraded=True),
    Flow("client2", "web", masqueraded=False),
    # No endpoints: REJECT on every frontend.
    Flow("client1", "empty", expect="refused"),
    Flow("ext", EMPTY_LB_IP, expect="refused"),
    Flow("ext", EMPTY_EXTERNAL_IP, expect="refused"),
    Flow("ext", "node1:empty", port=None, expect="refused"),
    Flow("client1", EMPTY_LB_IP, expect="refused"),
    # A cluster IP on a port (or protocol) it does not serve: REJECT, not a hang.
    Flow("client1", "web", port=81, expect="refused"),
    Flow("client2", "web", proto="UDP", expect="refused"),
    # Services another proxy owns (service-proxy-name label) are not ours: nothing programmed.
    Flow("client1", "other-proxy", expect="dropped"),
]


@pytest.fixture(scope="module")
def cluster(lab: LabCluster) -> Iterator[LabCluster]:
    """The workload above, with kproxyd on both nodes."""
    lab.set_node_zone("node1", "zone-a")
    lab.set_node_zone("node2", "zone-b")
    lab.add_external_client("ext2")
    for host in ("ext", "ext2"):
        lab.route_from_outside("172.29.0.0/24", "node1", host)
        lab.route_from_outside("10.96.0.0/16", "node1", host)
    lab.add_pod("backend-0", "node1", {"app": "backend"})
    lab.add_pod("backend-1", "node2", {"app": "backend"})
    lab.add_pod("backend-2", "node1", {"app": "backend"})
    lab.add_pod("only1-0", "node1", {"app": "only1"})
    lab.add_pod("only1-1", "node1", {"app": "only1"})
    lab.add_pod("client1", "node1", {"app": "client"})
    lab.add_pod("client2", "node2", {"app": "client"})
    lab.create_service(svc("web"))
    lab.create_service(svc("lb", type="LoadBalancer"))
    lab.create_service(svc("lb-ranges", type="LoadBalancer", loadBalancerSourceRanges=[f"{EXT}/32"]))
    lab.create_service(svc("ext-ip", externalIPs=[EXTERNAL_IP]))
    lab.create_service(svc("etp-local", type="NodePort", externalTrafficPolicy="Local"))
    lab.create_service(svc("only1-lb", "only1", type="LoadBalancer", externalTrafficPolicy="Local"))
    lab.create_service(svc("itp-local", internalTrafficPolicy="Local"))
    lab.create_service(svc("itp-only1", "only1", internalTrafficPolicy="Local"))
    lab.create_service(svc("topology", trafficDistribution="PreferClose"))
    lab.create_service(svc("empty", "nothing", type="LoadBalancer", externalIPs=[EMPTY_EXTERNAL_IP]))
    lab.create_service(svc("affinity", sessionAffinity="ClientIP"))
    headless = svc("headless", clusterIP="None")
    lab.create_service(headless)
    other = svc("other-proxy")
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "someone-else"}
    lab.create_service(other)
    for name, ip in (
        ("lb", LB_IP),
        ("lb-ranges", LB_RANGES_IP),
        ("empty", EMPTY_LB_IP),
        ("only1-lb", ONLY1_LB_IP),
    ):
        lab.set_load_balancer(name, [ip])
    for node in ("node1", "node2"):
        lab.start_proxy(node, [f"--proxy-mode={lab.mode}"])  # type: ignore[attr-defined]
    for src in ("client1", "client2"):
        wait_until(
            lambda s=src: all_answer(lab, s, cluster_ip(lab, "topology"), 80),
            timeout=30,
            what=f"first sync seen from {src}",
        )
    wait_for_dataplane(lab, ("node1", "node2"))
    yield lab


def cluster_ip(lab: LabCluster, name: str) -> str:
    return str(lab.service(name)["spec"]["clusterIP"])


def node_port(lab: LabCluster, name: str) -> int:
    return int(lab.service(name)["spec"]["ports"][0]["nodePort"])


def pods_seen(lab: LabCluster, src: str, ip: str, count: int = 20) -> set[str]:
    """The pods that answered count requests from src to ip:80."""
    return {r.pod for r in lab.answers(src, ip, 80, count=count, timeout=0.5) if isinstance(r, Reply)}


def all_answer(lab: LabCluster, src: str, ip: str, port: int, count: int = 6) -> bool:
    return all(isinstance(r, Reply) for r in lab.answers(src, ip, port, count=count, timeout=0.5))


def resolve(lab: LabCluster, flow: Flow) -> tuple[str, int]:
    """The flow's destination address and port."""
    if ":" in flow.dst:
        node, service = flow.dst.split(":")
        return lab.net.node(node).ip, flow.port or node_port(lab, service)
    if flow.dst[0].isdigit():
        return flow.dst, flow.port or 80
    return cluster_ip(lab, flow.dst), flow.port or 80


def source_ip(lab: LabCluster, src: str) -> str:
    return {"ext": EXT, "ext2": EXT2}.get(src) or lab.net.host(src).ip


@pytest.mark.parametrize("flow", FLOWS, ids=str)
def test_flow(cluster: LabCluster, flow: Flow) -> None:
    ip, port = resolve(cluster, flow)
    expect = flow.expected(cluster.mode)  # type: ignore[attr-defined]
    count = 8 if isinstance(expect, str) else 40
    results = cluster.answers(flow.src, ip, port, flow.proto, count=count, timeout=0.7)
    mode = cluster.mode  # type: ignore[attr-defined]
    cluster_ip = flow.dst in cluster_ip_flows()
    if flow.src.startswith("ext") and cluster_ip and mode == "ebpf":
        # The socket load balancer serves local sockets only: cluster IPs are not offered to traffic routed
        # in from outside the node (as Cilium's default, bpf-lb-external-clusterip=false). Nothing answers.
        assert all(isinstance(r, TimeoutError) for r in results), results[:3]
        return
    socket_lb = cluster_ip or socket_balanced(cluster, flow)
    if expect == "refused":
        error = refused_error(mode, socket_lb)
        assert all(isinstance(r, error) for r in results), results[:3]
        return
    if expect == "dropped":
        error = dropped_error(mode, socket_lb and flow.dst != "other-proxy")
        assert all(isinstance(r, error) for r in results), results[:3]
        return
    errors = [r for r in results if not isinstance(r, Reply)]
    assert not errors, errors[:3]
    replies = [r for r in results if isinstance(r, Reply)]
    assert {r.pod for r in replies} == expect
    if flow.masqueraded is not None:
        kept = {r.source_ip == source_ip(cluster, flow.src) for r in replies}
        assert kept == {not masqueraded(mode, flow.masqueraded, socket_lb)}, {r.source_ip for r in replies}


def socket_balanced(lab: LabCluster, flow: Flow) -> bool:
    """True for an external frontend the ebpf mode's socket load balancer holds for flow's source: a process
    of a node (the node, or a pod on it) dialing that node's IP at a node port, or an external or LB IP
    (loadBalancerSourceRanges ones stay with the nftables fallback).
    """
    if flow.src.startswith("ext") or flow.dst == LB_RANGES_IP:
        return False
    if ":" in flow.dst:
        pods = {pod.name: pod.node for pod in lab.net.pods}
        return flow.dst.split(":")[0] == pods.get(flow.src, flow.src)
    return flow.dst[0].isdigit()


def cluster_ip_flows() -> set[str]:
    """The Flow.dst values that name a Service's cluster IP."""
    return {flow.dst for flow in FLOWS if ":" not in flow.dst and not flow.dst[0].isdigit()}


def test_external_frontends_run_in_tc(cluster: LabCluster) -> None:
    if cluster.mode != "ebpf":  # type: ignore[attr-defined]
        pytest.skip("the tc programs are ebpf mode's")
    for ip in (LB_IP, EXTERNAL_IP, ONLY1_LB_IP):  # routed to node1 by the outside world
        assert_served_by_tc(cluster, "ext", "node1", ip, 80)
    for node in ("node1", "node2"):
        assert_served_by_tc(cluster, "ext", node, cluster.net.node(node).ip, node_port(cluster, "etp-local"))


def test_session_affinity_keeps_each_client_on_one_endpoint(cluster: LabCluster) -> None:
    ip = cluster_ip(cluster, "affinity")
    for src in ("client1", "client2", "node1"):
        pods = collections.Counter(r.pod for r in cluster.answers(src, ip, 80, count=25) if isinstance(r, Reply))
        assert len(pods) == 1 and sum(pods.values()) == 25, (src, pods)


def test_hairpin_is_masqueraded(cluster: LabCluster) -> None:
    backend0 = cluster.net.pod("backend-0").ip
    replies = [
        r for r in cluster.answers("backend-0", cluster_ip(cluster, "web"), 80, count=40) if isinstance(r, Reply)
    ]
    assert {r.pod for r in replies} == BACKENDS
    if cluster.mode == "ebpf":  # type: ignore[attr-defined]
        # No NAT at all: connect() went straight to the pod itself, which sees its own address.
        assert all(r.source_ip == backend0 for r in replies)
        return
    assert all(r.source_ip != backend0 for r in replies if r.pod == "backend-0")  # reached itself: SNATed
    assert all(r.source_ip == backend0 for r in replies if r.pod != "backend-0")


def test_health_check_node_port(cluster: LabCluster) -> None:
    port = int(cluster.service("only1-lb")["spec"]["healthCheckNodePort"])
    for node, status, count in (("node1", 200, 2), ("node2", 503, 0)):
        ip = cluster.net.node(node).ip
        got, body = wait_until(lambda ip=ip: _http(cluster, ip, port), timeout=10, what="health check port")
        service = {"namespace": "default", "name": "only1-lb"}
        assert (got, json.loads(body)) == (
            status,
            {"service": service, "localEndpoints": count, "serviceProxyHealthy": True},
        ), node


def _http(lab: LabCluster, ip: str, port: int) -> tuple[int, str] | None:
    try:
        return lab.http_get("ext", ip, port, "/")
    except OSError:
        return None


def test_terminating_endpoints_used_only_when_none_ready(cluster: LabCluster) -> None:
    cluster.add_pod("term-0", "node1", {"app": "term"})
    cluster.add_pod("term-1", "node2", {"app": "term"})
    ip = cluster.create_service(svc("term", "term"))["spec"]["clusterIP"]

    def pods() -> set[str]:
        return pods_seen(cluster, "client1", ip)

    wait_until(lambda: pods() == {"term-0", "term-1"}, timeout=20, what="both endpoints")
    cluster.terminate_pod("term-0")
    wait_until(lambda: pods() == {"term-1"}, timeout=20, what="terminating endpoint dropped while one is ready")
    cluster.terminate_pod("term-1")
    wait_until(lambda: pods() == {"term-0", "term-1"}, timeout=20, what="serving terminating endpoints used")
    cluster.set_pod_ready("term-0", False)  # terminating and no longer serving: never used
    wait_until(lambda: pods() == {"term-1"}, timeout=20, what="non-serving endpoint dropped")


def test_node_zone_change_resyncs_topology(cluster: LabCluster) -> None:
    ip = cluster_ip(cluster, "topology")

    def pods() -> set[str]:
        return pods_seen(cluster, "client2", ip)

    assert pods() == {"backend-1"}
    cluster.set_node_zone("node2", "zone-a")  # every endpoint is in zone-a now
    wait_until(lambda: pods() == BACKENDS, timeout=20, what="topology after the node's zone changed")
    cluster.set_node_zone("node2", "zone-b")
    wait_until(lambda: pods() == {"backend-1"}, timeout=20, what="topology restored")


def test_node_port_on_localhost(cluster: LabCluster) -> None:
    """iptables mode answers 127.0.0.1:NodePort (route_localnet, set inside the node only), as kube-proxy."""
    if cluster.mode != "iptables":  # type: ignore[attr-defined]
        pytest.skip("node ports on localhost are offered in iptables mode only, as kube-proxy")
    port = node_port(cluster, "lb")
    pods = {r.pod for r in cluster.answers("node1", "127.0.0.1", port, count=20) if isinstance(r, Reply)}
    assert pods == BACKENDS
    sysctl = ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]
    assert cluster.net.exec("node1", sysctl).stdout.strip() == "1"
    assert "KUBE-FIREWALL" in cluster.iptables_save("node1", "filter")


def test_headless_and_foreign_services_program_nothing(cluster: LabCluster) -> None:
    if cluster.mode == "ipvs":  # type: ignore[attr-defined]
        # IPVS mode's rules name no Service: what is programmed is the service IPs on kube-ipvs0.
        bound = ipvs_addresses(cluster, "node1")
        assert cluster_ip(cluster, "web") in bound
        assert cluster_ip(cluster, "other-proxy") not in bound and len(bound) == len(set(bound))
    else:
        rules = cluster.ruleset("node1")
        if cluster.mode != "ebpf":  # type: ignore[attr-defined]
            assert "default/web" in rules  # ebpf's maps hold addresses, not names (web's cluster IP is eBPF's)
        assert "default/headless" not in rules
        assert "default/other-proxy" not in rules
    assert "error" not in cluster.proxy_log("node1").lower()


def ipvs_addresses(lab: LabCluster, node: str) -> list[str]:
    """The addresses on a node's kube-ipvs0 (IPVS mode)."""
    out = lab.net.exec(node, ["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def ipvs_real_servers(lab: LabCluster, node: str, proto: str, ip: str, port: int) -> int:
    """How many real servers a node's IPVS virtual service has (0 when it has none or is not there yet)."""
    wanted = f"{proto} {socket.inet_aton(ip).hex().upper()}:{port:04X}"
    count, inside = 0, False
    for line in lab.net.exec(node, ["cat", "/proc/net/ip_vs"]).stdout.splitlines():
        if not line.startswith(" "):
            inside = line.split()[:2] == wanted.split()
        elif inside and line.strip().startswith("->"):
            count += 1
    return count


def test_sctp_service(cluster: LabCluster) -> None:
    """SCTP Services are programmed; with SCTP sockets in the kernel, traffic flows too."""
    sctp = {"name": "sctp", "port": 7777, "targetPort": 7777, "protocol": "SCTP"}
    ip = cluster.create_service(svc("sctp", ports=[sctp]))["spec"]["clusterIP"]
    if cluster.mode == "ipvs":  # type: ignore[attr-defined]
        wait_until(
            lambda: ipvs_real_servers(cluster, "node1", "SCTP", ip, 7777) == len(BACKENDS),
            timeout=20,
            what="SCTP virtual service and its real servers",
        )
    else:
        wait_until(lambda: "default/sctp" in cluster.ruleset("node1"), timeout=20, what="SCTP Service rules")
        lines = [
            line.replace("default/sctp", "")
            for line in cluster.ruleset("node1").splitlines()
            if "default/sctp" in line
        ]
        assert any("sctp" in line for line in lines), lines  # the rules match the SCTP protocol
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as err:
        pytest.skip(f"rules checked; no SCTP traffic test: this kernel has no SCTP sockets ({err.strerror})")
    servers = [_sctp_server(cluster, pod) for pod in sorted(BACKENDS)]
    try:
        seen = {_sctp_request(cluster, "client1", ip) for _ in range(30)}
    finally:
        for server in servers:
            server.close()
    assert seen == BACKENDS


def _sctp_server(lab: LabCluster, pod: str) -> socket.socket:
    listener = socket_in_netns(lab.net.pod(pod).netns, socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    listener.bind(("0.0.0.0", 7777))
    listener.listen(16)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(pod.encode())

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _sctp_request(lab: LabCluster, src: str, ip: str) -> str:
    sock = socket_in_netns(lab.net.host(src).netns, socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    with sock:
        # SCTP retransmits a lost INIT after RTO.initial (3 s), TCP a SYN after 1 s: room for one retransmit.
        sock.settimeout(4 * TIME_SCALE)
        sock.connect((ip, 7777))
        return sock.recv(100).decode()
