"""Immutable values that describe Services, endpoints and the node, independent of the API's JSON."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Protocol(enum.StrEnum):
    """Transport protocol of a Service port (the API's spelling)."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class ServiceType(enum.StrEnum):
    """spec.type of a Service."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """Identity of one port of one Service: kube-proxy's ServicePortName."""

    namespace: str
    name: str
    port: str  # the port's name; "" for an unnamed single port
    protocol: Protocol

    def __str__(self) -> str:
        """kube-proxy's spelling, "ns/name:port" (":port" omitted for an unnamed port)."""
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}"

    @property
    def service_key(self) -> str:
        """The owning Service's "namespace/name"."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything kube-proxy needs to know about one port of a Service, already validated."""

    name: ServicePortName
    type: ServiceType
    cluster_ips: tuple[str, ...]
    port: int
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity_timeout: int | None = None  # seconds when sessionAffinity is ClientIP
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int | None = None
    prefer_close: bool = False  # trafficDistribution: PreferClose
    lb_algorithm: str | None = None  # the kproxyd.io/lb-algorithm annotation (ebpf mode), when set

    @property
    def protocol(self) -> Protocol:
        """The port's transport protocol."""
        return self.name.protocol

    @property
    def externally_accessible(self) -> bool:
        """True when traffic may reach it from outside the cluster network (node port, external/LB IP)."""
        return self.node_port is not None or bool(self.external_ips) or bool(self.load_balancer_ips)


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One backend address of a ServicePort, merged from the EndpointSlices of its Service."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] | None = None  # hints.forZones; None when the slice gave no hints

    @property
    def address(self) -> str:
        """ "ip:port", bracketed for IPv6, as kube-proxy writes it in comments and chain hashes."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What kube-proxy uses of this node's Node object."""

    name: str
    addresses: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False  # being deleted, or tainted for deletion by the cluster autoscaler

    @property
    def zone(self) -> str | None:
        """The node's topology zone label, if any."""
        return self.labels.get("topology.kubernetes.io/zone")


@dataclass(frozen=True, slots=True)
class ProxyState:
    """A consistent snapshot of everything the proxy programs: ports, their endpoints, and this node."""

    ports: Mapping[ServicePortName, ServicePort]
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]]
    node: NodeInfo


class DetectLocalMode(enum.StrEnum):
    """kube-proxy's --detect-local-mode: how traffic from this node's pods is recognised."""

    CLUSTER_CIDR = "ClusterCIDR"
    NODE_CIDR = "NodeCIDR"
    BRIDGE_INTERFACE = "BridgeInterface"
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"


@dataclass(frozen=True, slots=True)
class LocalTrafficDetector:
    """Recognises pod-originated traffic: by source CIDRs, or by the input interface (name or prefix)."""

    mode: DetectLocalMode
    cidrs: tuple[str, ...] = ()
    interface: str = ""
