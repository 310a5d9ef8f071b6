"""Where the ebpf mode legitimately differs from kube-proxy, the expectation per mode (one place)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply


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


TC_ATTACHED = "tc external-frontend programs attached"


def wait_for_dataplane(lab: LabCluster, nodes: Iterable[str]) -> None:
    """In ebpf mode, wait for the tc programs too: they are compiled after the first sync's maps and nftables
    fallback (which serves external frontends until then), so the external rows run through tc.
    """
    if lab.mode == "ebpf":  # type: ignore[attr-defined]
        for node in nodes:
            wait_until(lambda n=node: TC_ATTACHED in lab.proxy_log(n), timeout=60, what=f"tc attached on {node}")


def tc_connections(lab: LabCluster, node: str) -> dict[str, int]:
    """ebpf mode: new connections per external frontend counted by node's tc program (its /metrics)."""
    text = lab.http_get(node, "127.0.0.1", 10249, "/metrics")[1]
    found = re.findall(r'^kproxyd_service_connections_total\{.*frontend="([^"]+) \(TC\)".*\} (\S+)$', text, re.M)
    return {frontend: int(float(value)) for frontend, value in found}


def assert_served_by_tc(lab: LabCluster, src: str, node: str, ip: str, port: int, proto: str = "TCP") -> None:
    """Flows from src to ip:port (IPv4 or IPv6) are counted by node's tc program (its tc_counters map: not
    left to the nftables fallback).
    """
    frontend = f"[{ip}]:{port}/{proto}" if ":" in ip else f"{ip}:{port}/{proto}"
    before = tc_connections(lab, node).get(frontend, 0)
    assert all(isinstance(r, Reply) for r in lab.answers(src, ip, port, proto, count=5, timeout=1.0))
    wait_until(
        lambda: tc_connections(lab, node).get(frontend, 0) >= before + 5, timeout=20, what=f"tc counted {frontend}"
    )
