"""kube-proxy's iptables chain names (pkg/proxy/iptables/proxier.go), so operators find what they know."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from kproxyd.model import Endpoint, ServicePortName

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
KUBE_FIREWALL = "KUBE-FIREWALL"  # the localhost node-port guard (CVE-2020-8558), as kube-proxy writes it

# The top-level chains every sync declares (and so rewrites), in kube-proxy's order.
FILTER_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
_TOP_LEVEL = frozenset((*FILTER_CHAINS, *NAT_CHAINS, KUBE_PROXY_CANARY, KUBE_FIREWALL))


@dataclass(frozen=True, slots=True)
class ServiceChains:
    """The per-ServicePort chains: Cluster policy, Local policy, external traffic, LB firewall."""

    cluster: str
    local: str
    external: str
    firewall: str


def _hash16(text: str) -> str:
    # base32 of the first 10 digest bytes is exactly the first 16 characters of the full encoding.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:10]).decode()


def service_chains(name: ServicePortName) -> ServiceChains:
    """kube-proxy's portProtoHash-based KUBE-SVC/SVL/EXT/FW chain names of a ServicePort."""
    digest = _hash16(str(name) + name.protocol.lower())
    return ServiceChains(
        cluster=f"KUBE-SVC-{digest}",
        local=f"KUBE-SVL-{digest}",
        external=f"KUBE-EXT-{digest}",
        firewall=f"KUBE-FW-{digest}",
    )


def endpoint_chain(name: ServicePortName, endpoint: Endpoint) -> str:
    """kube-proxy's KUBE-SEP chain name of one endpoint of a ServicePort."""
    return "KUBE-SEP-" + _hash16(str(name) + name.protocol.lower() + endpoint.address)


def is_service_chain(chain: str) -> bool:
    """True for a per-ServicePort or per-endpoint chain (the ones stale-chain removal may delete)."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def is_kproxyd_chain(chain: str) -> bool:
    """True for every chain kproxyd (like kube-proxy) creates, in any table."""
    return chain in _TOP_LEVEL or is_service_chain(chain)
