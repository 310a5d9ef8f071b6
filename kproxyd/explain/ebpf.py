"""`kproxyd explain` in ebpf mode: which program meets a new connection, and what the pinned maps make of it.

A process of this node (the node itself, or one of its pods) connecting to a cluster IP, or to a node IP at a
node port, an external IP or a load-balancer IP, is translated inside connect() by the socket load balancer
(bpf/sock_lb.c); a packet arriving on an interface meets tc
(bpf/tc_nat.c) when tc holds its frontend, else the nftables fallback, which the nftables walker explains.
Pure: the maps, whether tc runs on the packet's interface and the fallback's walk come in through EbpfNode.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol as Interface

from kproxyd.backends.ebpf.image import F_MAGLEV, F_NO_ENDPOINTS, FrontendKey, address_key
from kproxyd.backends.ebpf.kernel import PinnedFrontend
from kproxyd.backends.ebpf.tc import F_POD_SOURCES, F_SNAT
from kproxyd.explain.common import Explanation, Fate, Hop, Outcome, Packet, masquerade_reason, merge
from kproxyd.model import Protocol

SOCKET_LB, TC = "sock_lb", "tc_nat"  # the programs, as the hops name them


class FrontendMaps(Interface):
    """One program's frontend maps: kernel.PinnedFrontends on a node."""

    def frontend(self, key: FrontendKey) -> PinnedFrontend | None:
        """The frontend at key, None when there is none."""

    def service_at(self, ip: str) -> str:
        """The Service ("ns/name") of a frontend at ip, "" when none is named."""


@dataclass(frozen=True)
class EbpfNode:
    """What explain reads from a node in ebpf mode."""

    socket_lb: FrontendMaps
    tc: FrontendMaps | None  # None: no tc filter on the packet's arrival interface (or tc does not run here)
    pod_sources: tuple[str, ...]  # tc leaves new flows from these to externalTrafficPolicy Local frontends
    uplinks: frozenset[str]  # the default routes' interfaces: what arrives there was routed in from elsewhere
    fallback: Callable[[Packet], Explanation]  # the nftables fallback table's walk


def explain(packet: Packet, node: EbpfNode) -> Explanation:
    """The program that takes the packet's connection, and what it does with it."""
    notes: list[Hop] = []  # the programs that saw it and let it go on
    if packet.proto in (Protocol.TCP, Protocol.UDP):
        key = FrontendKey(packet.dst, packet.dport, Protocol(packet.proto))
        on_node = packet.from_node or packet.iif not in node.uplinks
        answer = _socket_lb(packet, node, key, notes) if on_node else _not_served(packet, node)
        if answer is None and node.tc is not None and not packet.from_node:
            answer = _tc(packet, node.tc, node.pod_sources, key, notes)
        if answer is not None:
            return answer
    walked = node.fallback(packet)
    where = "nat OUTPUT (sent by this node)" if packet.from_node else f"nat PREROUTING (arrives on {packet.iif})"
    outcomes = tuple(replace(o, hops=(*notes, *o.hops)) for o in walked.outcomes)
    return replace(walked, mode="ebpf", outcomes=outcomes, dataplane=f"nftables fallback, {where}")


def _socket_lb(packet: Packet, node: EbpfNode, key: FrontendKey, notes: list[Hop]) -> Explanation | None:
    """connect() (sendmsg() for unconnected UDP) by a process of this node; None: not a frontend it holds."""
    hook = _hook(packet)
    dataplane = f"socket load balancer ({hook} of a process on this node)"
    found = node.socket_lb.frontend(key)
    cluster_ip = node.socket_lb.frontend(address_key(packet.dst)) is not None
    if found is not None:
        kind = "cluster IP" if cluster_ip else _external_kind(packet)
        return _balanced(packet, SOCKET_LB, hook, key, found, kind, None, dataplane)
    if not cluster_ip:
        notes.append(Hop(SOCKET_LB, hook, f"frontends: no {key}, not a cluster IP: connect() goes on unchanged"))
        return None
    hop = Hop(SOCKET_LB, hook, f"frontends: no {key}; ({packet.dst}, 0, 0) marks it a cluster IP")
    reason = f"cluster IP {packet.dst} has no port {packet.dport}/{packet.proto}: {_fails(packet)}"
    outcome = Outcome(1.0, Fate.REJECTED, reason=reason, hops=(hop,))
    service = node.socket_lb.service_at(packet.dst) or None
    return Explanation("ebpf", packet, service, "cluster IP", (outcome,), dataplane=dataplane)


def _not_served(packet: Packet, node: EbpfNode) -> Explanation | None:
    """A packet routed in to a cluster IP: the socket load balancer never sees it. None: not a cluster IP."""
    if node.socket_lb.frontend(address_key(packet.dst)) is None:
        return None
    found = node.socket_lb.frontend(FrontendKey(packet.dst, packet.dport, Protocol(packet.proto)))
    service = found.entry.service if found is not None else node.socket_lb.service_at(packet.dst)
    reason = f"cluster IPs serve the sockets of this node and its pods, not traffic routed in on {packet.iif}"
    outcome = Outcome(1.0, Fate.UNHANDLED, reason=reason)
    dataplane = f"none: routed in on {packet.iif}, past the socket load balancer"
    return Explanation("ebpf", packet, service or None, "cluster IP", (outcome,), dataplane=dataplane)


def _tc(
    packet: Packet, maps: FrontendMaps, pod_sources: tuple[str, ...], key: FrontendKey, notes: list[Hop]
) -> Explanation | None:
    """tc ingress on the packet's interface; None: tc passes it on to the stack (and nftables)."""
    hook = f"tc_ingress {packet.iif}"
    found = maps.frontend(key)
    if found is None:
        notes.append(Hop(TC, hook, f"tc_frontends: no {key}: passed on to the stack"))
        return None
    entry = found.entry
    if entry.flags & F_NO_ENDPOINTS or not entry.slots:
        notes.append(Hop(TC, hook, f"tc_frontends[{key}]: no endpoints: passed on to the stack"))
        return None
    if entry.flags & F_POD_SOURCES and _in(packet.src, pod_sources):
        note = f"tc_frontends[{key}]: externalTrafficPolicy Local and {packet.src} in tc_pod_sources: pods' new "
        notes.append(Hop(TC, hook, note + "flows are left to nftables"))
        return None
    masquerade = masquerade_reason("external", False) if entry.flags & F_SNAT else None
    return _balanced(
        packet, TC, hook, key, found, _external_kind(packet), masquerade, f"tc ingress on {packet.iif}"
    )


def _external_kind(packet: Packet) -> str:
    """The kind of external frontend the packet is for (the maps do not say which of the last two)."""
    return "node port" if packet.is_local(packet.dst) else "external or loadbalancer IP"


def _balanced(
    packet: Packet,
    program: str,
    hook: str,
    key: FrontendKey,
    found: PinnedFrontend,
    frontend: str,
    masquerade: str | None,
    dataplane: str,
) -> Explanation:
    """A frontend entry's outcomes: each backend with its share of the slots, or EPERM without endpoints."""
    entry = found.entry
    prefix = "tc_" if program == TC else ""
    algorithm = "maglev" if entry.flags & F_MAGLEV else "random"
    affinity = f", ClientIP affinity {entry.affinity} s" if entry.affinity else ""
    snat = ", SNAT" if masquerade else ""
    head = Hop(
        program,
        hook,
        f"{prefix}frontends[{key}]: {entry.service or '(unnamed)'}, rev {found.rev}, {len(entry.slots)} slots, "
        f"{algorithm}{affinity}{snat}; connections so far: {found.connections}",
    )
    if entry.flags & F_NO_ENDPOINTS or not entry.slots:
        outcomes: tuple[Outcome, ...] = (
            Outcome(1.0, Fate.REJECTED, reason=f"no endpoints: {_fails(packet)}", hops=(head,)),
        )
    else:
        outcomes = merge(_slot_outcomes(found, program, hook, prefix, masquerade, head))
    return Explanation("ebpf", packet, entry.service or None, frontend, outcomes, entry.affinity > 0, dataplane)


def _slot_outcomes(
    found: PinnedFrontend, program: str, hook: str, prefix: str, masquerade: str | None, head: Hop
) -> list[Outcome]:
    """One outcome per backend: its share of the slots (random: 1/count each; Maglev: its share of the table)."""
    total = len(found.entry.slots)
    outcomes = []
    for (ip, port), count in Counter(found.entry.slots).items():
        endpoint = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        if port == 0:  # a slot missing: read while the frontend was being replaced
            hop = Hop(program, hook, f"{prefix}slots[{found.rev}, *]: {count} of {total} missing")
            outcomes.append(
                Outcome(
                    count / total, Fate.REJECTED, reason="slot missing (frontend being replaced)", hops=(head, hop)
                )
            )
            continue
        hop = Hop(program, hook, f"{prefix}slots[{found.rev}, *]: {count} of {total} -> {endpoint}")
        outcomes.append(Outcome(count / total, Fate.ENDPOINT, endpoint, masquerade, hops=(head, hop)))
    return outcomes


def _hook(packet: Packet) -> str:
    """The socket load balancer's program for the packet's family and protocol."""
    family = ipaddress.ip_address(packet.dst).version
    return f"connect{family}" if packet.proto == Protocol.TCP else f"connect{family}/sendmsg{family}"


def _fails(packet: Packet) -> str:
    calls = "connect()" if packet.proto == Protocol.TCP else "connect() and sendmsg()"
    return f"{calls} {'fails' if packet.proto == Protocol.TCP else 'fail'} with EPERM"


def _in(ip: str, cidrs: tuple[str, ...]) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in ipaddress.ip_network(cidr) for cidr in cidrs)
