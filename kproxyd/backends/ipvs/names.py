"""kube-proxy's IPVS-mode names (pkg/proxy/ipvs/proxier.go and ipset.go), so operators find what they know."""

from __future__ import annotations

from dataclasses import dataclass

DUMMY_DEVICE = "kube-ipvs0"

# nat chains (KUBE-SERVICES, KUBE-POSTROUTING and KUBE-MARK-MASQ are shared with iptables mode).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_NODE_PORT = "KUBE-NODE-PORT"  # in nat and in filter
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
# filter chains (KUBE-FORWARD and KUBE-PROXY-FIREWALL are shared with iptables mode).
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"

NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_FORWARD, KUBE_NODE_PORT, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, KUBE_IPVS_FILTER)
# Chains only IPVS mode creates: what its cleanup may delete without breaking iptables mode.
IPVS_ONLY_CHAINS = (KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_SOURCE_RANGES_FIREWALL, KUBE_IPVS_FILTER)


@dataclass(frozen=True, slots=True)
class SetKind:
    """One of kube-proxy's ipsets: its name (IPv4 spelling), type and the comment kube-proxy gives it."""

    name: str
    type: str
    comment: str


LOOP_BACK = SetKind(
    "KUBE-LOOP-BACK", "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"
)
CLUSTER_IP = SetKind(
    "KUBE-CLUSTER-IP", "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"
)
EXTERNAL_IP = SetKind(
    "KUBE-EXTERNAL-IP", "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"
)
EXTERNAL_IP_LOCAL = SetKind(
    "KUBE-EXTERNAL-IP-LOCAL",
    "hash:ip,port",
    "Kubernetes service external ip + port with externalTrafficPolicy=local",
)
LOAD_BALANCER = SetKind("KUBE-LOAD-BALANCER", "hash:ip,port", "Kubernetes service lb portal")
LOAD_BALANCER_LOCAL = SetKind(
    "KUBE-LOAD-BALANCER-LOCAL",
    "hash:ip,port",
    "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
)
LOAD_BALANCER_FW = SetKind(
    "KUBE-LOAD-BALANCER-FW",
    "hash:ip,port",
    "Kubernetes service load balancer ip + port for load balancer with sourceRange",
)
LOAD_BALANCER_SOURCE_IP = SetKind(
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "hash:ip,port,ip",
    "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
)
LOAD_BALANCER_SOURCE_CIDR = SetKind(
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "hash:ip,port,net",
    "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
)
NODE_PORT_TCP = SetKind("KUBE-NODE-PORT-TCP", "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose")
NODE_PORT_LOCAL_TCP = SetKind(
    "KUBE-NODE-PORT-LOCAL-TCP", "bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"
)
NODE_PORT_UDP = SetKind("KUBE-NODE-PORT-UDP", "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose")
NODE_PORT_LOCAL_UDP = SetKind(
    "KUBE-NODE-PORT-LOCAL-UDP", "bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"
)
NODE_PORT_SCTP = SetKind(
    "KUBE-NODE-PORT-SCTP-HASH",
    "hash:ip,port",
    "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
)
NODE_PORT_LOCAL_SCTP = SetKind(
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "hash:ip,port",
    "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
)
HEALTH_CHECK_NODE_PORT = SetKind("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port", "Kubernetes health check node port")
IPVS_IPS = SetKind("KUBE-IPVS-IPS", "hash:ip", "Kubernetes service IP list")

SET_KINDS = (
    LOOP_BACK,
    CLUSTER_IP,
    EXTERNAL_IP,
    EXTERNAL_IP_LOCAL,
    LOAD_BALANCER,
    LOAD_BALANCER_LOCAL,
    LOAD_BALANCER_FW,
    LOAD_BALANCER_SOURCE_IP,
    LOAD_BALANCER_SOURCE_CIDR,
    NODE_PORT_TCP,
    NODE_PORT_LOCAL_TCP,
    NODE_PORT_UDP,
    NODE_PORT_LOCAL_UDP,
    NODE_PORT_SCTP,
    NODE_PORT_LOCAL_SCTP,
    HEALTH_CHECK_NODE_PORT,
    IPVS_IPS,
)


IPSET_MAX_NAME = 31  # IPSET_MAXNAMELEN less the terminating NUL: ipset refuses longer names


def set_name(kind: SetKind, family: int) -> str:
    """kube-proxy's ipset name for an IP family: IPv6 sets are KUBE-6-..., cut to 31 characters as kube-proxy's
    NewIPSet does (KUBE-6-LOAD-BALANCER-SOURCE-CID, KUBE-6-NODE-PORT-LOCAL-SCTP-HAS)."""
    return kind.name if family == 4 else ("KUBE-6-" + kind.name.removeprefix("KUBE-"))[:IPSET_MAX_NAME]


def all_set_names() -> tuple[str, ...]:
    """Every ipset name kproxyd's IPVS mode may create, both families."""
    return tuple(set_name(kind, family) for family in (4, 6) for kind in SET_KINDS)
