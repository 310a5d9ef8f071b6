"""Run IPVS mode's kernel layer in the current network namespace and print what the kernel then holds (JSON).

Used by test_ipvs_backend.py through `ip netns exec`: pyroute2 acts on the process's own namespace.
"""

from __future__ import annotations

import json
from typing import Any

from kproxyd.backends.ipvs.backend import IpvsBackend
from kproxyd.backends.ipvs.kernel import DummyLink, IpvsKernel
from kproxyd.backends.ipvs.render import RealServer, ServiceChanges, VirtualServerKey
from kproxyd.config import ProxyConfig
from kproxyd.model import Endpoint, NodeInfo, Protocol
from kproxyd.plan import plan_service_port
from tests.model_factories import spn, svc

NODE = NodeInfo("node1", addresses=("192.168.0.2",))


def snapshot(kernel: IpvsKernel) -> dict[str, Any]:
    """Virtual services with (server, weight) and persistence, and kube-ipvs0's addresses."""
    services = {
        str(key): {
            "scheduler": live.scheduler,
            "persistence": live.persistence,
            "servers": sorted(f"{s.ip}:{s.port}/{d.weight}" for s, d in live.destinations.items()),
        }
        for key, live in kernel.services().items()
    }
    return {"services": services, "addresses": sorted(DummyLink().addresses(4)), "link": DummyLink().exists()}


def main() -> None:
    """Full sync, a partial sync dropping an endpoint, a drain, then cleanup; a snapshot after each."""
    config = ProxyConfig(cluster_cidrs=("10.0.0.0/8",), mode="ipvs", ipvs_scheduler="rr")
    backend = IpvsBackend(config, local_addresses=lambda _family: ["192.168.0.2"])
    kernel = IpvsKernel(4)
    name = spn()
    port = svc(name, "172.30.0.41", node_port=30080, session_affinity_timeout=600)
    both = [Endpoint("10.180.0.1", 80, node_name="node1"), Endpoint("10.180.0.2", 80, node_name="node2")]
    steps = {}
    backend.apply({name: plan_service_port(port, both, NODE)}, None, NODE)
    steps["full"] = snapshot(kernel)
    backend.apply({name: plan_service_port(port, both[:1], NODE)}, {name}, NODE)
    steps["partial"] = snapshot(kernel)
    key = VirtualServerKey(Protocol.TCP, "172.30.0.41", 80)
    kernel.apply(ServiceChanges(drain_destinations=[(key, RealServer("10.180.0.1", 80))]))
    steps["drained"] = snapshot(kernel)
    backend.cleanup()
    steps["cleaned"] = snapshot(kernel)
    print(json.dumps(steps))  # the last line: logs may come before it


if __name__ == "__main__":
    main()
