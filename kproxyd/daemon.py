"""Wires the stages together: informers → tracker → sync (plan → backend), plus health and metrics."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterable
from dataclasses import replace
from types import FrameType

import structlog
from prometheus_client import start_http_server

from kproxyd.backends import Backend
from kproxyd.config import PROXY_MODES, ProxyConfig
from kproxyd.conntrack import ConntrackCleaner
from kproxyd.healthcheck import HealthServer, ProxyHealth, ServiceHealthServers, parse_bind_address
from kproxyd.k8s.client import build_api_client
from kproxyd.k8s.reflector import ENDPOINT_SLICES, NODES, PROXY_LABEL_SELECTOR, SERVICES, Reflector
from kproxyd.metrics import ProxyMetrics
from kproxyd.sockdestroy import UdpSocketDestroyer
from kproxyd.sync import Proxier, SyncObserver, SyncRunner
from kproxyd.tracker import FanOut, ProxyStateTracker

log = structlog.get_logger(__name__)

INFORMER_SYNC_TIMEOUT = 60.0
# The modes whose leftovers a starting mode keeps: ipvs mode writes into iptables mode's shared chains
# (KUBE-SERVICES, KUBE-POSTROUTING...), so cleaning iptables mode would delete its own rules; kube-proxy
# does not clean iptables mode in ipvs mode either. ebpf mode uses nftables mode's table as its fallback.
_KEEP_ON_START = {
    "iptables": ("iptables",),
    "nftables": ("nftables",),
    "ipvs": ("ipvs", "iptables"),
    "ebpf": ("ebpf", "nftables"),
}


def proxy_families(config: ProxyConfig) -> tuple[int, ...]:
    """The IP families to proxy: both where the kernel has IPv6 (kube-proxy's dual-stack mode), else IPv4."""
    return (4, 6) if os.path.exists("/proc/net/if_inet6") else (4,)


def require_mode(config: ProxyConfig) -> None:
    """Refuse, with BackendUnavailableError saying why, a mode this kernel cannot run (ipvs without IPVS)."""
    if config.mode == "ipvs":
        from kproxyd.backends.ipvs.kernel import require_ipvs

        require_ipvs()


def make_backend(config: ProxyConfig, family: int = 4) -> Backend:
    """The dataplane backend for the configured mode and one IP family."""
    if config.mode == "ebpf":
        from kproxyd.backends.ebpf.backend import EbpfBackend

        return EbpfBackend.for_config(config, family)
    if config.mode == "ipvs":
        from kproxyd.backends.ipvs.backend import IpvsBackend

        return IpvsBackend.for_config(config, family)
    if config.mode == "nftables":
        from kproxyd.backends.nftables.backend import NftablesBackend

        return NftablesBackend.for_config(config, family)
    from kproxyd.backends.iptables.backend import IptablesBackend

    return IptablesBackend.for_config(config, family)


def cleanup(config: ProxyConfig, modes: Iterable[str] = PROXY_MODES) -> int:
    """--cleanup: remove everything the given kproxyd modes (all of them by default) programmed here.

    ipvs goes first: its rules use chains iptables mode shares (KUBE-MARK-MASQ...), which iptables mode's
    cleanup can delete only once nothing of ipvs mode refers to them.
    """
    for mode in sorted(modes, key=lambda mode: mode != "ipvs"):
        make_backend(replace(config, mode=mode)).cleanup()
    log.info("cleanup done", modes=list(modes))
    return 0


class Daemon:
    """One node's proxy: informers feed a tracker per IP family, the runner syncs each family's proxier."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        require_mode(config)
        self.metrics = ProxyMetrics()
        families = proxy_families(config)
        trackers = {f: ProxyStateTracker(config.hostname, family=f, on_change=self._changed) for f in families}
        backends = {family: make_backend(config, family) for family in families}
        self.runner = SyncRunner(
            self._sync,
            config.min_sync_period,
            config.sync_period,
            drifted=lambda: any(backend.drifted() for backend in backends.values()),
        )
        primary = trackers[families[0]]
        self.health = ProxyHealth(
            2 * config.sync_period,
            lambda: self.runner.last_success,
            lambda: self.runner.oldest_pending,
            node_eligible=lambda: not primary.node.deleting,
        )
        self.service_health = ServiceHealthServers(config.bind_address, lambda: self.health.status()[0])
        self.proxiers = {
            family: Proxier(trackers[family], backends[family], self.metrics, self._observers(family))
            for family in families
        }
        self.metrics.count_connections(
            lambda: [counter for backend in backends.values() for counter in backend.connection_counters()]
        )
        self.metrics.service_changes_pending.set_function(lambda: primary.pending_events[0])
        self.metrics.endpoint_changes_pending.set_function(lambda: primary.pending_events[1])
        api = build_api_client(config.kubeconfig, config.master)
        handler = FanOut(trackers.values())
        self.reflectors = [
            Reflector(api, SERVICES, handler, label_selector=PROXY_LABEL_SELECTOR),
            Reflector(api, ENDPOINT_SLICES, handler, label_selector=PROXY_LABEL_SELECTOR),
            Reflector(api, NODES, handler, field_selector=f"metadata.name={config.hostname}"),
        ]
        self._health_server: HealthServer | None = None
        self._other_modes_removed = False

    def _observers(self, family: int) -> list[SyncObserver]:
        """Follow-up work after a family's successful sync: health check ports, stale UDP flows (conntrack
        entries; in ebpf mode also connected sockets, which the socket load balancer translated once).
        """
        cleaner = ConntrackCleaner(socket.AF_INET if family == 4 else socket.AF_INET6)
        observers: list[SyncObserver] = [
            lambda _old, new, changed: self.service_health.on_sync(new, changed, family),
            cleaner.on_sync,
        ]
        if self.config.mode == "ebpf":
            from kproxyd.backends.ebpf.backend import cgroup_of

            destroyer = UdpSocketDestroyer(cgroup_of(self.config), self.metrics.sockets_destroyed.inc)
            observers.append(destroyer.on_sync)
        return observers

    def _changed(self) -> None:
        self.metrics.record_queued()
        self.runner.request()

    def _sync(self, full: bool) -> None:
        """Sync every family; one family's failure does not hold back the others, and is raised after."""
        failure: Exception | None = None
        for family, proxier in self.proxiers.items():
            try:
                result = proxier.sync(force_full=full)
            except Exception as err:
                failure = failure or err
                continue
            if result.applied:
                log.info(
                    "synced",
                    family=f"IPv{family}",
                    full=result.full,
                    changed=result.changed,
                    service_ports=result.services,
                    seconds=round(result.seconds, 4),
                    bytes=result.stats.bytes,
                    lines=result.stats.lines,
                )
        if failure is not None:
            raise failure
        if not self._other_modes_removed:
            # Only now that this mode's rules are in place: the old mode kept traffic flowing meanwhile.
            cleanup(self.config, [mode for mode in PROXY_MODES if mode not in _KEEP_ON_START[self.config.mode]])
            self._other_modes_removed = True

    def start(self) -> None:
        """Start informers, wait for their first lists, then start syncing and serving."""
        self._start_servers()
        for reflector in self.reflectors:
            reflector.start()
        for reflector in self.reflectors:  # the first sync needs every list (NodeCIDR mode needs the Node)
            if not reflector.wait_synced(INFORMER_SYNC_TIMEOUT):
                log.warning("informer not synced yet; starting anyway", resource=reflector.resource.kind)
        self.runner.start()
        log.info("kproxyd started", node=self.config.hostname, mode=self.config.mode, families=list(self.proxiers))

    def _start_servers(self) -> None:
        healthz = parse_bind_address(self.config.healthz_bind_address, 10256)
        if healthz:
            self._health_server = HealthServer(healthz, self.health)
            self._health_server.start()
        metrics = parse_bind_address(self.config.metrics_bind_address, 10249)
        if metrics:
            start_http_server(metrics[1], metrics[0], registry=self.metrics.registry)

    def stop(self) -> None:
        """Stop syncing and watching; the programmed rules stay so traffic keeps flowing.

        A sync still running gets a moment to finish; each kernel write is atomic, so cutting it short
        leaves the previous or the new rules, never half of them.
        """
        self.runner.stop(timeout=3.0)
        for reflector in self.reflectors:
            reflector.stop()
        if self._health_server:
            self._health_server.stop()
        self.service_health.stop()
        log.info("kproxyd stopped; rules left in place")


def run_daemon(config: ProxyConfig) -> int:
    """Run until SIGTERM or SIGINT (a signal during start-up stops it as soon as it is up)."""
    stopped = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(config)
    daemon.start()
    stopped.wait()
    daemon.stop()
    return 0
