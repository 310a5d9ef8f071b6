"""The explain walker on kproxyd's own rendered rules: build plans, render, parse, walk (no root, no kernel)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from kproxyd.backends.iptables.kernel import JUMPS
from kproxyd.backends.iptables.render import IptablesRenderer, IptablesRenderOptions
from kproxyd.explain.common import Explanation, Fate, Packet
from kproxyd.explain.iptables import IptablesWalker, Match, parse_rule, parse_save
from kproxyd.model import (
    DetectLocalMode,
    Endpoint,
    LocalTrafficDetector,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
    ServiceType,
)
from kproxyd.plan import plan_service_port

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "explain"
NODE = NodeInfo("node1", addresses=("192.168.0.1",))
NODE_IP, CLUSTER_IP, LB_IP = "192.168.0.1", "172.30.0.41", "203.0.113.7"
POD, OUTSIDE = "10.1.2.3", "198.51.100.9"
DETECTOR = LocalTrafficDetector(DetectLocalMode.CLUSTER_CIDR, ("10.0.0.0/8",))
NAME = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
ENDPOINTS = (
    Endpoint("10.180.0.1", 80, node_name="node1"),
    Endpoint("10.180.0.2", 80, node_name="node2"),
    Endpoint("10.180.0.3", 80, node_name="node2"),
)


def walker(port: ServicePort, endpoints: tuple[Endpoint, ...] = ENDPOINTS, **options: object) -> IptablesWalker:
    """Render one ServicePort as kproxyd writes it, add kube-proxy's jumps from the built-in chains, parse."""
    opts = IptablesRenderOptions(local_detector=DETECTOR, node_ips=(NODE_IP,), **options)  # type: ignore[arg-type]
    plan = plan_service_port(port, endpoints, NODE)
    rules = parse_save(IptablesRenderer(opts).render({port.name: plan}, None, set()).text)
    for jump in JUMPS:
        rules[jump.table].setdefault(jump.source, []).append(
            parse_rule(f"-A {jump.source} {shlex.join(jump.args)}")
        )
    return IptablesWalker(rules)


def port(**kw: object) -> ServicePort:
    kw.setdefault("type", ServiceType.CLUSTER_IP)
    return ServicePort(name=NAME, cluster_ips=(CLUSTER_IP,), port=80, **kw)  # type: ignore[arg-type]


def packet(src: str, dst: str = CLUSTER_IP, dport: int = 80, iif: str = "eth0", proto: str = "TCP") -> Packet:
    return Packet(src, dst, dport, proto, "" if src == NODE_IP else iif, frozenset({NODE_IP}))


def ips(explanation: Explanation) -> dict[str, float]:
    return {ep.rsplit(":", 1)[0]: round(p, 6) for ep, p in explanation.endpoints.items()}


def test_parse_rule_negation_modules_and_target_options() -> None:
    rule = parse_rule(
        '-A KUBE-SVC-X -m comment --comment "a b" -m tcp -p tcp ! -s 10.0.0.0/8 --dport 80'
        " -m recent --name S --rcheck --seconds 10 --reap -j KUBE-SEP-Y"
    )
    assert rule.chain == "KUBE-SVC-X" and rule.comment == "a b" and rule.target == "KUBE-SEP-Y"
    assert Match("-s", "10.0.0.0/8", negated=True) in rule.matches
    assert Match("--rcheck", "") in rule.matches and Match("--seconds", "10") in rule.matches
    dnat = parse_rule("-A KUBE-SEP-Y -m tcp -p tcp -j DNAT --to-destination 10.0.0.1:80")
    assert dnat.target_args == {"--to-destination": "10.0.0.1:80"}


def test_cluster_ip_spreads_evenly_and_keeps_pod_sources() -> None:
    result = walker(port()).explain(packet(POD, iif="cbr0"))
    assert (result.service, result.frontend) == ("ns1/svc1:p80", "cluster IP")
    assert ips(result) == {"10.180.0.1": 0.333333, "10.180.0.2": 0.333333, "10.180.0.3": 0.333333}
    assert {o.masquerade for o in result.outcomes} == {None}


def test_off_cluster_source_to_a_cluster_ip_is_masqueraded() -> None:
    result = walker(port()).explain(packet(OUTSIDE))
    assert {o.masquerade for o in result.outcomes} == {"off-cluster source to a cluster IP"}


def test_masquerade_all() -> None:
    result = walker(port(), masquerade_all=True).explain(packet(POD, iif="cbr0"))
    assert {o.masquerade for o in result.outcomes} == {"masquerade-all"}


def test_hairpin_is_masqueraded_only_to_itself() -> None:
    result = walker(port()).explain(packet("10.180.0.1", iif="cbr0"))
    masq = {o.endpoint: o.masquerade for o in result.outcomes}
    assert masq == {
        "10.180.0.1:80": "hairpin: the endpoint connects to itself",
        "10.180.0.2:80": None,
        "10.180.0.3:80": None,
    }


def test_node_port_from_outside_is_masqueraded_with_cluster_policy() -> None:
    result = walker(port(type=ServiceType.NODE_PORT, node_port=30080)).explain(packet(OUTSIDE, NODE_IP, 30080))
    assert result.frontend == "node port" and len(result.endpoints) == 3
    assert {o.masquerade for o in result.outcomes} == {
        "external traffic to a Service with externalTrafficPolicy Cluster"
    }


def test_external_policy_local() -> None:
    w = walker(port(type=ServiceType.NODE_PORT, node_port=30080, external_policy_local=True))
    outside = w.explain(packet(OUTSIDE, NODE_IP, 30080))
    assert ips(outside) == {"10.180.0.1": 1.0} and outside.outcomes[0].masquerade is None
    from_node = w.explain(packet(NODE_IP, NODE_IP, 30080))  # short-circuited to every endpoint, masqueraded
    assert len(from_node.endpoints) == 3
    assert {o.masquerade for o in from_node.outcomes} == {"external destination reached from the node itself"}


def test_external_policy_local_without_local_endpoints_drops() -> None:
    w = walker(port(type=ServiceType.NODE_PORT, node_port=30080, external_policy_local=True), ENDPOINTS[1:])
    [outcome] = w.explain(packet(OUTSIDE, NODE_IP, 30080)).outcomes
    assert (outcome.fate, outcome.reason) == (Fate.DROPPED, "ns1/svc1:p80 has no local endpoints")


def test_no_endpoints_rejects() -> None:
    [outcome] = walker(port(), ()).explain(packet(POD, iif="cbr0")).outcomes
    assert (outcome.fate, outcome.reason) == (Fate.REJECTED, "ns1/svc1:p80 has no endpoints")


def test_unserved_port_and_protocol_of_a_cluster_ip_reject() -> None:
    w = walker(port())
    for pkt in (packet(POD, dport=81, iif="cbr0"), packet(POD, proto="UDP", iif="cbr0")):
        [outcome] = w.explain(pkt).outcomes
        assert (outcome.fate, outcome.reason) == (Fate.REJECTED, "ns1/svc1 cluster IP with no such port")


def test_load_balancer_source_ranges() -> None:
    lb = port(
        type=ServiceType.LOAD_BALANCER,
        node_port=30080,
        load_balancer_ips=(LB_IP,),
        load_balancer_source_ranges=("198.51.100.0/24",),
    )
    w = walker(lb)
    assert len(w.explain(packet(OUTSIDE, LB_IP)).endpoints) == 3
    [outcome] = w.explain(packet("192.0.2.1", LB_IP)).outcomes
    assert outcome.fate is Fate.DROPPED and "traffic not accepted by KUBE-FW-" in (outcome.reason or "")


def test_session_affinity_is_reported() -> None:
    result = walker(port(session_affinity_timeout=10800)).explain(packet(POD, iif="cbr0"))
    assert result.affinity and len(result.endpoints) == 3


def test_destination_no_rule_knows_is_unhandled() -> None:
    result = walker(port()).explain(packet(POD, "172.30.9.9", iif="cbr0"))
    assert result.service is None and result.fates == {Fate.UNHANDLED}


def test_json_output() -> None:
    data = walker(port()).explain(packet(OUTSIDE)).to_json()
    assert data["service"] == "ns1/svc1:p80" and data["path"] == "PREROUTING"
    assert sum(o["probability"] for o in data["outcomes"]) == pytest.approx(1.0, abs=1e-5)
    assert data["outcomes"][0]["hops"][0] == {
        "table": "nat",
        "chain": "PREROUTING",
        "rule": "-m comment --comment 'kubernetes service portals' -j KUBE-SERVICES",
    }


@pytest.mark.parametrize(
    ("name", "pkt"),
    [("cluster_ip_off_cluster", packet(OUTSIDE)), ("node_port_from_node", packet(NODE_IP, NODE_IP, 30080))],
)
def test_text_output_golden(name: str, pkt: Packet) -> None:
    """tests/golden/explain/<name>.txt; KPROXYD_UPDATE_GOLDEN=1 rewrites it."""
    text = walker(port(type=ServiceType.NODE_PORT, node_port=30080), ENDPOINTS[:2]).explain(pkt).to_text() + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("KPROXYD_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; KPROXYD_UPDATE_GOLDEN=1 regenerates it"
