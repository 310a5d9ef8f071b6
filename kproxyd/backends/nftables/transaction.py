"""Build `nft -f` transactions for the kube-proxy table from rendered objects: full and partial syncs.

A full sync rewrites the table in place, never deleting it (that takes minutes at 10k Services): it
(re)declares every object, flushes the chains, sets and maps it owns that already exist (a cold sync
flushes nothing), writes them again and deletes chains and affinity sets no longer wanted. A partial sync
rewrites only the changed chains of the ServicePorts given and sends only the element differences of the
shared maps; affinity sets keep their entries across both. A Transaction is both `nft -f` text and, for
the vocabulary netlink.py knows, one nf_tables netlink batch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from kproxyd.backends.nftables.names import NODEPORT_IPS, TABLE
from kproxyd.backends.nftables.netlink import Batch, Unsupported, element_key, element_verdict
from kproxyd.backends.nftables.render import PortRules, SetSpec, StaticRules
from kproxyd.backends.nftables.rules import Rule
from kproxyd.model import ServicePortName

Elements = dict[str, dict[str, str]]  # set or map -> key -> verdict ("" in a set)

_ELEMENTS_PER_COMMAND = 1000
_SET_KEYS = {"ipv4_addr": (7, 4), "ipv6_addr": (8, 16)}  # nft's datatype number and length
_SET_TIMEOUT, _SET_EVAL = 0x10, 0x20  # "flags dynamic,timeout"

# What a transaction holds, for its netlink batch: (verb, kind, name, spec) | SetSpec | (chain, rules) | elements
_Op = tuple[str, str, str, bool] | SetSpec | tuple[str, tuple[Rule, ...]] | tuple[str, str, list[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class TableObjects:
    """The names of the chains and sets (maps included) a table holds."""

    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()


class Transaction:
    """One transaction against one table, as `nft -f` lines and as netlink; applied atomically or not at all."""

    def __init__(self, family: str, table: str = TABLE) -> None:
        """Commands address `family table`."""
        self.family = family
        self.table = table
        self._table = f"{family} {table}"
        self.lines: list[str] = []
        self._ops: list[_Op] = []

    def command(self, verb: str, kind: str, name: str, spec: str = "") -> None:
        """E.g. `add chain ip kube-proxy NAME { SPEC }`."""
        parts = (verb, kind, self._table, name, f"{{ {spec} }}" if spec else "")
        self.lines.append(" ".join(part for part in parts if part))
        self._ops.append((verb, kind, name, bool(spec)))

    def add_set(self, spec: SetSpec) -> None:
        """`add set` / `add map` with its declaration."""
        self.lines.append(f"add {spec.kind} {self._table} {spec.name} {{ {spec.body} }}")
        self._ops.append(spec)

    def rules(self, chain: str, rules: tuple[Rule, ...]) -> None:
        """Append rules to a chain."""
        self.lines.extend(f"add rule {self._table} {chain} {rule.text}" for rule in rules)
        self._ops.append((chain, rules))

    def elements(self, verb: str, target: str, items: list[tuple[str, str]]) -> None:
        """Add or delete (key, verdict or "") elements, a thousand per command."""
        texts = [_element(key, value) for key, value in items]
        for start in range(0, len(texts), _ELEMENTS_PER_COMMAND):
            chunk = ", ".join(texts[start : start + _ELEMENTS_PER_COMMAND])
            self.lines.append(f"{verb} element {self._table} {target} {{ {chunk} }}")
        if items:
            self._ops.append((verb, target, items))

    def text(self) -> str:
        """The nft input, "" when there is nothing to do."""
        return "\n".join([*self.lines, ""]) if self.lines else ""

    def batch(self) -> Batch:
        """The same transaction as one netlink batch; raises Unsupported for what only `nft -f` writes."""
        batch = Batch(self.family, self.table)
        for op in self._ops:
            if isinstance(op, SetSpec):
                _netlink_set(batch, op)
            elif len(op) == 4:
                _netlink_command(batch, *op)
            elif len(op) == 3:
                verb, target, items = op
                batch.elements(verb, target, [(element_key(k), element_verdict(v)) for k, v in items])
            else:
                chain, rules = op
                for rule in rules:
                    batch.add_rule(chain, rule.expressions(), rule.comment)
        return batch


def _netlink_command(batch: Batch, verb: str, kind: str, name: str, spec: bool) -> None:
    """The chain and set commands a partial sync sends; anything else is left to `nft -f`."""
    if kind == "chain" and not spec and verb in ("add", "flush", "delete"):
        {"add": batch.add_chain, "flush": batch.flush_chain, "delete": batch.delete_chain}[verb](name)
    elif kind == "set" and verb == "delete":
        batch.delete_set(name)
    else:
        raise Unsupported(f"{verb} {kind}")


def _netlink_set(batch: Batch, spec: SetSpec) -> None:
    """A plain or dynamic-timeout set of addresses (the affinity sets); maps and others are left to nft."""
    if spec.kind != "set" or spec.counter or spec.comment or spec.key not in _SET_KEYS:
        raise Unsupported(f"{spec.kind} {spec.name}")
    key_type, key_len = _SET_KEYS[spec.key]
    flags = 0 if spec.timeout is None else _SET_TIMEOUT | _SET_EVAL
    batch.add_set(spec.name, key_type, key_len, flags, None if spec.timeout is None else spec.timeout * 1000)


def merged_elements(ports: Iterable[PortRules]) -> Elements:
    """Every port's elements by set or map; a key two ports share is there once (the last port's)."""
    merged: Elements = {}
    for port in ports:
        for target, key, value in port.elements:
            merged.setdefault(target, {})[key] = value
    return merged


@dataclass(slots=True)
class TableElements:
    """The port elements a table holds (merged_elements) and which ports own each, for partial syncs that
    touch only the keys of the ports they rewrite (no walk over every port).
    """

    merged: Elements = field(default_factory=dict)
    owners: dict[tuple[str, str], set[ServicePortName]] = field(default_factory=dict)

    @classmethod
    def of(cls, ports: Mapping[ServicePortName, PortRules]) -> TableElements:
        """The elements of these ports."""
        owners: dict[tuple[str, str], set[ServicePortName]] = {}
        for name, port in ports.items():
            for target, key, _ in port.elements:
                owners.setdefault((target, key), set()).add(name)
        return cls(merged_elements(ports.values()), owners)

    def update(
        self,
        old: Mapping[ServicePortName, PortRules],
        new: Mapping[ServicePortName, PortRules],
        names: Iterable[ServicePortName],
    ) -> dict[tuple[str, str], tuple[str | None, str | None]]:
        """Move ports `names` from old to new; returns (before, after) of each key that changed (None: absent)."""
        touched: set[tuple[str, str]] = set()
        for name in names:
            for port, owning in ((old.get(name), False), (new.get(name), True)):
                for target, key, _ in port.elements if port else ():
                    touched.add((target, key))
                    owners = self.owners.setdefault((target, key), set())
                    if owning:
                        owners.add(name)
                    else:
                        owners.discard(name)
        changes: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        for target, key in touched:
            value = _owned_value(new, self.owners[target, key], target, key)
            if not self.owners[target, key]:
                del self.owners[target, key]
            before = self.merged.get(target, {}).get(key)
            if before != value:
                changes[target, key] = before, value
                if value is None:
                    del self.merged[target][key]
                    if not self.merged[target]:
                        del self.merged[target]
                else:
                    self.merged.setdefault(target, {})[key] = value
        return changes


def _owned_value(
    ports: Mapping[ServicePortName, PortRules], owners: set[ServicePortName], target: str, key: str
) -> str | None:
    """The value of the last owning port in ports' order (as merged_elements), None without owners."""
    if not owners:
        return None
    owner = next(iter(owners)) if len(owners) == 1 else [name for name in ports if name in owners][-1]
    return next(v for t, k, v in ports[owner].elements if (t, k) == (target, key))


def _element(key: str, value: str) -> str:
    return f"{key} : {value}" if value else key


def full_sync(
    tx: Transaction,
    static: StaticRules,
    ports: Mapping[ServicePortName, PortRules],
    existing: TableObjects,
    recreate_base: bool,
) -> TableElements:
    """Rewrite the whole table into tx; returns the port elements it holds afterwards."""
    tx.command("add", "table", "", 'comment "rules for kube-proxy" ;')
    present = existing.chains
    if recreate_base:  # a base chain's hook or priority cannot change: recreate ours once per process
        for chain in static.base_chains:
            if chain.name in present:
                tx.command("delete", "chain", chain.name)
        present = present - {chain.name for chain in static.base_chains}
    for chain in static.base_chains:
        tx.command("add", "chain", chain.name, f"type {chain.type} hook {chain.hook} priority {chain.priority} ;")
    for spec in static.sets:
        tx.add_set(spec)
        if spec.name in existing.sets:
            tx.command("flush", spec.kind, spec.name)
    _rewrite_chains(tx, static.chains, present)
    tx.elements("add", NODEPORT_IPS, [(ip, "") for ip in static.nodeport_ips])
    for port in ports.values():
        _add_sets(tx, port.affinity_sets)
        _rewrite_chains(tx, port.chains, present)
    elements = TableElements.of(ports)
    for target, items in elements.merged.items():
        tx.elements("add", target, list(items.items()))
    wanted = {name for name, _ in static.chains} | {name for port in ports.values() for name, _ in port.chains}
    wanted_sets = {spec.name for spec in static.sets}
    wanted_sets |= {spec.name for port in ports.values() for spec in port.affinity_sets}
    _delete(tx, existing.chains - wanted, existing.sets - wanted_sets)
    return elements


def partial_sync(
    tx: Transaction,
    old: Mapping[ServicePortName, PortRules],
    new: Mapping[ServicePortName, PortRules],
    names: Collection[ServicePortName],
    elements: TableElements,
) -> TableElements:
    """Rewrite the chains of the ports `names` into tx; updates and returns the table's port elements."""
    stale_chains: set[str] = set()
    stale_sets: set[str] = set()
    for name in names:
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        before_sets = {spec.name for spec in before.affinity_sets} if before else set()
        before_chains = dict(before.chains) if before else {}
        after_chains = after.chains if after else ()
        _add_sets(tx, [spec for spec in after.affinity_sets if spec.name not in before_sets] if after else [])
        # Only the chains whose rules changed; the others stay as they are.
        changed = [(chain, rules) for chain, rules in after_chains if before_chains.get(chain) != rules]
        _rewrite_chains(tx, changed, before_chains.keys())
        if before:
            stale_chains |= {chain for chain, _ in before.chains} - {chain for chain, _ in after_chains}
            stale_sets |= before_sets - {spec.name for spec in after.affinity_sets} if after else before_sets
    _element_diff(tx, elements.update(old, new, names))
    _delete(tx, stale_chains, stale_sets)
    return elements


def _add_sets(tx: Transaction, specs: Iterable[SetSpec]) -> None:
    for spec in specs:
        tx.add_set(spec)


def _rewrite_chains(
    tx: Transaction, chains: Iterable[tuple[str, tuple[Rule, ...]]], present: Collection[str]
) -> None:
    """Create or empty (those present) every chain first (gotos may point forward), then write the rules."""
    chains = tuple(chains)
    for name, _ in chains:
        tx.command("add", "chain", name)
        if name in present:
            tx.command("flush", "chain", name)
    for name, rules in chains:
        tx.rules(name, rules)


def _element_diff(tx: Transaction, changes: Mapping[tuple[str, str], tuple[str | None, str | None]]) -> None:
    """Per set or map: delete the elements gone or changed, then add the new or changed ones."""
    for target in sorted({target for target, _ in changes}):
        keys = sorted(key for t, key in changes if t == target)
        tx.elements("delete", target, [(key, "") for key in keys if changes[target, key][0] is not None])
        tx.elements("add", target, [(key, v) for key in keys if (v := changes[target, key][1]) is not None])


def _delete(tx: Transaction, chains: Collection[str], sets: Collection[str]) -> None:
    """Flush every chain before deleting any (they may jump to each other), then delete the sets."""
    for chain in sorted(chains):
        tx.command("flush", "chain", chain)
    for chain in sorted(chains):
        tx.command("delete", "chain", chain)
    for name in sorted(sets):
        tx.command("delete", "set", name)
