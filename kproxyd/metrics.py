"""kube-proxy's Prometheus metrics (names prefixed kubeproxy_), in a registry of the daemon's own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kproxyd.backends import FrontendCounter
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)

_BUCKETS = (
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.024,
    2.048,
    4.096,
    8.192,
    16.384,
)


# kube-proxy's buckets for network programming latency: 0.25 s to 5 min.
_PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))


class ProxyMetrics:
    """The daemon's metrics; one instance per daemon so tests can build several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=_BUCKETS,
            registry=reg,
        )
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Full SyncProxyRules latency in seconds",
            buckets=_BUCKETS,
            registry=reg,
        )
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Partial SyncProxyRules latency in seconds",
            buckets=_BUCKETS,
            registry=reg,
        )
        self.last_sync_timestamp = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=reg,
        )
        self.last_queued_timestamp = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=reg,
        )
        self.sync_failures = {
            "iptables": Counter(
                "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                "Cumulative proxy iptables restore failures",
                registry=reg,
            ),
            "nftables": Counter(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                registry=reg,
            ),
            "ebpf": Counter(
                "kubeproxy_sync_proxy_rules_ebpf_sync_failures",
                "Cumulative proxy eBPF map and fallback sync failures",
                registry=reg,
            ),
        }
        self.iptables_rules = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kproxyd",
            ["table"],
            registry=reg,
        )
        self.programming_duration = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            buckets=_PROGRAMMING_BUCKETS,
            registry=reg,
        )
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=reg,
        )
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=reg,
        )
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", registry=reg
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", registry=reg
        )
        self.sockets_destroyed = Counter(
            "kproxyd_sockets_destroyed",
            "UDP sockets destroyed because they were connected to a removed endpoint (ebpf mode)",
            registry=reg,
        )
        self.services = Gauge("kproxyd_service_ports", "ServicePorts programmed by the last sync", registry=reg)
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=reg,
        )
        # Plan-derived gauges are counted at scrape time, so that a sync costs no pass over every Service.
        self._plan_sources: list[Callable[[], Collection[ServicePlan]]] = []
        self.services.set_function(lambda: sum(len(read()) for read in self._plan_sources))
        self.no_local_endpoints.labels("internal").set_function(lambda: self._count(_no_local_internal))
        self.no_local_endpoints.labels("external").set_function(lambda: self._count(_no_local_external))

    def watch_plans(self, read: Callable[[], Collection[ServicePlan]]) -> None:
        """Count the plans read() returns (one IP family's last applied plans) in the plan gauges."""
        self._plan_sources.append(read)

    def _count(self, wanted: Callable[[ServicePlan], bool]) -> int:
        return sum(1 for read in self._plan_sources for plan in read() if wanted(plan))

    def count_connections(self, read: Callable[[], Iterable[FrontendCounter]], max_age: float = 10.0) -> None:
        """Export kproxyd_service_connections_total, read from the kernel at most every max_age seconds."""
        self.registry.register(_ConnectionCollector(read, max_age))

    def record_changes(self, service_events: int, endpoint_events: int) -> None:
        """Count the API changes a sync consumed."""
        self.service_changes.inc(service_events)
        self.endpoint_changes.inc(endpoint_events)

    def record_queued(self) -> None:
        """A change was queued for the next sync."""
        self.last_queued_timestamp.set(time.time())

    def record_failure(self, backend: str) -> None:
        """A sync the kernel refused (counted under the backend's own kube-proxy metric name)."""
        if backend in self.sync_failures:
            self.sync_failures[backend].inc()

    def record_programming(self, trigger_times: Iterable[float]) -> None:
        """Network programming latency: from each EndpointSlice change's trigger time until now, programmed."""
        now = time.time()
        for trigger in trigger_times:
            self.programming_duration.observe(max(now - trigger, 0.0))

    def record_sync(self, seconds: float, full: bool, rules: Mapping[str, int]) -> None:
        """A successful sync."""
        for table, count in rules.items():
            self.iptables_rules.labels(table).set(count)
        self.sync_duration.observe(seconds)
        (self.full_sync_duration if full else self.partial_sync_duration).observe(seconds)
        self.last_sync_timestamp.set(time.time())


def _no_local_internal(plan: ServicePlan) -> bool:
    return plan.port.internal_policy_local and not plan.internal_endpoints


def _no_local_external(plan: ServicePlan) -> bool:
    return plan.port.external_policy_local and plan.has_any_endpoints and not plan.external_endpoints


class _ConnectionCollector(Collector):
    """Per-Service-frontend connection counts, which kube-proxy does not offer; cached between scrapes."""

    def __init__(self, read: Callable[[], Iterable[FrontendCounter]], max_age: float) -> None:
        self._read = read
        self._max_age = max_age
        self._lock = threading.Lock()
        self._cached: list[FrontendCounter] = []
        self._read_at = -float("inf")

    def collect(self) -> Iterator[Metric]:
        """One counter per (Service, frontend)."""
        family = CounterMetricFamily(
            "kproxyd_service_connections",
            "New connections per Service frontend since its rules were last written (kernel rule counters)",
            labels=["service", "frontend"],
        )
        for counter in self._counters():
            family.add_metric([counter.service, counter.frontend], counter.connections)
        yield family

    def _counters(self) -> list[FrontendCounter]:
        with self._lock:
            if time.monotonic() - self._read_at >= self._max_age:
                self._read_at = time.monotonic()
                try:
                    self._cached = list(self._read())
                except Exception:  # a scrape must not fail because the kernel could not be read
                    log.exception("reading connection counters failed")
            return self._cached
