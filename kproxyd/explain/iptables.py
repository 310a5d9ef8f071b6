"""Walk iptables-save output for one new connection, as the kernel would: nat, then filter, then POSTROUTING.

Pure: parse_save reads the nat and filter tables; IptablesWalker follows every branch (the random spread
over endpoints splits it) through kube-proxy's chains and the built-in chains' jumps into them.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, replace

from kproxyd.backends.iptables.names import KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_SERVICES
from kproxyd.explain.common import (
    VERDICT_FATES,
    Branch,
    Explanation,
    Hop,
    Packet,
    chain_kind,
    explanation,
    masquerade_reason,
    walk_chain,
)

# Options that take no value, and the options of -m recent that only qualify --rcheck / --set.
_FLAGS = frozenset({"--rcheck", "--set", "--reap", "--update", "--random-fully"})
_RECENT = frozenset({"--name", "--seconds", "--reap", "--rsource", "--mask"})
_PASSIVE = frozenset({"--comment", "--set"}) | _RECENT
_CHAIN_KINDS = {"KUBE-SVC-": "cluster", "KUBE-SVL-": "local", "KUBE-EXT-": "external", "KUBE-SEP-": "endpoint"}
_TERMINAL = frozenset({"ACCEPT", "DROP", "REJECT"})


class UnsupportedRule(ValueError):
    """A kube-proxy rule uses a match this walker cannot evaluate."""


@dataclass(frozen=True, slots=True)
class Match:
    """One match option of a rule, e.g. ("-d", "10.96.0.1/32", negated=False)."""

    option: str
    value: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One -A line: its matches, its target and the target's options."""

    chain: str
    matches: tuple[Match, ...]
    target: str | None
    target_args: dict[str, str]
    comment: str
    text: str

    def has(self, option: str) -> bool:
        """True when the rule carries this match option."""
        return any(m.option == option for m in self.matches)


Ruleset = dict[str, dict[str, list[Rule]]]


def parse_save(text: str) -> Ruleset:
    """The rules of every table in iptables-save (or -restore) text, by table and chain, in order."""
    tables: Ruleset = {}
    table: dict[str, list[Rule]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:].strip(), {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            rule = parse_rule(line)
            table.setdefault(rule.chain, []).append(rule)
    return tables


def parse_rule(line: str) -> Rule:
    """One "-A CHAIN ..." line."""
    tokens = shlex.split(line)
    chain, matches, target, target_args = tokens[1], [], None, {}
    negate, i = False, 2
    while i < len(tokens):
        token = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) and token not in _FLAGS else ""
        if token == "!":
            negate, i = True, i + 1
            continue
        if token in ("-j", "-g"):
            target = value
            target_args = _options(tokens[i + 2 :])
            break
        if token != "-m":
            matches.append(Match(token, value, negate))
        negate, i = False, i + (2 if value else 1)
    comment = next((m.value for m in matches if m.option == "--comment"), "")
    return Rule(chain, tuple(matches), target, target_args, comment, line.split(" ", 2)[2])


def _options(tokens: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            out[token] = "" if nxt.startswith("--") else nxt
    return out


def _ours(rule: Rule) -> bool:
    """Only kube-proxy's chains, and the built-in chains' jumps into them, are walked."""
    return rule.chain.startswith("KUBE-") or (rule.target or "").startswith("KUBE-")


class IptablesWalker:
    """Follows one packet through a parsed ruleset."""

    def __init__(self, rules: Ruleset) -> None:
        """Walk these tables (nat and filter are used)."""
        self._rules = rules

    def explain(self, packet: Packet) -> Explanation:
        """Every way a new connection of this packet can go, merged by outcome."""
        return explanation("iptables", packet, list(self._hooks(packet)))

    def _hooks(self, packet: Packet) -> Iterator[Branch]:
        """nat PREROUTING or OUTPUT, then filter INPUT, FORWARD or OUTPUT, then nat POSTROUTING."""
        start = Branch(1.0, packet.dst, packet.dport)
        for nat in self._chain(packet, "nat", "OUTPUT" if packet.from_node else "PREROUTING", start):
            local = packet.is_local(nat.dst)
            chain = "OUTPUT" if packet.from_node else "INPUT" if local else "FORWARD"
            for filtered in self._chain(packet, "filter", chain, replace(nat, verdict=None)):
                if filtered.verdict in VERDICT_FATES or chain == "INPUT":
                    yield filtered
                else:
                    yield from self._chain(packet, "nat", "POSTROUTING", replace(filtered, verdict=None))

    def _chain(self, packet: Packet, table: str, chain: str, state: Branch) -> list[Branch]:
        """Run a chain; return the branches that ended (verdict) or fell off its end (verdict None)."""
        return walk_chain(
            filter(_ours, self._rules.get(table, {}).get(chain, [])),
            state,
            lambda rule: rule.has("--rcheck"),
            lambda rule, branch: _match(packet, rule, branch),
            lambda rule, branch: self._target(packet, table, rule, branch),
        )

    def _target(self, packet: Packet, table: str, rule: Rule, state: Branch) -> list[Branch]:
        """Apply a matched rule's target to a branch."""
        before = state.hops
        state = _annotate(table, rule, replace(state, hops=(*before, Hop(table, rule.chain, rule.text))))
        target, args = rule.target, rule.target_args
        if target is None:
            return [state]
        if target.startswith("KUBE-"):
            results = self._chain(packet, table, target, state)
            # A jump into a chain where nothing matched is no part of the path.
            return [replace(r, hops=before) if r.hops == state.hops and not r.verdict else r for r in results]
        if target == "MARK":
            return [replace(state, mark=_mark(state.mark, args))]
        if target == "DNAT":
            ip, _, port = args["--to-destination"].rpartition(":")
            return [replace(state, dst=ip, dport=int(port), dnat=f"{ip}:{port}", verdict="ACCEPT")]
        if target == "MASQUERADE":
            return [replace(state, masqueraded=True, verdict="ACCEPT")]
        if target in _TERMINAL or target == "RETURN":
            return [replace(state, verdict=target)]
        raise UnsupportedRule(f"target {target} in {rule.chain}: {rule.text}")


def _annotate(table: str, rule: Rule, state: Branch) -> Branch:
    """Record what a matched rule tells: the Service and frontend, a masquerade's or a verdict's reason."""
    if rule.target == KUBE_MARK_MASQ:
        conditional = any(m.option in ("-s", "-i", "--src-type") for m in rule.matches)
        reason = masquerade_reason(chain_kind(rule.chain, _CHAIN_KINDS), conditional)
        return replace(state, masquerade_reason=state.masquerade_reason or reason)
    if rule.target in VERDICT_FATES:
        return replace(state, reason=rule.comment or rule.text, service=state.service or _service(rule.comment))
    if table == "nat" and rule.chain in (KUBE_SERVICES, KUBE_NODEPORTS) and rule.comment and not state.service:
        name, _, frontend = rule.comment.partition(" ")
        if name.count("/") == 1:
            return replace(state, service=name, frontend=frontend or "node port")
    return state


def _service(comment: str) -> str | None:
    name = comment.partition(" ")[0]
    return name if name.count("/") == 1 else None


def _mark(mark: int, args: dict[str, str]) -> int:
    if "--or-mark" in args:
        return mark | int(args["--or-mark"], 0)
    if "--xor-mark" in args:
        return mark ^ int(args["--xor-mark"], 0)
    value, _, mask = args["--set-xmark"].partition("/")
    return (mark & ~int(mask or "0xffffffff", 0)) ^ int(value, 0)


def _match(packet: Packet, rule: Rule, state: Branch) -> float:
    """The share of the branch the rule matches: 0 or 1, or the probability of -m statistic."""
    share = 1.0
    for m in rule.matches:
        if m.option == "--probability":
            share *= float(m.value)
        elif m.option not in _PASSIVE and m.option != "--mode" and _test(packet, m, state) == m.negated:
            return 0.0
    return share


def _test(packet: Packet, m: Match, state: Branch) -> bool:
    """One match option, not negated."""
    option, value = m.option, m.value
    if option in ("-s", "-d"):
        ip = packet.src if option == "-s" else state.dst
        return ipaddress.ip_address(ip) in ipaddress.ip_network(value, strict=False)
    if option == "-p":
        return value.lower() == packet.proto.lower()
    if option == "--dport":
        return int(value) == state.dport
    if option in ("--dst-type", "--src-type"):
        return packet.is_local(packet.src if option == "--src-type" else state.dst) == (value == "LOCAL")
    if option == "-i":
        return packet.iif.startswith(value[:-1]) if value.endswith("+") else packet.iif == value
    if option == "--mark":
        mark, _, mask = value.partition("/")
        return state.mark & int(mask or "0xffffffff", 0) == int(mark, 0)
    if option == "--ctstate":
        states = {"NEW", "DNAT"} if state.dnat else {"NEW"}
        return bool(states & set(value.split(",")))
    if option == "--rcheck":
        return False
    raise UnsupportedRule(f"match {option} {value}")
