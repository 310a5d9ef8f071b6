"""The iptables backend on real iptables-nft: batched syncs end where one restore would, failures stay safe."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kproxyd.backends.iptables.backend import IptablesBackend
from kproxyd.backends.iptables.kernel import IptablesKernel, IptablesRestoreError
from kproxyd.config import ProxyConfig
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan, plan_service_port

pytestmark = pytest.mark.netns

NODE = NodeInfo("node1", addresses=("192.168.0.2",))
CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8",), nodeport_addresses=("192.168.0.0/24",))
Plans = dict[ServicePortName, ServicePlan]


def make_plans(n: int, endpoints: int = 3, port: int = 80) -> Plans:
    """n Services; every third a NodePort, every fifth without endpoints."""
    plans = {}
    for i in range(n):
        name = ServicePortName("ns", f"svc{i}", "http", Protocol.TCP)
        node_port = 30000 + i if i % 3 == 0 else None
        svc = ServicePort(
            name=name,
            type=ServiceType.NODE_PORT if node_port else ServiceType.CLUSTER_IP,
            cluster_ips=(f"172.16.{i // 256}.{i % 256}",),
            port=port,
            node_port=node_port,
        )
        eps = (
            [] if i % 5 == 4 else [Endpoint(f"10.{j}.{i // 256}.{i % 256}", 8080) for j in range(1, endpoints + 1)]
        )
        plans[name] = plan_service_port(svc, eps, NODE)
    return plans


@pytest.fixture
def make_kernel(make_netns: Callable[[], str]) -> Callable[[], IptablesKernel]:
    """Makes iptables-nft kernels, each in a fresh network namespace deleted afterwards."""
    return lambda: IptablesKernel("nft", prefix=("ip", "netns", "exec", make_netns()))


def backend(kernel: IptablesKernel, batch_chains: int | None) -> IptablesBackend:
    """A backend whose node has 192.168.0.2 and 10.1.0.1 on its interfaces."""
    return IptablesBackend(
        CONFIG, kernel, batch_chains, local_addresses=lambda _family: ["192.168.0.2", "10.1.0.1"]
    )


def ruleset(kernel: IptablesKernel) -> list[str]:
    """The kernel's chains and rules, sorted, without counters or comments."""
    lines = kernel.save().splitlines()
    return sorted(line.split(" ", 1)[0] if line.startswith(":") else line for line in lines if line[:1] != "#")


def test_batched_sync_ends_like_one_restore(make_kernel: Callable[[], IptablesKernel]) -> None:
    batched_kernel, single_kernel = make_kernel(), make_kernel()
    batched, single = backend(batched_kernel, 50), backend(single_kernel, None)
    before, after = make_plans(300), make_plans(250, endpoints=2)
    changed = set(before) | set(after)
    for plans, changes in ((before, None), (before, None), (after, changed)):
        batched.apply(plans, changes, NODE)
        single.apply(plans, changes, NODE)
        assert ruleset(batched_kernel) == ruleset(single_kernel)
    assert "-A KUBE-SERVICES" in "\n".join(ruleset(batched_kernel))


class FailingKernel(IptablesKernel):
    """An nft kernel whose restores fail once `fail_at` more have succeeded."""

    fail_at: int | None = None

    def restore(self, text: str) -> None:
        """Refuse the restore when the countdown reaches zero."""
        if self.fail_at == 0:
            raise IptablesRestoreError("injected failure", None, None)
        if self.fail_at is not None:
            self.fail_at -= 1
        super().restore(text)


def test_batch_failure_keeps_previous_top_level(make_kernel: Callable[[], IptablesKernel]) -> None:
    prefix = make_kernel()._prefix
    kernel = FailingKernel("nft", prefix=prefix)
    proxy = backend(kernel, 50)
    proxy.apply(make_plans(100), None, NODE)
    top_level = top_level_rules(kernel)
    kernel.fail_at = 2
    with pytest.raises(IptablesRestoreError):
        proxy.apply(make_plans(100, port=81), None, NODE)
    assert top_level_rules(kernel) == top_level
    kernel.fail_at = None
    proxy.apply(make_plans(100, port=81), set(), NODE)  # the retry: a full sync, whatever `changed` says
    assert "--dport 80 " not in kernel.save("nat") and "--dport 81 " in kernel.save("nat")


def top_level_rules(kernel: IptablesKernel) -> list[str]:
    """The nat rules in KUBE-SERVICES and KUBE-NODEPORTS."""
    return [
        line
        for line in kernel.save("nat").splitlines()
        if line.startswith(("-A KUBE-SERVICES", "-A KUBE-NODEPORTS"))
    ]
