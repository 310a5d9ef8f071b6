"""The iptables Backend: render plans (pure) and write them with one iptables-restore per sync."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from kproxyd.backends.iptables.kernel import IptablesKernel, detect_iptables_variant
from kproxyd.backends.iptables.render import IptablesRenderer, IptablesRenderOptions
from kproxyd.config import ProxyConfig, local_traffic_detector
from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)


def render_options(config: ProxyConfig, node: NodeInfo) -> IptablesRenderOptions:
    """The renderer's options for this node ("primary" node-port addresses become the node's own IPs)."""
    nodeport_cidrs: list[str] = []
    for cidr in config.nodeport_addresses:
        if cidr == "primary":
            nodeport_cidrs += [f"{ip}/32" for ip in node.addresses if ":" not in ip]
        elif ":" not in cidr:
            nodeport_cidrs.append(cidr)
    return IptablesRenderOptions(
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local_detector=local_traffic_detector(config, node),
        nodeport_addresses=tuple(nodeport_cidrs),
        node_ips=tuple(ip for ip in node.addresses if ":" not in ip),
    )


class IptablesBackend:
    """kube-proxy's iptables mode: full sync at start and when options change, partial syncs after."""

    name = "iptables"

    def __init__(self, config: ProxyConfig, kernel: IptablesKernel) -> None:
        self._config = config
        self._kernel = kernel
        self._options: IptablesRenderOptions | None = None
        self._renderer: IptablesRenderer | None = None
        self._chains: set[str] | None = None  # kproxyd chains in the kernel; None until read back

    @classmethod
    def for_config(cls, config: ProxyConfig) -> IptablesBackend:
        """The backend on the iptables variant this node already uses."""
        return cls(config, IptablesKernel(detect_iptables_variant()))

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> None:
        """Render and restore; a full sync also re-reads the kernel's chains and re-ensures the jumps."""
        options = render_options(self._config, node)
        if options != self._options or self._renderer is None:
            self._options, self._renderer = options, IptablesRenderer(options)
            changed = None
        if changed is None or self._chains is None:
            self._kernel.ensure_jumps()
            self._chains = self._kernel.list_chains()
            changed = None
        result = self._renderer.render(plans, changed, self._chains)
        try:
            self._kernel.restore(result.text)
        except Exception:
            self._chains = None  # unknown after a failure: re-read on the next (full) sync
            raise
        self._chains = set(result.chains)
        log.debug("iptables rules written", full=changed is None, bytes=len(result.text), **result.rule_count)

    def cleanup(self) -> None:
        """Remove kproxyd's chains and jumps from both iptables variants."""
        for variant in ("nft", "legacy"):
            try:
                IptablesKernel(variant).cleanup()
            except (OSError, RuntimeError) as err:
                log.warning("iptables cleanup incomplete", variant=variant, error=str(err))
