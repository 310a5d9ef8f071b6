"""Benchmark the nftables backend's syncs of N Services x 3 endpoints: cold full, full resync, one change.

Run as root: .venv/bin/python bench/nftables_sync.py [N ...]. Every run uses a fresh network namespace that
is deleted afterwards; results are printed and written to bench/results/nftables_sync.json. "layout"
compares the endpoint spread written (plain `numgen ... == 0 goto` rules) with kube-proxy's inline vmap,
on the same cold full sync of LAYOUT_N Services.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from kproxyd.backends.nftables.backend import NftablesBackend
from kproxyd.backends.nftables.kernel import NftKernel
from kproxyd.config import ProxyConfig
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan, plan_service_port

RESULTS = Path(__file__).resolve().parent / "results" / "nftables_sync.json"
NODE = NodeInfo("node1")
CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8",), mode="nftables")
LAYOUT_N = 5000
_SPREAD = re.compile(
    r"^add rule (\S+ \S+) (service-\S+|local-\S+) (?:numgen random mod \d+ == 0 )?goto (endpoint-\S+)$"
)


def make_plans(n: int) -> dict[ServicePortName, ServicePlan]:
    """n Services with 3 endpoints each; every third one is a NodePort (as bench/iptables_sync.py)."""
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


class TimedKernel(NftKernel):
    """An NftKernel counting its transactions, their time and their input size."""

    def __init__(self, prefix: tuple[str, ...], rewrite: bool = False) -> None:
        """Start with zero counts; rewrite turns the spread into kube-proxy's inline vmaps."""
        super().__init__(prefix)
        self._rewrite = rewrite
        self.reset()

    def reset(self) -> None:
        """Zero the counts before the next sync."""
        self.runs, self.nft_s, self.bytes = 0, 0.0, 0

    def run(self, text: str) -> None:
        """Run (rewritten if asked) and count."""
        text = inline_vmaps(text) if self._rewrite else text
        start = time.perf_counter()
        super().run(text)
        self.runs += 1
        self.nft_s += time.perf_counter() - start
        self.bytes += len(text.encode())


def inline_vmaps(text: str) -> str:
    """kube-proxy's layout: each chain's spread as one `numgen random mod N vmap { 0 : goto a, ... }` rule."""
    out: list[str] = []
    spreads: dict[str, tuple[int, str, list[str]]] = {}  # chain -> (its line in out, table, targets)
    for line in text.splitlines():
        match = _SPREAD.match(line)
        if match is None:
            out.append(line)
            continue
        table, chain, target = match.groups()
        if chain not in spreads:
            spreads[chain] = (len(out), table, [])
            out.append("")
        spreads[chain][2].append(target)
    for chain, (index, table, targets) in spreads.items():
        vmap = ", ".join(f"{k} : goto {target}" for k, target in enumerate(targets))
        out[index] = f"add rule {table} {chain} numgen random mod {len(targets)} vmap {{ {vmap} }}"
    return "\n".join([*out, ""])


def measure(n: int) -> dict[str, Any]:
    """A cold full sync into an empty namespace, a full resync, one endpoint change, a no-op sync."""
    plans = make_plans(n)
    changed = next(iter(plans))
    port, endpoints = plans[changed].port, plans[changed].cluster_policy_endpoints
    after = {**plans, changed: plan_service_port(port, [*endpoints[:2], Endpoint("10.9.9.9", 8080)], NODE)}
    syncs: tuple[tuple[str, dict[ServicePortName, ServicePlan], set[ServicePortName] | None], ...] = (
        ("cold", plans, None),
        ("resync", plans, None),
        ("partial", after, {changed}),
        ("noop", after, set()),
    )
    result: dict[str, Any] = {"services": n, "endpoints": 3 * n}
    with netns() as ns:
        kernel = TimedKernel(("ip", "netns", "exec", ns))
        backend = NftablesBackend(CONFIG, kernel, local_addresses=lambda _family: [])
        for label, the_plans, the_changed in syncs:
            kernel.reset()
            start = time.perf_counter()
            backend.apply(the_plans, the_changed, NODE)
            result[label] = {
                "total_s": round(time.perf_counter() - start, 3),
                "nft_s": round(kernel.nft_s, 3),
                "transactions": kernel.runs,
                "bytes": kernel.bytes,
            }
    return result


def measure_layout(n: int, inline: bool) -> dict[str, Any]:
    """One cold full sync of n Services with either spread layout."""
    with netns() as ns:
        kernel = TimedKernel(("ip", "netns", "exec", ns), rewrite=inline)
        NftablesBackend(CONFIG, kernel, local_addresses=lambda _family: []).apply(make_plans(n), None, NODE)
    layout = "inline numgen vmap (kube-proxy)" if inline else "plain numgen rules (kproxyd)"
    return {"services": n, "layout": layout, "cold_nft_s": round(kernel.nft_s, 3)}


def main(sizes: list[int]) -> None:
    """Measure every size and both layouts; print and save the results."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results: dict[str, list[dict[str, Any]]] = {"syncs": [], "layout": []}
    for n in sizes:
        r = measure(n)
        results["syncs"].append(r)
        syncs = " | ".join(
            f"{s}: {r[s]['total_s']:.3f}s ({r[s]['transactions']} tx {r[s]['nft_s']:.3f}s {r[s]['bytes']} B)"
            for s in ("cold", "resync", "partial", "noop")
        )
        sys.stdout.write(f"{n:>6} svc  {syncs}\n")
        sys.stdout.flush()
    for inline in (False, True):
        results["layout"].append(measure_layout(LAYOUT_N, inline))
        sys.stdout.write(f"{results['layout'][-1]}\n")
        sys.stdout.flush()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1000, 10000])
