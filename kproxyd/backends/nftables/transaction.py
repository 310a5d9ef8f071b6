"""Build `nft -f` transactions for the kube-proxy table from rendered objects: full and partial syncs.

A full sync rewrites the table in place, never deleting it (that takes minutes at 10k Services): it
(re)declares every object, flushes the chains, sets and maps it owns, writes them again and deletes chains
and affinity sets no longer wanted. A partial sync rewrites only the chains of the ServicePorts given and
sends only the element differences of the shared maps; affinity sets keep their entries across both.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from kproxyd.backends.nftables.names import NODEPORT_IPS, TABLE
from kproxyd.backends.nftables.render import PortRules, SetSpec, StaticRules
from kproxyd.model import ServicePortName

Elements = dict[str, dict[str, str]]  # set or map -> key -> verdict ("" in a set)

_ELEMENTS_PER_COMMAND = 1000


@dataclass(frozen=True, slots=True)
class TableObjects:
    """The names of the chains and sets (maps included) a table holds."""

    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()


class Transaction:
    """The lines of one `nft -f` input against one table; applied atomically or not at all."""

    def __init__(self, family: str, table: str = TABLE) -> None:
        """Commands address `family table`."""
        self.family = family
        self._table = f"{family} {table}"
        self.lines: list[str] = []

    def command(self, verb: str, kind: str, name: str, spec: str = "") -> None:
        """E.g. `add chain ip kube-proxy NAME { SPEC }`."""
        parts = (verb, kind, self._table, name, f"{{ {spec} }}" if spec else "")
        self.lines.append(" ".join(part for part in parts if part))

    def rules(self, chain: str, rules: Iterable[str]) -> None:
        """Append rules to a chain."""
        self.lines.extend(f"add rule {self._table} {chain} {rule}" for rule in rules)

    def elements(self, verb: str, target: str, items: list[str]) -> None:
        """Add or delete elements ("key" or "key : verdict"), a thousand per command."""
        for start in range(0, len(items), _ELEMENTS_PER_COMMAND):
            chunk = ", ".join(items[start : start + _ELEMENTS_PER_COMMAND])
            self.lines.append(f"{verb} element {self._table} {target} {{ {chunk} }}")

    def text(self) -> str:
        """The nft input, "" when there is nothing to do."""
        return "\n".join([*self.lines, ""]) if self.lines else ""


def merged_elements(ports: Iterable[PortRules]) -> Elements:
    """Every port's elements by set or map; a key two ports share is there once."""
    merged: Elements = {}
    for port in ports:
        for target, key, value in port.elements:
            merged.setdefault(target, {})[key] = value
    return merged


def _element(key: str, value: str) -> str:
    return f"{key} : {value}" if value else key


def full_sync(
    tx: Transaction,
    static: StaticRules,
    ports: Mapping[ServicePortName, PortRules],
    existing: TableObjects,
    recreate_base: bool,
) -> Elements:
    """Rewrite the whole table into tx; returns the port elements it holds afterwards."""
    tx.command("add", "table", "", 'comment "rules for kube-proxy" ;')
    if recreate_base:  # a base chain's hook or priority cannot change: recreate ours once per process
        for chain in static.base_chains:
            tx.command("add", "chain", chain.name)
            tx.command("delete", "chain", chain.name)
    for chain in static.base_chains:
        tx.command("add", "chain", chain.name, f"type {chain.type} hook {chain.hook} priority {chain.priority} ;")
    for spec in static.sets:
        tx.command("add", spec.kind, spec.name, spec.body)
        tx.command("flush", spec.kind, spec.name)
    _rewrite_chains(tx, static.chains)
    tx.elements("add", NODEPORT_IPS, list(static.nodeport_ips))
    for port in ports.values():
        _add_sets(tx, port.affinity_sets)
        _rewrite_chains(tx, port.chains)
    elements = merged_elements(ports.values())
    for target, items in elements.items():
        tx.elements("add", target, [_element(key, value) for key, value in items.items()])
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
    kernel_elements: Elements,
) -> Elements:
    """Rewrite the chains of the ports `names` into tx; returns the port elements the table holds after."""
    stale_chains: set[str] = set()
    stale_sets: set[str] = set()
    for name in names:
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        before_sets = {spec.name for spec in before.affinity_sets} if before else set()
        after_chains = after.chains if after else ()
        _add_sets(tx, [spec for spec in after.affinity_sets if spec.name not in before_sets] if after else [])
        _rewrite_chains(tx, after_chains)
        if before:
            stale_chains |= {chain for chain, _ in before.chains} - {chain for chain, _ in after_chains}
            stale_sets |= before_sets - {spec.name for spec in after.affinity_sets} if after else before_sets
    elements = merged_elements(new.values())
    _element_diff(tx, kernel_elements, elements)
    _delete(tx, stale_chains, stale_sets)
    return elements


def _add_sets(tx: Transaction, specs: Iterable[SetSpec]) -> None:
    for spec in specs:
        tx.command("add", spec.kind, spec.name, spec.body)


def _rewrite_chains(tx: Transaction, chains: Iterable[tuple[str, tuple[str, ...]]]) -> None:
    """Create or empty every chain first (gotos may point forward), then write their rules."""
    chains = tuple(chains)
    for name, _ in chains:
        tx.command("add", "chain", name)
        tx.command("flush", "chain", name)
    for name, rules in chains:
        tx.rules(name, rules)


def _element_diff(tx: Transaction, old: Elements, new: Elements) -> None:
    """Delete the elements gone or changed, then add the new or changed ones."""
    for target in sorted(old.keys() | new.keys()):
        before, after = old.get(target, {}), new.get(target, {})
        tx.elements("delete", target, [key for key, value in before.items() if after.get(key) != value])
        added = [_element(key, value) for key, value in after.items() if before.get(key) != value]
        tx.elements("add", target, added)


def _delete(tx: Transaction, chains: Collection[str], sets: Collection[str]) -> None:
    """Flush every chain before deleting any (they may jump to each other), then delete the sets."""
    for chain in sorted(chains):
        tx.command("flush", "chain", chain)
    for chain in sorted(chains):
        tx.command("delete", "chain", chain)
    for name in sorted(sets):
        tx.command("delete", "set", name)
