"""The tc part of the ebpf mode, pure: which plans tc serves, their frontends and entries, incremental writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kproxyd.backends import FrontendCounter
from kproxyd.backends.ebpf import image as img
from kproxyd.backends.ebpf import tc
from kproxyd.backends.ebpf.backend import EbpfBackend
from kproxyd.config import ProxyConfig
from kproxyd.model import DetectLocalMode, LocalTrafficDetector, NodeInfo, Protocol, ServiceType
from tests.model_factories import NODE, eps, plans, spn, svc
from tests.unit.test_ebpf import FakeFallback, FakeKernel

NODE_IPS = ("172.28.0.11", "10.244.1.1")
TCP = Protocol.TCP


def test_cluster_policy_node_port_masquerades_to_every_endpoint() -> None:
    port = svc(spn(), "10.96.0.10", node_port=30080)
    plan = plans((port, eps("10.0.1.2", "10.0.2.3", port=8080, node="node2")))[port.name]
    image = tc.plan_image(plan, NODE_IPS, "random")
    entry = img.FrontendEntry((("10.0.1.2", 8080), ("10.0.2.3", 8080)), tc.F_SNAT, service=str(port.name))
    assert image == {img.FrontendKey(ip, 30080, TCP): entry for ip in NODE_IPS}


def test_local_policy_keeps_the_client_and_picks_local_endpoints() -> None:
    """No SNAT; new flows from pod sources go to nftables, as the plan short-circuits them (kube-proxy's)."""
    port = svc(spn(), "10.96.0.10", node_port=30080, external_policy_local=True)
    endpoints = [*eps("10.0.1.2", node="node1"), *eps("10.0.2.3", node="node2")]
    plan = plans((port, endpoints))[port.name]
    assert plan.short_circuit_local_sources
    assert tc.plan_image(plan, NODE_IPS[:1], "random") == {
        img.FrontendKey("172.28.0.11", 30080, TCP): img.FrontendEntry(
            (("10.0.1.2", 80),), tc.F_POD_SOURCES, service=str(port.name)
        )
    }


def test_external_and_load_balancer_ips_at_the_service_port() -> None:
    port = svc(
        spn(),
        "10.96.0.10",
        type=ServiceType.LOAD_BALANCER,
        external_ips=("172.29.0.5",),
        load_balancer_ips=("172.29.0.6",),
    )
    plan = plans((port, eps("10.0.1.2")))[port.name]
    assert set(tc.plan_image(plan, NODE_IPS, "random")) == {
        img.FrontendKey("172.29.0.5", 80, TCP),
        img.FrontendKey("172.29.0.6", 80, TCP),
    }


def test_what_stays_with_the_nftables_fallback() -> None:
    node_port = svc(spn(), "10.96.0.10", node_port=30080)
    no_endpoints = plans((node_port, []))[node_port.name]
    local_elsewhere = plans(
        (svc(spn(), "10.96.0.10", node_port=30080, external_policy_local=True), eps("10.0.2.3", node="node2"))
    )
    ranges = svc(
        spn(), "10.96.0.10", type=ServiceType.LOAD_BALANCER, load_balancer_ips=("172.29.0.6",),
        load_balancer_source_ranges=("172.28.0.200/32",),
    )  # fmt: skip
    sctp = svc(spn(proto=Protocol.SCTP), "10.96.0.10", node_port=30080)
    cluster_ip = svc(spn(), "10.96.0.10")
    for plan in [
        no_endpoints,
        *local_elsewhere.values(),
        *plans((ranges, eps("10.0.1.2"))).values(),
        *plans((sctp, eps("10.0.1.2"))).values(),
        *plans((cluster_ip, eps("10.0.1.2"))).values(),
    ]:
        assert tc.plan_image(plan, NODE_IPS, "random") == {}, plan.port
    assert img.dataplane([no_endpoints], tc=True) == "ebpf(cluster-ip v4, external from node)+nftables(external)"
    served = plans((node_port, eps("10.0.1.2")))[node_port.name]
    assert img.dataplane([served], tc=True) == "ebpf(cluster-ip v4, external from node)+tc(external v4)"
    assert (
        img.dataplane([served, no_endpoints], tc=True)
        == "ebpf(cluster-ip v4, external from node)+tc(external v4)+nftables(external)"
    )


def test_node_port_addresses() -> None:
    local = ["127.0.0.1", "172.28.0.11", "10.244.1.1"]
    assert tc.node_port_ips(ProxyConfig(), NODE, local) == ("172.28.0.11", "10.244.1.1")
    only_lan = ProxyConfig(nodeport_addresses=("172.28.0.0/24",))
    assert tc.node_port_ips(only_lan, NODE, local) == ("172.28.0.11",)
    primary = ProxyConfig(nodeport_addresses=("primary",))
    assert tc.node_port_ips(primary, NodeInfo("node1", addresses=("10.244.1.1",)), local) == ("10.244.1.1",)


@dataclass
class FakeTcKernel(FakeKernel):
    """The tc maps as a dict, on fixed local addresses."""

    attaches: int = 0
    removes: int = 0
    failed: bool = False
    pod_sources: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def attach_interfaces(self) -> None:
        self.attaches += 1

    def remove(self) -> None:
        self.removes += 1

    def set_pod_sources(self, cidrs: Sequence[str], family: int = 4) -> None:
        self.pod_sources[family] = tuple(cidrs)


def test_backend_writes_tc_maps_full_and_partial_and_counts() -> None:
    sockets, kernel = FakeKernel(), FakeTcKernel()
    backend = EbpfBackend(ProxyConfig(mode="ebpf"), FakeFallback(), sockets, tc_kernel=kernel)  # type: ignore[arg-type]
    web = svc(spn(name="web"), "10.96.0.10", node_port=30080)
    other = svc(spn(name="other"), "10.96.0.11", node_port=30081)
    state = plans((web, eps("10.0.1.2")), (other, eps("10.0.1.3")))
    backend.apply(state, None, NODE)
    assert kernel.loads == 1
    assert set(kernel.maps) == {img.FrontendKey("172.28.0.11", p, TCP) for p in (30080, 30081)}
    state = plans((web, eps("10.0.1.2")), (other, []))
    backend.apply(state, {other.name}, NODE)
    assert kernel.writes[-1] == ({}, [img.FrontendKey("172.28.0.11", 30081, TCP)])  # no endpoints: nftables'
    kernel.local = ["172.28.0.11", "172.28.0.99"]  # a new address: the next full sync attaches and adds it
    backend.apply(state, None, NODE)
    assert kernel.attaches == 1 and kernel.loads == 1
    assert set(kernel.writes[-1][0]) == {img.FrontendKey("172.28.0.99", 30080, TCP)}
    assert FrontendCounter("ns1/web:p80", "10.96.0.10:80/TCP (TC)", 7) not in backend.connection_counters()


def test_a_partial_sync_reads_the_node_addresses_only_for_a_port_tc_serves() -> None:
    kernel = FakeTcKernel()
    backend = EbpfBackend(ProxyConfig(mode="ebpf"), FakeFallback(), FakeKernel(), tc_kernel=kernel)  # type: ignore[arg-type]
    web = svc(spn(name="web"), "10.96.0.10", node_port=30080)
    internal = svc(spn(name="internal"), "10.96.0.11")
    backend.apply(plans((web, eps("10.0.1.2")), (internal, [])), None, NODE)
    reads = kernel.address_reads
    backend.apply(plans((web, eps("10.0.1.2")), (internal, eps("10.0.1.3"))), {internal.name}, NODE)
    assert kernel.address_reads == reads  # a ClusterIP change: no netlink dump
    backend.apply(plans((web, eps("10.0.1.4")), (internal, eps("10.0.1.3"))), {web.name}, NODE)
    assert kernel.address_reads == reads + 1
    assert set(kernel.writes[-1][0]) == {img.FrontendKey("172.28.0.11", 30080, TCP)}


def test_a_tc_program_that_cannot_load_leaves_external_traffic_to_nftables() -> None:
    class Broken(FakeTcKernel):
        def load(self) -> None:
            raise OSError("no clsact here")

    broken = Broken()
    sockets = FakeKernel()
    backend = EbpfBackend(ProxyConfig(mode="ebpf"), FakeFallback(), sockets, tc_kernel=broken)  # type: ignore[arg-type]
    v6 = EbpfBackend(ProxyConfig(mode="ebpf"), FakeFallback(), sockets, 6, broken)  # type: ignore[arg-type]
    web = svc(spn(name="web"), "10.96.0.10", node_port=30080)
    backend.apply(plans((web, eps("10.0.1.2"))), None, NODE)  # no exception: the fallback has it all
    v6.apply({}, None, NODE)  # the other family does not compile again
    assert broken.writes == [] and backend.tc_frontends() == {} and broken.removes == 1
    assert backend._tc is None and v6._tc is None


def test_both_families_share_one_tc_kernel() -> None:
    """One load and one slot revision counter for the one map set, as the socket load balancer's."""
    config = ProxyConfig(mode="ebpf", cgroup_root="/sys/fs/cgroup/kproxyd-unit", bpf_pin_path="/sys/fs/bpf/unit")
    v4, v6 = EbpfBackend.for_config(config, 4)._tc, EbpfBackend.for_config(config, 6)._tc
    assert isinstance(v4, tc.TcKernel) and v4 is v6


def test_ipv6_plan_frontends_on_ipv6_node_ips() -> None:
    port = svc(spn(), "fd00:96::10", node_port=30080, external_ips=("fd00:29::5",))
    plan = plans((port, eps("fd00:244:2::3", port=8080, node="node2")))[port.name]
    entry = img.FrontendEntry((("fd00:244:2::3", 8080),), tc.F_SNAT, service=str(port.name))
    assert tc.plan_image(plan, ("fd00:28::11",), "random") == {
        img.FrontendKey("fd00:28::11", 30080, TCP): entry,
        img.FrontendKey("fd00:29::5", 80, TCP): entry,
    }
    assert img.dataplane([plan], tc=True) == "ebpf(cluster-ip v6, external from node)+tc(external v6)"
    v4 = plans((svc(spn(), "10.96.0.10", node_port=30080), eps("10.0.1.2")))
    assert img.dataplane([*v4.values(), plan], tc=True) == (
        "ebpf(cluster-ip v4+v6, external from node)+tc(external v4+v6)"
    )


def test_ipv6_node_port_addresses() -> None:
    local = ["::1", "fd00:28::11", "fe80::1", "fd00:244:1::1"]  # link-local: the fallback's
    assert tc.node_port_ips(ProxyConfig(), NODE, local, 6) == ("fd00:28::11", "fd00:244:1::1")
    only_lan = ProxyConfig(nodeport_addresses=("172.28.0.0/24", "fd00:28::/64"))
    assert tc.node_port_ips(only_lan, NODE, local, 6) == ("fd00:28::11",)
    only_v4 = ProxyConfig(nodeport_addresses=("172.28.0.0/24",))  # no IPv6 CIDR: every IPv6 address
    assert tc.node_port_ips(only_v4, NODE, local, 6) == ("fd00:28::11", "fd00:244:1::1")


def test_pod_source_prefixes_are_ipv4_mapped_in_one_trie() -> None:
    assert tc.prefix_key("10.244.0.0/16") == (112, (0, 0, 0xFFFF0000, 0xF40A))
    assert tc.prefix_key("fd00:244::/48") == (48, (0x440200FD, 0, 0, 0))  # fd 00 02 44 as a u32
    bridge = LocalTrafficDetector(DetectLocalMode.BRIDGE_INTERFACE, interface="cbr0")
    assert tc.pod_source_cidrs(bridge, 6) == ("::/0",)


def test_the_two_families_full_syncs_keep_each_others_tc_frontends() -> None:
    sockets, kernel = FakeKernel(), FakeTcKernel()
    config = ProxyConfig(mode="ebpf", cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))
    v4 = EbpfBackend(config, FakeFallback(), sockets, 4, kernel)  # type: ignore[arg-type]
    v6 = EbpfBackend(config, FakeFallback(), sockets, 6, kernel)  # type: ignore[arg-type]
    web4 = plans((svc(spn(name="web"), "10.96.0.10", node_port=30080), eps("10.0.1.2")))
    web6 = plans((svc(spn(name="web"), "fd00:96::10", node_port=30080), eps("fd00:244:1::2")))
    for _ in range(2):
        v4.apply(web4, None, NODE)
        v6.apply(web6, None, NODE)
    assert kernel.loads == 1
    assert set(kernel.maps) == {img.FrontendKey(ip, 30080, TCP) for ip in ("172.28.0.11", "fd00:28::11")}
    assert kernel.pod_sources == {4: ("10.244.0.0/16",), 6: ("fd00:244::/48",)}
    v6.apply({}, None, NODE)  # the IPv6 Service went: only its frontend goes
    assert set(kernel.maps) == {img.FrontendKey("172.28.0.11", 30080, TCP)}
    kernel.invalidate()  # a reload (drift, failure): both reread their own family, then write what differs
    v4.apply(web4, None, NODE)
    v6.apply(web6, None, NODE)
    assert kernel.loads == 2 and kernel.writes[-2] == ({}, [])
    assert set(kernel.maps) == {img.FrontendKey(ip, 30080, TCP) for ip in ("172.28.0.11", "fd00:28::11")}


def test_pod_sources_left_to_nftables_follow_the_local_traffic_detector() -> None:
    cidr = LocalTrafficDetector(DetectLocalMode.CLUSTER_CIDR, cidrs=("10.244.0.0/16",))
    assert tc.pod_source_cidrs(cidr) == ("10.244.0.0/16",)
    bridge = LocalTrafficDetector(DetectLocalMode.BRIDGE_INTERFACE, interface="cbr0")
    assert tc.pod_source_cidrs(bridge) == ("0.0.0.0/0",)  # only nftables can match the input interface
    assert tc.pod_source_cidrs(None) == ()
    kernel = FakeTcKernel()
    config = ProxyConfig(mode="ebpf", cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"))
    backend = EbpfBackend(config, FakeFallback(), FakeKernel(), tc_kernel=kernel)  # type: ignore[arg-type]
    backend.apply({}, None, NODE)
    assert kernel.pod_sources == {4: ("10.244.0.0/16",)}
