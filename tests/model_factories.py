"""Builders for kproxyd's model objects (ServicePorts, Endpoints, plans) and the golden-file check of tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

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

GOLDEN = Path(__file__).resolve().parent / "golden"
NODE = NodeInfo("node1")
CLUSTER_CIDR = LocalTrafficDetector(DetectLocalMode.CLUSTER_CIDR, ("10.0.0.0/8",))


def spn(ns: str = "ns1", name: str = "svc1", port: str = "p80", proto: Protocol = Protocol.TCP) -> ServicePortName:
    """A ServicePortName, ns1/svc1:p80/TCP unless told."""
    return ServicePortName(ns, name, port, proto)


def svc(name: ServicePortName, cluster_ip: str, port: int = 80, **kw: object) -> ServicePort:
    """A ServicePort on one cluster IP: of type NodePort when given a node_port, else ClusterIP (or kw's)."""
    kw.setdefault("type", ServiceType.NODE_PORT if "node_port" in kw else ServiceType.CLUSTER_IP)
    return ServicePort(name=name, cluster_ips=(cluster_ip,), port=port, **kw)  # type: ignore[arg-type]


def eps(*ips: str, port: int = 80, node: str | None = None) -> list[Endpoint]:
    """Ready endpoints on these IPs."""
    return [Endpoint(ip, port, node_name=node) for ip in ips]


def plans(
    *pairs: tuple[ServicePort, Sequence[Endpoint]], node: NodeInfo = NODE
) -> dict[ServicePortName, ServicePlan]:
    """The plans of these ServicePorts with their endpoints, on node (node1 unless told)."""
    return {p.name: plan_service_port(p, e, node) for p, e in pairs}


def assert_golden(path: Path, text: str, regenerate: str = "KPROXYD_UPDATE_GOLDEN=1 regenerates it") -> None:
    """Compare text with a golden file; KPROXYD_UPDATE_GOLDEN=1 rewrites the file instead."""
    if os.environ.get("KPROXYD_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; {regenerate}"
