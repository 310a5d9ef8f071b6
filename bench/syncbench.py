"""Backend syncs driven directly in a scratch namespace: renderer time vs bare kernel tool time.

This replaces bench/iptables_sync.py and bench/nftables_sync.py: the same plans (N Services x 3 endpoints,
every third a NodePort), the same cold full / full resync / one-Service partial syncs, for iptables-nft
(the backend's default batching), iptables-legacy, nftables (its netlink writer) and nftables-text (the same
backend writing everything through `nft -f`). "kernel_s" is the time spent inside iptables-restore / nft -f
on the text the renderer produced (the bare tool time for that ruleset), or in the netlink send (the
kernel's share); "total_s" adds kproxyd's own rendering, encoding and diffing. "cpu_s" is the CPU time
(user + system, this process and its children) of the sync, "kernel_cpu_s" that of the tool or send alone:
on a shared machine CPU time moves less than wall time.
"""

from __future__ import annotations

import json
import os
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

from kproxyd.backends.iptables.backend import DEFAULT_BATCH_CHAINS, IptablesBackend
from kproxyd.backends.iptables.kernel import IptablesKernel, Variant
from kproxyd.backends.nftables.backend import NftablesBackend
from kproxyd.backends.nftables.kernel import NftKernel
from kproxyd.backends.nftables.netlink import Batch
from kproxyd.config import ProxyConfig
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan, plan_service_port

NODE = NodeInfo("node1")
IPT_CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8",))
NFT_CONFIG = ProxyConfig(cluster_cidrs=("10.0.0.0/8",), mode="nftables")
LEGACY_MAX = 10000  # iptables-legacy is measured up to here (it is the cheap variant, but not the default)
RESYNC_MAX = 10000  # the full resync is skipped above this size to keep `make bench` under budget


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
def scratch_netns() -> Iterator[str]:
    """A fresh network namespace, deleted afterwards."""
    name = f"kpt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


class TimedIptables(IptablesKernel):
    """An IptablesKernel counting its restores, their time and their input size."""

    def __init__(self, variant: Variant, prefix: tuple[str, ...]) -> None:
        super().__init__(variant, prefix)
        self.reset()

    def reset(self) -> None:
        """Zero the counts before the next sync."""
        self.calls, self.kernel_s, self.kernel_cpu_s, self.bytes = 0, 0.0, 0.0, 0

    def restore(self, text: str) -> None:
        """Restore and count."""
        start, cpu = time.perf_counter(), cpu_seconds()
        super().restore(text)
        self.calls += 1
        self.kernel_s += time.perf_counter() - start
        self.kernel_cpu_s += cpu_seconds() - cpu
        self.bytes += len(text.encode())


class TimedNft(NftKernel):
    """An NftKernel counting its transactions (nft -f text or netlink batches), their time and size."""

    def __init__(self, netns: str) -> None:
        super().__init__(("ip", "netns", "exec", netns), netns=netns)
        self.reset()

    def reset(self) -> None:
        """Zero the counts before the next sync."""
        self.calls, self.kernel_s, self.kernel_cpu_s, self.bytes = 0, 0.0, 0.0, 0

    def run(self, text: str) -> None:
        """Run and count."""
        start, cpu = time.perf_counter(), cpu_seconds()
        super().run(text)
        self.calls += 1
        self.kernel_s += time.perf_counter() - start
        self.kernel_cpu_s += cpu_seconds() - cpu
        self.bytes += len(text.encode())

    def send(self, batch: Batch) -> None:
        """Send and count."""
        start, cpu = time.perf_counter(), cpu_seconds()
        super().send(batch)
        self.calls += 1
        self.kernel_s += time.perf_counter() - start
        self.kernel_cpu_s += cpu_seconds() - cpu
        self.bytes += batch.size


def cpu_seconds() -> float:
    """User and system CPU time of this process and its reaped children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def variants(n: int) -> Iterator[str]:
    """The backends measured at size n."""
    if shutil.which("iptables-nft-restore"):
        yield "iptables-nft"
    if shutil.which("iptables-legacy-restore") and n <= LEGACY_MAX:
        yield "iptables-legacy"
    if shutil.which("nft"):
        yield "nftables"
        yield "nftables-text"


def measure(n: int, variant: str) -> dict[str, Any]:
    """Cold full sync into an empty namespace, full resync (n <= RESYNC_MAX), one-Service partial sync."""
    plans = make_plans(n)
    changed = next(iter(plans))
    port, endpoints = plans[changed].port, plans[changed].cluster_policy_endpoints
    after = {
        **plans,
        changed: plan_service_port(replace(port), [*endpoints[:2], Endpoint("10.9.9.9", 8080)], NODE),
    }
    syncs: list[tuple[str, dict[ServicePortName, ServicePlan], set[ServicePortName] | None]] = [
        ("cold", plans, None)
    ]
    if n <= RESYNC_MAX:
        syncs.append(("resync", plans, None))
    syncs.append(("partial", after, {changed}))
    result: dict[str, Any] = {"services": n, "endpoints": 3 * n, "variant": variant}
    with scratch_netns() as ns:
        prefix = ("ip", "netns", "exec", ns)
        kernel: TimedIptables | TimedNft
        backend: IptablesBackend | NftablesBackend
        if variant.startswith("nftables"):
            kernel = TimedNft(ns)
            kernel.netlink = variant == "nftables"
            backend = NftablesBackend(NFT_CONFIG, kernel, local_addresses=lambda _family: [])
        else:
            kernel = TimedIptables("nft" if variant == "iptables-nft" else "legacy", prefix)
            batch = DEFAULT_BATCH_CHAINS if variant == "iptables-nft" else None
            backend = IptablesBackend(IPT_CONFIG, kernel, batch, local_addresses=lambda _family: [])
        for label, the_plans, the_changed in syncs:
            kernel.reset()
            start, cpu = time.perf_counter(), cpu_seconds()
            backend.apply(the_plans, the_changed, NODE)
            result[label] = {
                "total_s": round(time.perf_counter() - start, 4),
                "cpu_s": round(cpu_seconds() - cpu, 4),
                "kernel_s": round(kernel.kernel_s, 4),
                "kernel_cpu_s": round(kernel.kernel_cpu_s, 4),
                "calls": kernel.calls,
                "bytes": kernel.bytes,
            }
    return result


def main(argv: list[str]) -> int:
    """`syncbench.py OUT.json N VARIANT...`: measure each variant at size N, append to OUT.json (a list)."""
    out, n, wanted = Path(argv[0]), int(argv[1]), argv[2:]
    results = json.loads(out.read_text()) if out.exists() else []
    for variant in wanted:
        load = round(os.getloadavg()[0], 1)  # the machine is shared: how busy it was when this started
        result = {**measure(n, variant), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load": load}
        sys.stdout.write(json.dumps(result) + "\n")
        results.append(result)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
