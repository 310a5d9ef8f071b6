"""The IPVS renderer: kube-proxy's virtual services, addresses, ipsets and rules; diffs; cleanup input."""

from __future__ import annotations

import ipaddress

from kproxyd.backends.ipvs import names
from kproxyd.backends.ipvs.backend import render_options
from kproxyd.backends.ipvs.names import all_set_names, set_name
from kproxyd.backends.ipvs.render import (
    IpsetChanges,
    IpvsRenderer,
    IpvsRenderOptions,
    IpvsState,
    LiveDestination,
    LiveService,
    RealServer,
    VirtualServer,
    VirtualServerKey,
    cleanup_rules,
    diff_services,
    ipset_changes,
)
from kproxyd.config import ProxyConfig
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan
from tests import model_factories
from tests.model_factories import CLUSTER_CIDR, eps, plans, spn, svc

GOLDEN = model_factories.GOLDEN / "ipvs"
OPTIONS = IpvsRenderOptions(
    local_detector=CLUSTER_CIDR, node_name="node1", nodeport_addresses=("192.168.0.2",), node_ips=("192.168.0.2",)
)
TCP80 = VirtualServerKey(Protocol.TCP, "172.30.0.41", 80)
A, B = RealServer("10.180.0.1", 80), RealServer("10.180.0.2", 80)


def state(the_plans: dict[ServicePortName, ServicePlan], options: IpvsRenderOptions = OPTIONS) -> IpvsState:
    renderer = IpvsRenderer(options)
    return renderer.state(renderer.port(plan) for plan in the_plans.values())


def dump(result: IpvsState) -> str:
    """The state as a readable text: virtual services, kube-ipvs0, non-empty ipsets, iptables rules."""
    lines = ["# virtual services"]
    for key, vs in sorted(result.services.items()):
        persistence = "" if vs.persistence is None else f" persistent {vs.persistence}"
        servers = " ".join(f"{s.ip}:{s.port}" for s in sorted(vs.destinations)) or "(none)"
        lines.append(f"{key} {vs.scheduler}{persistence} [{vs.service}] -> {servers}")
    lines += ["# kube-ipvs0", *sorted(result.addresses), "# ipsets"]
    lines += [f"{name} {' '.join(sorted(m))}" for name, m in sorted(result.sets.items()) if m]
    return "\n".join([*lines, "# iptables", result.iptables])


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/ipvs/<name>.txt; KPROXYD_UPDATE_GOLDEN=1 rewrites the file."""
    model_factories.assert_golden(GOLDEN / f"{name}.txt", text)


def test_every_frontend_kind() -> None:
    lb = spn(name="lb")
    local = spn(name="local")
    the_plans = plans(
        (svc(spn(), "172.30.0.41", session_affinity_timeout=10800), eps("10.180.0.1", "10.180.0.2", node="node1")),
        (
            svc(
                lb,
                "172.30.0.42",
                node_port=30080,
                type=ServiceType.LOAD_BALANCER,
                load_balancer_ips=("5.6.7.8",),
                load_balancer_source_ranges=("203.0.113.0/24", "192.168.0.0/24"),
                external_ips=("1.2.3.4",),
            ),
            eps("10.180.0.3", node="node2"),
        ),
        (
            svc(local, "172.30.0.43", node_port=30081, external_policy_local=True, health_check_node_port=32000),
            eps("10.180.0.4", node="node2"),
        ),
        (svc(spn(name="empty", proto=Protocol.UDP), "172.30.0.44", port=53), []),
    )
    assert_golden("every-frontend", dump(state(the_plans)))


def test_external_policy_local_without_local_endpoints_has_no_real_servers() -> None:
    """kube-proxy's IPVS mode: the node-port virtual service is empty (IPVS refuses), not a DROP rule."""
    local = spn(name="local")
    result = state(
        plans(
            (svc(local, "172.30.0.43", node_port=30081, external_policy_local=True), eps("10.1.0.1", node="node2"))
        )
    )
    assert result.services[VirtualServerKey(Protocol.TCP, "192.168.0.2", 30081)].destinations == frozenset()
    assert result.services[VirtualServerKey(Protocol.TCP, "172.30.0.43", 80)].destinations == {
        RealServer("10.1.0.1", 80)
    }
    assert result.sets["KUBE-NODE-PORT-LOCAL-TCP"] == {"30081"}


def test_masquerade_all_and_no_detector() -> None:
    the_plans = plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1")))
    everything = state(the_plans, IpvsRenderOptions(masquerade_all=True)).iptables
    assert "--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in everything
    nothing = state(the_plans, IpvsRenderOptions()).iptables
    assert "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ" in nothing


def test_ipv6_sets_and_addresses() -> None:
    name = spn()
    port = svc(name, "fd00::41", node_port=30080)
    options = IpvsRenderOptions(family=6, node_name="node1", nodeport_addresses=("fd00:1::2",))
    result = state({name: ServicePlan(port, (Endpoint("fd00:180::1", 80),), (), True)}, options)
    assert result.addresses == {"fd00::41"}
    assert result.sets["KUBE-6-CLUSTER-IP"] == {"fd00::41,tcp:80"}
    assert set(result.services) == {
        VirtualServerKey(Protocol.TCP, "fd00::41", 80),
        VirtualServerKey(Protocol.TCP, "fd00:1::2", 30080),
    }
    assert "--match-set KUBE-6-IPVS-IPS dst -j REJECT" in result.iptables
    assert set_name(names.CLUSTER_IP, 6) in all_set_names()


def test_ipv6_set_names_are_cut_to_what_ipset_takes_as_kube_proxy_does() -> None:
    assert set_name(names.LOAD_BALANCER_SOURCE_CIDR, 6) == "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    assert set_name(names.NODE_PORT_LOCAL_SCTP, 6) == "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
    assert max(len(name) for name in all_set_names()) == names.IPSET_MAX_NAME
    assert len(set(all_set_names())) == len(all_set_names())


def test_render_options_node_ports_on_the_nodes_own_addresses() -> None:
    node = NodeInfo("node1", addresses=("192.168.0.2",))
    local = ["127.0.0.1", "192.168.0.2", "10.244.1.1"]
    assert render_options(ProxyConfig(), node, local).nodeport_addresses == ("10.244.1.1", "192.168.0.2")
    primary = ProxyConfig(nodeport_addresses=("primary",))
    assert render_options(primary, node, local).nodeport_addresses == ("192.168.0.2",)
    assert render_options(ProxyConfig(ipvs_scheduler="sh"), node, local).scheduler == "sh"


def live(*servers: tuple[RealServer, int, int], scheduler: str = "rr") -> LiveService:
    """A live virtual service with (server, weight, connections)."""
    return LiveService(scheduler, None, {s: LiveDestination(w, c) for s, w, c in servers})


def want(*servers: RealServer, scheduler: str = "rr", persistence: int | None = None) -> VirtualServer:
    return VirtualServer(scheduler, persistence, frozenset(servers), "ns1/svc1:p80")


def test_diff_creates_and_deletes_services() -> None:
    gone = VirtualServerKey(Protocol.TCP, "172.30.0.99", 80)
    changes = diff_services({TCP80: want(A, B)}, {gone: live()})
    assert changes.create == {TCP80: want(A, B)} and changes.delete == [gone]
    assert changes.add_destinations == [(TCP80, A), (TCP80, B)]
    assert len(changes) == 4


def test_diff_updates_scheduler_and_persistence_in_place() -> None:
    changes = diff_services({TCP80: want(A, scheduler="sh", persistence=60)}, {TCP80: live((A, 1, 0))})
    assert changes.update == {TCP80: want(A, scheduler="sh", persistence=60)} and len(changes) == 1


def test_diff_removes_tcp_servers_gracefully() -> None:
    """Weight 0 while connections last, deletion once drained, back to weight 1 if wanted again."""
    busy = diff_services({TCP80: want(A)}, {TCP80: live((A, 1, 0), (B, 1, 3))})
    assert busy.drain_destinations == [(TCP80, B)] and not busy.delete_destinations
    assert busy.draining == {(TCP80, B)}
    still = diff_services({TCP80: want(A)}, {TCP80: live((A, 1, 0), (B, 0, 1))})
    assert not still.drain_destinations and still.draining == {(TCP80, B)} and len(still) == 0
    drained = diff_services({TCP80: want(A)}, {TCP80: live((A, 1, 0), (B, 0, 0))})
    assert drained.delete_destinations == [(TCP80, B)] and not drained.draining
    back = diff_services({TCP80: want(A, B)}, {TCP80: live((A, 1, 0), (B, 0, 2))})
    assert back.restore_destinations == [(TCP80, B)]


def test_diff_removes_udp_servers_at_once() -> None:
    udp = VirtualServerKey(Protocol.UDP, "172.30.0.41", 53)
    changes = diff_services({udp: want()}, {udp: live((A, 1, 5))})
    assert changes.delete_destinations == [(udp, A)] and not changes.draining


def test_diff_scope_and_excluded_cidrs() -> None:
    other = VirtualServerKey(Protocol.TCP, "10.0.0.5", 80)
    assert diff_services({}, {other: live()}, keep=[ipaddress.ip_network("10.0.0.0/8")]).delete == []
    assert diff_services({}, {other: live(), TCP80: live()}, keys=[TCP80]).delete == [TCP80]


def test_ipset_changes_create_missing_sets_and_diff_members() -> None:
    the_plans = plans(
        (
            svc(
                spn(),
                "172.30.0.41",
                load_balancer_ips=("5.6.7.8",),
                load_balancer_source_ranges=("1.1.1.1/32",),
                node_port=30080,
            ),
            eps("10.180.0.1"),
        )
    )
    result = state(the_plans)
    first = ipset_changes(result, {}, 4).additions
    assert "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535" in first
    assert "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536" in first
    assert "add KUBE-LOAD-BALANCER-SOURCE-CIDR 5.6.7.8,tcp:80,1.1.1.1" in first  # as ipset save prints a /32
    live_sets: dict[str, set[str]] = {name: set(m) for name, m in result.sets.items()}
    assert ipset_changes(result, live_sets, 4) == IpsetChanges("", "")
    live_sets["KUBE-CLUSTER-IP"] = {"172.30.0.9,tcp:80"}
    assert ipset_changes(result, live_sets, 4) == IpsetChanges(
        additions="add KUBE-CLUSTER-IP 172.30.0.41,tcp:80\n", deletions="del KUBE-CLUSTER-IP 172.30.0.9,tcp:80\n"
    )


def test_cleanup_rules_leave_iptables_modes_chains() -> None:
    nat = "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":KUBE-SERVICES - [0:0]",
            ":KUBE-NODE-PORT - [0:0]",
            ":KUBE-MARK-MASQ - [0:0]",
            '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
            "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
            "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-X",
            "-A KUBE-NODE-PORT -p tcp -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ",
            "COMMIT",
        ]
    )
    filt = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-IPVS-FILTER\n:KUBE-IPVS-FILTER - [0:0]\nCOMMIT\n"
    assert cleanup_rules({"nat": nat, "filter": filt}) == "\n".join(
        [
            "*nat",
            ":KUBE-NODE-PORT - [0:0]",
            "-D KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
            "-D KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
            "-X KUBE-NODE-PORT",
            "COMMIT",
            "*filter",
            ":KUBE-IPVS-FILTER - [0:0]",
            "-D INPUT -j KUBE-IPVS-FILTER",
            "-X KUBE-IPVS-FILTER",
            "COMMIT",
            "",
        ]
    )
    assert cleanup_rules({"nat": "*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"}) == ""
