"""The real ipset and iptables accept what IPVS mode writes, and its cleanup leaves iptables mode's chains.

These parts need no IPVS, so they run on any kernel with ipset; the virtual services need IPVS (see
test_ipvs_backend.py).
"""

from __future__ import annotations

import pytest

from kproxyd.backends.iptables.kernel import IptablesKernel, detect_iptables_variant
from kproxyd.backends.ipvs.kernel import Ipset, iptables_kernel
from kproxyd.backends.ipvs.names import all_set_names
from kproxyd.backends.ipvs.render import (
    IpsetChanges,
    IpvsRenderer,
    IpvsRenderOptions,
    IpvsState,
    cleanup_rules,
    ipset_changes,
)
from kproxyd.model import ServiceType
from tests.model_factories import CLUSTER_CIDR, eps, plans, spn, svc

pytestmark = pytest.mark.netns

OPTIONS = IpvsRenderOptions(local_detector=CLUSTER_CIDR, node_name="node1", nodeport_addresses=("192.168.0.2",))


def rendered() -> IpvsState:
    the_plans = plans(
        (svc(spn(), "172.30.0.41", session_affinity_timeout=60), eps("10.180.0.1", "10.180.0.2", node="node1")),
        (
            svc(
                spn(name="lb"),
                "172.30.0.42",
                node_port=30080,
                type=ServiceType.LOAD_BALANCER,
                load_balancer_ips=("5.6.7.8",),
                load_balancer_source_ranges=("203.0.113.0/24", "198.51.100.7/32"),
                external_ips=("1.2.3.4",),
                external_policy_local=True,
                health_check_node_port=32000,
            ),
            eps("10.180.0.3", node="node2"),
        ),
    )
    renderer = IpvsRenderer(OPTIONS)
    return renderer.state(renderer.port(plan) for plan in the_plans.values())


def test_ipsets_and_rules_are_accepted_and_cleaned_up(netns: str) -> None:
    prefix = ("ip", "netns", "exec", netns)
    ipset = Ipset(prefix)
    iptables = iptables_kernel(detect_iptables_variant(prefix), 4, prefix)
    state = rendered()
    ipset.restore(ipset_changes(state, ipset.sets(state.sets), 4).additions)
    iptables.ensure_jumps()
    iptables.restore(state.iptables)
    live = ipset.sets(state.sets)
    assert live == {name: set(members) for name, members in state.sets.items()}
    assert ipset_changes(state, live, 4) == IpsetChanges(
        "", ""
    )  # members as ipset save prints them: nothing to redo
    nat = iptables.save("nat")
    assert "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT" in nat
    assert "-j KUBE-IPVS-FILTER" in iptables.save("filter")

    iptables.restore(cleanup_rules({table: iptables.save(table) for table in ("nat", "filter")}))
    ipset.destroy(all_set_names())
    assert ipset.sets(all_set_names()) == {}
    saved = iptables.save()
    for chain in ("KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-IPVS-FILTER", "KUBE-SOURCE-RANGES-FIREWALL"):
        assert chain not in saved
    assert ":KUBE-SERVICES" in saved and "--match-set" not in saved  # iptables mode's chains stay, emptied
    IptablesKernel(iptables.variant, prefix).cleanup()  # and iptables mode's cleanup can remove them after
    assert "KUBE-" not in IptablesKernel(iptables.variant, prefix).save()
