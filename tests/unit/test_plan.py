"""plan.py: kube-proxy's CategorizeEndpoints decisions, table-driven."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import Verdict, can_use_topology, changed_plans, plan_service_port

NODE = NodeInfo(name="node1", labels={"topology.kubernetes.io/zone": "a"})
PORT = ServicePort(
    name=ServicePortName("ns", "svc", "http", Protocol.TCP),
    type=ServiceType.NODE_PORT,
    cluster_ips=("10.96.0.10",),
    port=80,
    node_port=30080,
)


def ep(
    ip: str,
    node: str = "node1",
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    hints: frozenset[str] | None = None,
) -> Endpoint:
    return Endpoint(
        ip=ip,
        port=8080,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name=node,
        zone_hints=hints,
    )


LOCAL, REMOTE = ep("10.244.1.2"), ep("10.244.2.2", node="node2")
LOCAL_TERMINATING = ep("10.244.1.3", ready=False, serving=True, terminating=True)
REMOTE_TERMINATING = ep("10.244.2.3", node="node2", ready=False, serving=True, terminating=True)
NOT_SERVING = ep("10.244.2.4", node="node2", ready=False, serving=False, terminating=True)


def ips(endpoints: tuple[Endpoint, ...]) -> list[str]:
    return [e.ip for e in endpoints]


@pytest.mark.parametrize(
    ("policy", "endpoints", "internal", "external", "internal_verdict", "external_verdict"),
    [
        ({}, [LOCAL, REMOTE], ["10.244.1.2", "10.244.2.2"], ["10.244.1.2", "10.244.2.2"], None, None),
        ({}, [], [], [], Verdict.REJECT, Verdict.REJECT),
        ({}, [NOT_SERVING], [], [], Verdict.REJECT, Verdict.REJECT),
        # KEP-1669: terminating-but-serving endpoints only when no endpoint is ready.
        ({}, [REMOTE, REMOTE_TERMINATING], ["10.244.2.2"], ["10.244.2.2"], None, None),
        ({}, [REMOTE_TERMINATING, NOT_SERVING], ["10.244.2.3"], ["10.244.2.3"], None, None),
        # externalTrafficPolicy Local: external traffic to this node's endpoints, DROP when it has none.
        (
            {"external_policy_local": True},
            [LOCAL, REMOTE],
            ["10.244.1.2", "10.244.2.2"],
            ["10.244.1.2"],
            None,
            None,
        ),
        ({"external_policy_local": True}, [REMOTE], ["10.244.2.2"], [], None, Verdict.DROP),
        ({"external_policy_local": True}, [LOCAL_TERMINATING, REMOTE], ["10.244.2.2"], ["10.244.1.3"], None, None),
        # internalTrafficPolicy Local.
        (
            {"internal_policy_local": True},
            [LOCAL, REMOTE],
            ["10.244.1.2"],
            ["10.244.1.2", "10.244.2.2"],
            None,
            None,
        ),
        ({"internal_policy_local": True}, [REMOTE], [], ["10.244.2.2"], Verdict.DROP, None),
        ({"internal_policy_local": True}, [], [], [], Verdict.REJECT, Verdict.REJECT),
    ],
)
def test_categorize(
    policy: dict[str, bool],
    endpoints: list[Endpoint],
    internal: list[str],
    external: list[str],
    internal_verdict: Verdict | None,
    external_verdict: Verdict | None,
) -> None:
    plan = plan_service_port(replace(PORT, **policy), endpoints, NODE)
    assert ips(plan.internal_endpoints) == internal
    assert ips(plan.external_endpoints) == external
    assert plan.internal_verdict == internal_verdict
    assert plan.external_verdict == external_verdict


def test_cluster_ip_only_service_has_no_external_traffic() -> None:
    plan = plan_service_port(replace(PORT, type=ServiceType.CLUSTER_IP, node_port=None), [LOCAL], NODE)
    assert plan.external_endpoints == ()
    assert not plan.port.externally_accessible


def test_external_local_short_circuit_keeps_cluster_set() -> None:
    plan = plan_service_port(replace(PORT, external_policy_local=True), [LOCAL, REMOTE], NODE)
    assert plan.short_circuit_local_sources
    assert plan.uses_cluster_policy and plan.uses_local_policy
    assert ips(plan.all_endpoints) == ["10.244.1.2", "10.244.2.2"]


def test_duplicates_merged_and_sorted() -> None:
    plan = plan_service_port(PORT, [REMOTE, LOCAL, LOCAL], NODE)
    assert ips(plan.all_endpoints) == ["10.244.1.2", "10.244.2.2"]


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ([ep("10.244.1.2", hints=frozenset("a")), ep("10.244.2.2", hints=frozenset("b"))], True),
        ([ep("10.244.1.2", hints=frozenset("a")), ep("10.244.2.2")], False),  # one endpoint lacks hints
        (
            [ep("10.244.1.2", hints=frozenset("b")), ep("10.244.2.2", hints=frozenset("b"))],
            False,
        ),  # none for zone a
        ([ep("10.244.1.2", hints=frozenset("a")), ep("10.244.2.2", ready=False)], True),  # unready ignored
    ],
)
def test_topology_hints(endpoints: list[Endpoint], expected: bool) -> None:
    assert can_use_topology(endpoints, NODE) is expected


def test_topology_filters_cluster_endpoints() -> None:
    endpoints = [ep("10.244.1.2", hints=frozenset("a")), ep("10.244.2.2", node="node2", hints=frozenset("b"))]
    assert ips(plan_service_port(PORT, endpoints, NODE).internal_endpoints) == ["10.244.1.2"]
    no_zone = NodeInfo(name="node1")
    assert len(plan_service_port(PORT, endpoints, no_zone).internal_endpoints) == 2


def test_changed_plans() -> None:
    a = plan_service_port(PORT, [LOCAL], NODE)
    other = replace(PORT, name=ServicePortName("ns", "other", "", Protocol.TCP))
    b = plan_service_port(other, [REMOTE], NODE)
    old = {a.name: a, b.name: b}
    new = {a.name: plan_service_port(PORT, [LOCAL, REMOTE], NODE), b.name: b}
    assert changed_plans(old, new) == {a.name}
    assert changed_plans(old, {b.name: b}) == {a.name}
    assert changed_plans(old, old) == set()


def test_duplicate_address_prefers_the_ready_copy() -> None:
    stale = ep("10.244.1.2", ready=False, serving=False, terminating=True)
    plan = plan_service_port(PORT, [stale, LOCAL], NODE)
    assert plan.all_endpoints == (LOCAL,)
