"""Where the ebpf mode legitimately differs from kube-proxy, the expectation per mode (one place)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply


def refused_error(mode: str, socket_lb: bool) -> type[OSError]:
    """The error a refused connection raises (socket_lb: the ebpf mode's socket load balancer holds the
    frontend: a cluster IP, or a node port, external IP or load-balancer IP a process of the node dials).

    kube-proxy's REJECT answers ECONNREFUSED. The ebpf mode's socket load balancer fails connect() and
    sendmsg() to a frontend without endpoints inside the call, with EPERM (the hook returns "reject"):
    as immediate, with no packet sent and no ICMP rate limit to flap against. External frontends reached
    from the network go through the nftables fallback and are REJECTed as in nftables mode.
    """
    return PermissionError if mode == "ebpf" and socket_lb else ConnectionRefusedError


def dropped_error(mode: str, socket_lb: bool) -> type[OSError]:
    """The error a dropped connection raises: a timeout, but EPERM at once where ebpf fails the connect()
    (a Local traffic policy with no endpoint on this node: no packet leaves, so there is nothing to drop).
    """
    return PermissionError if mode == "ebpf" and socket_lb else TimeoutError


def masqueraded(mode: str, kube_proxy: bool, socket_lb: bool) -> bool:
    """Whether a flow arrives SNATed (kube_proxy: in kube-proxy). kube-proxy masquerades pod traffic to
    external frontends with Cluster policy; the ebpf mode's socket load balancer connects the pod's socket
    straight to the endpoint, from the pod's own address (as Cilium's socket load balancer does).
    """
    return kube_proxy and not (mode == "ebpf" and socket_lb)


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
