"""The nftables renderer and transactions: kube-proxy's names, golden rulesets, partial syncs."""

from __future__ import annotations

from kproxyd.backends.nftables.names import endpoint_chain, port_chains
from kproxyd.backends.nftables.render import NftRenderer, NftRenderOptions, PortRules
from kproxyd.backends.nftables.transaction import TableElements, TableObjects, Transaction, full_sync, partial_sync
from kproxyd.model import Endpoint, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan
from tests import model_factories
from tests.model_factories import CLUSTER_CIDR, eps, plans, spn, svc

GOLDEN = model_factories.GOLDEN / "nftables"
OPTIONS = NftRenderOptions(local_detector=CLUSTER_CIDR)
EMPTY = TableObjects()


def ports(
    the_plans: dict[ServicePortName, ServicePlan], options: NftRenderOptions
) -> dict[ServicePortName, PortRules]:
    renderer = NftRenderer(options)
    return {name: renderer.port(plan) for name, plan in the_plans.items()}


def full(
    the_plans: dict[ServicePortName, ServicePlan],
    options: NftRenderOptions = OPTIONS,
    existing: TableObjects = EMPTY,
) -> str:
    tx = Transaction("ip")
    full_sync(tx, NftRenderer(options).static(), ports(the_plans, options), existing, recreate_base=False)
    return tx.text()


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/nftables/<name>.nft; KPROXYD_UPDATE_GOLDEN=1 rewrites the file."""
    model_factories.assert_golden(GOLDEN / f"{name}.nft", text)


def test_names_match_kube_proxy_tests() -> None:
    assert port_chains(spn()).cluster == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert port_chains(spn()).external == "external-ULMVA6XW-ns1/svc1/tcp/p80"
    ep = Endpoint("10.180.0.1", 80)
    assert endpoint_chain(spn(), ep) == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    long = spn(ns="n" * 63, name="s" * 63, port="p" * 63)
    assert len(port_chains(long).cluster) <= len("service-") + 240


def test_full_sync_cluster_ip_and_node_port() -> None:
    the_plans = plans(
        (svc(spn(), "172.30.0.41"), eps("10.180.0.1", "10.180.0.2", "10.180.0.3")),
        (svc(spn(name="svc2"), "172.30.0.42", node_port=30080), eps("10.180.0.4")),
    )
    text = full(the_plans)
    assert_golden("full", text)
    assert "delete table" not in text and "vmap {" not in text  # no table rebuild, no anonymous vmaps
    assert "numgen random mod 3 == 0 goto" in text and "numgen random mod 2 == 0 goto" in text


def test_full_sync_deletes_stale_chains_and_sets_only() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1")))
    stale = "service-XXXXXXXX-ns9/gone/tcp/p80"
    kept = port_chains(spn()).cluster
    existing = TableObjects(frozenset({stale, kept, "services"}), frozenset({"affinity-gone", "service-ips"}))
    text = full(the_plans, existing=existing)
    assert f"delete chain ip kube-proxy {stale}\n" in text
    assert f"delete chain ip kube-proxy {kept}\n" not in text
    assert (
        "delete set ip kube-proxy affinity-gone\n" in text and "delete set ip kube-proxy service-ips" not in text
    )


def test_no_endpoints_reject_and_drop() -> None:
    the_plans = plans(
        (
            svc(
                spn(),
                "172.30.0.41",
                type=ServiceType.LOAD_BALANCER,
                node_port=30081,
                load_balancer_ips=("1.2.3.4",),
            ),
            [],
        ),
        (svc(spn(name="itp"), "172.30.0.42", internal_policy_local=True), eps("10.180.0.1")),
    )
    text = full(the_plans)
    assert_golden("no_endpoints", text)
    assert "172.30.0.41 . tcp . 80 : goto reject-chain" in text and "tcp . 30081 : goto reject-chain" in text
    assert "172.30.0.42 . tcp . 80 : drop" in text


def test_load_balancer_source_ranges() -> None:
    port = svc(
        spn(),
        "172.30.0.41",
        type=ServiceType.LOAD_BALANCER,
        node_port=30080,
        external_ips=("192.168.99.11",),
        load_balancer_ips=("1.2.3.4",),
        load_balancer_source_ranges=("203.0.113.0/25", "192.168.0.0/24"),
    )
    text = full(plans((port, eps("10.180.0.1"))), NftRenderOptions(node_ips=("192.168.0.2",)))
    assert_golden("lb_source_ranges", text)
    assert "ip saddr != { 203.0.113.0/25, 192.168.0.0/24, 1.2.3.4 } drop" in text


def test_external_traffic_policy_local() -> None:
    port = svc(spn(), "172.30.0.41", node_port=30080, external_policy_local=True, health_check_node_port=32000)
    text = full(plans((port, [*eps("10.180.0.1"), *eps("10.180.0.2", node="node1")])))
    assert_golden("etp_local", text)
    assert "ip saddr 10.0.0.0/8 goto service-" in text and "goto local-" in text
    without_local = full(plans((port, eps("10.180.0.1"))))
    assert "tcp . 30080 : drop" in without_local and "local-" not in without_local


def test_session_affinity() -> None:
    port = svc(spn(), "172.30.0.41", session_affinity_timeout=10800)
    text = full(plans((port, eps("10.180.0.1", "10.180.0.2"))))
    assert_golden("affinity", text)
    assert "flags dynamic,timeout ; timeout 10800s ;" in text and "update @affinity-" in text


def test_partial_sync_sends_only_the_changed_port() -> None:
    before = plans(
        (svc(spn(), "172.30.0.41"), eps("10.180.0.1", "10.180.0.2")),
        (svc(spn(name="svc2"), "172.30.0.42"), eps("10.180.0.3")),
    )
    after = plans(
        (svc(spn(), "172.30.0.41"), eps("10.180.0.1", "10.180.0.9")),
        (svc(spn(name="svc2"), "172.30.0.42"), eps("10.180.0.3")),
    )
    old, new = ports(before, OPTIONS), ports(after, OPTIONS)
    tx = Transaction("ip")
    elements = partial_sync(tx, old, new, {spn()}, full_elements(old))
    assert_golden("partial", tx.text())
    assert "svc2" not in tx.text() and "element" not in tx.text()  # the dispatch maps did not change
    assert "delete chain ip kube-proxy endpoint-" in tx.text()
    assert elements == full_elements(new)


def test_partial_sync_of_a_deleted_port_removes_its_elements_and_chains() -> None:
    old = ports(plans((svc(spn(), "172.30.0.41", node_port=30080), eps("10.180.0.1"))), OPTIONS)
    tx = Transaction("ip")
    assert partial_sync(tx, old, {}, {spn()}, full_elements(old)) == TableElements()
    text = tx.text()
    assert "delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }" in text
    assert "delete element ip kube-proxy cluster-ips { 172.30.0.41 }" in text
    assert text.index("delete element") < text.index("delete chain")
    assert text.count("delete chain") == 3  # service-, external-, endpoint-


def test_partial_sync_without_change_sends_nothing() -> None:
    old = ports(plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1"))), OPTIONS)
    tx = Transaction("ip")
    partial_sync(tx, old, dict(old), {spn()}, full_elements(old))
    assert tx.text() == ""


def full_elements(the_ports: dict[ServicePortName, PortRules]) -> TableElements:
    tx = Transaction("ip")
    return full_sync(tx, NftRenderer(OPTIONS).static(), the_ports, TableObjects(), recreate_base=False)


def test_partial_sync_keeps_a_key_two_ports_share_as_a_full_sync_would() -> None:
    shared = svc(spn(name="a"), "172.30.0.41", external_ips=("192.0.2.1",))
    other = svc(spn(name="b"), "172.30.0.42", external_ips=("192.0.2.1",))
    both = plans((shared, eps("10.180.0.1")), (other, eps("10.180.0.2")))
    for changed in (spn(name="a"), spn(name="b")):
        old = ports(both, OPTIONS)
        new = {name: port for name, port in old.items() if name != changed}
        elements = partial_sync(Transaction("ip"), old, new, {changed}, full_elements(old))
        assert elements == full_elements(new)
        back = partial_sync(Transaction("ip"), new, old, {changed}, elements)
        assert back.merged == full_elements(old).merged
