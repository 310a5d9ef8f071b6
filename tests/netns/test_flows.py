"""Packet flows with real traffic: from this source to this Service address, which pods answer, masqueraded?

One lab per proxy mode; every row below runs against each mode unchanged. Sources: pods on both nodes, the
node itself, and an external client on the node network.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply
from tests.netns.expect import assert_served_by_tc, refused_error, wait_for_dataplane

BACKEND_PORTS = [
    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
    {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    {"name": "dns", "containerPort": 8053, "protocol": "UDP"},
]
BACKENDS = {"backend-0", "backend-1", "backend-2"}
NODE_PORT = 30080


def svc(
    name: str, ports: list[dict[str, Any]], selector: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    """A Service in the default namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": selector or {"app": "backend"}, "ports": ports, **spec},
    }


@dataclass(frozen=True)
class Flow:
    """One row: from src to the Service's address, what answers."""

    src: str
    service: str
    port: int
    proto: str = "TCP"
    via: str = "cluster-ip"  # cluster-ip | node1-ip | node2-ip
    expect: frozenset[str] | str = frozenset(BACKENDS)  # the pods that must all answer, or "refused"
    masqueraded: bool | None = None  # None: not checked

    def __str__(self) -> str:
        return f"{self.src}->{self.service}:{self.port}/{self.proto}@{self.via}"


FLOWS = [
    # ClusterIP, port 80 -> targetPort 8080: every endpoint, from pods on either node; the pod IP is kept.
    Flow("client1", "web", 80, masqueraded=False),
    Flow("client2", "web", 80, masqueraded=False),
    Flow("node1", "web", 80),
    # A named targetPort ("http") and a second port of a two-port Service ("metrics" -> 9090).
    Flow("client1", "named", 81, masqueraded=False),
    Flow("client2", "multi", 80, masqueraded=False),
    Flow("client2", "multi", 90, masqueraded=False),
    # A second Service with the same selector reaches the same pods.
    Flow("client1", "web-too", 80, masqueraded=False),
    # UDP ClusterIP.
    Flow("client1", "dns", 53, proto="UDP", masqueraded=False),
    Flow("client2", "dns", 53, proto="UDP", masqueraded=False),
    # NodePort from outside the cluster, at each node's IP: masqueraded (externalTrafficPolicy Cluster).
    Flow("ext", "web-np", NODE_PORT, via="node1-ip", masqueraded=True),
    Flow("ext", "web-np", NODE_PORT, via="node2-ip", masqueraded=True),
    Flow("node1", "web-np", NODE_PORT, via="node1-ip"),
    Flow("client1", "web-np", NODE_PORT, via="node2-ip"),
    # A NodePort Service keeps its cluster IP.
    Flow("client2", "web-np", 80, masqueraded=False),
    # No endpoints: refused at once, on the cluster IP and on node ports, from pods, nodes and outside.
    Flow("client1", "empty", 80, expect="refused"),
    Flow("node2", "empty", 80, expect="refused"),
    Flow("ext", "empty-np", NODE_PORT + 1, via="node1-ip", expect="refused"),
    Flow("client2", "empty", 53, proto="UDP", expect="refused"),
]


@pytest.fixture(scope="module")
def cluster(lab: LabCluster) -> Iterator[LabCluster]:
    """The flows' workload: 3 backends over 2 nodes, client pods on both nodes, the Services, kproxyd."""
    lab.add_pod("backend-0", "node1", {"app": "backend"}, ports=BACKEND_PORTS)
    lab.add_pod("backend-1", "node2", {"app": "backend"}, ports=BACKEND_PORTS)
    lab.add_pod("backend-2", "node1", {"app": "backend"}, ports=BACKEND_PORTS)
    lab.add_pod("client1", "node1", {"app": "client"})
    lab.add_pod("client2", "node2", {"app": "client"})
    http = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    lab.create_service(svc("web", [http]))
    lab.create_service(svc("web-too", [http]))
    lab.create_service(svc("named", [{"name": "http", "port": 81, "targetPort": "http"}]))
    lab.create_service(svc("multi", [http, {"name": "metrics", "port": 90, "targetPort": 9090}]))
    lab.create_service(svc("dns", [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]))
    lab.create_service(svc("web-np", [{**http, "nodePort": NODE_PORT}], type="NodePort"))
    lab.create_service(
        svc("empty", [http, {"name": "dns", "port": 53, "protocol": "UDP"}], selector={"app": "none"})
    )
    lab.create_service(
        svc("empty-np", [{**http, "nodePort": NODE_PORT + 1}], selector={"app": "none"}, type="NodePort")
    )
    for node in ("node1", "node2"):
        lab.start_proxy(node, [f"--proxy-mode={lab.mode}"])  # type: ignore[attr-defined]
    for src in ("client1", "client2"):  # one per node: each node's kproxyd has synced
        wait_until(
            lambda s=src: _reply_or_none(lab, s, _ip(lab, "web", "cluster-ip")),
            timeout=30,
            what=f"kproxyd's first sync seen from {src}",
        )
    wait_for_dataplane(lab, ("node1", "node2"))
    yield lab


def _ip(lab: LabCluster, service: str, via: str) -> str:
    if via == "cluster-ip":
        return str(lab.service(service)["spec"]["clusterIP"])
    return lab.net.node(via.removesuffix("-ip")).ip


def _reply_or_none(lab: LabCluster, src: str, ip: str) -> Reply | None:
    try:
        return lab.request(src, ip, 80, timeout=0.5)
    except OSError:
        return None


def _host_ips(lab: LabCluster, name: str) -> set[str]:
    host = lab.net.host(name)
    return {host.ip}


@pytest.mark.parametrize("flow", FLOWS, ids=str)
def test_flow(cluster: LabCluster, flow: Flow) -> None:
    ip = _ip(cluster, flow.service, flow.via)
    results = cluster.answers(flow.src, ip, flow.port, flow.proto, count=40, timeout=1.0)
    if flow.expect == "refused":
        error = refused_error(cluster.mode, flow.via == "cluster-ip")  # type: ignore[attr-defined]
        assert all(isinstance(r, error) for r in results), [r for r in results if not isinstance(r, error)][:3]
        return
    replies = [r for r in results if isinstance(r, Reply)]
    assert len(replies) == len(results), [r for r in results if not isinstance(r, Reply)][:3]
    assert {r.pod for r in replies} == flow.expect
    if flow.masqueraded is not None:
        client_ips = _host_ips(cluster, flow.src)
        masqueraded = {r.source_ip not in client_ips for r in replies}
        assert masqueraded == {flow.masqueraded}, {r.source_ip for r in replies}


def test_external_frontends_run_in_tc(cluster: LabCluster) -> None:
    if cluster.mode != "ebpf":  # type: ignore[attr-defined]
        pytest.skip("the tc programs are ebpf mode's")
    for node in ("node1", "node2"):
        assert_served_by_tc(cluster, "ext", node, cluster.net.node(node).ip, NODE_PORT)


def test_endpoint_removed_is_never_chosen_again(cluster: LabCluster) -> None:
    cluster.add_pod("gone-0", "node1", {"app": "gone"})
    cluster.add_pod("gone-1", "node2", {"app": "gone"})
    ip = cluster.create_service(
        svc("gone", [{"name": "http", "port": 80, "targetPort": 8080}], selector={"app": "gone"})
    )["spec"]["clusterIP"]
    wait_until(
        lambda: (
            {r.pod for r in cluster.answers("client1", ip, 80, count=20) if isinstance(r, Reply)}
            == {"gone-0", "gone-1"}
        ),
        timeout=20,
        what="both endpoints",
    )
    cluster.delete_pod("gone-1")
    wait_until(
        lambda: all(isinstance(r, Reply) for r in cluster.answers("client2", ip, 80, count=5, timeout=0.5)),
        timeout=20,
        what="convergence after removal",
    )
    results = cluster.answers("client2", ip, 80, count=40)
    assert all(isinstance(r, Reply) and r.pod == "gone-0" for r in results), results[:3]


def test_not_ready_pod_gets_no_traffic_until_ready(cluster: LabCluster) -> None:
    cluster.add_pod("flaky-0", "node2", {"app": "flaky"})
    cluster.add_pod("flaky-1", "node1", {"app": "flaky"}, ready=False)
    ip = cluster.create_service(
        svc("flaky", [{"name": "http", "port": 80, "targetPort": 8080}], selector={"app": "flaky"})
    )["spec"]["clusterIP"]
    wait_until(
        lambda: all(isinstance(r, Reply) for r in cluster.answers("client1", ip, 80, count=5, timeout=0.5)),
        timeout=20,
        what="flaky service",
    )
    assert {r.pod for r in cluster.answers("client1", ip, 80, count=30) if isinstance(r, Reply)} == {"flaky-0"}
    cluster.set_pod_ready("flaky-1", True)
    wait_until(
        lambda: "flaky-1" in {r.pod for r in cluster.answers("client1", ip, 80, count=20) if isinstance(r, Reply)},
        timeout=20,
        what="flaky-1 becoming an endpoint",
    )


def test_iptables_save_reads_like_kube_proxy(cluster: LabCluster) -> None:
    if cluster.mode != "iptables":  # type: ignore[attr-defined]
        pytest.skip("iptables-save layout applies to iptables mode only")
    nat = cluster.iptables_save("node1", "nat")
    services = [line for line in nat.splitlines() if line.startswith("-A KUBE-SERVICES ")]
    assert any('--comment "default/web:http cluster IP"' in line and "-j KUBE-SVC-" in line for line in services)
    assert "-j KUBE-NODEPORTS" in nat and "KUBE-MARK-MASQ" in nat and "KUBE-POSTROUTING" in nat
    assert any(line.startswith(":KUBE-SVC-") for line in nat.splitlines())
    assert any(line.startswith(":KUBE-SEP-") for line in nat.splitlines())
    filt = cluster.iptables_save("node1", "filter")
    assert '"default/empty:http has no endpoints"' in filt and "-j REJECT" in filt
