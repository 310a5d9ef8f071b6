"""kube-proxy's Prometheus metrics (names prefixed kubeproxy_), in a registry of the daemon's own."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kproxyd.plan import ServicePlan

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
        self.sync_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy rules restore failures",
            registry=reg,
        )
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", registry=reg
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", registry=reg
        )
        self.services = Gauge("kproxyd_service_ports", "ServicePorts programmed by the last sync", registry=reg)
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=reg,
        )

    def record_changes(self, service_events: int, endpoint_events: int) -> None:
        """Count the API changes a sync consumed."""
        self.service_changes.inc(service_events)
        self.endpoint_changes.inc(endpoint_events)

    def record_queued(self) -> None:
        """A change was queued for the next sync."""
        self.last_queued_timestamp.set(time.time())

    def record_sync(self, seconds: float, full: bool, plans: Iterable[ServicePlan]) -> None:
        """A successful sync."""
        self.sync_duration.observe(seconds)
        (self.full_sync_duration if full else self.partial_sync_duration).observe(seconds)
        self.last_sync_timestamp.set(time.time())
        plans = list(plans)
        self.services.set(len(plans))
        internal = sum(1 for p in plans if p.port.internal_policy_local and not p.internal_endpoints)
        external = sum(
            1 for p in plans if p.port.external_policy_local and p.has_any_endpoints and not p.external_endpoints
        )
        self.no_local_endpoints.labels("internal").set(internal)
        self.no_local_endpoints.labels("external").set(external)
