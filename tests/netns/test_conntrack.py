"""UDP conntrack cleanup with real packets: the cleaner on its own, then stale flows healed by kproxyd's sync."""

from __future__ import annotations

import json
import secrets
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply
from kproxyd.lab.nsutil import ip_in, run, run_in_netns, socket_in_netns

pytestmark = pytest.mark.netns

BACKEND = "10.0.0.1"
VIPS = ("10.96.0.10", "10.96.0.11")
DNS_PORTS = [{"name": "dns", "containerPort": 8053, "protocol": "UDP"}]
LATE_CLUSTER_IP = "10.96.222.53"
# Runs the cleaner inside a namespace (`ip netns exec`), so its netlink socket lives there.
CLEAN = (
    "import json, sys; from kproxyd.conntrack import ConntrackCleaner, FlowFilter;"
    " from kproxyd.model import Protocol;"
    " print(ConntrackCleaner().delete([FlowFilter(Protocol.UDP, *f) for f in json.loads(sys.argv[1])]))"
)


@pytest.fixture
def scratch() -> Iterator[str]:
    """A namespace where UDP to VIPS:53 is DNATed (nat OUTPUT) to a local server at BACKEND:5353."""
    netns = f"kpct-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", netns])
    try:
        ip_in(netns, "link", "set", "lo", "up")
        ip_in(netns, "link", "add", "ct0", "type", "veth", "peer", "name", "ct1")
        ip_in(netns, "addr", "add", f"{BACKEND}/24", "dev", "ct0")
        ip_in(netns, "link", "set", "ct1", "up")
        ip_in(netns, "link", "set", "ct0", "up")
        ip_in(netns, "route", "add", "10.96.0.0/16", "dev", "ct0")
        for vip in VIPS:
            dnat = ["-p", "udp", "-d", vip, "--dport", "53", "-j", "DNAT", "--to-destination", f"{BACKEND}:5353"]
            run_in_netns(netns, ["iptables-nft", "-t", "nat", "-A", "OUTPUT", *dnat])
        yield netns
    finally:
        run(["ip", "netns", "del", netns], check=False)


def _exchange(netns: str, vip: str, source_port: int) -> None:
    """One UDP request/answer from source_port to vip:53, through the DNAT."""
    with (
        socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.settimeout(2)
        client.settimeout(2)
        server.bind((BACKEND, 5353))
        client.bind((BACKEND, source_port))
        client.sendto(b"ping", (vip, 53))
        data, peer = server.recvfrom(64)
        server.sendto(data, peer)
        assert client.recvfrom(64)[1] == (vip, 53)


def _flows(netns: str) -> set[tuple[str, int]]:
    """(original destination, source port) of the namespace's UDP conntrack entries."""
    out = run_in_netns(netns, ["conntrack", "-L", "-p", "udp"], check=False).stdout
    flows = set()
    for line in out.splitlines():
        orig = dict(reversed([f.split("=", 1) for f in line.split() if "=" in f]))  # first of each key wins
        flows.add((orig["dst"], int(orig["sport"])))
    return flows


def _clean(netns: str, *filters: tuple[Any, ...]) -> int:
    return int(run_in_netns(netns, [sys.executable, "-c", CLEAN, json.dumps(filters)]).stdout.split()[-1])


def test_cleaner_deletes_only_matching_entries(scratch: str) -> None:
    _exchange(scratch, VIPS[0], 40001)
    _exchange(scratch, VIPS[1], 40002)
    assert _flows(scratch) == {(VIPS[0], 40001), (VIPS[1], 40002)}
    assert _clean(scratch, (53, VIPS[0], "10.0.0.99")) == 0  # another endpoint answered
    assert _clean(scratch, (53, VIPS[0], BACKEND)) == 1
    assert _flows(scratch) == {(VIPS[1], 40002)}
    assert _clean(scratch, (53, None, BACKEND)) == 1  # a node-port style filter: any destination
    assert _flows(scratch) == set()


# With kproxyd: a client keeps its source port across the change and must reach a live endpoint.


def svc(name: str, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    """A UDP Service, port 53 -> dns."""
    ports = [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": selector, "ports": ports, **spec},
    }


@pytest.fixture(scope="module")
def cluster(lab: LabCluster) -> Iterator[LabCluster]:
    """kproxyd on both nodes and a client pod on node1."""
    if lab.mode == "ebpf":  # type: ignore[attr-defined]
        pytest.skip(
            "ebpf translates every UDP connect()/sendmsg() afresh: cluster-IP flows are never NATed, so there"
            " are no conntrack entries to clean; its counterpart, destroying the sockets connected to a removed"
            " endpoint, is tests/netns/test_ebpf.py::test_connected_udp_socket_to_a_removed_backend_is_destroyed"
        )
    lab.add_pod("ct-client", "node1", {"app": "ct-client"})
    for node in ("node1", "node2"):
        lab.start_proxy(node, [f"--proxy-mode={lab.mode}"])  # type: ignore[attr-defined]
    # Once kproxyd's nat rules (or nat table) exist, conntrack tracks node1's traffic.
    mode = lab.mode  # type: ignore[attr-defined]
    _wait_for_rule(lab, "-A KUBE-SERVICES" if mode == "iptables" else "table ip kube-proxy")
    yield lab


def _wait_for_rule(lab: LabCluster, text: str) -> None:
    """Wait until node1's rules contain text (without sending traffic)."""
    wait_until(lambda: text in lab.ruleset("node1"), what=f"{text!r} on node1")


def _send(lab: LabCluster, ip: str, source_port: int) -> Reply | Exception:
    try:
        return lab.net.request("ct-client", ip, 53, "UDP", timeout=0.3, source_port=source_port)
    except OSError as exc:
        return exc


def _answered_by(lab: LabCluster, ip: str, source_port: int, pod: str) -> bool:
    reply = _send(lab, ip, source_port)
    return isinstance(reply, Reply) and reply.pod == pod


def test_removed_endpoint_flow_moves_to_a_live_pod(cluster: LabCluster) -> None:
    pods = [
        cluster.add_pod(f"ct-{x}", f"node{n}", {"app": "ct"}, ports=DNS_PORTS) for x, n in (("a", 1), ("b", 2))
    ]
    ip = cluster.create_service(svc("ct-removed", {"app": "ct"}))["spec"]["clusterIP"]
    for pod in pods:  # both endpoints programmed before any traffic
        _wait_for_rule(cluster, f"{pod.ip}:8053")  # its DNAT, in either mode
    pinned = next(p for p in range(41000, 41200) if _answered_by(cluster, ip, p, "ct-a"))
    cluster.delete_pod("ct-a")
    wait_until(lambda: _answered_by(cluster, ip, pinned, "ct-b"), timeout=5, what="the flow to move to ct-b")


def test_flow_from_before_any_endpoint_reaches_a_new_pod(cluster: LabCluster) -> None:
    port = 42000
    assert isinstance(_send(cluster, LATE_CLUSTER_IP, port), TimeoutError)  # no Service yet: no rule, no answer
    entries = cluster.net.exec("node1", ["conntrack", "-L", "-p", "udp", "-d", LATE_CLUSTER_IP]).stdout
    assert f"sport={port}" in entries  # the un-NATed flow a later DNAT rule cannot change
    cluster.create_service(svc("ct-late", {"app": "ct-late"}, clusterIP=LATE_CLUSTER_IP))
    wait_until(
        lambda: isinstance(_send(cluster, LATE_CLUSTER_IP, port), ConnectionRefusedError),
        what="the REJECT of a Service without endpoints",
    )
    cluster.add_pod("ct-late", "node2", {"app": "ct-late"}, ports=DNS_PORTS)
    wait_until(lambda: _answered_by(cluster, LATE_CLUSTER_IP, port, "ct-late"), timeout=5, what="an answer")
