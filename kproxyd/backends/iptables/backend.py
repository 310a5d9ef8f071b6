"""The iptables Backend: render plans (pure) and write them with iptables-restore, in batches when large."""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable, Collection, Mapping

import structlog

from kproxyd.backends import FrontendCounter, WriteStats
from kproxyd.backends.common import family_addresses
from kproxyd.backends.iptables.kernel import (
    IptablesKernel,
    Variant,
    detect_iptables_variant,
    local_addresses,
)
from kproxyd.backends.iptables.names import KUBE_NODEPORTS
from kproxyd.backends.iptables.render import IptablesRenderer, IptablesRenderOptions
from kproxyd.config import ProxyConfig, local_traffic_detector
from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)

# Per-service chains per restore in a batched nft sync (~500 ServicePorts of 3 endpoints): at 10k Services,
# 1000/2000/4000 took 8.8/9.2/10.7 s cold and 15.7/13.2/12.4 s to resync (bench/results/iptables_sync.json).
DEFAULT_BATCH_CHAINS = 2000


def nodeport_ips(
    cidrs: Collection[str], node: NodeInfo, local_ips: Collection[str], family: int = 4
) -> tuple[str, ...] | None:
    """kube-proxy's node-port addresses: the local addresses in `cidrs` as host routes; None for all of them."""
    own = [c for c in cidrs if c == "primary" or ipaddress.ip_network(c).version == family]
    networks = [ipaddress.ip_network(cidr) for cidr in own if cidr != "primary"]
    if not own or any(net.prefixlen == 0 for net in networks):
        return None
    primary = set(node.addresses) if "primary" in own else set()
    wanted = {ip for ip in local_ips if ip in primary or any(ipaddress.ip_address(ip) in n for n in networks)}
    if not wanted:
        log.warning("no local address matches nodePortAddresses: node ports unreachable", cidrs=own)
    host = 32 if family == 4 else 128
    return tuple(f"{ip}/{host}" for ip in sorted(wanted, key=ipaddress.ip_address))


def render_options(
    config: ProxyConfig, node: NodeInfo, local_ips: Collection[str], family: int = 4
) -> IptablesRenderOptions:
    """The renderer's options for this node and IP family, given its local addresses of that family."""
    return IptablesRenderOptions(
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local_detector=local_traffic_detector(config, node, family),
        nodeport_addresses=nodeport_ips(config.nodeport_addresses, node, local_ips, family),
        node_ips=family_addresses(node, family),
        localhost_nodeports=family == 4 and localhost_nodeports(config),
    )


def localhost_nodeports(config: ProxyConfig) -> bool:
    """kube-proxy offers node ports on 127.0.0.1 when enabled and the node-port addresses include loopback."""
    cidrs = [ipaddress.ip_network(c) for c in config.nodeport_addresses if c != "primary" and ":" not in c]
    loopback = ipaddress.ip_address("127.0.0.1")
    return config.localhost_nodeports and (not config.nodeport_addresses or any(loopback in n for n in cidrs))


_COMMENT = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_MATCH = re.compile(r"(?:^| )(-d|-p|--dport|-j) (\S+)")


def frontend_counter(chain: str, packets: int, rule: str) -> FrontendCounter | None:
    """A nat dispatch rule as the frontend it counts; None for rules that count no Service frontend."""
    comment = _COMMENT.search(rule)
    args = dict(_MATCH.findall(rule))
    if comment is None or not args.get("-j", "").startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-")):
        return None
    service = (comment.group(1) or comment.group(2)).split(" ")[0]
    proto = args.get("-p", "").upper()
    if chain == KUBE_NODEPORTS:
        return FrontendCounter(service, f"nodePort {args.get('--dport')}/{proto}", packets)
    ip = args.get("-d", "").split("/")[0]
    address = f"[{ip}]" if ":" in ip else ip
    return FrontendCounter(service, f"{address}:{args.get('--dport')}/{proto}", packets)


class IptablesBackend:
    """kube-proxy's iptables mode: full sync at start and when options change, partial syncs after.

    On nft, a sync rewriting more than batch_chains per-service chains writes them batch by batch first,
    then the top level in one last restore: iptables-nft-restore --noflush is quadratic in the chains it
    declares. Legacy restores rewrite whole tables, so there batches only add cost (3x at 10k Services).
    """

    name = "iptables"

    def __init__(
        self,
        config: ProxyConfig,
        kernel: IptablesKernel,
        batch_chains: int | None = DEFAULT_BATCH_CHAINS,
        local_addresses: Callable[[int], list[str]] = local_addresses,
    ) -> None:
        """batch_chains None (always so on legacy): one restore; local_addresses is read on every full sync."""
        self._config = config
        self._kernel = kernel
        self._batch_chains = batch_chains if kernel.variant == "nft" else None
        self._local_addresses = local_addresses
        self._node: NodeInfo | None = None
        self._renderer: IptablesRenderer | None = None
        self._chains: set[str] | None = None  # kproxyd chains in the kernel; None until read back

    @classmethod
    def for_config(cls, config: ProxyConfig, family: int = 4) -> IptablesBackend:
        """The backend for one IP family, on the iptables variant this node already uses."""
        return cls(config, IptablesKernel(detect_iptables_variant(), family=family))

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> WriteStats:
        """Render and restore; a full sync (also on a Node change) re-reads addresses, chains and jumps."""
        if changed is None or self._chains is None or self._renderer is None or node != self._node:
            self._node = node
            family = self._kernel.family
            options = render_options(self._config, node, self._local_addresses(family), family)
            self._renderer = IptablesRenderer(options)
            if options.localhost_nodeports:
                self._kernel.enable_route_localnet()
            self._kernel.ensure_jumps()
            self._chains = self._kernel.list_chains()
            changed = None
        try:
            return self._write(self._renderer, plans, changed, self._chains)
        except Exception:
            self._chains = None  # unknown after a failure: re-read on the next (full) sync
            raise

    def _write(
        self,
        renderer: IptablesRenderer,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        existing: set[str],
    ) -> WriteStats:
        """One restore, or the changed ports' chains batch by batch and then the top level."""
        batches = self._batches(renderer, plans, changed)
        for text in batches:
            self._kernel.restore(text)
        result = renderer.render(plans, set() if batches else changed, existing)
        self._kernel.restore(result.text)
        self._chains = set(result.chains)
        log.debug(
            "iptables rules written",
            full=changed is None,
            batches=len(batches),
            bytes=len(result.text),
            **result.rule_count,
        )
        texts = [*batches, result.text]
        return WriteStats(
            bytes=sum(len(text) for text in texts),
            lines=sum(text.count("\n") for text in texts),
            rules=dict(result.rule_count),
        )

    def _batches(
        self,
        renderer: IptablesRenderer,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
    ) -> list[str]:
        """The batch inputs of a sync above batch_chains per-service chains; none for a smaller one."""
        if self._batch_chains is None:
            return []
        names = plans.keys() if changed is None else changed & plans.keys()
        batches = list(renderer.render_batches(plans, names, self._batch_chains))
        return batches if len(batches) > 1 else []

    def connection_counters(self) -> list[FrontendCounter]:
        """New connections per frontend: the packet counters of the nat dispatch rules (first packets only)."""
        counters = (frontend_counter(*rule) for rule in self._kernel.dispatch_counters())
        return [counter for counter in counters if counter is not None]

    def drifted(self) -> bool:
        """True when the canary chains are gone (someone flushed the tables): the next sync must be full."""
        return not self._kernel.canary_present()

    def cleanup(self) -> None:
        """Remove kproxyd's chains and jumps from both iptables variants."""
        variants: tuple[Variant, ...] = ("nft", "legacy")
        for variant, family in itertools.product(variants, (4, 6)):
            try:
                IptablesKernel(variant, family=family).cleanup()
            except (OSError, RuntimeError) as err:
                log.warning("iptables cleanup incomplete", variant=variant, error=str(err))
