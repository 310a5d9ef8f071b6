"""The real nft accepts and keeps what the nftables backend writes, in a fresh namespace."""

from __future__ import annotations

import pytest

from kproxyd.backends.nftables.backend import NftablesBackend
from kproxyd.backends.nftables.kernel import NftError, NftKernel
from kproxyd.config import ProxyConfig
from kproxyd.model import NodeInfo, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan
from tests import model_factories
from tests.model_factories import eps, spn, svc

pytestmark = pytest.mark.netns

NODE = NodeInfo("node1", addresses=("192.168.0.2",))
CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8",), mode="nftables")


class CountingKernel(NftKernel):
    """An NftKernel that keeps every transaction it ran."""

    def __init__(self, netns: str) -> None:
        super().__init__(prefix=("ip", "netns", "exec", netns))
        self.sent: list[str] = []

    def run(self, text: str) -> None:
        self.sent.append(text)
        super().run(text)


@pytest.fixture
def kernel(netns: str) -> CountingKernel:
    return CountingKernel(netns)


def backend(kernel: NftKernel) -> NftablesBackend:
    return NftablesBackend(CONFIG, kernel, local_addresses=lambda _family: ["192.168.0.2"])


def port(name: str, ip: str, **kw: object) -> ServicePort:
    return svc(spn(name=name), ip, **kw)


def plans(*pairs: tuple[ServicePort, list[str]]) -> dict[ServicePortName, ServicePlan]:
    return model_factories.plans(*((p, eps(*ips, port=8080)) for p, ips in pairs), node=NODE)


WORKLOAD = plans(
    (port("web", "10.96.0.10"), ["10.244.1.2", "10.244.1.3", "10.244.2.2"]),
    (port("np", "10.96.0.11", node_port=30080), ["10.244.1.2"]),
    (port("aff", "10.96.0.12", session_affinity_timeout=600), ["10.244.1.4", "10.244.1.5"]),
    (port("empty", "10.96.0.13"), []),
    (
        port(
            "lb",
            "10.96.0.14",
            type=ServiceType.LOAD_BALANCER,
            node_port=30081,
            load_balancer_ips=("172.29.0.10",),
            load_balancer_source_ranges=("172.28.0.200/32",),
        ),
        ["10.244.1.2"],
    ),
)


def listing(kernel: NftKernel) -> str:
    return kernel.list("list", "table", "ip", "kube-proxy")


def test_full_sync_is_accepted_and_reads_back(kernel: CountingKernel) -> None:
    backend(kernel).apply(WORKLOAD, None, NODE)
    text = listing(kernel)
    for expected in (
        "chain service-",
        "ns1/web/tcp/p80",
        "numgen random mod 3 0 goto endpoint-",
        "10.96.0.10 . tcp . 80 counter packets 0 bytes 0 : goto service-",
        "10.96.0.13 . tcp . 80 : goto reject-chain",
        "tcp . 30080 counter packets 0 bytes 0 : goto external-",
        "172.29.0.10 . tcp . 80 : goto firewall-",
        "flags dynamic,timeout",
        "masquerade fully-random",
        "type nat hook output priority -100",
    ):
        assert expected in text, expected
    assert len(kernel.sent) == 1


def test_partial_sync_sends_one_small_transaction(kernel: CountingKernel) -> None:
    nft = backend(kernel)
    nft.apply(WORKLOAD, None, NODE)
    changed = dict(WORKLOAD)
    web = port("web", "10.96.0.10")
    changed[web.name] = plans((web, ["10.244.1.2", "10.244.9.9"]))[web.name]
    del changed[port("np", "10.96.0.11").name]
    nft.apply(changed, {web.name, port("np", "10.96.0.11").name}, NODE)
    assert len(kernel.sent) == 2
    assert "ns1/aff/" not in kernel.sent[1] and "ns1/lb/" not in kernel.sent[1]
    text = listing(kernel)
    assert "10.244.9.9" in text and "10.244.2.2" not in text
    assert "ns1/np/" not in text and "30080" not in text
    nft.apply(changed, set(), NODE)
    assert len(kernel.sent) == 2  # nothing changed: nothing sent


def test_full_resync_removes_stale_objects_in_place(kernel: CountingKernel) -> None:
    backend(kernel).apply(WORKLOAD, None, NODE)
    restarted = backend(kernel)  # a new process: it knows nothing but what it lists
    smaller = {name: plan for name, plan in WORKLOAD.items() if name.name in ("web", "empty")}
    restarted.apply(smaller, None, NODE)
    text = listing(kernel)
    assert "ns1/aff/" not in text and "affinity-" not in text and "ns1/lb/" not in text
    assert "ns1/web/" in text
    assert "delete table" not in kernel.sent[-1]


def test_refused_transaction_changes_nothing(kernel: CountingKernel) -> None:
    backend(kernel).apply(WORKLOAD, None, NODE)
    before = listing(kernel)
    with pytest.raises(NftError) as err:
        kernel.run("flush chain ip kube-proxy services\nadd rule ip kube-proxy services bogus\n")
    assert err.value.line == 2
    assert listing(kernel) == before


def test_cleanup_removes_only_the_table(kernel: CountingKernel) -> None:
    kernel.run("add table ip other\n")
    nft = backend(kernel)
    nft.apply(WORKLOAD, None, NODE)
    assert not nft.drifted()
    nft.cleanup()
    tables = kernel.list("list", "tables")
    assert "kube-proxy" not in tables and "table ip other" in tables
    assert nft.drifted()
    nft.cleanup()  # idempotent
