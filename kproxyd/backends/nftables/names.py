"""kube-proxy's nftables object names (pkg/proxy/nftables/proxier.go), so operators find what they know."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from kproxyd.model import Endpoint, ServicePortName

TABLE = "kube-proxy"

# Regular chains of the top level.
SERVICES = "services"
MASQUERADING = "masquerading"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
REJECT_CHAIN = "reject-chain"
FIREWALL_CHECK = "firewall-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"

# Sets and verdict maps.
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
FIREWALL_IPS = "firewall-ips"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"

_NAME_MAX = 240  # kube-proxy's chainNameBaseLengthMax


@dataclass(frozen=True, slots=True)
class PortChains:
    """The per-ServicePort chains: Cluster policy, Local policy, external traffic, LB firewall."""

    cluster: str
    local: str
    external: str
    firewall: str


def _hash_and_truncate(name: str) -> str:
    encoded = base64.b32encode(hashlib.sha256(name.encode()).digest()[:5]).decode()
    based = f"{encoded}-{name}"
    return based if len(based) <= _NAME_MAX else based[: _NAME_MAX - 3] + "..."


def _port_base(name: ServicePortName) -> str:
    return f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port}"


def port_chains(name: ServicePortName) -> PortChains:
    """kube-proxy's servicePortChainNameBase-based chain names, e.g. service-ULMVA6XW-ns1/svc1/tcp/p80."""
    base = _hash_and_truncate(_port_base(name))
    return PortChains(f"service-{base}", f"local-{base}", f"external-{base}", f"firewall-{base}")


def _endpoint_base(name: ServicePortName, endpoint: Endpoint) -> str:
    return _hash_and_truncate(f"{_port_base(name)}__{endpoint.ip.replace(':', '.')}/{endpoint.port}")


def endpoint_chain(name: ServicePortName, endpoint: Endpoint) -> str:
    """kube-proxy's per-endpoint chain, e.g. endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80."""
    return "endpoint-" + _endpoint_base(name, endpoint)


def affinity_set(name: ServicePortName, endpoint: Endpoint) -> str:
    """The per-endpoint session-affinity set of kube-proxy, e.g. affinity-5OJB2KTY-ns1/svc1/tcp/p80__…."""
    return "affinity-" + _endpoint_base(name, endpoint)
