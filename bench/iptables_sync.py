"""Benchmark the iptables backend's syncs of N Services x 3 endpoints: cold full, full resync, partial.

Run as root: .venv/bin/python bench/iptables_sync.py [N ...]. Every sync runs in a fresh network namespace
that is deleted afterwards; results are printed and written to bench/results/iptables_sync.json. "single"
is one restore per sync (batch_chains=None), "batched" the backend's default; nft "single" runs only up
to SINGLE_NFT_MAX Services (10k took 508 s cold).
"""

from __future__ import annotations

import json
import logging
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

import structlog

from kproxyd.backends.iptables.backend import DEFAULT_BATCH_CHAINS, IptablesBackend
from kproxyd.backends.iptables.kernel import IptablesKernel, Variant
from kproxyd.config import ProxyConfig
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan, plan_service_port

RESULTS = Path(__file__).resolve().parent / "results" / "iptables_sync.json"
NODE = NodeInfo("node1")
CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8",))
SINGLE_NFT_MAX = 2000


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


class TimedKernel(IptablesKernel):
    """An IptablesKernel counting its restores, their time and their input size."""

    def __init__(self, variant: Variant, prefix: tuple[str, ...]) -> None:
        """Start with zero counts."""
        super().__init__(variant, prefix)
        self.reset()

    def reset(self) -> None:
        """Zero the counts before the next sync."""
        self.restores, self.restore_s, self.bytes = 0, 0.0, 0

    def restore(self, text: str) -> None:
        """Restore and count."""
        start = time.perf_counter()
        super().restore(text)
        self.restores += 1
        self.restore_s += time.perf_counter() - start
        self.bytes += len(text.encode())


def measure(n: int, variant: Variant, batch_chains: int | None) -> dict[str, Any]:
    """A cold full sync into an empty namespace, a full resync, then a partial sync of one Service."""
    plans = make_plans(n)
    changed = next(iter(plans))
    port, endpoints = plans[changed].port, [*plans[changed].cluster_policy_endpoints, Endpoint("10.9.9.9", 8080)]
    after = {**plans, changed: plan_service_port(replace(port, port=81), endpoints, NODE)}
    syncs = (("cold", plans, None), ("resync", plans, None), ("partial", after, {changed}))
    result: dict[str, Any] = {"services": n, "endpoints": 3 * n, "variant": variant}
    result["mode"] = "single" if batch_chains is None else f"batched({batch_chains} chains)"
    with netns() as ns:
        kernel = TimedKernel(variant, ("ip", "netns", "exec", ns))
        backend = IptablesBackend(CONFIG, kernel, batch_chains, local_addresses=lambda _family: [])
        for label, the_plans, the_changed in syncs:
            kernel.reset()
            start = time.perf_counter()
            backend.apply(the_plans, the_changed, NODE)
            result[label] = {
                "total_s": round(time.perf_counter() - start, 3),
                "restore_s": round(kernel.restore_s, 3),
                "restores": kernel.restores,
                "bytes": kernel.bytes,
            }
    return result


def runs(sizes: list[int]) -> Iterator[tuple[int, Variant, int | None]]:
    """Every (size, variant, batch_chains) to measure; batching applies to nft only."""
    for n in sizes:
        if shutil.which("iptables-nft-restore"):
            yield n, "nft", DEFAULT_BATCH_CHAINS
            if n <= SINGLE_NFT_MAX:
                yield n, "nft", None
        if shutil.which("iptables-legacy-restore"):
            yield n, "legacy", None


def main(sizes: list[int]) -> None:
    """Measure every run; print and save the results."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = []
    for n, variant, batch_chains in runs(sizes):
        r = measure(n, variant, batch_chains)
        results.append(r)
        syncs = " | ".join(
            f"{s}: {r[s]['total_s']:.2f}s ({r[s]['restores']} restores {r[s]['restore_s']:.2f}s)"
            for s in ("cold", "resync", "partial")
        )
        sys.stdout.write(f"{n:>6} svc {variant:<6} {r['mode']:<22} {syncs}\n")
        sys.stdout.flush()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1000, 10000])
