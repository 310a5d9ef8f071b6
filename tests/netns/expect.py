"""Where the ebpf mode legitimately differs from kube-proxy, the expectation per mode (one place)."""

from __future__ import annotations


def refused_error(mode: str, cluster_ip: bool) -> type[OSError]:
    """The error a refused connection raises.

    kube-proxy's REJECT answers ECONNREFUSED. The ebpf mode's socket load balancer fails connect() and
    sendmsg() to a cluster IP without endpoints inside the call, with EPERM (the hook returns "reject"):
    as immediate, with no packet sent and no ICMP rate limit to flap against. Node ports and other
    external frontends go through the nftables fallback and are REJECTed as in nftables mode.
    """
    return PermissionError if mode == "ebpf" and cluster_ip else ConnectionRefusedError


def dropped_error(mode: str, cluster_ip: bool) -> type[OSError]:
    """The error a dropped connection raises: a timeout, but EPERM at once where ebpf fails the connect()
    (a Local traffic policy with no endpoint on this node: no packet leaves, so there is nothing to drop).
    """
    return PermissionError if mode == "ebpf" and cluster_ip else TimeoutError
