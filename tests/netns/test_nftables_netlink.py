"""Syncs written as netlink batches (full and partial) leave the same table as the same syncs through `nft -f`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kproxyd.backends.nftables.backend import NftablesBackend
from kproxyd.backends.nftables.kernel import NftError, NftKernel
from kproxyd.backends.nftables.names import TABLE
from kproxyd.backends.nftables.netlink import Batch, NetlinkError
from kproxyd.backends.nftables.render import IPV4, IPV6, Family
from kproxyd.backends.nftables.rules import Verdict, rule
from kproxyd.backends.nftables.transaction import Transaction
from kproxyd.config import ProxyConfig
from kproxyd.model import DetectLocalMode, Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan
from tests import model_factories
from tests.model_factories import spn, svc

pytestmark = pytest.mark.netns

NODE = NodeInfo("node1", addresses=("192.168.0.2", "fd00:1::2"))
CONFIGS = {
    "cluster-cidr": ProxyConfig(cluster_cidrs=("10.0.0.0/8", "fd00:10::/64"), mode="nftables"),
    "interface-prefix": ProxyConfig(
        mode="nftables", detect_local_mode=DetectLocalMode.INTERFACE_NAME_PREFIX, pod_interface_name_prefix="veth"
    ),
}


class RecordingKernel(NftKernel):
    """An NftKernel in a namespace that notes which writer each transaction took."""

    def __init__(self, netns: str, netlink: bool) -> None:
        super().__init__(prefix=("ip", "netns", "exec", netns), netns=netns)
        self.netlink = netlink
        self.writers: list[str] = []

    def run(self, text: str) -> None:
        self.writers.append("nft")
        super().run(text)

    def send(self, batch: Batch) -> None:
        self.writers.append("netlink")
        super().send(batch)


def address(family: Family, v4: str) -> str:
    """v4 itself, or an IPv6 address made from its last two octets."""
    if family is IPV4:
        return v4
    *_, c, d = v4.split(".")
    return f"fd00:{v4.split('.')[0]}::{c}:{d}"


def workload(family: Family, **endpoints: list[str]) -> dict[ServicePortName, ServicePlan]:
    """Services of every shape kproxyd renders, with the endpoints given by Service name."""
    ip = lambda v4: address(family, v4)  # noqa: E731
    ports: dict[str, ServicePort] = {
        "web": svc(spn(name="web"), ip("172.30.0.1")),
        "np": svc(spn(name="np"), ip("172.30.0.2"), node_port=30080),
        "empty": svc(spn(name="empty"), ip("172.30.0.3"), node_port=30081),
        "aff": svc(spn(name="aff"), ip("172.30.0.4"), session_affinity_timeout=600),
        "local": svc(
            spn(name="local", proto=Protocol.UDP),
            ip("172.30.0.5"),
            type=ServiceType.LOAD_BALANCER,
            node_port=30082,
            load_balancer_ips=(ip("172.29.0.5"),),
            external_policy_local=True,
        ),
        "lb": svc(
            spn(name="lb"),
            ip("172.30.0.6"),
            type=ServiceType.LOAD_BALANCER,
            node_port=30083,
            load_balancer_ips=(ip("172.29.0.6"),),
            load_balancer_source_ranges=(  # an interval set: prefixes, adjacent ones merged, an address
                f"{ip('172.28.0.0')}/{24 if family is IPV4 else 120}",
                f"{ip('172.28.1.0')}/{24 if family is IPV4 else 120}",
                f"{ip('172.27.0.0')}/{16 if family is IPV4 else 112}",
                ip("172.26.5.5"),
            ),
        ),
    }
    pairs = []
    for name, ips in endpoints.items():
        eps = [Endpoint(ip(v4), 8080, node_name="node1" if i % 2 == 0 else "node2") for i, v4 in enumerate(ips)]
        pairs.append((ports[name], eps))
    return model_factories.plans(*pairs, node=NODE)


START = {
    "web": ["10.1.0.1", "10.1.0.2", "10.2.0.3"],
    "np": ["10.1.0.4"],
    "empty": [],
    "aff": ["10.1.0.5", "10.2.0.6"],
    "local": ["10.1.0.7", "10.2.0.8"],
    "lb": ["10.1.0.9"],
}
# (what changes, the Services after it, the writer the change takes)
STEPS: list[tuple[str, dict[str, list[str]], str]] = [
    ("one endpoint replaced", {**START, "web": ["10.1.0.1", "10.1.0.2", "10.9.9.9"]}, "netlink"),
    ("a Service gains endpoints", {**START, "empty": ["10.1.0.10"]}, "netlink"),
    ("an affinity endpoint replaced", {**START, "aff": ["10.1.0.5", "10.2.0.16"]}, "netlink"),
    ("a Service removed", {k: v for k, v in START.items() if k != "np"}, "netlink"),
    ("a Local-policy Service changes", {**START, "local": ["10.2.0.8"]}, "netlink"),
    ("a Service loses its endpoints", {**START, "web": []}, "netlink"),
    ("a firewalled LB Service removed", {k: v for k, v in START.items() if k != "lb"}, "netlink"),
    ("a firewalled LB Service added", START, "netlink"),
]


NO_FIREWALL = {name: eps for name, eps in START.items() if name != "lb"}
# (what, the Services of a full sync, the writer it takes): cold, then resyncs over what the table holds
FULL_STEPS: list[tuple[str, dict[str, list[str]], str]] = [
    ("cold", NO_FIREWALL, "netlink"),
    ("resync, unchanged", NO_FIREWALL, "netlink"),
    (
        "resync after changes",
        {**NO_FIREWALL, "web": ["10.1.0.1", "10.9.9.9"], "aff": ["10.1.0.5"], "empty": ["10.1.0.10"]},
        "netlink",
    ),
    ("resync, a Service removed", {k: v for k, v in NO_FIREWALL.items() if k != "np"}, "netlink"),
    ("a firewalled LB Service", START, "netlink"),
    ("resync, its source ranges changed", {**START, "lb": ["10.1.0.9", "10.2.0.19"]}, "netlink"),
    ("resync without it", NO_FIREWALL, "netlink"),
]


def listing(kernel: NftKernel, family: Family) -> Any:
    """The table as nft -j lists it, without handles and with set elements sorted (hash order varies)."""
    items = json.loads(kernel.list("-j", "list", "table", family.name, TABLE))["nftables"]
    for item in items:
        for obj in item.values():
            if isinstance(obj, dict):
                obj.pop("handle", None)
                if "elem" in obj:
                    obj["elem"] = sorted(obj["elem"], key=json.dumps)
    return items


@pytest.mark.parametrize("family", [IPV4, IPV6], ids=["ip", "ip6"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_netlink_partial_syncs_match_nft(make_netns: Callable[[], str], family: Family, config: str) -> None:
    kernels = RecordingKernel(make_netns(), netlink=True), RecordingKernel(make_netns(), netlink=False)
    backends = [NftablesBackend(CONFIGS[config], k, lambda _f: list(NODE.addresses), family) for k in kernels]
    before = workload(family, **START)
    for backend in backends:
        backend.apply(before, None, NODE)
    for what, endpoints, writer in STEPS:
        after = workload(family, **endpoints)
        changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
        for backend in backends:
            backend.apply(after, changed, NODE)
        assert kernels[0].writers[-1] == writer, what
        assert kernels[1].writers[-1] == "nft", what
        assert listing(kernels[0], family) == listing(kernels[1], family), what
        before = after
    assert len(kernels[0].writers) == len(kernels[1].writers) == len(STEPS) + 1


@pytest.mark.parametrize("family", [IPV4, IPV6], ids=["ip", "ip6"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_netlink_full_syncs_match_nft(make_netns: Callable[[], str], family: Family, config: str) -> None:
    kernels = RecordingKernel(make_netns(), netlink=True), RecordingKernel(make_netns(), netlink=False)
    backends = [NftablesBackend(CONFIGS[config], k, lambda _f: list(NODE.addresses), family) for k in kernels]
    for what, endpoints, writer in FULL_STEPS:
        plans = workload(family, **endpoints)
        for backend in backends:
            backend.apply(plans, None, NODE)
        assert (kernels[0].writers[-1], kernels[1].writers[-1]) == (writer, "nft"), what
        assert listing(kernels[0], family) == listing(kernels[1], family), what
    # partial syncs go on from a table a netlink full sync wrote
    after = workload(family, **{**NO_FIREWALL, "web": ["10.1.0.3"]})
    for backend in backends:
        backend.apply(after, {spn(name="web")}, NODE)
    assert kernels[0].writers[-1] == "netlink"
    assert listing(kernels[0], family) == listing(kernels[1], family)


def test_refused_full_sync_goes_through_nft(netns: str) -> None:
    kernel = RecordingKernel(netns, netlink=True)
    backend = NftablesBackend(CONFIGS["cluster-cidr"], kernel, lambda _f: list(NODE.addresses), IPV4)
    # a set where the table's verdict map of the same name belongs: the kernel refuses the batch, and nft -f
    # the same transaction, saying where
    kernel.run(f"add table ip {TABLE}\nadd set ip {TABLE} service-ips {{ type ipv4_addr ; }}\n")
    with pytest.raises(NftError):
        backend.apply(workload(IPV4, **NO_FIREWALL), None, NODE)
    assert kernel.writers[-2:] == ["netlink", "nft"]


def test_refused_batch_changes_nothing(netns: str) -> None:
    kernel = NftKernel.in_netns(netns)
    kernel.run(f"add table ip {TABLE}\nadd chain ip {TABLE} a\n")
    before = kernel.list("list", "table", "ip", TABLE)
    tx = Transaction("ip")
    tx.command("add", "chain", "b")
    tx.rules("a", (rule(Verdict("goto", "b")),))
    tx.rules("a", (rule(Verdict("goto", "missing")),))
    with pytest.raises(NetlinkError) as err:
        kernel.send(tx.batch())
    assert err.value.seq == 3  # the rule naming the missing chain
    assert kernel.list("list", "table", "ip", TABLE) == before
    kernel.send(Batch("ip", TABLE))  # an empty batch sends nothing
    ok = Transaction("ip")
    ok.command("add", "chain", "b")
    ok.rules("a", (rule(Verdict("goto", "b")),))
    kernel.send(ok.batch())  # the socket is usable again after a refusal
    assert "goto b" in kernel.list("list", "table", "ip", TABLE)
