"""The eBPF Backend: TCP/UDP cluster IPs (and external frontends, for local processes) in a cgroup socket
load balancer (pinned maps, written incrementally), external frontends from the network in tc, everything
else through an nftables fallback that renders only what eBPF does not carry. There is one backend per IP
family, as in every mode; both write the one socket load balancer's maps and the one tc program's.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from kproxyd.backends import Backend, FrontendCounter, WriteStats
from kproxyd.backends.ebpf import image as img
from kproxyd.backends.ebpf import tc
from kproxyd.backends.ebpf.kernel import SockLbKernel, cgroup2_root, detach_and_unpin
from kproxyd.backends.nftables.backend import NftablesBackend
from kproxyd.config import ProxyConfig, local_traffic_detector
from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)


class Fallback(Backend, Protocol):
    """The nftables backend, as the ebpf mode drives it."""

    def remove_table(self) -> None:
        """Delete this family's table; the next apply writes it afresh."""


def cgroup_of(config: ProxyConfig) -> str:
    """The cgroup the socket load balancer attaches to: --cgroup-root, else the cgroup2 root (as Cilium)."""
    return config.cgroup_root or cgroup2_root()


@functools.cache
def socket_lb(cgroup: str, pin_path: str) -> SockLbKernel:
    """The process's socket load balancer for a cgroup and pin directory, shared by both families' backends
    (one load, one slot revision counter for the one map set).
    """
    return SockLbKernel(cgroup, pin_path)


NodeIps = Callable[[], tuple[str, ...]]  # this family's node IPs where node ports answer, read once per sync


class EbpfBackend:
    """Socket load balancing for one family's cluster IPs and (for local processes) external frontends; tc for
    its external frontends from the network; the nftables fallback for external frontends (and SCTP).
    """

    name = "ebpf"

    def __init__(
        self,
        config: ProxyConfig,
        fallback: Fallback,
        kernel: SockLbKernel,
        family: int = 4,
        tc_kernel: tc.TcKernel | None = None,
    ) -> None:
        """tc_kernel None: no tc program (tc off), the fallback carries external frontends from the network too."""
        self._config = config
        self._fallback = fallback
        self._kernel = kernel
        self._family = family
        self._tc = tc_kernel
        self._tc_ports: dict[ServicePortName, img.Image] | None = None  # what the tc maps hold; None: unknown
        self._tc_generation = 0  # the tc load _tc_ports was read from; another one: unknown, reread
        self._ports: dict[ServicePortName, img.Image] = {}  # what the maps hold for this family
        self._generation = 0  # the kernel load _ports was read from; another one: unknown, reread
        self._fallback_plans: dict[ServicePortName, ServicePlan] = {}  # what the nftables fallback renders
        self._fallback_live = False  # its table exists (written by this process)
        self._addresses: Counter[str] = Counter()  # frontends per cluster IP in the maps
        self._cluster_ips: dict[ServicePortName, tuple[str, ...]] = {}  # each port's cluster IPs in the maps

    @classmethod
    def for_config(cls, config: ProxyConfig, family: int = 4) -> EbpfBackend:
        """The socket load balancer on the configured cgroup and pin path, the tc programs on that pin path
        (both shared with the other family's backend), this family's nftables fallback.
        """
        kernel = socket_lb(cgroup_of(config), config.bpf_pin_path)
        tc_kernel = tc.shared(config.bpf_pin_path)
        return cls(config, NftablesBackend.for_config(config, family), kernel, family, tc_kernel)

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> WriteStats:
        """Maps first (only what changed), then the nftables fallback for the plans it renders, then tc. The
        node IPs are read at most once, and only when a port needs them.
        """
        node_ips: NodeIps = functools.cache(functools.partial(self._node_port_ips, node))
        writes = self._write_maps(plans, changed, node_ips)
        stats = WriteStats()
        if changed is None:
            self._fallback_plans = img.fallback_plans(plans)
            stats = self._apply_fallback(None, node)
        elif fallback_changed := self._update_fallback(plans, changed):
            stats = self._apply_fallback(fallback_changed, node)
        # After the fallback: it carries external frontends too (a first compile here takes seconds).
        writes += self._write_tc(plans, changed, node, node_ips) if self._tc is not None else 0
        return WriteStats(bytes=stats.bytes, lines=stats.lines + writes, rules=stats.rules)

    def _apply_fallback(self, changed: set[ServicePortName] | None, node: NodeInfo) -> WriteStats:
        """Write the nftables fallback; while no frontend needs it, have no table at all: its nat hooks would
        turn conntrack on for every connection, the socket-balanced ones too.
        """
        if not self._fallback_plans and changed is None:
            self._fallback.remove_table()
            self._fallback_live = False
            return WriteStats()
        stats = self._fallback.apply(self._fallback_plans, changed if self._fallback_live else None, node)
        self._fallback_live = True
        return stats

    def _update_fallback(
        self, plans: Mapping[ServicePortName, ServicePlan], changed: set[ServicePortName]
    ) -> set[ServicePortName]:
        """Update the fallback's plans for the changed ports only (O(changed)); the ones it must rewrite."""
        touched = {name for name in changed if name in self._fallback_plans}
        for name in changed:
            plan = plans.get(name)
            fallback = img.fallback_plan(plan) if plan else None
            if fallback is None:
                self._fallback_plans.pop(name, None)
            else:
                self._fallback_plans[name] = fallback
                touched.add(name)
        return touched

    def _write_maps(
        self, plans: Mapping[ServicePortName, ServicePlan], changed: set[ServicePortName] | None, node_ips: NodeIps
    ) -> int:
        kernel = self._kernel
        started = time.monotonic()
        try:
            if not kernel.loaded:
                kernel.load()
            first = self._generation != kernel.generation  # our first sync, or (either family) reloaded since
            if first:
                old = kernel.read_image(self._family)  # an earlier run's maps: rewrite only what differs
                self._ports, self._addresses, self._cluster_ips = {}, Counter(), {}
                self._generation = kernel.generation
                names: set[ServicePortName] = set(plans)
            else:
                old = {}
                names = set(plans) | set(self._ports) if changed is None else changed
            new = self._replace_ports(plans, names, old, node_ips, first)
            upserts, deletes = img.diff(old, new)
            writes = kernel.write(upserts, deletes)
            kernel.attach()
        except Exception:
            kernel.invalidate()  # unknown after a failure: reload, and both families reread, on the next sync
            raise
        log.debug(
            "eBPF maps written",
            full=changed is None,
            upserts=len(upserts),
            deletes=len(deletes),
            writes=writes,
            ms=round((time.monotonic() - started) * 1000, 2),
        )
        return writes

    def _write_tc(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
        node_ips: NodeIps,
    ) -> int:
        """This family's part of the tc maps: everything on a full sync (the interfaces and node IPs may have
        changed), else the changed ports. The nftables fallback still holds these frontends: if tc cannot be
        loaded here, it carries them from the network, and tc stays off.
        """
        kernel = self._tc
        assert kernel is not None
        if not kernel.loaded and not self._load_tc(kernel):
            return 0
        family = self._family
        try:
            if self._tc_ports is None or self._tc_generation != kernel.generation:  # first sync, or reloaded
                old, self._tc_ports = kernel.read_image(family), {}
                self._tc_generation = kernel.generation
                changed = None
            elif changed is None:
                kernel.attach_interfaces()
                old = {key: entry for image in self._tc_ports.values() for key, entry in image.items()}
            if changed is None:
                detector = local_traffic_detector(self._config, node, family)
                kernel.set_pod_sources(tc.pod_source_cidrs(detector, family), family)
                self._tc_ports = tc.image(plans, node_ips(), self._config.ebpf_lb_algorithm)
                new = {key: entry for image in self._tc_ports.values() for key, entry in image.items()}
            else:
                old, new = self._replace_tc_ports(plans, changed, node_ips)
            return kernel.write(*img.diff(old, new))
        except Exception:
            kernel.invalidate()  # unknown after a failure: reload, and both families reread, on the next sync
            raise

    def _load_tc(self, kernel: tc.TcKernel) -> bool:
        """Load the tc programs; False (and tc off for this backend, its maps unpinned) when they cannot run,
        found here or by the other family's backend before (no second compile).
        """
        if not kernel.failed:
            try:
                kernel.load()
                return True
            except Exception:
                log.exception("tc programs cannot run here: external frontends stay with the nftables fallback")
                kernel.failed = True
                kernel.remove()
        self._tc = None
        return False

    def _replace_tc_ports(
        self, plans: Mapping[ServicePortName, ServicePlan], changed: set[ServicePortName], node_ips: NodeIps
    ) -> tuple[img.Image, img.Image]:
        """Replace the changed ports' tc images; what they held and what they hold now. The node's addresses
        are read (a netlink dump, ~2 ms) only when a changed port has an external frontend tc serves.
        """
        assert self._tc_ports is not None
        old: img.Image = {}
        new: img.Image = {}
        for name in changed:
            old.update(self._tc_ports.pop(name, {}))
            plan = plans.get(name)
            if plan is None or not img.tc_serves(plan):
                continue
            image = tc.plan_image(plan, node_ips(), self._config.ebpf_lb_algorithm)
            if image:
                self._tc_ports[name] = image
                new.update(image)
        return old, new

    def _node_port_ips(self, node: NodeInfo) -> tuple[str, ...]:
        """This family's node IPs where node ports answer, for the socket load balancer and tc alike."""
        kernel = self._tc or self._kernel
        return tc.node_port_ips(self._config, node, kernel.local_addresses(self._family), self._family)

    def _replace_ports(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        names: set[ServicePortName],
        old: img.Image,
        node_ips: NodeIps,
        first: bool,
    ) -> img.Image:
        """Replace the named ports' images in place (O(changed)); add what they held to old, return what they
        hold now, each with the address entries of the cluster IPs (only those) that appear or disappear.
        """
        ports, addresses, cluster_ips = self._ports, self._addresses, self._cluster_ips
        algorithm = self._config.ebpf_lb_algorithm
        before: dict[str, int] = {}
        new: img.Image = {}
        for name in names:
            old.update(ports.pop(name, {}))
            for ip in cluster_ips.pop(name, ()):
                before.setdefault(ip, addresses[ip])
                addresses[ip] -= 1
            plan = plans.get(name)
            if plan is not None:
                ips = node_ips() if img.needs_node_ips(plan) else ()
                image = ports[name] = img.plan_image(plan, algorithm, ips)
                new.update(image)
                cluster_ips[name] = img.balanced_cluster_ips(plan) if image else ()
                for ip in cluster_ips[name]:
                    before.setdefault(ip, addresses[ip])
                    addresses[ip] += 1
        for ip, count in before.items():
            if addresses[ip] > 0:
                new[img.address_key(ip)] = img.ADDRESS_ENTRY
            else:
                del addresses[ip]
            if count > 0 and not first:
                old[img.address_key(ip)] = img.ADDRESS_ENTRY
        return new

    def frontends(self) -> dict[img.FrontendKey, ServicePortName]:
        """The ServicePort of each frontend in the maps."""
        if not self._kernel.loaded or self._generation != self._kernel.generation:
            return {}  # unknown until the next sync rereads the maps
        return {key: name for name, image in self._ports.items() for key in image}

    def connection_counters(self) -> list[FrontendCounter]:
        """Translated connections per socket load balancer frontend from the counters map (external ones marked
        "(socket LB)": the fallback counts the same frontend from the network), plus tc's and the fallback's.
        """
        counters = self._fallback.connection_counters()
        owners = self.frontends()
        if owners:
            for key, count in self._kernel.counters():
                name = owners.get(key)
                if name is not None:
                    external = key.ip not in self._cluster_ips.get(name, ())
                    frontend = f"{key} (socket LB)" if external else str(key)
                    counters.append(FrontendCounter(str(name), frontend, count))
        tc_owners = self.tc_frontends()
        if self._tc is not None and tc_owners:
            for key, count in self._tc.counters():
                if key in tc_owners:
                    counters.append(FrontendCounter(str(tc_owners[key]), f"{key} (TC)", count))
        return counters

    def tc_frontends(self) -> dict[img.FrontendKey, ServicePortName]:
        """The ServicePort of each frontend in the tc maps."""
        return {key: name for name, image in (self._tc_ports or {}).items() for key in image}

    def drifted(self) -> bool:
        """True when our programs were detached or unpinned behind our back (then reload), or the fallback's
        table was removed.
        """
        if self._kernel.loaded and not self._kernel.attached():
            log.warning(
                "eBPF programs detached or unpinned behind our back: reloading", pin=self._config.bpf_pin_path
            )
            self._kernel.invalidate()
            return True
        if self._tc is not None and self._tc.loaded and not self._tc.attached():
            log.warning(
                "tc programs detached or unpinned behind our back: reloading", pin=self._config.bpf_pin_path
            )
            self._tc.invalidate()
            return True
        return self._fallback.drifted()

    def cleanup(self) -> None:
        """Detach and unpin the socket load balancer (only what is pinned in our pin path); the fallback's
        table is the nftables mode's and goes with its cleanup.
        """
        tc.detach_tc()
        detach_and_unpin(cgroup_of(self._config), self._config.bpf_pin_path)
