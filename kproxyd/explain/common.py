"""What `kproxyd explain` reports for one packet, whatever the mode: the paths it may take and where they end.

A walker follows the rules for a new connection and ends each branch in an Outcome (with its probability,
from the random spread over endpoints); Explanation merges the branches and prints them as text or JSON.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
R = TypeVar("R")  # a walker's parsed rule


class Fate(enum.StrEnum):
    """Where a branch of the walk ends."""

    ENDPOINT = "endpoint"  # DNATed to an endpoint
    REJECTED = "rejected"  # refused at once (ICMP unreachable / TCP reset)
    DROPPED = "dropped"  # silently dropped: the client times out
    UNHANDLED = "unhandled"  # no kube-proxy rule took it: it goes on to its destination unchanged


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a connection, and what the node knows about it."""

    src: str
    dst: str
    dport: int
    proto: str = "TCP"
    iif: str = ""  # the interface it arrives on ("" when it is sent by the node itself or unknown)
    local_addresses: frozenset[str] = frozenset()

    def is_local(self, ip: str) -> bool:
        """True when ip is an address of this node (addrtype LOCAL / fib type local)."""
        return ip in self.local_addresses or ipaddress.ip_address(ip) in LOOPBACK

    @property
    def from_node(self) -> bool:
        """True when the node itself sends it (nat OUTPUT), not a pod or another host (nat PREROUTING)."""
        return self.is_local(self.src)


@dataclass(frozen=True, slots=True)
class Hop:
    """One rule the packet matched, in a table (or nftables hook chain) and chain."""

    table: str
    chain: str
    rule: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """One way the walk can end, with its probability."""

    probability: float
    fate: Fate
    endpoint: str | None = None  # "ip:port" when DNATed
    masquerade: str | None = None  # why the source is SNATed, when it is
    reason: str | None = None  # the rule's comment when rejected or dropped
    hops: tuple[Hop, ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every outcome of one packet, with the Service and frontend that captured it."""

    mode: str
    packet: Packet
    service: str | None
    frontend: str | None
    outcomes: tuple[Outcome, ...]
    affinity: bool = False
    dataplane: str | None = None  # ebpf mode: the program that decides (socket LB, tc, nftables fallback)

    @property
    def endpoints(self) -> dict[str, float]:
        """The endpoints it may reach, with the probability of each."""
        return {o.endpoint: o.probability for o in self.outcomes if o.endpoint is not None}

    @property
    def fates(self) -> set[Fate]:
        """Every way it can end."""
        return {o.fate for o in self.outcomes}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        packet = self.packet
        return {
            "mode": self.mode,
            "packet": {"src": packet.src, "dst": packet.dst, "dport": packet.dport, "proto": packet.proto},
            "path": "OUTPUT" if packet.from_node else "PREROUTING",
            "iif": packet.iif,
            "service": self.service,
            "frontend": self.frontend,
            "affinity": self.affinity,
            "dataplane": self.dataplane,
            "outcomes": [_outcome_json(o) for o in self.outcomes],
        }

    def to_text(self) -> str:
        """Human-readable: the packet, the Service, each outcome, and the rules of each path."""
        packet = self.packet
        hook = self.dataplane or (
            "nat OUTPUT (sent by this node)" if packet.from_node else f"nat PREROUTING (arrives on {packet.iif})"
        )
        lines = [
            f"packet:   {packet.proto} {packet.src} -> {packet.dst}:{packet.dport}, {hook}, {self.mode} mode",
            f"service:  {self.service or '(none: no kube-proxy rule matches this destination)'}"
            + (f" ({self.frontend})" if self.frontend else ""),
        ]
        if self.affinity:
            lines.append("affinity: ClientIP session affinity: a client sticks to the first endpoint it gets")
        lines.append("outcomes:")
        lines += [f"  {o.probability:7.2%}  {_describe(o)}" for o in self.outcomes]
        width = max([8, *(len(hop.table) for o in self.outcomes for hop in o.hops)])
        for outcome in self.outcomes:
            lines.append(f"path to {outcome.endpoint or outcome.fate.value}:")
            lines += [f"  {hop.table:<{width}} {hop.chain}: {hop.rule}" for hop in outcome.hops]
        return "\n".join(lines)


VERDICT_FATES = {"DROP": Fate.DROPPED, "REJECT": Fate.REJECTED}


@dataclass(frozen=True, slots=True)
class Branch:
    """One branch of a walk: its share of new connections and what the rules did to it so far."""

    probability: float
    dst: str
    dport: int
    hops: tuple[Hop, ...] = ()
    mark: int = 0
    dnat: str | None = None
    verdict: str | None = None  # ACCEPT/DROP/REJECT ends the hook (chain); RETURN leaves the current chain
    masquerade_reason: str | None = None
    masqueraded: bool = False
    reason: str | None = None
    service: str | None = None
    frontend: str | None = None
    affinity: bool = False

    def outcome(self) -> Outcome:
        """How this branch ends."""
        if self.verdict in VERDICT_FATES:
            return Outcome(self.probability, VERDICT_FATES[self.verdict], None, None, self.reason, self.hops)
        masquerade = self.masquerade_reason if self.masqueraded else None
        fate = Fate.ENDPOINT if self.dnat else Fate.UNHANDLED
        return Outcome(self.probability, fate, self.dnat, masquerade, None, self.hops)


def explanation(mode: str, packet: Packet, branches: list[Branch]) -> Explanation:
    """The Explanation of a finished walk: its branches merged by outcome, the first Service and frontend."""
    return Explanation(
        mode=mode,
        packet=packet,
        service=next((b.service for b in branches if b.service), None),
        frontend=next((b.frontend for b in branches if b.frontend), None),
        outcomes=merge(b.outcome() for b in branches),
        affinity=any(b.affinity for b in branches),
    )


def walk_chain(
    rules: Iterable[R],
    branch: Branch,
    affinity: Callable[[R], bool],
    share: Callable[[R, Branch], float],
    apply: Callable[[R, Branch], list[Branch]],
) -> list[Branch]:
    """Run a chain's rules over a branch; return the branches that ended (verdict) or left it (verdict None).

    A rule matching a share of a branch splits it (the random spread over endpoints); apply() runs the
    matched rule on its part; an affinity rule marks the branch as subject to session affinity.
    """
    active, done = [branch], []
    for rule in rules:
        following: list[Branch] = []
        for current in active:
            if affinity(rule):
                current = replace(current, affinity=True)  # a new client has no affinity entry yet
            part = share(rule, current)
            if part < 1:
                following.append(replace(current, probability=current.probability * (1 - part)))
            if part > 0:
                taken = replace(current, probability=current.probability * part)
                for result in apply(rule, taken):
                    if result.verdict == "RETURN":
                        done.append(replace(result, verdict=None))
                    else:
                        (done if result.verdict else following).append(result)
        active = following
    return done + active


def chain_kind(chain: str, kinds: Mapping[str, str]) -> str:
    """The kind of a per-ServicePort chain (cluster, local, external, endpoint) by its name prefix, or ""."""
    return next((kind for prefix, kind in kinds.items() if chain.startswith(prefix)), "")


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "probability": round(outcome.probability, 6),
        "fate": outcome.fate.value,
        "endpoint": outcome.endpoint,
        "masquerade": outcome.masquerade,
        "reason": outcome.reason,
        "hops": [{"table": h.table, "chain": h.chain, "rule": h.rule} for h in outcome.hops],
    }


def _describe(outcome: Outcome) -> str:
    if outcome.fate is Fate.ENDPOINT:
        snat = f"masqueraded: {outcome.masquerade}" if outcome.masquerade else "source kept"
        return f"DNAT to {outcome.endpoint}, {snat}"
    if outcome.fate is Fate.UNHANDLED:
        return (
            f"not translated: {outcome.reason}"
            if outcome.reason
            else "not a Service destination: routed on unchanged"
        )
    return f"{outcome.fate.value}" + (f": {outcome.reason}" if outcome.reason else "")


def masquerade_reason(chain_kind: str, conditional: bool) -> str:
    """Why a rule in a chain of this kind (cluster, local, external, endpoint) marks for masquerade.

    conditional: the rule matches on the source (not a pod / a local address), not on every packet.
    """
    if chain_kind == "endpoint":
        return "hairpin: the endpoint connects to itself"
    if chain_kind == "external":
        if conditional:
            return "external destination reached from the node itself"
        return "external traffic to a Service with externalTrafficPolicy Cluster"
    return "off-cluster source to a cluster IP" if conditional else "masquerade-all"


def merge(outcomes: Iterable[Outcome]) -> tuple[Outcome, ...]:
    """Sum the probabilities of branches that end the same way; keep the first branch's path."""
    merged: dict[tuple[Fate, str | None, str | None, str | None], Outcome] = {}
    for o in outcomes:
        if o.probability <= 0:
            continue
        key = (o.fate, o.endpoint, o.masquerade, o.reason)
        first = merged.get(key)
        merged[key] = o if first is None else Outcome(first.probability + o.probability, *key, first.hops)
    return tuple(
        sorted(merged.values(), key=lambda o: (o.fate != Fate.ENDPOINT, o.endpoint or "", o.reason or ""))
    )
