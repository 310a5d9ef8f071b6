"""sync.py: the Proxier's change handling against a recording backend, and the SyncRunner's scheduling."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import pytest

from kproxyd.backends import WriteStats
from kproxyd.metrics import ProxyMetrics
from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan
from kproxyd.sync import Proxier, SyncRunner
from kproxyd.tracker import ENDPOINT_SLICE, SERVICE, ProxyStateTracker
from tests.factories import endpoint, endpoint_slice, service


class RecordingBackend:
    """Records every apply; fails on demand."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[set[ServicePortName], set[ServicePortName] | None]] = []
        self.fail = False

    def apply(
        self, plans: Mapping[ServicePortName, ServicePlan], changed: set[ServicePortName] | None, node: NodeInfo
    ) -> WriteStats:
        if self.fail:
            raise RuntimeError("kernel said no")
        self.calls.append((set(plans), changed))
        return WriteStats(bytes=1, lines=1)

    def drifted(self) -> bool:
        return False

    def cleanup(self) -> None:
        self.calls.clear()


@pytest.fixture
def setup() -> tuple[ProxyStateTracker, RecordingBackend, Proxier]:
    tracker = ProxyStateTracker("node1")
    backend = RecordingBackend()
    tracker.upsert(SERVICE, service(name="a", cluster_ip="10.96.0.10"))
    tracker.upsert(SERVICE, service(name="b", cluster_ip="10.96.0.11"))
    tracker.upsert(ENDPOINT_SLICE, endpoint_slice(service_name="a"))
    return tracker, backend, Proxier(tracker, backend, ProxyMetrics())


def test_first_sync_full_then_no_op(setup: tuple[ProxyStateTracker, RecordingBackend, Proxier]) -> None:
    _, backend, proxier = setup
    assert proxier.sync().full
    assert backend.calls[0][1] is None and len(backend.calls[0][0]) == 2
    result = proxier.sync()
    assert not result.applied
    assert len(backend.calls) == 1  # a sync with no change sends nothing


def test_partial_sync_names_only_the_changed_port(
    setup: tuple[ProxyStateTracker, RecordingBackend, Proxier],
) -> None:
    tracker, backend, proxier = setup
    proxier.sync()
    tracker.upsert(ENDPOINT_SLICE, endpoint_slice(service_name="a", endpoints=[endpoint("10.244.1.9")]))
    proxier.sync()
    plans, changed = backend.calls[-1]
    assert changed == {n for n in plans if n.name == "a"}
    assert len(plans) == 2


def test_deleted_service_leaves_plans(setup: tuple[ProxyStateTracker, RecordingBackend, Proxier]) -> None:
    tracker, backend, proxier = setup
    proxier.sync()
    tracker.delete(SERVICE, service(name="b"))
    proxier.sync()
    plans, changed = backend.calls[-1]
    assert {n.name for n in plans} == {"a"}
    assert {n.name for n in changed or ()} == {"b"}


def test_renamed_port_changes_the_old_and_the_new_port(
    setup: tuple[ProxyStateTracker, RecordingBackend, Proxier],
) -> None:
    tracker, backend, proxier = setup
    proxier.sync()
    (old,) = [n for n in proxier.plans if n.name == "a"]
    tracker.upsert(SERVICE, service(name="a", cluster_ip="10.96.0.10", ports=[{"name": "web", "port": 8080}]))
    proxier.sync()
    plans, changed = backend.calls[-1]
    (new,) = [n for n in plans if n.name == "a"]
    assert changed == {old, new} and old not in plans


def test_partial_sync_observers_see_the_plans_before_and_after() -> None:
    tracker = ProxyStateTracker("node1")
    tracker.upsert(SERVICE, service(name="a", cluster_ip="10.96.0.10"))
    tracker.upsert(SERVICE, service(name="b", cluster_ip="10.96.0.11"))
    seen: list[tuple[dict[ServicePortName, ServicePlan], dict[ServicePortName, ServicePlan], object]] = []
    proxier = Proxier(
        tracker,
        RecordingBackend(),
        ProxyMetrics(),
        [lambda old, new, changed: seen.append((dict(old), dict(new), changed))],
    )
    proxier.sync()
    first = dict(proxier.plans)
    tracker.upsert(ENDPOINT_SLICE, endpoint_slice(service_name="a"))
    tracker.delete(SERVICE, service(name="b"))
    tracker.upsert(SERVICE, service(name="c", cluster_ip="10.96.0.12"))
    proxier.sync()
    old, new, changed = seen[-1]
    assert old == first  # the view of the replaced plans: b back, c not there yet, a's old plan
    assert {n.name for n in new} == {"a", "c"} and new == dict(proxier.plans)
    assert {n.name for n in changed} == {"a", "b", "c"}  # type: ignore[attr-defined]


def test_failed_partial_sync_puts_the_replaced_plans_back(
    setup: tuple[ProxyStateTracker, RecordingBackend, Proxier],
) -> None:
    tracker, backend, proxier = setup
    proxier.sync()
    before = dict(proxier.plans)
    tracker.delete(SERVICE, service(name="a"))
    tracker.upsert(SERVICE, service(name="c", cluster_ip="10.96.0.12"))
    backend.fail = True
    with pytest.raises(RuntimeError):
        proxier.sync()
    assert proxier.plans == before


def test_plan_gauges_count_every_family_at_scrape_time() -> None:
    metrics = ProxyMetrics()
    for family, ip in ((4, "10.96.0.10"), (6, "fd00:10:96::10")):
        tracker = ProxyStateTracker("node1", family=family)
        tracker.upsert(SERVICE, service(name="a", cluster_ip=ip, internalTrafficPolicy="Local"))
        Proxier(tracker, RecordingBackend(), metrics).sync()
    assert metrics.registry.get_sample_value("kproxyd_service_ports") == 2
    assert (
        metrics.registry.get_sample_value(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total", {"traffic_policy": "internal"}
        )
        == 2
    )


def test_failed_apply_keeps_last_plans_and_retries_full(
    setup: tuple[ProxyStateTracker, RecordingBackend, Proxier],
) -> None:
    tracker, backend, proxier = setup
    proxier.sync()
    before = dict(proxier.plans)
    tracker.upsert(ENDPOINT_SLICE, endpoint_slice(service_name="b"))
    backend.fail = True
    with pytest.raises(RuntimeError):
        proxier.sync()
    assert proxier.plans == before
    backend.fail = False
    assert proxier.sync().full
    assert backend.calls[-1][1] is None


def test_runner_batches_requests_and_retries() -> None:
    calls: list[bool] = []
    failures = [True]
    done = threading.Event()

    def sync(full: bool) -> None:
        calls.append(full)
        if failures:
            failures.pop()
            raise RuntimeError("first sync fails")
        if len(calls) >= 3:
            done.set()

    runner = SyncRunner(sync, min_period=0.2, check_period=3600)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while runner.last_success == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runner.last_success > 0  # the failed first sync was retried
        for _ in range(20):
            runner.request()
        assert done.wait(10)
        assert len(calls) == 3  # twenty requests within min_period became one sync
        assert calls[0] is True  # the first sync is a full one
    finally:
        runner.stop()


def test_runner_drift_forces_a_full_sync() -> None:
    calls: list[bool] = []
    drift = threading.Event()

    def drifted() -> bool:
        return drift.is_set()

    runner = SyncRunner(lambda full: calls.append(full), min_period=0.05, check_period=0.1, drifted=drifted)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        runner.request()
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls[:2] == [True, False]  # first sync full, a change-driven one partial
        drift.set()
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls[2] is True  # the canary check found drift: full resync without any change
    finally:
        runner.stop()


def test_runner_runs_a_change_after_a_quiet_period_at_once() -> None:
    """kube-proxy's BoundedFrequencyRunner: a change runs at once when the last sync started longer than
    min-sync-period ago; a change right after a sync waits until that period has passed."""
    starts: list[float] = []
    runner = SyncRunner(lambda full: starts.append(time.monotonic()), min_period=0.5, check_period=3600)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not starts and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.6)  # quiet for longer than min_period
        asked = time.monotonic()
        runner.request()
        while len(starts) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert starts[1] - asked < 0.2
        runner.request()
        while len(starts) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert starts[2] - starts[1] >= 0.49
    finally:
        runner.stop()
