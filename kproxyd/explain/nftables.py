"""Walk `nft -j list table ip kube-proxy` for one new connection, as the kernel would: hook by hook.

Pure: parse_json reads the table; NftablesWalker runs its base chains in hook and priority order (prerouting,
then input, or forward and postrouting; output and postrouting for the node's own packets) and follows every
branch (`numgen random mod k` splits it) through the chains and verdict maps kproxyd writes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from kproxyd.backends.nftables.names import (
    CLUSTER_IPS,
    FIREWALL_IPS,
    MARK_FOR_MASQUERADE,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
)
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

_AFFINITY = "affinity-"  # per-endpoint sets of names.affinity_set: a new client is in none of them
_CHAIN_KINDS = {"service-": "cluster", "local-": "local", "external-": "external", "endpoint-": "endpoint"}
# names.port_chains / endpoint_chain: PREFIX-HASH-namespace/name/protocol/port[__endpoint]
_SERVICE_CHAIN = re.compile(
    r"^(?:service|local|external|firewall|endpoint)-[A-Z2-7]{8}-([^/]+/[^/]+)/[^/]+/(.*?)(?:__|$)"
)
_FRONTENDS = {SERVICE_NODEPORTS: "node port", NO_ENDPOINT_NODEPORTS: "node port", FIREWALL_IPS: "loadbalancer IP"}
_VERDICTS = {"accept": "ACCEPT", "drop": "DROP", "reject": "REJECT", "return": "RETURN"}
_PASSIVE = frozenset({"counter", "log", "limit", "comment"})
_BINARY: dict[str, Callable[[int, int], int]] = {"&": int.__and__, "|": int.__or__, "^": int.__xor__}
_ABSENT = object()  # a header the packet does not have, e.g. `udp dport` of a TCP packet


class UnsupportedRule(ValueError):
    """A kube-proxy rule uses an expression this walker cannot evaluate."""


@dataclass(frozen=True, slots=True)
class NftRule:
    """One rule: its expressions (matches, then statements), comment and nft-like text."""

    chain: str
    exprs: tuple[dict[str, Any], ...]
    comment: str
    text: str
    affinity: bool = False  # it looks up or updates an affinity set


@dataclass(frozen=True, slots=True)
class NftSet:
    """A named set or map: its elements as (key, verdict), verdict None in a set."""

    comment: str
    elements: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True, slots=True)
class BaseChainInfo:
    """A chain on a hook."""

    name: str
    type: str
    hook: str
    priority: int


@dataclass(frozen=True, slots=True)
class NftTable:
    """One table as `nft -j list table` shows it."""

    base_chains: tuple[BaseChainInfo, ...]
    chains: dict[str, tuple[NftRule, ...]]
    sets: dict[str, NftSet]

    def hook(self, hook: str, nat: bool) -> list[BaseChainInfo]:
        """The base chains on a hook in priority order (without the nat ones unless nat)."""
        chains = [c for c in self.base_chains if c.hook == hook and (nat or c.type != "nat")]
        return sorted(chains, key=lambda c: c.priority)


def parse_json(data: str | dict[str, Any]) -> NftTable:
    """The chains, rules, sets and maps of `nft -j list table FAMILY kube-proxy` output."""
    objects = (json.loads(data) if isinstance(data, str) else data)["nftables"]
    base, chains, sets = [], {}, {}
    rules: dict[str, list[NftRule]] = {}
    for obj in objects:
        if "chain" in obj:
            chain = obj["chain"]
            rules.setdefault(chain["name"], [])
            if "hook" in chain:
                base.append(BaseChainInfo(chain["name"], chain["type"], chain["hook"], int(chain["prio"])))
        elif "rule" in obj:
            rule = obj["rule"]
            rules.setdefault(rule["chain"], []).append(_rule(rule))
        for kind in ("set", "map"):
            if kind in obj:
                spec = obj[kind]
                sets[spec["name"]] = NftSet(spec.get("comment", ""), tuple(_elements(spec.get("elem", []), kind)))
    chains = {name: tuple(chain_rules) for name, chain_rules in rules.items()}
    return NftTable(tuple(base), chains, sets)


def _rule(rule: dict[str, Any]) -> NftRule:
    exprs = tuple(rule["expr"])
    text = " ".join(_statement_text(e) for e in exprs)
    affinity = '"@' + _AFFINITY in json.dumps(exprs)
    return NftRule(rule["chain"], exprs, rule.get("comment", ""), text, affinity)


def _elements(items: list[Any], kind: str) -> Iterable[tuple[Any, Any]]:
    for item in items:
        if kind == "map":
            yield _key(item[0]), item[1]
        else:
            yield _key(item), None


def _key(item: Any) -> Any:
    """An element's key: "elem" wrappers (counters, timeouts) removed, a concatenation as a tuple."""
    if isinstance(item, dict) and "elem" in item:
        return _key(item["elem"]["val"])
    if isinstance(item, dict) and "concat" in item:
        return tuple(_key(part) for part in item["concat"])
    return item


class NftablesWalker:
    """Follows one packet through a parsed kube-proxy table."""

    def __init__(self, table: NftTable) -> None:
        """Walk this table (of the packet's family)."""
        self._table = table

    def explain(self, packet: Packet) -> Explanation:
        """Every way a new connection of this packet can go, merged by outcome."""
        return explanation("nftables", packet, self._walk(packet))

    def _walk(self, packet: Packet) -> list[Branch]:
        """The node's own packets: output, postrouting, and (delivered locally over lo) prerouting and input
        without NAT, whose bindings are already set; others: prerouting, then input or forward + postrouting.
        """
        start = [Branch(1.0, packet.dst, packet.dport)]
        if packet.from_node:
            sent = self._hooks(packet, ("output", "postrouting"), start)
            return self._route(packet, sent, ("prerouting", "input"), (), nat=False)
        arrived = self._hooks(packet, ("prerouting",), start)
        return self._route(packet, arrived, ("input",), ("forward", "postrouting"), nat=True)

    def _route(
        self, packet: Packet, branches: list[Branch], local: tuple[str, ...], remote: tuple[str, ...], nat: bool
    ) -> list[Branch]:
        """Go on through the hooks of local delivery or of forwarding, by each branch's destination now."""
        here = [b for b in branches if packet.is_local(b.dst)]
        there = [b for b in branches if not packet.is_local(b.dst)]
        return self._hooks(packet, local, here, nat) + self._hooks(packet, remote, there, nat)

    def _hooks(
        self, packet: Packet, hooks: Iterable[str], branches: list[Branch], nat: bool = True
    ) -> list[Branch]:
        """Run every base chain of these hooks in order; an accept ends only its base chain."""
        for hook in hooks:
            for base in self._table.hook(hook, nat):
                branches = [result for branch in branches for result in self._base(packet, base.name, branch)]
        return branches

    def _base(self, packet: Packet, base: str, branch: Branch) -> list[Branch]:
        """Run a base chain, unless the branch was dropped or rejected before it."""
        if branch.verdict in VERDICT_FATES:
            return [branch]
        results = self._chain(packet, base, base, branch)
        return [replace(r, verdict=None) if r.verdict == "ACCEPT" else r for r in results]

    def _chain(self, packet: Packet, base: str, chain: str, branch: Branch) -> list[Branch]:
        """Run a chain: the branches that ended (verdict) or left it to go on in its caller (verdict None)."""
        return walk_chain(
            self._table.chains.get(chain, ()),
            branch,
            lambda rule: rule.affinity,  # a new client is in no affinity set yet
            lambda rule, current: self._matches(packet, rule, current),
            lambda rule, current: self._statements(packet, base, rule, current),
        )

    def _matches(self, packet: Packet, rule: NftRule, branch: Branch) -> float:
        """The share of the branch the rule's matches take: 0 or 1, or 1/k of `numgen random mod k`."""
        share = 1.0
        for expr in rule.exprs:
            if "match" in expr:
                share *= self._match(packet, expr["match"], branch)
                if share == 0:
                    return 0.0
        return share

    def _match(self, packet: Packet, match: dict[str, Any], branch: Branch) -> float:
        left, right, op = match["left"], match["right"], match["op"]
        if isinstance(left, dict) and "numgen" in left:
            return _numgen_share(left["numgen"], right, op)
        value = _value(left, packet, branch)
        if value is _ABSENT:
            return 0.0
        if op not in ("==", "!=", "in"):
            raise UnsupportedRule(f"operator {op} in {_expr_text(left)}")
        return float(self._equal(value, right) != (op == "!="))

    def _equal(self, value: Any, right: Any) -> bool:
        """value is right, or in it (a prefix, range, anonymous or named set, or interface wildcard)."""
        if isinstance(right, str) and right.startswith("@"):
            return any(_same(value, key) for key, _ in self._set(right[1:]).elements)
        if isinstance(right, list):
            return any(self._equal(value, item) for item in right)
        if isinstance(right, dict) and "set" in right:
            return any(self._equal(value, _key(item)) for item in right["set"])
        return _same(value, _key(right))

    def _set(self, name: str) -> NftSet:
        return NftSet("", ()) if name.startswith(_AFFINITY) else self._table.sets[name]

    def _statements(self, packet: Packet, base: str, rule: NftRule, branch: Branch) -> list[Branch]:
        """Apply a matched rule's statements to a branch, in order, up to its verdict."""
        before = branch.hops
        branch = replace(branch, hops=(*before, Hop(base, rule.chain, rule.text)))
        for expr in rule.exprs:
            kind = next(iter(expr))
            if kind == "match":
                continue
            if kind == "vmap":
                return self._vmap(packet, base, rule, expr["vmap"], replace(branch, hops=before))
            if kind in ("jump", "goto"):
                return self._jump(packet, base, rule, kind, expr[kind]["target"], branch)
            if kind in _VERDICTS or kind in ("dnat", "masquerade"):
                return [_terminal(rule, kind, expr[kind], branch)]
            branch = _apply(packet, kind, expr[kind], branch)
        return [branch]

    def _vmap(
        self, packet: Packet, base: str, rule: NftRule, vmap: dict[str, Any], branch: Branch
    ) -> list[Branch]:
        """Look the packet up in a verdict map; no element: the rule does not match."""
        name = vmap["data"].lstrip("@")
        value = _value(vmap["key"], packet, branch)
        elements = () if value is _ABSENT else self._set(name).elements
        found = next(((k, v) for k, v in elements if _same(value, k)), None)
        if found is None:
            return [branch]
        key, verdict = found
        element = f"{_expr_text(key)} : {_statement_text(verdict)}"
        branch = replace(
            branch,
            hops=(*branch.hops, Hop(base, rule.chain, f"{rule.text}: {element}")),
            reason=f"{_expr_text(key)} in @{name}: {self._set(name).comment}",
            frontend=branch.frontend or self._frontend(name, branch.dst),
        )
        kind = next(iter(verdict))
        if kind in ("jump", "goto"):
            target = verdict[kind]["target"]
            branch = replace(branch, service=branch.service or _service(target))
            return self._jump(packet, base, rule, kind, target, branch)
        return [_terminal(rule, kind, verdict[kind], branch)]

    def _frontend(self, name: str, dst: str) -> str | None:
        if name in _FRONTENDS:
            return _FRONTENDS[name]
        if name not in (SERVICE_IPS, NO_ENDPOINT_SERVICES):
            return None
        return "cluster IP" if self._equal(dst, "@" + CLUSTER_IPS) else "external or loadbalancer IP"

    def _jump(
        self, packet: Packet, base: str, rule: NftRule, kind: str, target: str, branch: Branch
    ) -> list[Branch]:
        """Run the target chain; after a goto, what leaves it leaves this chain too."""
        if target == MARK_FOR_MASQUERADE:
            reason = masquerade_reason(chain_kind(rule.chain, _CHAIN_KINDS), _source_match(rule))
            branch = replace(branch, masquerade_reason=branch.masquerade_reason or reason)
        results = self._chain(packet, base, target, branch)
        if kind == "goto":
            return [replace(r, verdict=r.verdict or "RETURN") for r in results]
        # A jump into a chain where nothing matched is no part of the path.
        trimmed = branch.hops[:-1]
        return [replace(r, hops=trimmed) if r.hops == branch.hops and not r.verdict else r for r in results]


def _terminal(rule: NftRule, kind: str, args: Any, branch: Branch) -> Branch:
    """A statement that ends the base chain: accept, drop, reject, return, dnat, masquerade."""
    if kind == "dnat":
        ip, port = str(args["addr"]), int(args["port"])
        endpoint = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return replace(branch, dst=ip, dport=port, dnat=endpoint, verdict="ACCEPT")
    if kind == "masquerade":
        return replace(branch, masqueraded=True, verdict="ACCEPT")
    verdict = _VERDICTS[kind]
    if verdict not in VERDICT_FATES:
        return replace(branch, verdict=verdict)
    service = _service(rule.chain)
    own = f"{rule.chain}: {rule.text}"
    reason = rule.comment or (own if service else branch.reason or own)
    return replace(branch, verdict=verdict, reason=reason, service=branch.service or service)


def _apply(packet: Packet, kind: str, args: Any, branch: Branch) -> Branch:
    """A statement that lets the rule go on: a mark set, an affinity set update, a counter."""
    if kind == "mangle" and args["key"] == {"meta": {"key": "mark"}}:
        return replace(branch, mark=int(_value(args["value"], packet, branch)))
    if kind == "set" and str(args["set"]).startswith("@" + _AFFINITY):
        return replace(branch, affinity=True)
    if kind in _PASSIVE:
        return branch
    raise UnsupportedRule(f"statement {kind}: {_statement_text({kind: args})}")


def _value(expr: Any, packet: Packet, branch: Branch) -> Any:
    """What an expression evaluates to for this packet (a tuple for a concatenation)."""
    if not isinstance(expr, dict):
        return expr
    kind, args = next(iter(expr.items()))
    if kind == "concat":
        parts = tuple(_value(part, packet, branch) for part in args)
        return _ABSENT if _ABSENT in parts else parts
    if kind in _BINARY:
        left, right = (_value(part, packet, branch) for part in args)
        return _BINARY[kind](int(left), int(right))
    if kind == "payload":
        return _payload(args, packet, branch)
    if kind == "meta":
        return _meta(args["key"], packet, branch)
    if kind == "fib" and args["result"] == "type":
        ip = branch.dst if "daddr" in args["flags"] else packet.src
        return "local" if packet.is_local(ip) else "unicast"
    if kind == "ct" and args["key"] == "state":
        return "new"
    raise UnsupportedRule(f"expression {_expr_text(expr)}")


def _payload(args: dict[str, Any], packet: Packet, branch: Branch) -> Any:
    protocol, field = args["protocol"], args["field"]
    if field in ("saddr", "daddr") and protocol in ("ip", "ip6"):
        return packet.src if field == "saddr" else branch.dst
    if field == "dport" and protocol in ("th", packet.proto.lower()):
        return branch.dport
    if field == "dport" and protocol in ("tcp", "udp", "sctp"):
        return _ABSENT
    raise UnsupportedRule(f"payload {protocol} {field}")


def _meta(key: str, packet: Packet, branch: Branch) -> Any:
    if key == "l4proto":
        return packet.proto.lower()
    if key == "mark":
        return branch.mark
    if key in ("iifname", "iif"):
        return packet.iif
    raise UnsupportedRule(f"meta {key}")


def _numgen_share(numgen: dict[str, Any], right: Any, op: str) -> float:
    """The share of `numgen random mod k [offset o]` values that match."""
    if numgen.get("mode") != "random" or op not in ("==", "!="):
        raise UnsupportedRule(f"numgen {numgen} {op} {right}")
    mod, offset = int(numgen["mod"]), int(numgen.get("offset", 0))
    share = 1 / mod if offset <= int(right) < offset + mod else 0.0
    return share if op == "==" else 1 - share


def _same(value: Any, key: Any) -> bool:
    """One value against one element: equal, in a prefix or range, or matching an interface wildcard."""
    if isinstance(key, tuple):
        return isinstance(value, tuple) and len(key) == len(value) and all(map(_same, value, key))
    if isinstance(key, dict) and "prefix" in key:
        network = ipaddress.ip_network(f"{key['prefix']['addr']}/{key['prefix']['len']}", strict=False)
        return ipaddress.ip_address(value) in network
    if isinstance(key, dict) and "range" in key:
        low, high = (_comparable(bound) for bound in key["range"])
        return bool(low <= _comparable(value) <= high)
    if isinstance(key, str) and key.endswith("*") and isinstance(value, str):
        return value.startswith(key[:-1])
    return bool(_comparable(value) == _comparable(key))


def _comparable(value: Any) -> Any:
    """IP addresses as ip_address objects (so IPv6 spellings compare equal), anything else as it is."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            return value
    return value


def _source_match(rule: NftRule) -> bool:
    """True when the rule matches on the source (address, interface, fib saddr), not on every packet."""
    lefts = [json.dumps(e["match"]["left"]) for e in rule.exprs if "match" in e]
    return any(token in left for left in lefts for token in ('"saddr"', '"iifname"', '"iif"'))


def _service(chain: str) -> str | None:
    """The Service of a per-ServicePort or per-endpoint chain, "ns/name:port" as kube-proxy spells it."""
    found = _SERVICE_CHAIN.match(chain)
    if not found:
        return None
    name, port = found.groups()
    return f"{name}:{port}" if port else name


def _statement_text(stmt: Any) -> str:
    """A statement as nft prints it, near enough: `ip saddr != 10.0.0.0/8`, `goto CHAIN`, `dnat to IP:PORT`."""
    if not isinstance(stmt, dict):
        return str(stmt)
    kind, args = next(iter(stmt.items()))
    if kind == "match":
        op = "" if args["op"] in ("==", "in") else f" {args['op']}"
        return f"{_expr_text(args['left'])}{op} {_expr_text(args['right'])}"
    if kind in ("jump", "goto"):
        return f"{kind} {args['target']}"
    if kind == "vmap":
        return f"{_expr_text(args['key'])} vmap {args['data']}"
    if kind == "mangle":
        return f"{_expr_text(args['key'])} set {_expr_text(args['value'])}"
    if kind == "dnat":
        return f"dnat to {args['addr']}:{args['port']}"
    if kind == "set":
        return f"{args['op']} {args['set']} {{ {_expr_text(args['elem'])} }}"
    if kind == "masquerade" and args:
        return f"masquerade {args.get('flags', '')}".strip()
    return kind if args is None or kind in _VERDICTS or kind == "masquerade" else json.dumps(stmt)


def _expr_text(expr: Any) -> str:
    """An expression as nft prints it, near enough."""
    if isinstance(expr, tuple):
        return " . ".join(_expr_text(part) for part in expr)
    if isinstance(expr, list):
        return ",".join(_expr_text(part) for part in expr)
    if not isinstance(expr, dict):
        return str(expr)
    kind, args = next(iter(expr.items()))
    if kind == "payload":
        return f"{args['protocol']} {args['field']}"
    if kind == "meta":
        return args["key"] if args["key"] in ("iifname", "iif") else f"meta {args['key']}"
    if kind == "fib":
        return f"fib {' . '.join(args['flags'])} {args['result']}"
    if kind == "ct":
        return f"ct {args['key']}"
    if kind == "numgen":
        return f"numgen {args['mode']} mod {args['mod']}"
    if kind == "concat":
        return " . ".join(_expr_text(part) for part in args)
    if kind == "prefix":
        return f"{args['addr']}/{args['len']}"
    if kind == "set":
        return "{ " + ", ".join(_expr_text(_key(item)) for item in args) + " }"
    if kind == "range":
        return "-".join(_expr_text(bound) for bound in args)
    if kind in _BINARY:
        return f" {kind} ".join(f"{part:#010x}" if isinstance(part, int) else _expr_text(part) for part in args)
    return json.dumps(expr)
