"""The nftables Backend: render plans (pure) and write them as one transaction per sync.

Every sync goes as one netlink batch (no cache of the table, so a partial sync's cost does not grow with the
table, and a full sync skips nft's parser), or through `nft -f` when it holds something the encoder does not
know or the kernel refused the batch (the same transaction, so the same rules).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping
from dataclasses import astuple

import structlog

from kproxyd.backends import FrontendCounter, WriteStats
from kproxyd.backends.common import family_addresses, gc_paused
from kproxyd.backends.iptables.backend import nodeport_ips
from kproxyd.backends.iptables.kernel import local_addresses
from kproxyd.backends.nftables.kernel import NftKernel
from kproxyd.backends.nftables.names import SERVICE_IPS, SERVICE_NODEPORTS, SERVICES, port_chains
from kproxyd.backends.nftables.netlink import NetlinkError, Unsupported
from kproxyd.backends.nftables.render import FAMILIES, IPV4, Family, NftRenderer, NftRenderOptions, PortRules
from kproxyd.backends.nftables.transaction import TableElements, Transaction, full_sync, partial_sync
from kproxyd.config import ProxyConfig, local_traffic_detector
from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)


def render_options(
    config: ProxyConfig, node: NodeInfo, local_ips: Collection[str], family: Family = IPV4
) -> NftRenderOptions:
    """The renderer's options for this node, given its local addresses; node ports never on loopback."""
    addresses = nodeport_ips(config.nodeport_addresses, node, local_ips, family.version)
    if addresses is not None:
        hosts = (ipaddress.ip_interface(cidr).ip for cidr in addresses)
        addresses = tuple(str(ip) for ip in hosts if not ip.is_loopback)
    return NftRenderOptions(
        family=family,
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local_detector=local_traffic_detector(config, node, family.version),
        nodeport_addresses=addresses,
        node_ips=family_addresses(node, family.version),
    )


class NftablesBackend:
    """kube-proxy's nftables mode: a full sync at start and when the node changes, partial syncs after."""

    name = "nftables"

    def __init__(
        self,
        config: ProxyConfig,
        kernel: NftKernel | None = None,
        local_addresses: Callable[[int], list[str]] = local_addresses,
        family: Family = IPV4,
    ) -> None:
        """local_addresses is read on every full sync (node-port addresses)."""
        self._config = config
        self._kernel = kernel or NftKernel()
        self._local_addresses = local_addresses
        self._family = family
        self._node: NodeInfo | None = None
        self._renderer: NftRenderer | None = None
        self._ports: dict[ServicePortName, PortRules] | None = None  # what the table holds; None: unknown
        self._elements = TableElements()
        self._base_recreated = False

    @classmethod
    def for_config(cls, config: ProxyConfig, family: int = 4) -> NftablesBackend:
        """The backend writing this namespace's `ip kube-proxy` (or `ip6 kube-proxy`) table."""
        return cls(config, family=FAMILIES[family])

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> WriteStats:
        """Render and write; a full sync (also on a Node change or after a failure) rewrites the table."""
        try:
            if changed is None or self._ports is None or self._renderer is None or node != self._node:
                with gc_paused():
                    return self._full_sync(plans, node)
            return self._partial_sync(self._renderer, self._ports, plans, changed)
        except Exception:
            self._ports = None  # unknown after a failure: the next sync is a full one
            raise

    def _full_sync(self, plans: Mapping[ServicePortName, ServicePlan], node: NodeInfo) -> WriteStats:
        renderer = NftRenderer(
            render_options(self._config, node, self._local_addresses(self._family.version), self._family)
        )
        ports = {name: renderer.port(plan) for name, plan in plans.items()}
        tx = Transaction(self._family.name)
        existing = self._kernel.objects(self._family.name)
        elements = full_sync(tx, renderer.static(), ports, existing, recreate_base=not self._base_recreated)
        stats = self._write(tx, full=True, ports=len(ports))
        self._node, self._renderer, self._ports, self._elements = node, renderer, ports, elements
        self._base_recreated = True
        return stats

    def _partial_sync(
        self,
        renderer: NftRenderer,
        old: dict[ServicePortName, PortRules],
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName],
    ) -> WriteStats:
        new = dict(old)
        for name in changed:
            if name in plans:
                new[name] = renderer.port(plans[name])
            else:
                new.pop(name, None)
        tx = Transaction(self._family.name)
        elements = partial_sync(tx, old, new, changed, self._elements)
        stats = self._write(tx, full=False, ports=len(changed))
        self._ports, self._elements = new, elements
        return stats

    def _write(self, tx: Transaction, full: bool, ports: int) -> WriteStats:
        if not tx.commands:
            return WriteStats()
        writer, size = "nft", 0
        if self._kernel.netlink:
            try:
                batch = tx.batch()
                size = batch.size
                self._kernel.send(batch)
                writer = "netlink"
            except Unsupported as why:  # nothing was sent: the same transaction goes as text
                log.debug("sync through nft -f", full=full, reason=str(why))
            except NetlinkError as why:  # nothing was applied: nft -f names the line it refuses, if it does
                log.warning("netlink batch refused, retrying through nft -f", full=full, error=str(why))
        if writer == "nft":
            text = tx.text()
            size = len(text)
            self._kernel.run(text)
        log.debug(
            "nftables rules written", full=full, ports=ports, commands=tx.commands, bytes=size, writer=writer
        )
        return WriteStats(bytes=size, lines=tx.commands)

    def connection_counters(self) -> list[FrontendCounter]:
        """New connections per frontend: the element counters of the service-ips and service-nodeports maps."""
        owner = {chain: name for name in self._ports or () for chain in astuple(port_chains(name))}
        counters = []
        for map_name in (SERVICE_IPS, SERVICE_NODEPORTS):
            for parts, packets, target in self._kernel.map_counters(self._family.name, map_name):
                name = owner.get(target)
                if name is None:
                    continue
                *address, proto, port = parts
                ip = address[0] if address else ""
                where = (f"[{ip}]" if ":" in ip else ip) + f":{port}" if address else f"nodePort {port}"
                counters.append(FrontendCounter(str(name), f"{where}/{proto.upper()}", packets))
        return counters

    def drifted(self) -> bool:
        """True when the table (its services chain) is gone since it was written: resync fully."""
        return self._ports is not None and not self._kernel.has_chain(self._family.name, SERVICES)

    def remove_table(self) -> None:
        """Delete this family's table only; the next apply writes it afresh (the ebpf mode's fallback)."""
        self._kernel.delete_table(self._family.name)
        self._ports, self._base_recreated = None, False

    def cleanup(self) -> None:
        """Remove the kube-proxy table (IPv4 and IPv6), and nothing else."""
        for family in ("ip", "ip6"):
            self._kernel.delete_table(family)
