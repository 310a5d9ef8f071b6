"""The real ipset and iptables accept what IPVS mode writes, and its cleanup leaves iptables mode's chains.

These parts need no IPVS, so they run on any kernel with ipset; the virtual services need IPVS (see
test_ipvs_backend.py).
"""

from __future__ import annotations

from typing import Any

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
from kproxyd.model import DetectLocalMode, LocalTrafficDetector, ServiceType
from tests.model_factories import CLUSTER_CIDR, eps, plans, spn, svc

pytestmark = pytest.mark.netns

# Each family's workload addresses; every set of the family is created, the empty ones too.
ADDRESSES = {
    4: {"node": "192.168.0.2", "svc": "172.30.0.", "ep": "10.180.0.", "lb": "5.6.7.8", "ext": "1.2.3.4",
        "ranges": ("203.0.113.0/24", "198.51.100.7/32")},
    6: {"node": "fd00:168::2", "svc": "fd00:30::", "ep": "fd00:180::", "lb": "2001:db8::5678",
        "ext": "2001:db8::1234", "ranges": ("2001:db8:113::/64", "2001:db8:100::7/128"), "pods": "fd00:180::/64"},
}  # fmt: skip


def rendered(family: int) -> IpvsState:
    a: dict[str, Any] = ADDRESSES[family]
    the_plans = plans(
        (
            svc(spn(), a["svc"] + "41", session_affinity_timeout=60),
            eps(a["ep"] + "1", a["ep"] + "2", node="node1"),
        ),
        (
            svc(
                spn(name="lb"),
                a["svc"] + "42",
                node_port=30080,
                type=ServiceType.LOAD_BALANCER,
                load_balancer_ips=(a["lb"],),
                load_balancer_source_ranges=a["ranges"],
                external_ips=(a["ext"],),
                external_policy_local=True,
                health_check_node_port=32000,
            ),
            eps(a["ep"] + "3", node="node2"),
        ),
    )
    options = IpvsRenderOptions(
        family=family,
        local_detector=CLUSTER_CIDR
        if family == 4
        else LocalTrafficDetector(DetectLocalMode.CLUSTER_CIDR, (a["pods"],)),
        node_name="node1",
        nodeport_addresses=(a["node"],),
    )
    renderer = IpvsRenderer(options)
    return renderer.state(renderer.port(plan) for plan in the_plans.values())


@pytest.mark.parametrize("family", [4, 6])
def test_ipsets_and_rules_are_accepted_and_cleaned_up(netns: str, family: int) -> None:
    prefix = ("ip", "netns", "exec", netns)
    ipset = Ipset(prefix)
    iptables = iptables_kernel(detect_iptables_variant(prefix), family, prefix)
    state = rendered(family)
    ipset.restore(ipset_changes(state, ipset.sets(state.sets), family).additions)
    iptables.ensure_jumps()
    iptables.restore(state.iptables)
    live = ipset.sets(state.sets)
    assert live == {name: set(members) for name, members in state.sets.items()}
    # Members as ipset save prints them: nothing to redo.
    assert ipset_changes(state, live, family) == IpsetChanges("", "")
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
    IptablesKernel(iptables.variant, prefix, family).cleanup()  # and iptables mode's cleanup can remove them after
    assert "KUBE-" not in IptablesKernel(iptables.variant, prefix, family).save()
