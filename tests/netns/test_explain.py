"""`kproxyd explain` against live rules: for every row of the packet-flow tables, explain must agree with what
real packets showed there (same endpoints, refused/dropped, masqueraded).

The workloads are test_flows.py's and test_semantics.py's own fixtures, run here on a fresh lab per mode.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import tests.netns.test_flows as flows
import tests.netns.test_semantics as semantics
from kproxyd.lab.cluster import LabCluster
from kproxyd.lab.nsutil import nsenter_argv, run
from tests.netns.expect import dropped_error, masqueraded, refused_error

MODES_EXPLAINED = ("iptables", "nftables", "ebpf")


@dataclass(frozen=True)
class Case:
    """One flow row as explain sees it."""

    suite: str
    flow: Any

    def __str__(self) -> str:
        return f"{self.suite}:{self.flow}"


WORKLOADS: dict[str, Callable[[LabCluster], Iterator[LabCluster]]] = {
    "flows": inspect.unwrap(flows.cluster),
    "semantics": inspect.unwrap(semantics.cluster),
}


def _workload(suite: str, proxy_mode: str) -> Iterator[LabCluster]:
    """A lab running one suite's workload under kproxyd."""
    if proxy_mode not in MODES_EXPLAINED:
        pytest.skip(f"explain does not walk {proxy_mode} rules yet")
    with LabCluster(nodes=("node1", "node2")) as lab:
        lab.mode = proxy_mode  # type: ignore[attr-defined]
        yield from WORKLOADS[suite](lab)


@pytest.fixture(scope="module")
def flows_lab(proxy_mode: str) -> Iterator[LabCluster]:
    """test_flows.py's workload, once per mode."""
    yield from _workload("flows", proxy_mode)


@pytest.fixture(scope="module")
def semantics_lab(proxy_mode: str) -> Iterator[LabCluster]:
    """test_semantics.py's workload, once per mode."""
    yield from _workload("semantics", proxy_mode)


def destination(lab: LabCluster, case: Case) -> tuple[str, int]:
    """The flow's destination IP and port."""
    flow = case.flow
    if case.suite == "flows":
        return flows._ip(lab, flow.service, flow.via), flow.port
    return semantics.resolve(lab, flow)


def source_ip(lab: LabCluster, src: str) -> str:
    """The flow's source address as the node sees it."""
    return semantics.source_ip(lab, src)


def first_node(lab: LabCluster, src: str, dst_ip: str) -> str:
    """Where the packet meets kube-proxy's rules first: its pod's node, the node itself, or where it arrives."""
    if src in {pod.name for pod in lab.net.pods}:
        return lab.net.pod(src).node
    if src in {node.name for node in lab.net.nodes}:
        return src
    return next((node.name for node in lab.net.nodes if node.ip == dst_ip), "node1")


def explain(lab: LabCluster, node: str, src: str, dst: str, port: int, proto: str) -> dict[str, Any]:
    """`kproxyd explain --json` run in a node's namespace with the host's /sys (ebpf: its pinned maps), the mode
    picked by itself.
    """
    argv = [sys.executable, "-m", "kproxyd", "explain", "--src", src, "--dst", dst, "--dport", str(port)]
    argv += ["--proto", proto, "--json", f"--bpf-pin-path={lab.net.pin_path(node)}"]
    answer = dict(json.loads(run(nsenter_argv(lab.net.node(node).netns, argv)).stdout))
    assert answer["mode"] == lab.mode, answer  # type: ignore[attr-defined]
    return answer


def explain_flow(lab: LabCluster, case: Case) -> dict[str, Any]:
    """Explain on the first node; when it routes the packet on unchanged to another node, explain there too."""
    dst, port = destination(lab, case)
    src = source_ip(lab, case.flow.src)
    node = first_node(lab, case.flow.src, dst)
    answer = explain(lab, node, src, dst, port, case.flow.proto)
    next_node = next((n.name for n in lab.net.nodes if n.ip == dst and n.name != node), None)
    if next_node and {o["fate"] for o in answer["outcomes"]} == {"unhandled"}:
        answer = explain(lab, next_node, src, dst, port, case.flow.proto)
    return answer


@pytest.mark.parametrize("flow", flows.FLOWS, ids=str)
def test_flows_explained(flows_lab: LabCluster, flow: Any) -> None:
    check(flows_lab, Case("flows", flow))


@pytest.mark.parametrize("flow", semantics.FLOWS, ids=str)
def test_semantics_explained(semantics_lab: LabCluster, flow: Any) -> None:
    check(semantics_lab, Case("semantics", flow))


def cluster_ip(case: Case) -> bool:
    """True when the flow goes to a Service's cluster IP."""
    if case.suite == "flows":
        return bool(case.flow.via == "cluster-ip")
    return case.flow.dst in semantics.cluster_ip_flows()


def socket_lb(lab: LabCluster, case: Case) -> bool:
    """True where the ebpf mode's socket load balancer holds the flow's frontend: a cluster IP, or an external
    frontend of the source's own node (test_semantics.socket_balanced).
    """
    flow = case.flow
    if cluster_ip(case):
        return True
    if case.suite == "semantics":
        return semantics.socket_balanced(lab, flow)
    return not flow.src.startswith("ext") and first_node(lab, flow.src, "") == flow.via.removesuffix("-ip")


def fails_with_eperm(lab: LabCluster, mode: str, case: Case) -> bool:
    """True where real packets showed ebpf's socket load balancer failing connect() itself (expect.py)."""
    if case.flow.expect == "refused":
        return refused_error(mode, socket_lb(lab, case)) is PermissionError
    if case.flow.expect == "dropped":
        return dropped_error(mode, socket_lb(lab, case) and case.flow.dst != "other-proxy") is PermissionError
    return False


def check(lab: LabCluster, case: Case) -> None:
    """explain's answer for one flow agrees with what real packets showed."""
    answer = explain_flow(lab, case)
    outcomes = answer["outcomes"]
    fates = {o["fate"] for o in outcomes}
    assert math.isclose(sum(o["probability"] for o in outcomes), 1.0, abs_tol=1e-4), outcomes
    expect = case.flow.expect
    mode = lab.mode  # type: ignore[attr-defined]
    if mode == "ebpf" and cluster_ip(case) and case.flow.src.startswith("ext"):
        assert fates == {"unhandled"}, answer  # cluster IPs are not served to traffic routed in (test_semantics)
    elif fails_with_eperm(lab, mode, case):
        assert fates == {"rejected"} and all("EPERM" in o["reason"] for o in outcomes), answer
    elif expect == "refused":
        assert fates == {"rejected"}, answer
    elif expect == "dropped":
        # Dropped by a rule, or not ours at all: a cluster IP no proxy serves goes nowhere.
        assert fates in ({"dropped"}, {"unhandled"}), answer
    else:
        assert fates == {"endpoint"}, answer
        pods = {lab.net.pod(name).ip for name in expect}
        assert {o["endpoint"].rsplit(":", 1)[0] for o in outcomes} == pods, answer
        if case.flow.masqueraded is not None:
            snat = masqueraded(mode, case.flow.masqueraded, socket_lb(lab, case))
            assert {o["masquerade"] is not None for o in outcomes} == {snat}, answer


def test_ebpf_programs_explained(flows_lab: LabCluster) -> None:
    """ebpf mode: explain names the program that takes each kind of flow, as the flow suites count them."""
    lab = flows_lab
    if lab.mode != "ebpf":  # type: ignore[attr-defined]
        pytest.skip("the socket load balancer, tc and the nftables fallback are ebpf mode's")
    pods = {lab.net.pod(name).ip for name in flows.BACKENDS}
    web = explain_flow(lab, Case("flows", flows.Flow("client1", "web", 80)))
    assert web["dataplane"] == "socket load balancer (connect4 of a process on this node)", web
    assert web["service"] == "default/web:http" and web["frontend"] == "cluster IP", web
    assert {o["endpoint"] for o in web["outcomes"]} == {f"{ip}:8080" for ip in pods}, web
    assert all(math.isclose(o["probability"], 1 / 3, abs_tol=1e-4) for o in web["outcomes"]), web
    node_port = explain_flow(lab, Case("flows", flows.Flow("ext", "web-np", flows.NODE_PORT, via="node1-ip")))
    assert node_port["dataplane"] == "tc ingress on eth0" and node_port["frontend"] == "node port", node_port
    assert node_port["service"] == "default/web-np:http", node_port
    assert {o["masquerade"] for o in node_port["outcomes"]} == {
        "external traffic to a Service with externalTrafficPolicy Cluster"
    }, node_port
    empty = explain_flow(lab, Case("flows", flows.Flow("client1", "empty", 80)))
    assert [o["reason"] for o in empty["outcomes"]] == ["no endpoints: connect() fails with EPERM"], empty
    assert empty["service"] == "default/empty:http", empty
    # No endpoints: tc leaves it to the fallback's REJECT.
    refused = explain_flow(lab, Case("flows", flows.Flow("ext", "empty-np", flows.NODE_PORT + 1, via="node1-ip")))
    assert refused["dataplane"] == "nftables fallback, nat PREROUTING (arrives on eth0)", refused
    assert {o["fate"] for o in refused["outcomes"]} == {"rejected"}, refused
    # The node's own connections to its node port: the socket load balancer's.
    own = explain_flow(lab, Case("flows", flows.Flow("node1", "web-np", flows.NODE_PORT, via="node1-ip")))
    assert own["dataplane"] == "socket load balancer (connect4 of a process on this node)", own
    assert own["frontend"] == "node port" and own["service"] == "default/web-np:http", own
    assert {o["endpoint"] for o in own["outcomes"]} == {f"{ip}:8080" for ip in pods}, own
