"""Node-wide choices both renderers make, decided once here; the renderers only spell them in their syntax.

Per-Service semantics live in kproxyd.plan; what depends on the node's settings (which sources count as pod
traffic, what cluster-IP traffic is masqueraded, which node IPs the LB source ranges admit) lives here.
"""

from __future__ import annotations

import gc
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from kproxyd.model import DetectLocalMode, LocalTrafficDetector, NodeInfo
from kproxyd.plan import ServicePlan

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Match = TypeVar("Match")


@dataclass(frozen=True, slots=True)
class PodTraffic:
    """What marks a packet as pod traffic: its source CIDR, or the interface (name or wildcard) it arrives on."""

    by_source: bool
    value: str  # the CIDR, or the interface name (a prefix ends in the renderer's wildcard)


def pod_traffic(detector: LocalTrafficDetector | None, wildcard: str) -> PodTraffic | None:
    """kube-proxy's LocalTrafficDetector as one match, or None when it is not implemented (nothing to go on)."""
    if detector is None:
        return None
    if detector.mode in (DetectLocalMode.CLUSTER_CIDR, DetectLocalMode.NODE_CIDR):
        return PodTraffic(True, detector.cidrs[0]) if detector.cidrs else None
    if not detector.interface:
        return None
    prefix = detector.mode is not DetectLocalMode.BRIDGE_INTERFACE
    return PodTraffic(False, detector.interface + wildcard if prefix else detector.interface)


def cluster_ip_masquerade(
    plan: ServicePlan, masquerade_all: bool, off_cluster: Match | None, everything: Match
) -> Match | None:
    """The source match of the rules marking plan's cluster-IP traffic for masquerade; None: no such rules.

    All of it with masquerade_all (everything: the renderer's empty match), else only off-cluster sources:
    off_cluster, the renderer's spelling of "not from a pod" (None when pod traffic cannot be told apart).
    None too when cluster-IP traffic has no endpoints to go to (it is rejected or dropped).
    """
    if plan.internal_verdict is not None:
        return None
    if masquerade_all:
        return everything
    return off_cluster


def family_addresses(node: NodeInfo, family: int) -> tuple[str, ...]:
    """The node's addresses of one IP family."""
    return tuple(ip for ip in node.addresses if ipaddress.ip_address(ip).version == family)


def firewall_sources(
    ranges: Sequence[str], load_balancer_ips: Sequence[str], node_ips: Iterable[IPAddress]
) -> list[str]:
    """The sources the load-balancer firewall admits: the source ranges, and the LB IPs too when a range
    contains one of the node's IPs (the LB IP is often local; the node's own requests then come from it).
    """
    networks = [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in ranges]
    nodes = tuple(node_ips)
    sources = list(ranges)
    if any(ip.version == net.version and ip in net for net in networks for ip in nodes):
        sources.extend(load_balancer_ips)
    return sources


def refused_line(stderr: str, text: str, line_number: re.Pattern[str]) -> tuple[int | None, str | None]:
    """The input line a refusing tool named in its stderr (line_number's group 1), and that line's text."""
    match = line_number.search(stderr)
    line = int(match.group(1)) if match else None
    lines = text.splitlines()
    return line, lines[line - 1] if line is not None and 0 < line <= len(lines) else None


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: a full sync allocates millions of acyclic objects, and the
    collections they trigger would each traverse them all (2-3x the render time at 10k Services). What it
    built lives until the next full sync: frozen, later collections skip it (refcounting still frees it).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
