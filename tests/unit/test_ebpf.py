"""The eBPF backend's pure parts: Maglev tables, plans → map image, fallback plans, incremental map writes."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import pytest

from kproxyd.backends import FrontendCounter, WriteStats
from kproxyd.backends.ebpf import image as img
from kproxyd.backends.ebpf import kernel as kernel_module
from kproxyd.backends.ebpf.backend import EbpfBackend, socket_lb
from kproxyd.backends.ebpf.kernel import SockLbKernel
from kproxyd.backends.ebpf.maglev import TABLE_SIZE, maglev_table
from kproxyd.config import ProxyConfig
from kproxyd.model import NodeInfo, Protocol, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan
from tests.model_factories import NODE, eps, plans, spn, svc


def test_maglev_spreads_evenly() -> None:
    table = maglev_table([f"10.0.0.{i}:80" for i in range(10)])
    assert len(table) == TABLE_SIZE
    shares = [table.count(i) for i in range(10)]
    assert max(shares) - min(shares) <= 2  # Maglev's near-perfect balance


@pytest.mark.parametrize("n", [3, 5, 10, 20])
def test_maglev_removing_one_backend_moves_about_one_nth(n: int) -> None:
    names = [f"10.0.0.{i}:8080" for i in range(n)]
    before = [names[i] for i in maglev_table(names)]
    kept = names[:2] + names[3:]
    after = [kept[i] for i in maglev_table(kept)]
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    lost = before.count(names[2])  # the removed backend's slots must move
    assert moved >= lost
    assert moved - lost <= TABLE_SIZE * 0.05  # the others barely move (the paper's "minimal disruption")
    assert moved / TABLE_SIZE == pytest.approx(1 / n, abs=0.05)


def test_maglev_table_does_not_depend_on_order() -> None:
    names = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    assert [names[i] for i in maglev_table(names)] == [
        list(reversed(names))[i] for i in maglev_table(list(reversed(names)))
    ]


def test_image_of_a_cluster_ip() -> None:
    port = svc(spn(), "10.96.0.10")
    image = img.image(plans((port, eps("10.0.1.2", "10.0.2.3", port=8080))), "random")
    key = img.FrontendKey("10.96.0.10", 80, Protocol.TCP)
    assert image[key] == img.FrontendEntry((("10.0.1.2", 8080), ("10.0.2.3", 8080)), service=str(port.name))
    assert image[img.address_key("10.96.0.10")] == img.ADDRESS_ENTRY
    assert len(image) == 2


def test_no_endpoints_and_affinity_and_maglev() -> None:
    empty = svc(spn(name="empty"), "10.96.0.11")
    sticky = svc(spn(name="sticky"), "10.96.0.12", session_affinity_timeout=600)
    hashed = svc(spn(name="hashed"), "10.96.0.13", lb_algorithm="maglev")
    image = img.image(
        plans((empty, []), (sticky, eps("10.0.1.2")), (hashed, eps("10.0.1.2", "10.0.1.3"))), "random"
    )
    assert image[img.FrontendKey("10.96.0.11", 80, Protocol.TCP)].flags == img.F_NO_ENDPOINTS
    assert image[img.FrontendKey("10.96.0.12", 80, Protocol.TCP)] == img.FrontendEntry(
        (("10.0.1.2", 80),), 0, 600, str(sticky.name)
    )
    maglev = image[img.FrontendKey("10.96.0.13", 80, Protocol.TCP)]
    assert maglev.flags == img.F_MAGLEV and len(maglev.slots) == TABLE_SIZE
    assert set(maglev.slots) == {("10.0.1.2", 80), ("10.0.1.3", 80)}


def test_internal_traffic_policy_local_without_local_endpoints_fails() -> None:
    port = svc(spn(), "10.96.0.10", internal_policy_local=True)
    image = img.image(plans((port, eps("10.0.2.3", node="node2"))), "random")
    assert image[img.FrontendKey("10.96.0.10", 80, Protocol.TCP)].flags == img.F_NO_ENDPOINTS


def test_sctp_stays_with_nftables() -> None:
    sctp = svc(spn(name="sctp", proto=Protocol.SCTP), "10.96.0.10")
    state = plans((sctp, eps("10.0.1.2")))
    assert img.image(state, "random") == {}
    assert set(img.fallback_plans(state)) == {sctp.name}
    assert img.dataplane([state[sctp.name]]) == "nftables(sctp)"


def test_image_of_an_ipv6_cluster_ip() -> None:
    six = svc(spn(name="six"), "fd00:96::10")
    hashed = svc(spn(name="hashed6"), "fd00:96::11", lb_algorithm="maglev")
    state = plans((six, eps("fd00:244::2", "fd00:244::3", port=8080)), (hashed, eps("fd00:244::2")))
    image = img.image(state, "random")
    key = img.FrontendKey("fd00:96::10", 80, Protocol.TCP)
    assert image[key] == img.FrontendEntry((("fd00:244::2", 8080), ("fd00:244::3", 8080)), service=str(six.name))
    assert image[img.address_key("fd00:96::10")] == img.ADDRESS_ENTRY
    assert set(image[img.FrontendKey("fd00:96::11", 80, Protocol.TCP)].slots) == {("fd00:244::2", 80)}
    assert img.fallback_plans(state) == {}  # IPv6 cluster IPs are eBPF's too: nothing falls back
    assert img.dataplane([state[six.name]]) == "ebpf(cluster-ip v6)"


def test_ipv6_node_port_falls_back_without_its_cluster_ip() -> None:
    port = svc(spn(), "fd00:96::10", node_port=30080)
    fallback = img.fallback_plans(plans((port, eps("fd00:244::2"))))
    assert fallback[port.name].port.cluster_ips == ()
    assert (
        img.dataplane(plans((port, eps("fd00:244::2"))).values())
        == "ebpf(cluster-ip v6, external from node)+nftables(external)"
    )


@pytest.mark.parametrize(("ip", "mapped"), [("10.96.0.10", "::ffff:10.96.0.10"), ("fd00:96::10", "fd00:96::10")])
def test_map_addresses_are_16_bytes_ipv4_mapped(ip: str, mapped: str) -> None:
    """IPv4 as ::ffff:a.b.c.d: connect6 to ::ffff:<cluster IP> (a dual-stack socket) finds the IPv4 frontend."""
    words = kernel_module._ip(ip)
    assert struct.pack("<4I", *words) == ipaddress.IPv6Address(mapped).packed  # bytes in network order
    assert kernel_module._ip_text(words) == ip


def test_fallback_keeps_external_frontends_without_cluster_ips() -> None:
    cluster_only = svc(spn(name="a"), "10.96.0.10")
    node_port = svc(spn(name="b"), "10.96.0.11", node_port=30080)
    fallback = img.fallback_plans(plans((cluster_only, eps("10.0.1.2")), (node_port, eps("10.0.1.2"))))
    assert list(fallback) == [node_port.name]
    assert fallback[node_port.name].port.cluster_ips == ()
    assert fallback[node_port.name].port.node_port == 30080
    assert (
        img.dataplane(plans((node_port, eps("10.0.1.2"))).values())
        == "ebpf(cluster-ip v4, external from node)+nftables(external)"
    )


@dataclass
class FakeKernel(SockLbKernel):
    """The maps as a dict; records every write."""

    maps: img.Image = field(default_factory=dict)
    writes: list[tuple[img.Image, list[img.FrontendKey]]] = field(default_factory=list)
    loads: int = 0
    local: list[str] = field(default_factory=lambda: ["172.28.0.11", "fd00:28::11"])
    address_reads: int = 0

    def __post_init__(self) -> None:
        super().__init__("/sys/fs/cgroup/test", "/sys/fs/bpf/test")

    def local_addresses(self, family: int = 4) -> list[str]:
        self.address_reads += 1
        return [ip for ip in self.local if img.family_of(ip) == family]

    def load(self) -> None:
        self.loads += 1
        self.generation += 1
        self._bpf = self  # loaded: stands in for bcc's object

    def attach(self) -> None:
        pass

    def read_image(self, family: int) -> img.Image:
        return {key: entry for key, entry in self.maps.items() if img.family_of(key.ip) == family}

    def write(self, upserts: img.Image, deletes: list[img.FrontendKey]) -> int:
        self.writes.append((upserts, deletes))
        self.maps.update(upserts)
        for key in deletes:
            del self.maps[key]
        return len(upserts) + len(deletes)

    def counters(self) -> Iterator[tuple[img.FrontendKey, int]]:
        yield img.FrontendKey("10.96.0.10", 80, Protocol.TCP), 7

    def attached(self) -> bool:
        return True


class FakeFallback:
    """Records what the nftables fallback was asked to render."""

    name = "nftables"

    def __init__(self) -> None:
        self.calls: list[tuple[set[ServicePortName], set[ServicePortName] | str | None]] = []

    def apply(
        self, plans: Mapping[ServicePortName, ServicePlan], changed: set[ServicePortName] | None, node: NodeInfo
    ) -> WriteStats:
        self.calls.append((set(plans), changed))
        return WriteStats()

    def connection_counters(self) -> list[FrontendCounter]:
        return []

    def drifted(self) -> bool:
        return False

    def cleanup(self) -> None:
        pass

    def remove_table(self) -> None:
        self.calls.append((set(), "removed"))


def _backend(kernel: FakeKernel, family: int = 4) -> tuple[EbpfBackend, FakeFallback]:
    fallback = FakeFallback()
    return EbpfBackend(ProxyConfig(mode="ebpf"), fallback, kernel, family), fallback


def test_both_families_share_one_socket_load_balancer() -> None:
    config = ProxyConfig(mode="ebpf", cgroup_root="/sys/fs/cgroup/kproxyd-unit", bpf_pin_path="/sys/fs/bpf/unit")
    assert EbpfBackend.for_config(config, 4)._kernel is EbpfBackend.for_config(config, 6)._kernel
    assert socket_lb("/a", "/b") is socket_lb("/a", "/b") is not socket_lb("/a", "/c")


def test_families_write_their_own_frontends_and_reread_after_a_reload() -> None:
    four, six = svc(spn(name="four"), "10.96.0.10"), svc(spn(name="six"), "fd00:96::10")
    v4, v6 = plans((four, eps("10.0.1.2"))), plans((six, eps("fd00:244::2")))
    kernel = FakeKernel()
    (backend4, _), (backend6, _) = _backend(kernel, 4), _backend(kernel, 6)
    backend4.apply(v4, None, NODE)
    backend6.apply(v6, None, NODE)
    assert kernel.loads == 1  # one load for both families
    assert kernel.maps == img.image(v4, "random") | img.image(v6, "random")  # v6's sync left v4's alone
    kernel.invalidate()  # a failure or drift seen by either family
    kernel.writes.clear()
    backend6.apply(v6, None, NODE)
    backend4.apply(v4, set(), NODE)  # a partial sync: still rereads, the load moved on
    assert kernel.loads == 2 and kernel.writes == [({}, []), ({}, [])]  # both reread: nothing to rewrite
    assert backend4.frontends() == {key: four.name for key in img.plan_image(v4[four.name], "random")}


def test_restart_rewrites_only_what_differs() -> None:
    a, b = svc(spn(name="a"), "10.96.0.10"), svc(spn(name="b"), "10.96.0.11")
    state = plans((a, eps("10.0.1.2")), (b, eps("10.0.1.3")))
    kernel = FakeKernel(maps=img.image(plans((a, eps("10.0.1.2")), (b, eps("10.0.1.9"))), "random"))
    backend, _ = _backend(kernel)  # a new daemon finding an earlier run's maps
    backend.apply(state, None, NODE)
    assert kernel.loads == 1
    assert kernel.writes == [
        (
            {
                img.FrontendKey("10.96.0.11", 80, Protocol.TCP): img.FrontendEntry(
                    (("10.0.1.3", 80),), service=str(b.name)
                )
            },
            [],
        )
    ]


def test_partial_sync_writes_only_the_changed_port_and_shared_addresses_stay() -> None:
    http = svc(spn(name="web", port="http"), "10.96.0.10")
    dns = replace(svc(spn(name="web", port="dns", proto=Protocol.UDP), "10.96.0.10"), port=53)
    kernel = FakeKernel()
    backend, fallback = _backend(kernel)
    state = plans((http, eps("10.0.1.2")), (dns, eps("10.0.1.2")))
    backend.apply(state, None, NODE)
    assert kernel.maps == img.image(state, "random")
    del state[dns.name]
    backend.apply(state, {dns.name}, NODE)
    upserts, deletes = kernel.writes[-1]
    assert upserts == {} and deletes == [img.FrontendKey("10.96.0.10", 53, Protocol.UDP)]  # address kept
    del state[http.name]
    backend.apply(state, {http.name}, NODE)
    assert kernel.maps == {}
    assert fallback.calls == [(set(), "removed")]  # nothing external: no table (no nat hooks, no conntrack)
    assert backend.connection_counters() == []


def test_counters_name_their_service_port() -> None:
    port = svc(spn(), "10.96.0.10")
    backend, _ = _backend(FakeKernel())
    backend.apply(plans((port, eps("10.0.1.2"))), None, NODE)
    assert backend.connection_counters() == [FrontendCounter("ns1/svc1:p80", "10.96.0.10:80/TCP", 7)]


LB = svc(
    spn(name="lb"),
    "10.96.0.20",
    node_port=30080,
    external_ips=("192.0.2.7",),
    load_balancer_ips=("198.51.100.9",),
    type=ServiceType.LOAD_BALANCER,
)
NODE_IPS = ("172.28.0.11",)


def test_external_frontends_for_local_processes_pick_the_cluster_policy_endpoints() -> None:
    state = plans((LB, eps("10.0.1.2", node="node1") + eps("10.0.2.2", node="node2")))
    image = img.image(state, "random", NODE_IPS)
    both = img.FrontendEntry((("10.0.1.2", 80), ("10.0.2.2", 80)), service=str(LB.name))
    external = [("172.28.0.11", 30080), ("192.0.2.7", 80), ("198.51.100.9", 80)]
    for ip, port in [*external, ("10.96.0.20", 80)]:
        assert image[img.FrontendKey(ip, port, Protocol.TCP)] == both
    local = plans((replace(LB, external_policy_local=True), eps("10.0.2.2", node="node2")))
    entry = img.image(local, "random", NODE_IPS)[img.FrontendKey("198.51.100.9", 80, Protocol.TCP)]
    assert entry.slots == (("10.0.2.2", 80),)  # short-circuited: no local endpoint, still the cluster set


def test_address_entries_are_for_cluster_ips_only() -> None:
    image = img.image(plans((LB, eps("10.0.1.2"))), "random", NODE_IPS)
    addresses = {key.ip for key in image if key.port == 0}
    assert addresses == {"10.96.0.20"}  # ssh to the node IP or another port of an external IP still works


def test_no_endpoints_fail_and_source_ranged_lb_ips_stay_with_nftables() -> None:
    image = img.image(plans((LB, [])), "random", NODE_IPS)
    assert image[img.FrontendKey("192.0.2.7", 80, Protocol.TCP)].flags == img.F_NO_ENDPOINTS
    ranged = replace(LB, load_balancer_source_ranges=("203.0.113.0/24",))
    keys = set(img.image(plans((ranged, eps("10.0.1.2"))), "random", NODE_IPS))
    assert img.FrontendKey("198.51.100.9", 80, Protocol.TCP) not in keys
    assert img.FrontendKey("192.0.2.7", 80, Protocol.TCP) in keys


def test_partial_sync_of_external_frontends_reads_node_ips_only_when_needed() -> None:
    kernel = FakeKernel()
    backend, _ = _backend(kernel)
    internal = svc(spn(name="internal"), "10.96.0.21")
    state = plans((LB, eps("10.0.1.2")), (internal, eps("10.0.1.3")))
    backend.apply(state, None, NODE)
    assert kernel.maps == img.image(state, "random", NODE_IPS) and kernel.address_reads == 1
    state = plans((LB, eps("10.0.1.2")), (internal, eps("10.0.1.4")))
    backend.apply(state, {internal.name}, NODE)
    assert kernel.address_reads == 1  # a ClusterIP change: no netlink dump
    state = plans((LB, eps("10.0.1.5")), (internal, eps("10.0.1.4")))
    backend.apply(state, {LB.name}, NODE)
    assert kernel.address_reads == 2 and kernel.maps == img.image(state, "random", NODE_IPS)
    del state[LB.name]
    backend.apply(state, {LB.name}, NODE)
    assert kernel.maps == img.image(state, "random", NODE_IPS)  # its address entry went, the other's stays
    kernel.local = ["172.28.0.99"]  # a new node IP: the next full sync rebuilds
    state = plans((LB, eps("10.0.1.5")), (internal, eps("10.0.1.4")))
    backend.apply(state, None, NODE)
    assert kernel.maps == img.image(state, "random", ("172.28.0.99",))


def test_external_frontend_counters_are_marked_as_the_socket_load_balancers() -> None:
    class Counting(FakeKernel):
        def counters(self) -> Iterator[tuple[img.FrontendKey, int]]:
            yield img.FrontendKey("10.96.0.20", 80, Protocol.TCP), 3
            yield img.FrontendKey("172.28.0.11", 30080, Protocol.TCP), 2

    kernel = Counting()
    backend, _ = _backend(kernel)
    backend.apply(plans((LB, eps("10.0.1.2"))), None, NODE)
    assert backend.connection_counters() == [
        FrontendCounter("ns1/lb:p80", "10.96.0.20:80/TCP", 3),
        FrontendCounter("ns1/lb:p80", "172.28.0.11:30080/TCP (socket LB)", 2),
    ]
