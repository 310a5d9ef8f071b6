"""Benchmark the iptables backend: render and iptables-restore of N Services x 3 endpoints, full and partial.

Run as root: .venv/bin/python bench/iptables_sync.py [N ...]. Every restore goes into a fresh network
namespace that is deleted afterwards; results are printed and written to bench/results/iptables_sync.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from kproxyd.backends.iptables.kernel import IptablesKernel, Variant
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
from kproxyd.plan import ServicePlan, plan_service_port

RESULTS = Path(__file__).resolve().parent / "results" / "iptables_sync.json"
NODE = NodeInfo("node1")
OPTIONS = IptablesRenderOptions(local_detector=LocalTrafficDetector(DetectLocalMode.CLUSTER_CIDR, ("10.0.0.0/8",)))


def make_plans(n: int) -> dict[ServicePortName, ServicePlan]:
    """n Services with 3 endpoints each; every third one is a NodePort."""
    plans = {}
    for i in range(n):
        name = ServicePortName(f"ns{i % 50}", f"svc{i}", "http", Protocol.TCP)
        node_port = 30000 + i % 2768 if i % 3 == 0 else None
        port = ServicePort(
            name=name,
            type=ServiceType.NODE_PORT if node_port else ServiceType.CLUSTER_IP,
            cluster_ips=(f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}",),
            port=80,
            node_port=node_port,
        )
        endpoints = [Endpoint(f"10.{j}.{i // 256 % 256}.{i % 256}", 8080) for j in range(1, 4)]
        plans[name] = plan_service_port(port, endpoints, NODE)
    return plans


@contextmanager
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted afterwards."""
    name = f"kpt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def timed_render(
    renderer: IptablesRenderer,
    plans: dict[ServicePortName, ServicePlan],
    changed: set[ServicePortName] | None,
    existing: frozenset[str],
) -> tuple[RenderResult, float]:
    start = time.perf_counter()
    result = renderer.render(plans, changed, existing)
    return result, time.perf_counter() - start


def timed_restore(kernel: IptablesKernel, text: str) -> float:
    start = time.perf_counter()
    kernel.restore(text)
    return time.perf_counter() - start


def measure(n: int, variant: Variant) -> dict[str, Any]:
    """Full sync into an empty namespace, then a partial sync of one changed Service on top."""
    plans = make_plans(n)
    renderer = IptablesRenderer(OPTIONS)
    full, full_render = timed_render(renderer, plans, None, frozenset())
    changed = next(iter(plans))
    port = plans[changed].port
    endpoints = [*plans[changed].cluster_policy_endpoints, Endpoint("10.9.9.9", 8080)]
    after = {**plans, changed: plan_service_port(replace(port, port=81), endpoints, NODE)}
    partial, partial_render = timed_render(renderer, after, {changed}, full.chains)
    with netns() as ns:
        kernel = IptablesKernel(variant, prefix=("ip", "netns", "exec", ns))
        full_restore = timed_restore(kernel, full.text)
        partial_restore = timed_restore(kernel, partial.text)
    return {
        "services": n,
        "endpoints": 3 * n,
        "variant": variant,
        "full": _sync(full, full_render, full_restore),
        "partial": _sync(partial, partial_render, partial_restore),
    }


def _sync(result: RenderResult, render_s: float, restore_s: float) -> dict[str, Any]:
    return {
        "render_s": round(render_s, 4),
        "restore_s": round(restore_s, 4),
        "lines": result.text.count("\n"),
        "bytes": len(result.text.encode()),
        "rules": dict(result.rule_count),
    }


def main(sizes: list[int]) -> None:
    """Measure every size with every installed variant; print and save the results."""
    variants: list[Variant] = [v for v in ("nft", "legacy") if shutil.which(f"iptables-{v}-restore")]
    results = [measure(n, variant) for n in sizes for variant in variants]
    for r in results:
        f, p = r["full"], r["partial"]
        sys.stdout.write(
            f"{r['services']:>6} svc {r['variant']:<6} full: render {f['render_s']:.3f}s restore"
            f" {f['restore_s']:.3f}s {f['lines']} lines {f['bytes']} B | partial: render {p['render_s']:.3f}s"
            f" restore {p['restore_s']:.3f}s {p['lines']} lines {p['bytes']} B\n"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1000, 10000])
