"""The ebpf explainer on the map images kproxyd writes for real plans (no kernel): which program, which
endpoints with what share, SNAT, EPERM, and what it leaves to the nftables fallback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from kproxyd.backends.ebpf import image as img
from kproxyd.backends.ebpf import tc
from kproxyd.backends.ebpf.kernel import PinnedFrontend
from kproxyd.backends.ebpf.maglev import TABLE_SIZE, maglev_table
from kproxyd.explain import ebpf
from kproxyd.explain.common import Explanation, Fate, Hop, Outcome, Packet
from kproxyd.model import Protocol, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan
from tests.model_factories import eps, plans, spn, svc

NODE_IP, POD, OUTSIDE = "172.28.0.11", "10.244.1.5", "172.28.0.200"
CLUSTER_IP, EMPTY_IP, LB_IP = "10.96.0.10", "10.96.0.11", "172.29.0.10"
BACKENDS = ("10.244.1.2", "10.244.1.3", "10.244.2.2")
WEB = svc(spn(name="web", port="http"), CLUSTER_IP, node_port=30080, type=ServiceType.NODE_PORT)
LOCAL = svc(
    spn(name="local", port="http"),
    "10.96.0.12",
    load_balancer_ips=(LB_IP,),
    type=ServiceType.LOAD_BALANCER,
    external_policy_local=True,
)
STATE = plans(
    (WEB, eps(*BACKENDS, port=8080)),
    (svc(spn(name="empty"), EMPTY_IP), []),
    (LOCAL, eps("10.244.1.2", node="node1")),
)
FALLBACK_HOP = Hop("prerouting", "services", "ip daddr . meta l4proto . th dport vmap @service-ips")


@dataclass
class Maps:
    """A program's maps holding an image, as PinnedFrontends reads them."""

    image: img.Image

    def frontend(self, key: img.FrontendKey) -> PinnedFrontend | None:
        entry = self.image.get(key)
        return PinnedFrontend(7, entry, 3) if entry is not None else None

    def service_at(self, ip: str) -> str:
        return next((e.service.split(":")[0] for k, e in self.image.items() if k.ip == ip and e.service), "")


def fallback(packet: Packet) -> Explanation:
    """What the nftables walker would say: here, a canned rejection."""
    outcome = Outcome(1.0, Fate.REJECTED, reason="fallback", hops=(FALLBACK_HOP,))
    return Explanation("nftables", packet, "ns1/fallback", "node port", (outcome,))


def node(
    state: Mapping[ServicePortName, ServicePlan] = STATE, tc_runs: bool = True, algorithm: str = "random"
) -> ebpf.EbpfNode:
    """A node whose maps hold state's images (node ports at NODE_IP)."""
    socket_lb = Maps(img.image(state, algorithm, (NODE_IP,)))
    tc_image = {k: e for port in tc.image(state, (NODE_IP,), algorithm).values() for k, e in port.items()}
    return ebpf.EbpfNode(
        socket_lb, Maps(tc_image) if tc_runs else None, ("10.244.0.0/16",), frozenset({"eth0"}), fallback
    )


def packet(src: str, dst: str, dport: int = 80, iif: str = "cbr0", proto: str = "TCP") -> Packet:
    return Packet(src, dst, dport, proto, "" if src == NODE_IP else iif, frozenset({NODE_IP}))


def test_cluster_ip_from_a_pod_is_the_socket_load_balancers() -> None:
    answer = ebpf.explain(packet(POD, CLUSTER_IP), node())
    assert answer.mode == "ebpf" and answer.service == "ns1/web:http" and answer.frontend == "cluster IP"
    assert answer.dataplane == "socket load balancer (connect4 of a process on this node)"
    assert answer.endpoints == {f"{ip}:8080": pytest.approx(1 / 3) for ip in BACKENDS}
    assert {o.masquerade for o in answer.outcomes} == {None}
    assert "frontends[10.96.0.10:80/TCP]: ns1/web:http, rev 7, 3 slots, random" in answer.outcomes[0].hops[0].rule


def test_cluster_ip_from_the_node_itself_too() -> None:
    answer = ebpf.explain(packet(NODE_IP, CLUSTER_IP, proto="UDP"), node())
    assert answer.fates == {Fate.REJECTED}  # WEB is TCP only: the address entry fails the call
    assert (
        answer.outcomes[0].reason
        == f"cluster IP {CLUSTER_IP} has no port 80/UDP: connect() and sendmsg() fail with EPERM"
    )
    assert answer.service == "ns1/web"


def test_maglev_shares_are_the_table_shares() -> None:
    answer = ebpf.explain(packet(POD, CLUSTER_IP), node(algorithm="maglev"))
    table = maglev_table([f"{ip}:8080" for ip in BACKENDS])
    expected = {f"{ip}:8080": table.count(i) / TABLE_SIZE for i, ip in enumerate(BACKENDS)}
    assert answer.endpoints == pytest.approx(expected)
    assert math.isclose(sum(o.probability for o in answer.outcomes), 1.0)


def test_no_endpoints_fails_connect_with_eperm() -> None:
    answer = ebpf.explain(packet(POD, EMPTY_IP), node())
    assert answer.fates == {Fate.REJECTED} and answer.service == "ns1/empty:p80"
    assert answer.outcomes[0].reason == "no endpoints: connect() fails with EPERM"


def test_a_cluster_ip_routed_in_from_outside_is_not_served() -> None:
    answer = ebpf.explain(packet(OUTSIDE, CLUSTER_IP, iif="eth0"), node())
    assert answer.fates == {Fate.UNHANDLED} and answer.service == "ns1/web:http"
    assert "not traffic routed in on eth0" in str(answer.outcomes[0].reason)


def test_node_port_from_outside_is_tcs_and_masqueraded() -> None:
    answer = ebpf.explain(packet(OUTSIDE, NODE_IP, 30080, iif="eth0"), node())
    assert answer.dataplane == "tc ingress on eth0" and answer.frontend == "node port"
    assert answer.endpoints == {f"{ip}:8080": pytest.approx(1 / 3) for ip in BACKENDS}
    assert {o.masquerade for o in answer.outcomes} == {
        "external traffic to a Service with externalTrafficPolicy Cluster"
    }
    assert answer.outcomes[0].hops[0].rule.startswith("tc_frontends[172.28.0.11:30080/TCP]: ns1/web:http")


def test_local_policy_keeps_the_source_from_outside_and_pods_get_the_cluster_policy_endpoints() -> None:
    answer = ebpf.explain(packet(OUTSIDE, LB_IP, iif="eth0"), node())
    assert answer.endpoints == {"10.244.1.2:80": 1.0} and answer.outcomes[0].masquerade is None
    remote_only = plans((LOCAL, eps("10.244.2.2", node="node2")))  # no local endpoint: DROP from outside
    from_pod = ebpf.explain(packet(POD, LB_IP), node(remote_only))
    assert from_pod.dataplane == "socket load balancer (connect4 of a process on this node)"
    assert from_pod.frontend == "external or loadbalancer IP" and from_pod.service == "ns1/local:http"
    assert from_pod.endpoints == {"10.244.2.2:80": 1.0} and from_pod.outcomes[0].masquerade is None


def test_the_nodes_own_connections_to_a_node_port_are_the_socket_load_balancers() -> None:
    answer = ebpf.explain(packet(NODE_IP, NODE_IP, 30080), node())
    assert answer.dataplane == "socket load balancer (connect4 of a process on this node)"
    assert answer.frontend == "node port" and answer.service == "ns1/web:http"
    assert answer.endpoints == {f"{ip}:8080": pytest.approx(1 / 3) for ip in BACKENDS}


def test_a_node_ip_on_another_port_goes_on_unchanged() -> None:
    answer = ebpf.explain(packet(NODE_IP, NODE_IP, 22), node())
    assert answer.dataplane == "nftables fallback, nat OUTPUT (sent by this node)"
    assert "not a cluster IP: connect() goes on unchanged" in answer.outcomes[0].hops[0].rule


def test_source_ranged_lb_ips_from_pods_are_the_fallbacks() -> None:
    ranged = svc(
        spn(name="ranged"),
        "10.96.0.15",
        load_balancer_ips=(LB_IP,),
        load_balancer_source_ranges=("172.28.0.0/16",),
        type=ServiceType.LOAD_BALANCER,
    )
    answer = ebpf.explain(packet(POD, LB_IP), node(plans((ranged, eps("10.244.1.2")))))
    assert answer.service == "ns1/fallback" and answer.outcomes[0].hops[-1] == FALLBACK_HOP


def test_without_tc_external_frontends_are_the_fallbacks() -> None:
    answer = ebpf.explain(packet(OUTSIDE, NODE_IP, 30080, iif="eth0"), node(tc_runs=False))
    assert answer.service == "ns1/fallback" and answer.outcomes[0].hops == (FALLBACK_HOP,)


def test_sctp_is_the_fallbacks() -> None:
    sctp = svc(spn(name="sctp", proto=Protocol.SCTP), "10.96.0.13")
    answer = ebpf.explain(packet(POD, "10.96.0.13", proto="SCTP"), node(plans((sctp, eps("10.244.1.2")))))
    assert answer.dataplane is not None and answer.dataplane.startswith("nftables fallback")


def test_affinity_is_reported() -> None:
    sticky = svc(spn(name="sticky"), "10.96.0.14", session_affinity_timeout=600)
    answer = ebpf.explain(packet(POD, "10.96.0.14"), node(plans((sticky, eps("10.244.1.2")))))
    assert answer.affinity and "ClientIP affinity 600 s" in answer.outcomes[0].hops[0].rule
    assert "affinity:" in answer.to_text() and "dataplane" in answer.to_json()


def test_ipv6_node_port_from_outside_is_tcs_too() -> None:
    web6 = svc(spn(name="web6", port="http"), "fd00:96::10", node_port=30090, type=ServiceType.NODE_PORT)
    state = plans((web6, eps("fd00:244:2::3", port=8080, node="node2")))
    tc_image = {k: e for port in tc.image(state, ("fd00:28::11",), "random").values() for k, e in port.items()}
    maps = ebpf.EbpfNode(Maps(img.image(state, "random")), Maps(tc_image), (), frozenset({"eth0"}), fallback)
    outside = Packet("fd00:28::200", "fd00:28::11", 30090, "TCP", "eth0", frozenset({"fd00:28::11"}))
    answer = ebpf.explain(outside, maps)
    assert answer.dataplane == "tc ingress on eth0" and answer.service == "ns1/web6:http"
    assert answer.endpoints == {"[fd00:244:2::3]:8080": 1.0} and answer.outcomes[0].masquerade
