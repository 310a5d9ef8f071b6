"""The IPVS Backend: render plans (pure), then write virtual services, addresses, ipsets and iptables rules."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Collection, Iterable, Mapping

import structlog

from kproxyd.backends import FrontendCounter, WriteStats
from kproxyd.backends.common import family_addresses
from kproxyd.backends.iptables.backend import nodeport_ips
from kproxyd.backends.iptables.kernel import IptablesKernel, Variant, detect_iptables_variant
from kproxyd.backends.ipvs import names
from kproxyd.backends.ipvs.kernel import (
    DummyLink,
    Ipset,
    IpvsKernel,
    iptables_kernel,
    ipvs_available,
    node_addresses,
    prepare_kernel,
)
from kproxyd.backends.ipvs.render import (
    IpvsRenderer,
    IpvsRenderOptions,
    IpvsState,
    PortState,
    RealServer,
    VirtualServerKey,
    cleanup_rules,
    diff_services,
    ipset_changes,
)
from kproxyd.config import ProxyConfig, local_traffic_detector
from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)


def render_options(
    config: ProxyConfig, node: NodeInfo, local_ips: Collection[str], family: int = 4
) -> IpvsRenderOptions:
    """The renderer's options for this node and family, given its own addresses (not kube-ipvs0's)."""
    hosts = nodeport_ips(config.nodeport_addresses, node, local_ips, family)
    chosen = local_ips if hosts is None else [str(ipaddress.ip_interface(cidr).ip) for cidr in hosts]
    addresses = sorted({ip for ip in chosen if not ipaddress.ip_address(ip).is_loopback}, key=ipaddress.ip_address)
    return IpvsRenderOptions(
        family=family,
        scheduler=config.ipvs_scheduler,
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local_detector=local_traffic_detector(config, node, family),
        node_name=node.name,
        nodeport_addresses=tuple(addresses),
        node_ips=family_addresses(node, family),
    )


class IpvsBackend:
    """kube-proxy's IPVS mode for one IP family: full sync at start and on node changes, partial after."""

    name = "ipvs"

    def __init__(
        self,
        config: ProxyConfig,
        iptables: IptablesKernel | None = None,
        family: int = 4,
        kernel: IpvsKernel | None = None,
        link: DummyLink | None = None,
        ipset: Ipset | None = None,
        local_addresses: Callable[[int], list[str]] = node_addresses,
    ) -> None:
        """iptables None: the variant the node uses, detected at the first sync; local_addresses (the
        node's own, kube-ipvs0's left out) is read on every full sync."""
        self._config = config
        self._iptables_kernel = iptables
        self._family = family
        self._kernel = kernel or IpvsKernel(family)
        self._counter_kernel = IpvsKernel(family)  # its own socket: metrics scrapes run in another thread
        self._link = link or DummyLink()
        self._ipset = ipset or Ipset()
        self._local_addresses = local_addresses
        self._keep = tuple(ipaddress.ip_network(cidr) for cidr in config.ipvs_exclude_cidrs if cidr != "primary")
        self._node: NodeInfo | None = None
        self._renderer: IpvsRenderer | None = None
        self._ports: dict[ServicePortName, PortState] | None = None  # None: the kernel state is unknown
        self._state: IpvsState | None = None
        self._draining: set[tuple[VirtualServerKey, RealServer]] = set()

    @classmethod
    def for_config(cls, config: ProxyConfig, family: int = 4) -> IpvsBackend:
        """The backend for one IP family (touching nothing until it syncs or cleans up)."""
        return cls(config, family=family)

    @property
    def _iptables(self) -> IptablesKernel:
        if self._iptables_kernel is None:
            self._iptables_kernel = iptables_kernel(detect_iptables_variant(), self._family)
        return self._iptables_kernel

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> WriteStats:
        """Render and write; a full sync (also on a Node change or after a failure) re-reads the kernel."""
        try:
            if changed is None or self._ports is None or self._renderer is None or node != self._node:
                return self._full_sync(plans, node)
            return self._partial_sync(self._renderer, self._ports, plans, changed)
        except Exception:
            self._ports = None
            raise

    def _full_sync(self, plans: Mapping[ServicePortName, ServicePlan], node: NodeInfo) -> WriteStats:
        config, family = self._config, self._family
        prepare_kernel(config.ipvs_scheduler, config.ipvs_strict_arp)
        self._kernel.set_timeouts(
            int(config.ipvs_tcp_timeout), int(config.ipvs_tcpfin_timeout), int(config.ipvs_udp_timeout)
        )
        renderer = IpvsRenderer(render_options(config, node, self._local_addresses(family), family))
        ports = {name: renderer.port(plan) for name, plan in plans.items()}
        state = renderer.state(ports.values())
        self._iptables.ensure_jumps()
        live_sets = self._ipset.sets(state.sets)
        stats = self._write(state, None, self._link.addresses(family), live_sets)
        self._node, self._renderer, self._ports = node, renderer, ports
        return stats

    def _partial_sync(
        self,
        renderer: IpvsRenderer,
        old: dict[ServicePortName, PortState],
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName],
    ) -> WriteStats:
        assert self._state is not None
        ports = dict(old)
        keys: set[VirtualServerKey] = set()
        for name in changed:
            if name in old:
                keys.update(old[name].services)
            if name in plans:
                ports[name] = renderer.port(plans[name])
                keys.update(ports[name].services)
            else:
                ports.pop(name, None)
        state = renderer.state(ports.values())
        previous = self._state
        stats = self._write(state, keys, previous.addresses, {k: set(v) for k, v in previous.sets.items()})
        self._ports = ports
        return stats

    def _write(
        self,
        state: IpvsState,
        keys: set[VirtualServerKey] | None,
        live_addresses: Collection[str],
        live_sets: Mapping[str, set[str]],
    ) -> WriteStats:
        """ipsets and rules, then virtual services with their real servers, then addresses, then stale members.

        A service address answers only once everything behind it is there: the rules masquerading node
        traffic to it (the node reaches it from the address itself, local on kube-ipvs0, and a reply from
        another node's pod to that source would never come back) and its virtual service (a local address
        without one resets connections).
        """
        family = self._family
        sets = ipset_changes(state, live_sets, family)
        self._ipset.restore(sets.additions)
        rules = state.iptables if self._state is None or state.iptables != self._state.iptables else ""
        if rules:
            self._iptables.restore(rules)
        live = self._kernel.services(keys)
        changes = diff_services(state.services, live, keys, self._keep)
        self._kernel.apply(changes)
        self._draining = {d for d in self._draining if keys is not None and d[0] not in keys} | changes.draining
        self._link.update(
            family,
            add=sorted(state.addresses - set(live_addresses)),
            remove=sorted(set(live_addresses) - state.addresses),
        )
        self._ipset.restore(sets.deletions)
        self._state = state
        log.debug(
            "ipvs state written",
            full=keys is None,
            netlink_requests=len(changes),
            draining=len(self._draining),
            ipset_lines=sum(text.count("\n") for text in (sets.additions, sets.deletions)),
        )
        texts = (sets.additions, sets.deletions, rules)
        return WriteStats(
            bytes=sum(len(t) for t in texts),
            lines=len(changes) + sum(t.count("\n") for t in texts),
            rules={"virtual_services": len(state.services)},
        )

    def connection_counters(self) -> list[FrontendCounter]:
        """New connections per frontend, from IPVS's per-virtual-service counters (node ports summed)."""
        if self._state is None:
            return []
        counts: dict[tuple[str, str], int] = {}
        services = self._state.services
        for key, live in self._counter_kernel.services(services).items():
            if key not in services:
                continue
            if key.ip in self._state.addresses:
                frontend = str(key).split("/", 1)[1] + f"/{key.protocol}"
            else:
                frontend = f"nodePort {key.port}/{key.protocol}"
            label = (services[key].service, frontend)
            counts[label] = counts.get(label, 0) + live.connections
        return [FrontendCounter(service, frontend, n) for (service, frontend), n in sorted(counts.items())]

    def drifted(self) -> bool:
        """True when our rules or kube-ipvs0 are gone; also deletes real servers whose connections drained.

        The periodic drift check is the clock of graceful removal, as kube-proxy's graceful termination
        manager checks its weight-0 real servers every minute.
        """
        if self._state is None:
            return False
        if self._draining:
            self._reap(self._state)
        return not self._iptables.canary_present() or not self._link.exists()

    def _reap(self, state: IpvsState) -> None:
        keys = {key for key, _ in self._draining}
        changes = diff_services(state.services, self._kernel.services(keys), keys, self._keep)
        self._kernel.apply(changes)
        self._draining = changes.draining
        log.debug("drained real servers removed", removed=len(changes.delete_destinations))

    def cleanup(self) -> None:
        """Remove kube-ipvs0, our virtual services, ipsets and IPVS-only rules; a no-op without IPVS."""
        if not ipvs_available(load=False):
            return
        sets = self._ipset.sets(names.all_set_names())
        if not sets and not self._link.exists():
            return  # nothing of IPVS mode is here
        addresses = {ip for family in (4, 6) for ip in self._link.addresses(family)}
        node_ports = {
            int(m) for name, members in sets.items() if "NODE-PORT" in name for m in members if m.isdigit()
        }
        variants: tuple[Variant, ...] = ("nft", "legacy")
        for variant, family in itertools.product(variants, (4, 6)):
            _cleanup_iptables(iptables_kernel(variant, family))
        self._ipset.destroy(sets)
        for family in (4, 6):
            kernel = IpvsKernel(family)
            ours = [k for k in kernel.services() if k.ip in addresses or k.port in node_ports]
            kernel.delete_services(_outside(ours, self._keep))
            kernel.close()
        self._link.delete()
        log.info("ipvs state cleaned up", virtual_service_addresses=len(addresses), ipsets=len(sets))


def _outside(
    keys: Iterable[VirtualServerKey], keep: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> list[VirtualServerKey]:
    return [key for key in keys if not any(ipaddress.ip_address(key.ip) in net for net in keep)]


def _cleanup_iptables(kernel: IptablesKernel) -> None:
    """Our jumps, IPVS-only chains and ipset rules in shared chains go; iptables mode's rules stay."""
    try:
        text = cleanup_rules({table: kernel.save(table) for table in ("nat", "filter")})
        if text:
            kernel.restore(text)
    except (OSError, RuntimeError) as err:
        log.warning("ipvs iptables cleanup incomplete", variant=kernel.variant, error=str(err))
