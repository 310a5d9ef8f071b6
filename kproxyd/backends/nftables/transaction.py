"""Build `nft -f` transactions for the kube-proxy table from rendered objects: full and partial syncs.

A full sync rewrites the table in place, never deleting it (that takes minutes at 10k Services): it
(re)declares every object, flushes the chains, sets and maps it owns that already exist (a cold sync
flushes nothing), writes them again and deletes chains and affinity sets no longer wanted. A partial sync
rewrites only the changed chains of the ServicePorts given and sends only the element differences of the
shared maps; affinity sets keep their entries across both. A Transaction is both `nft -f` text and, for
the vocabulary netlink.py knows, one nf_tables netlink batch.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from kproxyd.backends.nftables.names import NODEPORT_IPS, TABLE
from kproxyd.backends.nftables.netlink import (
    SET_EVAL,
    SET_MAP,
    SET_TIMEOUT_FLAG,
    Batch,
    Unsupported,
    element_key,
    element_verdict,
    udata,
)
from kproxyd.backends.nftables.render import BaseChain, PortRules, SetSpec, StaticRules
from kproxyd.backends.nftables.rules import Rule
from kproxyd.model import ServicePortName

Elements = dict[str, dict[str, str]]  # set or map -> key -> verdict ("" in a set)

_ELEMENTS_PER_COMMAND = 1000
# nft's datatypes (number, length): a concatenation's type is theirs shifted in 6 bits at a time, its
# length theirs each rounded up to 4 bytes.
_DATATYPES = {"ipv4_addr": (7, 4), "ipv6_addr": (8, 16), "inet_proto": (12, 1), "inet_service": (13, 2)}
_TYPE_BITS = 6
# Set userdata as nft 1.0.6 writes it (libnftnl's NFTNL_UDATA_SET_*): key and data byte order, the key's
# expression for a concatenation, the data's interval flag, the comment.
_UDATA_KEY_ORDER, _UDATA_DATA_ORDER, _UDATA_KEY_TYPEOF, _UDATA_DATA_INTERVAL, _UDATA_COMMENT = 0, 1, 3, 6, 7
_BIG_ENDIAN, _EXPR_CONCAT = 2, 13

_Op = Callable[[Batch], None]  # writes one command of a transaction into its netlink batch


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
        self.commands = 0  # how many `nft -f` lines it makes
        self._ops: list[tuple[Callable[[], list[str]], _Op]] = []

    def _add(self, lines: Callable[[], list[str]], write: _Op, count: int = 1) -> None:
        """One command: its `nft -f` lines (made only when text is wanted) and its netlink writer."""
        self.commands += count
        self._ops.append((lines, write))

    def add_table(self, comment: str) -> None:
        """`add table ip kube-proxy { comment "…" ; }`."""
        line = f'add table {self._table} {{ comment "{comment}" ; }}'
        self._add(lambda: [line], lambda batch: batch.add_table(comment))

    def add_base_chain(self, chain: BaseChain) -> None:
        """`add chain ip kube-proxy NAME { type T hook H priority P ; }`."""
        spec = f"type {chain.type} hook {chain.hook} priority {chain.priority} ;"
        line = f"add chain {self._table} {chain.name} {{ {spec} }}"
        self._add(
            lambda: [line], lambda batch: batch.add_base_chain(chain.name, chain.type, chain.hook, chain.priority)
        )

    def command(self, verb: str, kind: str, name: str) -> None:
        """`add|flush|delete chain NAME`, `flush|delete set|map NAME`."""
        line = f"{verb} {kind} {self._table} {name}"
        self._add(lambda: [line], functools.partial(_netlink_command, verb=verb, kind=kind, name=name))

    def add_set(self, spec: SetSpec) -> None:
        """`add set` / `add map` with its declaration."""
        line = f"add {spec.kind} {self._table} {spec.name} {{ {spec.body} }}"
        self._add(lambda: [line], functools.partial(_netlink_set, spec=spec))

    def rules(self, chain: str, rules: tuple[Rule, ...]) -> None:
        """Append rules to a chain."""
        prefix = f"add rule {self._table} {chain} "
        self._add(
            lambda: [prefix + rule.text for rule in rules], lambda batch: batch.add_rules(chain, rules), len(rules)
        )

    def elements(self, verb: str, target: str, items: list[tuple[str, str]]) -> None:
        """Add or delete (key, verdict or "") elements, a thousand per command."""
        if items:
            lines = functools.partial(_element_lines, f"{verb} element {self._table} {target}", items)
            write = functools.partial(_netlink_elements, verb=verb, target=target, items=items)
            self._add(lines, write, -(-len(items) // _ELEMENTS_PER_COMMAND))

    @property
    def lines(self) -> list[str]:
        """The `nft -f` lines."""
        return [line for lines, _ in self._ops for line in lines()]

    def text(self) -> str:
        """The nft input, "" when there is nothing to do."""
        lines = self.lines
        return "\n".join([*lines, ""]) if lines else ""

    def batch(self) -> Batch:
        """The same transaction as one netlink batch; raises Unsupported for what only `nft -f` writes."""
        batch = Batch(self.family, self.table)
        for _, write in self._ops:
            write(batch)
        return batch


def _element_lines(command: str, items: list[tuple[str, str]]) -> list[str]:
    """`add|delete element … { k : v, … }`, a thousand elements per line."""
    texts = [_element(key, value) for key, value in items]
    chunks = range(0, len(texts), _ELEMENTS_PER_COMMAND)
    return [f"{command} {{ {', '.join(texts[start : start + _ELEMENTS_PER_COMMAND])} }}" for start in chunks]


def _netlink_elements(batch: Batch, verb: str, target: str, items: list[tuple[str, str]]) -> None:
    batch.elements(verb, target, [(element_key(key), element_verdict(value)) for key, value in items])


def _netlink_command(batch: Batch, verb: str, kind: str, name: str) -> None:
    """The chain, set and map commands of a sync."""
    if kind == "chain" and verb in ("add", "flush", "delete"):
        {"add": batch.add_chain, "flush": batch.flush_chain, "delete": batch.delete_chain}[verb](name)
    elif kind in ("set", "map") and verb in ("flush", "delete"):
        (batch.flush_set if verb == "flush" else batch.delete_set)(name)
    else:
        raise Unsupported(f"{verb} {kind}")


def _netlink_set(batch: Batch, spec: SetSpec) -> None:
    """A set or verdict map of addresses, protocols and ports (a concatenation of them), as nft declares it."""
    key, _, data = spec.key.partition(" : ")
    parts = key.split(" . ")
    if data not in ("", "verdict") or any(part not in _DATATYPES for part in parts):
        raise Unsupported(f"{spec.kind} {spec.name}: {spec.key}")
    key_type, key_len = _DATATYPES[parts[0]]
    if len(parts) > 1:
        key_type = functools.reduce(lambda acc, part: acc << _TYPE_BITS | _DATATYPES[part][0], parts, 0)
        key_len = sum(-(-_DATATYPES[part][1] // 4) * 4 for part in parts)
    flags = SET_MAP if data else 0
    if spec.timeout is not None:
        flags |= SET_TIMEOUT_FLAG | SET_EVAL
    userdata = [udata(_UDATA_KEY_ORDER, struct.pack("=I", 0 if len(parts) > 1 else _BIG_ENDIAN))]
    if data:
        userdata.append(udata(_UDATA_DATA_ORDER, struct.pack("=I", 0)))
    if len(parts) > 1:
        userdata.append(udata(_UDATA_KEY_TYPEOF, udata(0, struct.pack("=I", _EXPR_CONCAT)) + udata(1, b"")))
    if data:
        userdata.append(udata(_UDATA_DATA_INTERVAL, struct.pack("=I", 0)))
    if spec.comment:
        userdata.append(udata(_UDATA_COMMENT, spec.comment.encode() + b"\0"))
    timeout = None if spec.timeout is None else spec.timeout * 1000
    batch.add_set(spec.name, (key_type, key_len), flags, timeout, b"".join(userdata), spec.counter)


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
    tx.add_table("rules for kube-proxy")
    present = existing.chains
    if recreate_base:  # a base chain's hook or priority cannot change: recreate ours once per process
        for chain in static.base_chains:
            if chain.name in present:
                tx.command("delete", "chain", chain.name)
        present = present - {chain.name for chain in static.base_chains}
    for chain in static.base_chains:
        tx.add_base_chain(chain)
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
