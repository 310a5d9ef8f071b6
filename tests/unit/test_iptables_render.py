"""The iptables renderer: kube-proxy's chain names and rules, golden rulesets, partial syncs, random plans."""

from __future__ import annotations

import shlex
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxyd.backends.iptables.backend import nodeport_ips
from kproxyd.backends.iptables.names import endpoint_chain, service_chains
from kproxyd.backends.iptables.render import IptablesRenderer, IptablesRenderOptions, RenderResult
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
from kproxyd.plan import ServicePlan
from tests import model_factories
from tests.model_factories import CLUSTER_CIDR, eps, plans, spn, svc

GOLDEN = model_factories.GOLDEN / "iptables"
BUILTIN_TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "MASQUERADE", "DNAT"}


def render(
    the_plans: dict[ServicePortName, ServicePlan],
    options: IptablesRenderOptions | None = None,
    changed: set[ServicePortName] | None = None,
    existing: Iterable[str] = (),
) -> RenderResult:
    return IptablesRenderer(options or IptablesRenderOptions()).render(the_plans, changed, set(existing))


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/iptables/<name>.rules; KPROXYD_UPDATE_GOLDEN=1 rewrites the file."""
    model_factories.assert_golden(GOLDEN / f"{name}.rules", text)


def check_restore_text(text: str, known: Iterable[str] = ()) -> dict[str, set[str]]:
    """A strict parser of the restore input; returns the declared chains per table.

    Every line must parse, chains are declared once per table before use and fit iptables' 28
    characters, every -A chain and -j target is declared (or known to exist, or built in), -X only
    deletes declared chains nobody appends to, and every table ends in COMMIT.
    """
    tables: dict[str, set[str]] = {}
    table: str | None = None
    appended: set[str] = set()
    deleted: set[str] = set()
    known_chains = set(known)
    for line in text.splitlines():
        if table is None:
            assert line.startswith("*") or line == "", line
            if line:
                table = line[1:]
                assert table not in tables
                tables[table], appended, deleted = set(), set(), set()
            continue
        if line == "COMMIT":
            assert not appended & deleted
            table = None
            continue
        declared = tables[table]
        if line.startswith(":"):
            chain, policy, counters = line[1:].split(" ")
            assert (policy, counters) == ("-", "[0:0]") and len(chain) <= 28 and chain not in declared, line
            assert not appended, "declarations must precede rules"
            declared.add(chain)
            continue
        words = shlex.split(line)
        if words[0] == "-X":
            assert words[1] in declared and len(words) == 2, line
            deleted.add(words[1])
            continue
        assert words[0] == "-A" and words[1] in declared, line
        appended.add(words[1])
        if "-j" in words:
            target = words[words.index("-j") + 1]
            assert target in declared | known_chains | BUILTIN_TARGETS, line
    assert table is None, "missing COMMIT"
    assert set(tables) == {"filter", "nat"}
    return tables


@pytest.mark.parametrize(
    ("name", "endpoint", "svc_chain", "sep_chain"),
    [
        (spn(), "10.180.0.1", "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
        (spn(), "10.180.2.1", "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"),
        (spn("ns2", "svc2"), "10.180.0.2", "KUBE-SVC-GNZBNJ2PO5MGZ6GT", "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
        (spn("ns2", "svc2", "p8080"), "10.0.2.1", "KUBE-SVC-2VJB64SDSIJUP5T6", "KUBE-SEP-UHEGFW77JX3KXTOV"),
        (spn("ns3", "svc3"), "10.180.0.3", "KUBE-SVC-X27LE4BHSL4DOUIK", "KUBE-SEP-OYPFS5VJICHGATKP"),
    ],
)
def test_chain_names_match_kube_proxy_tests(
    name: ServicePortName, endpoint: str, svc_chain: str, sep_chain: str
) -> None:
    port = 8080 if name.port == "p8080" else 80
    assert service_chains(name).cluster == svc_chain
    assert service_chains(name).external == svc_chain.replace("SVC", "EXT")
    assert endpoint_chain(name, Endpoint(endpoint, port)) == sep_chain


def test_overall_ruleset_matches_kube_proxy() -> None:
    """kube-proxy's TestOverallIPTablesRulesWithMultipleServices, rule for rule (sorted, as it compares).

    Differences on purpose: MASQUERADE carries --random-fully (kube-proxy adds it when iptables has
    it), kubelet's KUBE-FIREWALL chain is not ours to write, and kproxyd adds one REJECT per cluster IP
    for ports the Service does not serve (kube-proxy's nftables mode does this; its iptables mode lets such
    packets follow the default route), which is left out of the comparison.
    """
    the_plans = plans(
        (svc(spn("ns1", "svc1"), "172.30.0.41"), eps("10.180.0.1")),
        (
            svc(
                spn("ns2", "svc2"),
                "172.30.0.42",
                type=ServiceType.LOAD_BALANCER,
                node_port=3001,
                load_balancer_ips=("1.2.3.4",),
                external_ips=("192.168.99.22",),
                external_policy_local=True,
                health_check_node_port=30000,
            ),
            eps("10.180.0.2"),
        ),
        (svc(spn("ns3", "svc3"), "172.30.0.43", node_port=3003), eps("10.180.0.3")),
        (
            svc(spn("ns4", "svc4"), "172.30.0.44", external_ips=("192.168.99.33",)),
            [*eps("10.180.0.4"), *eps("10.180.0.5", node="node1")],
        ),
        (
            svc(
                spn("ns5", "svc5"),
                "172.30.0.45",
                type=ServiceType.LOAD_BALANCER,
                node_port=3002,
                load_balancer_ips=("5.6.7.8",),
                load_balancer_source_ranges=("203.0.113.0/25",),
            ),
            eps("10.180.0.3"),
        ),
        (svc(spn("ns6", "svc6"), "172.30.0.46"), []),
    )
    text = render(the_plans, IptablesRenderOptions(local_detector=CLUSTER_CIDR)).text
    ours = [line for line in text.splitlines() if "cluster IP with no such port" not in line]
    expected = (GOLDEN / "kube_proxy_overall.expected").read_text()
    assert sorted(ours) == sorted(expected.splitlines())
    assert sum("cluster IP with no such port" in line for line in text.splitlines()) == 6


def test_cluster_ip_three_endpoints() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1", "10.180.1.1", "10.180.2.1")))
    assert_golden("cluster_ip_3_endpoints", render(the_plans).text)


def test_node_port() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41", node_port=30080), eps("10.180.0.1", "10.180.1.1")))
    assert_golden("node_port", render(the_plans, IptablesRenderOptions(local_detector=CLUSTER_CIDR)).text)


def test_no_endpoints_rejects_every_destination() -> None:
    port = svc(
        spn(),
        "172.30.0.41",
        type=ServiceType.LOAD_BALANCER,
        node_port=30080,
        external_ips=("192.168.99.11",),
        load_balancer_ips=("1.2.3.4",),
    )
    text = render(plans((port, []))).text
    assert_golden("no_endpoints", text)
    nat = text.split("*nat")[1]
    assert "KUBE-SVC-" not in nat and "KUBE-EXT-" not in nat
    assert text.count('"ns1/svc1:p80 has no endpoints"') == 4


def test_named_and_unnamed_ports_and_two_ports() -> None:
    the_plans = plans(
        (svc(spn("ns1", "web", ""), "172.30.0.50"), eps("10.180.0.1")),
        (svc(spn("ns2", "dns", "dns", Protocol.UDP), "172.30.0.10", port=53), eps("10.180.0.9", port=5353)),
        (svc(spn("ns2", "dns", "dns-tcp"), "172.30.0.10", port=53), eps("10.180.0.9", port=5353)),
    )
    text = render(the_plans).text
    assert_golden("named_and_two_ports", text)
    assert '"ns1/web cluster IP"' in text and '"ns2/dns:dns cluster IP"' in text
    assert "-m udp -p udp -j DNAT --to-destination 10.180.0.9:5353" in text


@pytest.mark.parametrize(
    ("golden", "options"),
    [
        ("masquerade_all", IptablesRenderOptions(masquerade_all=True, masquerade_bit=5)),
        ("detect_cluster_cidr", IptablesRenderOptions(local_detector=CLUSTER_CIDR)),
        (
            "detect_bridge",
            IptablesRenderOptions(
                local_detector=LocalTrafficDetector(DetectLocalMode.BRIDGE_INTERFACE, interface="cbr0")
            ),
        ),
        (
            "detect_interface_prefix",
            IptablesRenderOptions(
                local_detector=LocalTrafficDetector(DetectLocalMode.INTERFACE_NAME_PREFIX, interface="veth")
            ),
        ),
        ("nodeport_addresses", IptablesRenderOptions(nodeport_addresses=("192.168.0.2/32", "10.1.0.1/32"))),
    ],
)
def test_masquerade_and_node_options(golden: str, options: IptablesRenderOptions) -> None:
    port = svc(spn(), "172.30.0.41", node_port=30080, external_policy_local=True)
    the_plans = plans((port, [*eps("10.180.0.1"), *eps("10.180.0.2", node="node1")]))
    assert_golden(golden, render(the_plans, options).text)


LOCAL_IPS = ("127.0.0.1", "192.168.0.2", "10.1.0.1", "172.17.0.1")


@pytest.mark.parametrize(
    ("cidrs", "expected"),
    [
        ((), None),
        (("0.0.0.0/0",), None),
        (("192.168.0.0/24", "0.0.0.0/0"), None),
        (("fd00::/64",), None),
        (("192.168.0.0/24", "10.0.0.0/8"), ("10.1.0.1/32", "192.168.0.2/32")),
        (("primary",), ("192.168.0.2/32",)),
        (("127.0.0.0/8", "primary"), ("127.0.0.1/32", "192.168.0.2/32")),
        (("192.0.2.0/24",), ()),
    ],
)
def test_nodeport_addresses_are_local_ips_in_the_cidrs(cidrs: tuple[str, ...], expected: object) -> None:
    node = NodeInfo("node1", addresses=("192.168.0.2", "203.0.113.9"))  # 203.0.113.9: not local, never used
    assert nodeport_ips(cidrs, node, LOCAL_IPS) == expected


def test_nodeport_addresses_without_a_match_write_no_jump() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41", node_port=30080), eps("10.180.0.1")))
    text = render(the_plans, IptablesRenderOptions(nodeport_addresses=())).text
    assert "-A KUBE-NODEPORTS" in text and "-j KUBE-NODEPORTS" not in text


def test_no_detector_means_no_cluster_ip_masquerade() -> None:
    text = render(plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1")))).text
    svc_rules = [line for line in text.splitlines() if line.startswith("-A KUBE-SVC-")]
    assert svc_rules and not any("cluster IP" in line for line in svc_rules)


def test_load_balancer_external_ips_and_source_ranges() -> None:
    port = svc(
        spn(),
        "172.30.0.41",
        type=ServiceType.LOAD_BALANCER,
        node_port=30080,
        external_ips=("192.168.99.11",),
        load_balancer_ips=("1.2.3.4", "1.2.3.5"),
        load_balancer_source_ranges=("203.0.113.0/25", "192.168.0.0/24"),
    )
    options = IptablesRenderOptions(node_ips=("192.168.0.2",))
    text = render(plans((port, eps("10.180.0.1"))), options).text
    assert_golden("lb_source_ranges", text)
    # A range holding the node IP admits the LB IPs as sources too (node-originated hairpin to the VIP).
    assert "-s 1.2.3.4 -j KUBE-EXT-" in text and "-s 1.2.3.5 -j KUBE-EXT-" in text
    without_node = render(plans((port, eps("10.180.0.1"))), IptablesRenderOptions(node_ips=("10.9.9.9",))).text
    assert "-s 1.2.3.4 -j KUBE-EXT-" not in without_node


def test_external_traffic_policy_local() -> None:
    port = svc(spn(), "172.30.0.41", node_port=30080, external_policy_local=True, health_check_node_port=32000)
    with_local = plans((port, [*eps("10.180.0.1"), *eps("10.180.0.2", node="node1")]))
    without_local = plans((port, eps("10.180.0.1")))
    options = IptablesRenderOptions(local_detector=CLUSTER_CIDR)
    assert_golden("etp_local", render(with_local, options).text)
    text = render(without_local, options).text
    assert_golden("etp_local_no_local_endpoints", text)
    assert '"ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL' in text
    assert "KUBE-SVL-" not in text


def test_internal_traffic_policy_local_without_local_endpoints_drops() -> None:
    port = svc(spn(), "172.30.0.41", internal_policy_local=True)
    text = render(plans((port, eps("10.180.0.1")))).text
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints"'
        " -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP"
    ) in text


def test_session_affinity() -> None:
    port = svc(spn(), "172.30.0.41", session_affinity_timeout=10800)
    assert_golden("affinity", render(plans((port, eps("10.180.0.1", "10.180.0.2")))).text)


def test_large_cluster_drops_endpoint_comments() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1", "10.180.0.2")))
    text = render(the_plans, IptablesRenderOptions(large_cluster_endpoints=1)).text
    sep = service_chains(spn()).cluster
    assert f"-A {sep} -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-" in text
    assert "-A KUBE-SEP-" in text and "--comment ns1/svc1:p80" not in text


def test_partial_render_rewrites_only_changed_services() -> None:
    a, b, c = spn("ns1", "a"), spn("ns1", "b"), spn("ns1", "c")
    before = plans(
        (svc(a, "172.30.0.1"), eps("10.180.0.1")),
        (svc(b, "172.30.0.2"), eps("10.180.0.2")),
        (svc(c, "172.30.0.3"), eps("10.180.0.3")),
    )
    full = render(before)
    after = plans(
        (svc(a, "172.30.0.1"), eps("10.180.0.1")), (svc(b, "172.30.0.2"), eps("10.180.0.2", "10.180.0.4"))
    )
    partial = render(after, changed={b, c}, existing=full.chains)
    assert_golden("partial", partial.text)
    tables = check_restore_text(partial.text, known=full.chains)
    a_chains = {service_chains(a).cluster, endpoint_chain(a, Endpoint("10.180.0.1", 80))}
    assert not a_chains & tables["nat"], "unchanged chains must not be declared"
    assert "-X " + service_chains(c).cluster in partial.text
    assert "-X " + endpoint_chain(c, Endpoint("10.180.0.3", 80)) in partial.text
    assert '"ns1/a:p80 cluster IP"' in partial.text, "top-level chains are rewritten whole"
    assert partial.chains == render(after).chains
    assert partial.rule_count == render(after).rule_count


def test_full_render_deletes_stale_chains_only_of_ours() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1")))
    result = render(the_plans, existing={"KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB", "MY-CHAIN"})
    assert "-X KUBE-SVC-AAAAAAAAAAAAAAAA" in result.text and "-X KUBE-SEP-BBBBBBBBBBBBBBBB" in result.text
    assert "MY-CHAIN" not in result.text
    assert result.rule_count == render(the_plans).rule_count


# Random plans: any valid input renders text the parser accepts, identically twice.

_ip = st.builds(lambda a, b: f"10.{a}.{b}.{a ^ b}", st.integers(0, 255), st.integers(1, 254))
_endpoint = st.builds(
    Endpoint,
    ip=_ip,
    port=st.integers(1, 65535),
    ready=st.booleans(),
    serving=st.booleans(),
    terminating=st.booleans(),
    node_name=st.sampled_from([None, "node1", "node2"]),
)
_name = st.builds(
    ServicePortName,
    namespace=st.sampled_from(["default", "kube-system", "ns1"]),
    name=st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True),
    port=st.sampled_from(["", "http", "dns-tcp"]),
    protocol=st.sampled_from(list(Protocol)),
)
_cidr = st.sampled_from(["203.0.113.0/25", "192.168.0.0/16", "0.0.0.0/0", "10.1.2.3/32"])


@st.composite
def _service_port(draw: st.DrawFn) -> ServicePort:
    lb = draw(st.lists(_ip, max_size=2, unique=True))
    return ServicePort(
        name=draw(_name),
        type=ServiceType.LOAD_BALANCER if lb else ServiceType.CLUSTER_IP,
        cluster_ips=(draw(_ip),),
        port=draw(st.integers(1, 65535)),
        node_port=draw(st.none() | st.integers(30000, 32767)),
        external_ips=tuple(draw(st.lists(_ip, max_size=2, unique=True))),
        load_balancer_ips=tuple(lb),
        load_balancer_source_ranges=tuple(draw(st.lists(_cidr, max_size=2, unique=True))),
        session_affinity_timeout=draw(st.none() | st.integers(1, 86400)),
        external_policy_local=draw(st.booleans()),
        internal_policy_local=draw(st.booleans()),
        health_check_node_port=draw(st.none() | st.integers(30000, 32767)),
    )


_options = st.builds(
    IptablesRenderOptions,
    masquerade_bit=st.integers(0, 31),
    masquerade_all=st.booleans(),
    local_detector=st.none()
    | st.just(CLUSTER_CIDR)
    | st.just(LocalTrafficDetector(DetectLocalMode.INTERFACE_NAME_PREFIX, interface="veth")),
    nodeport_addresses=st.sampled_from([None, (), ("192.168.0.2/32", "10.1.0.1/32")]),
    node_ips=st.sampled_from([(), ("192.168.0.2",)]),
    large_cluster_endpoints=st.sampled_from([1000, 2]),
)


@settings(max_examples=150, deadline=None)
@given(
    ports=st.lists(st.tuples(_service_port(), st.lists(_endpoint, max_size=4)), max_size=6),
    options=_options,
    data=st.data(),
)
def test_random_plans_render_valid_deterministic_text(
    ports: list[tuple[ServicePort, list[Endpoint]]], options: IptablesRenderOptions, data: st.DataObject
) -> None:
    the_plans = plans(*ports)
    renderer = IptablesRenderer(options)
    full = renderer.render(the_plans, None, set())
    check_restore_text(full.text)
    assert renderer.render(dict(reversed(the_plans.items())), None, set()) == full
    changed = data.draw(st.sets(st.sampled_from(sorted(the_plans, key=str)))) if the_plans else set()
    partial = renderer.render(the_plans, changed, full.chains)
    check_restore_text(partial.text, known=full.chains)
    assert (partial.chains, partial.rule_count) == (full.chains, full.rule_count)


def test_localhost_nodeports_guard() -> None:
    """CVE-2020-8558: with node ports on 127.0.0.1, packets to 127/8 from elsewhere are dropped."""
    the_plans = plans((svc(spn(), "172.30.0.41", node_port=30080), eps("10.180.0.1")))
    text = render(the_plans, IptablesRenderOptions(localhost_nodeports=True)).text
    assert ":KUBE-FIREWALL - [0:0]" in text
    assert (
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8'
        " ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    ) in text
    assert "KUBE-FIREWALL" not in render(the_plans, IptablesRenderOptions()).text
