"""The explain walker on kproxyd's own rendered rules: build plans, render, parse, walk (no root, no kernel)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from kproxyd.backends.iptables.kernel import JUMPS
from kproxyd.backends.iptables.render import IptablesRenderer, IptablesRenderOptions
from kproxyd.backends.nftables.render import NftRenderer, NftRenderOptions
from kproxyd.backends.nftables.transaction import TableObjects, Transaction, full_sync
from kproxyd.explain.common import Explanation, Fate, Packet
from kproxyd.explain.iptables import IptablesWalker, Match, parse_rule, parse_save
from kproxyd.explain.nftables import NftablesWalker, parse_json
from kproxyd.model import Endpoint, NodeInfo, ServicePort, ServiceType
from kproxyd.plan import plan_service_port
from tests import model_factories
from tests.model_factories import CLUSTER_CIDR, spn, svc
from tests.scratch_netns import scratch_netns

GOLDEN = model_factories.GOLDEN / "explain"
NODE = NodeInfo("node1", addresses=("192.168.0.1",))
NODE_IP, CLUSTER_IP, LB_IP = "192.168.0.1", "172.30.0.41", "203.0.113.7"
POD, OUTSIDE = "10.1.2.3", "198.51.100.9"
ENDPOINTS = (
    Endpoint("10.180.0.1", 80, node_name="node1"),
    Endpoint("10.180.0.2", 80, node_name="node2"),
    Endpoint("10.180.0.3", 80, node_name="node2"),
)


def walker(port: ServicePort, endpoints: tuple[Endpoint, ...] = ENDPOINTS, **options: object) -> IptablesWalker:
    """Render one ServicePort as kproxyd writes it, add kube-proxy's jumps from the built-in chains, parse."""
    opts = IptablesRenderOptions(local_detector=CLUSTER_CIDR, node_ips=(NODE_IP,), **options)  # type: ignore[arg-type]
    plan = plan_service_port(port, endpoints, NODE)
    rules = parse_save(IptablesRenderer(opts).render({port.name: plan}, None, set()).text)
    for jump in JUMPS:
        rules[jump.table].setdefault(jump.source, []).append(
            parse_rule(f"-A {jump.source} {shlex.join(jump.args)}")
        )
    return IptablesWalker(rules)


def port(**kw: object) -> ServicePort:
    return svc(spn(), CLUSTER_IP, **kw)


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
    model_factories.assert_golden(GOLDEN / f"{name}.txt", text)


# nftables: the ruleset kproxyd renders, as the kernel lists it back (`nft -j`), checked in beside the .nft
# input it came from; KPROXYD_UPDATE_GOLDEN=1 (as root) reloads it in a scratch namespace and rewrites both.
NFT_GOLDEN = GOLDEN / "nftables"


def nft_port(n: int, **kw: object) -> ServicePort:
    """Service svcN of ns1 on cluster IP 172.30.0.4N."""
    return svc(spn(name=f"svc{n}"), f"172.30.0.4{n}", **kw)


NFT_SERVICES = {
    "services": (
        (nft_port(1, node_port=30080), ENDPOINTS),
        (nft_port(2, node_port=30081, external_policy_local=True), ENDPOINTS),
        (nft_port(3, node_port=30082, external_policy_local=True), ENDPOINTS[1:]),
        (nft_port(4), ()),
        (
            nft_port(
                5,
                type=ServiceType.LOAD_BALANCER,
                node_port=30085,
                load_balancer_ips=(LB_IP,),
                load_balancer_source_ranges=("198.51.100.0/24",),
            ),
            ENDPOINTS,
        ),
        (nft_port(6, session_affinity_timeout=10800), ENDPOINTS),
    ),
    "masquerade_all": ((nft_port(1), ENDPOINTS),),
}


def nft_ruleset(name: str) -> str:
    """The `nft -f` text of a full sync of one set of Services."""
    options = NftRenderOptions(
        local_detector=CLUSTER_CIDR, node_ips=(NODE_IP,), masquerade_all=name == "masquerade_all"
    )
    renderer = NftRenderer(options)
    ports = {p.name: renderer.port(plan_service_port(p, eps, NODE)) for p, eps in NFT_SERVICES[name]}
    tx = Transaction("ip")
    full_sync(tx, renderer.static(), ports, TableObjects(), recreate_base=False)
    return tx.text()


def listed_in_scratch_namespace(text: str) -> str:
    """`nft -j list table ip kube-proxy` after loading text in a namespace of its own (root only)."""
    with scratch_netns() as ns:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, check=True)
        argv = ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "ip", "kube-proxy"]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def nft_walker(name: str = "services") -> NftablesWalker:
    """tests/golden/explain/nftables/<name>.json, after checking <name>.nft is what kproxyd renders today."""
    text, nft, listed = nft_ruleset(name), NFT_GOLDEN / f"{name}.nft", NFT_GOLDEN / f"{name}.json"
    if os.environ.get("KPROXYD_UPDATE_GOLDEN") == "1":
        nft.write_text(text)
        listed.write_text(listed_in_scratch_namespace(text))
    assert text == nft.read_text(), f"{nft} differs; KPROXYD_UPDATE_GOLDEN=1 (as root) regenerates it"
    return NftablesWalker(parse_json(listed.read_text()))


def test_nft_cluster_ip_spreads_evenly_and_keeps_pod_sources() -> None:
    result = nft_walker().explain(packet(POD, "172.30.0.41", iif="cbr0"))
    assert (result.mode, result.service, result.frontend) == ("nftables", "ns1/svc1:p80", "cluster IP")
    assert ips(result) == {"10.180.0.1": 0.333333, "10.180.0.2": 0.333333, "10.180.0.3": 0.333333}
    assert {o.masquerade for o in result.outcomes} == {None} and not result.affinity


def test_nft_masquerade_reasons() -> None:
    w = nft_walker()
    off_cluster = w.explain(packet(OUTSIDE, "172.30.0.41"))
    assert {o.masquerade for o in off_cluster.outcomes} == {"off-cluster source to a cluster IP"}
    hairpin = w.explain(packet("10.180.0.1", "172.30.0.41", iif="cbr0"))
    assert {o.endpoint: o.masquerade for o in hairpin.outcomes} == {
        "10.180.0.1:80": "hairpin: the endpoint connects to itself",
        "10.180.0.2:80": None,
        "10.180.0.3:80": None,
    }
    every = nft_walker("masquerade_all").explain(packet(POD, "172.30.0.41", iif="cbr0"))
    assert {o.masquerade for o in every.outcomes} == {"masquerade-all"}


def test_nft_node_port_from_outside_is_masqueraded_with_cluster_policy() -> None:
    result = nft_walker().explain(packet(OUTSIDE, NODE_IP, 30080))
    assert (result.service, result.frontend) == ("ns1/svc1:p80", "node port") and len(result.endpoints) == 3
    assert {o.masquerade for o in result.outcomes} == {
        "external traffic to a Service with externalTrafficPolicy Cluster"
    }


def test_nft_external_policy_local() -> None:
    w = nft_walker()
    outside = w.explain(packet(OUTSIDE, NODE_IP, 30081))
    assert ips(outside) == {"10.180.0.1": 1.0} and outside.outcomes[0].masquerade is None
    from_node = w.explain(packet(NODE_IP, NODE_IP, 30081))  # short-circuited to every endpoint, masqueraded
    assert len(from_node.endpoints) == 3
    assert {o.masquerade for o in from_node.outcomes} == {"external destination reached from the node itself"}
    from_pod = w.explain(packet(POD, NODE_IP, 30081, iif="cbr0"))  # short-circuited, source kept
    assert len(from_pod.endpoints) == 3 and {o.masquerade for o in from_pod.outcomes} == {None}


def test_nft_external_policy_local_without_local_endpoints_drops() -> None:
    [outcome] = nft_walker().explain(packet(OUTSIDE, NODE_IP, 30082)).outcomes
    assert (outcome.fate, outcome.reason) == (
        Fate.DROPPED,
        "tcp . 30082 in @no-endpoint-nodeports: "
        "vmap to drop or reject packets to service nodeports with no endpoints",
    )


def test_nft_no_endpoints_rejects_and_unserved_ports_of_a_cluster_ip_reject() -> None:
    w = nft_walker()
    [outcome] = w.explain(packet(POD, "172.30.0.44", iif="cbr0")).outcomes
    assert outcome.fate is Fate.REJECTED and (outcome.reason or "").startswith("172.30.0.44 . tcp . 80 in @no-")
    for pkt in (packet(POD, "172.30.0.41", 81, iif="cbr0"), packet(POD, "172.30.0.41", proto="UDP", iif="cbr0")):
        [outcome] = w.explain(pkt).outcomes
        assert (outcome.fate, outcome.reason) == (Fate.REJECTED, "Reject traffic to invalid ports of ClusterIPs")


def test_nft_load_balancer_source_ranges() -> None:
    w = nft_walker()
    admitted = w.explain(packet(OUTSIDE, LB_IP))
    assert len(admitted.endpoints) == 3 and admitted.frontend == "loadbalancer IP"
    result = w.explain(packet("192.0.2.1", LB_IP))
    [outcome] = result.outcomes
    assert outcome.fate is Fate.DROPPED and result.service == "ns1/svc5:p80"
    assert (outcome.reason or "").startswith("firewall-") and (outcome.reason or "").endswith(
        "/svc5/tcp/p80: ip saddr != 198.51.100.0/24 drop"
    )


def test_nft_session_affinity_is_reported() -> None:
    result = nft_walker().explain(packet(POD, "172.30.0.46", iif="cbr0"))
    assert result.affinity and ips(result) == {
        "10.180.0.1": 0.333333,
        "10.180.0.2": 0.333333,
        "10.180.0.3": 0.333333,
    }


def test_nft_destination_no_rule_knows_is_unhandled() -> None:
    result = nft_walker().explain(packet(POD, "172.30.9.9", iif="cbr0"))
    assert result.service is None and result.fates == {Fate.UNHANDLED}


def test_nft_text_output_golden() -> None:
    """tests/golden/explain/nftables_node_port_from_node.txt; KPROXYD_UPDATE_GOLDEN=1 rewrites it."""
    text = nft_walker().explain(packet(NODE_IP, NODE_IP, 30080)).to_text() + "\n"
    path = GOLDEN / "nftables_node_port_from_node.txt"
    if os.environ.get("KPROXYD_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; KPROXYD_UPDATE_GOLDEN=1 regenerates it"
