"""The real iptables-restore (nft and legacy) accepts and keeps what the renderer writes, in a fresh netns."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from kproxyd.backends.iptables.kernel import (
    IptablesKernel,
    IptablesRestoreError,
    Variant,
    detect_iptables_variant,
)
from kproxyd.backends.iptables.render import IptablesRenderer, IptablesRenderOptions
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
from kproxyd.plan import ServicePlan, plan_service_port

pytestmark = pytest.mark.netns

VARIANTS: list[Variant] = [v for v in ("nft", "legacy") if shutil.which(f"iptables-{v}-restore")]
OPTIONS = IptablesRenderOptions(
    local_detector=LocalTrafficDetector(DetectLocalMode.CLUSTER_CIDR, ("10.0.0.0/8",)),
    node_ips=("192.168.0.2",),
)
NODE = NodeInfo("node1")


@pytest.fixture(params=VARIANTS)
def kernel(request: pytest.FixtureRequest, netns: str) -> IptablesKernel:
    """An IptablesKernel of each installed variant, running inside the test namespace."""
    return IptablesKernel(request.param, prefix=("ip", "netns", "exec", netns))


def _plans(endpoints: int = 3, services: int = 4) -> dict[ServicePortName, ServicePlan]:
    plans = {}
    for i in range(services):
        name = ServicePortName("ns1", f"svc{i}", "http", Protocol.TCP if i % 2 else Protocol.UDP)
        port = ServicePort(
            name=name,
            type=ServiceType.LOAD_BALANCER,
            cluster_ips=(f"172.30.0.{i + 1}",),
            port=80,
            node_port=30000 + i,
            external_ips=(f"192.168.99.{i + 1}",),
            load_balancer_ips=(f"1.2.3.{i + 1}",),
            load_balancer_source_ranges=("192.168.0.0/24",) if i == 0 else (),
            session_affinity_timeout=10800 if i == 1 else None,
            external_policy_local=i == 2,
            health_check_node_port=32000 + i if i == 2 else None,
        )
        eps = [
            Endpoint(f"10.180.{i}.{j + 1}", 8080, node_name="node1" if j == 0 else None) for j in range(endpoints)
        ]
        plans[name] = plan_service_port(port, eps if i != 3 else [], NODE)
    return plans


def _rules(kernel: IptablesKernel) -> list[str]:
    return [line for line in kernel.save().splitlines() if line.startswith("-A")]


def test_full_then_partial_render_applies_and_reads_back(kernel: IptablesKernel) -> None:
    renderer = IptablesRenderer(OPTIONS)
    before = _plans()
    full = renderer.render(before, None, kernel.list_chains())
    kernel.restore(full.text)
    assert kernel.list_chains() == full.chains
    nat_rules = [line for line in kernel.save("nat").splitlines() if line.startswith("-A KUBE-")]
    assert len(nat_rules) == full.rule_count["nat"]

    after = dict(before)
    changed = next(iter(before))
    del after[changed]
    partial = renderer.render(after, {changed}, kernel.list_chains())
    kernel.restore(partial.text)
    assert kernel.list_chains() == partial.chains == renderer.render(after, None, set()).chains
    assert not any(str(changed) in line for line in _rules(kernel))


def test_refused_restore_raises_and_keeps_previous_rules(kernel: IptablesKernel) -> None:
    full = IptablesRenderer(OPTIONS).render(_plans(), None, set())
    kernel.restore(full.text)
    before = _rules(kernel)
    broken = full.text.replace("-j KUBE-MARK-MASQ", "-j KUBE-NO-SUCH-CHAIN", 1)
    with pytest.raises(IptablesRestoreError) as err:
        kernel.restore(broken)
    assert err.value.line is not None and err.value.stderr
    assert _rules(kernel) == before


def test_ensure_jumps_is_idempotent_and_cleanup_removes_only_ours(kernel: IptablesKernel) -> None:
    kernel.restore(
        "*filter\n:MY-CHAIN - [0:0]\n-A INPUT -s 198.51.100.1 -j MY-CHAIN\n-A MY-CHAIN -j ACCEPT\nCOMMIT\n"
    )
    kernel.ensure_jumps()
    once = kernel.save()
    kernel.ensure_jumps()
    assert _strip_comments(kernel.save()) == _strip_comments(once)
    assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in once
    assert "KUBE-PROXY-CANARY" in kernel.save("mangle")

    kernel.restore(IptablesRenderer(OPTIONS).render(_plans(), None, set()).text)
    kernel.cleanup()
    remaining = kernel.save()
    assert "KUBE-" not in remaining and "kubernetes" not in remaining
    assert "-A INPUT -s 198.51.100.1/32 -j MY-CHAIN" in remaining and "-A MY-CHAIN -j ACCEPT" in remaining


def _strip_comments(save: str) -> str:
    return "\n".join(line for line in save.splitlines() if not line.startswith("#"))


def _fake_binary(directory: Path, name: str, output: str) -> str:
    path = directory / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize(
    ("legacy", "nft", "version", "expected"),
    [
        ("-A KUBE-SERVICES -j KUBE-NODEPORTS", "", "iptables v1.8.9 (nf_tables)", "legacy"),
        ("-A INPUT -j ACCEPT", "-A KUBE-FORWARD -j ACCEPT", "iptables v1.8.9 (legacy)", "nft"),
        ("", "", "iptables v1.8.9 (nf_tables)", "nft"),
        ("", "", "iptables v1.8.9 (legacy)", "legacy"),
    ],
)
def test_detect_variant_follows_iptables_wrapper(
    tmp_path: Path, legacy: str, nft: str, version: str, expected: Variant
) -> None:
    variant = detect_iptables_variant(
        legacy_save=_fake_binary(tmp_path, "legacy-save", legacy),
        nft_save=_fake_binary(tmp_path, "nft-save", nft),
        iptables=_fake_binary(tmp_path, "iptables", version),
    )
    assert variant == expected


def test_detect_variant_in_a_namespace_with_rules(kernel: IptablesKernel, netns: str) -> None:
    kernel.ensure_jumps()
    assert detect_iptables_variant(prefix=("ip", "netns", "exec", netns)) == kernel.variant
