"""Wires the stages together: informers → tracker → sync (plan → backend), plus health and metrics."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import structlog
from prometheus_client import start_http_server

from kproxyd.backends import Backend
from kproxyd.config import ProxyConfig
from kproxyd.conntrack import ConntrackCleaner
from kproxyd.healthcheck import HealthServer, ProxyHealth, ServiceHealthServers, parse_bind_address
from kproxyd.k8s.client import build_api_client
from kproxyd.k8s.reflector import ENDPOINT_SLICES, NODES, PROXY_LABEL_SELECTOR, SERVICES, Reflector
from kproxyd.metrics import ProxyMetrics
from kproxyd.sync import Proxier, SyncRunner
from kproxyd.tracker import ProxyStateTracker

log = structlog.get_logger(__name__)

INFORMER_SYNC_TIMEOUT = 60.0


def make_backend(config: ProxyConfig) -> Backend:
    """The dataplane backend for the configured mode."""
    from kproxyd.backends.iptables.backend import IptablesBackend

    return IptablesBackend.for_config(config)


def cleanup(config: ProxyConfig) -> int:
    """--cleanup: remove everything any kproxyd mode programmed on this node."""
    make_backend(config).cleanup()
    log.info("cleanup done")
    return 0


class Daemon:
    """One node's proxy: informers feed the tracker, the runner syncs, servers report health and metrics."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.metrics = ProxyMetrics()
        self.stopped = threading.Event()
        self.tracker = ProxyStateTracker(config.hostname, family=4, on_change=self._changed)
        backend = make_backend(config)
        self.runner = SyncRunner(self._sync, config.min_sync_period, config.sync_period, drifted=backend.drifted)
        self.health = ProxyHealth(
            2 * config.sync_period, lambda: self.runner.last_success, lambda: self.runner.oldest_pending
        )
        self.service_health = ServiceHealthServers(config.bind_address, lambda: self.health.status()[0])
        self.proxier = Proxier(
            self.tracker,
            backend,
            self.metrics,
            observers=[
                lambda _old, new, changed: self.service_health.on_sync(new, changed),
                ConntrackCleaner().on_sync,
            ],
        )
        api = build_api_client(config.kubeconfig, config.master)
        self.reflectors = [
            Reflector(api, SERVICES, self.tracker, label_selector=PROXY_LABEL_SELECTOR),
            Reflector(api, ENDPOINT_SLICES, self.tracker, label_selector=PROXY_LABEL_SELECTOR),
            Reflector(api, NODES, self.tracker, field_selector=f"metadata.name={config.hostname}"),
        ]
        self._health_server: HealthServer | None = None

    def _changed(self) -> None:
        self.metrics.record_queued()
        self.runner.request()

    def _sync(self, full: bool) -> None:
        result = self.proxier.sync(force_full=full)
        if result.applied:
            log.info("synced", full=result.full, changed=result.changed, service_ports=result.services)

    def start(self) -> None:
        """Start informers, wait for their first lists, then start syncing and serving."""
        self._start_servers()
        for reflector in self.reflectors:
            reflector.start()
        for reflector in self.reflectors:  # the first sync needs every list (NodeCIDR mode needs the Node)
            if not reflector.wait_synced(INFORMER_SYNC_TIMEOUT):
                log.warning("informer not synced yet; starting anyway", resource=reflector.resource.kind)
        self.runner.start()
        log.info("kproxyd started", node=self.config.hostname, mode=self.config.mode)

    def _start_servers(self) -> None:
        healthz = parse_bind_address(self.config.healthz_bind_address, 10256)
        if healthz:
            self._health_server = HealthServer(healthz, self.health)
            self._health_server.start()
        metrics = parse_bind_address(self.config.metrics_bind_address, 10249)
        if metrics:
            start_http_server(metrics[1], metrics[0], registry=self.metrics.registry)

    def stop(self) -> None:
        """Stop syncing and watching; the programmed rules stay so traffic keeps flowing."""
        self.runner.stop()
        for reflector in self.reflectors:
            reflector.stop()
        if self._health_server:
            self._health_server.stop()
        self.service_health.stop()
        log.info("kproxyd stopped; rules left in place")


def run_daemon(config: ProxyConfig) -> int:
    """Run until SIGTERM or SIGINT."""
    daemon = Daemon(config)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        daemon.stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    daemon.stopped.wait()
    daemon.stop()
    return 0
