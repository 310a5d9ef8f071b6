"""Builders for API objects (plain dicts, as the API server sends them) used across tests."""

from __future__ import annotations

from typing import Any


def service(
    name: str = "svc",
    namespace: str = "ns",
    cluster_ip: str = "10.96.0.10",
    ports: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A v1 Service."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip] if cluster_ip not in ("", "None") else None,
            "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}],
            **spec,
        },
    }
    if body["spec"]["clusterIPs"] is None:
        del body["spec"]["clusterIPs"]
    return body


def endpoint(ip: str, node: str = "node1", ready: bool = True, **extra: Any) -> dict[str, Any]:
    """One entry of an EndpointSlice's endpoints."""
    conditions = {
        "ready": ready,
        "serving": extra.pop("serving", ready),
        "terminating": extra.pop("terminating", False),
    }
    return {"addresses": [ip], "conditions": conditions, "nodeName": node, **extra}


def endpoint_slice(
    service_name: str = "svc",
    namespace: str = "ns",
    endpoints: list[dict[str, Any]] | None = None,
    ports: list[dict[str, Any]] | None = None,
    name: str | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice of a Service."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-abc",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "endpoints": endpoints if endpoints is not None else [endpoint("10.244.1.2")],
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str = "node1", ip: str = "172.28.0.11", zone: str | None = None) -> dict[str, Any]:
    """A v1 Node."""
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]},
    }
