"""tracker.py: informer events → converted state and the changed-Service set."""

from __future__ import annotations

import pytest
import structlog

from kproxyd.model import Protocol, ServicePortName
from kproxyd.tracker import ENDPOINT_SLICE, NODE, SERVICE, ProxyStateTracker
from tests.factories import endpoint, endpoint_slice, node, service

HTTP = ServicePortName("ns", "svc", "http", Protocol.TCP)


@pytest.fixture
def tracker() -> ProxyStateTracker:
    t = ProxyStateTracker("node1")
    t.take_changes()  # the initial full sync
    return t


def test_first_changes_are_full() -> None:
    t = ProxyStateTracker("node1")
    t.upsert(SERVICE, service())
    changes = t.take_changes()
    assert changes.full
    assert set(changes.services) == {"ns/svc"}


def test_service_and_slice_merge(tracker: ProxyStateTracker) -> None:
    tracker.upsert(SERVICE, service())
    tracker.upsert(ENDPOINT_SLICE, endpoint_slice(endpoints=[endpoint("10.244.1.2"), endpoint("10.244.2.2")]))
    tracker.upsert(
        ENDPOINT_SLICE, endpoint_slice(name="svc-2", endpoints=[endpoint("10.244.2.2"), endpoint("10.244.3.2")])
    )
    changes = tracker.take_changes()
    assert not changes.full
    view = changes.services["ns/svc"]
    assert [p.name for p in view.ports] == [HTTP]
    assert sorted(e.ip for e in view.endpoints[HTTP]) == ["10.244.1.2", "10.244.2.2", "10.244.3.2"]
    assert tracker.take_changes().services == {}


def test_unchanged_relist_records_nothing(tracker: ProxyStateTracker) -> None:
    objects = [service(), service(name="other", cluster_ip="10.96.0.11")]
    tracker.replace(SERVICE, objects)
    tracker.take_changes()
    tracker.replace(SERVICE, objects)
    assert tracker.take_changes().services == {}


def test_relist_removes_missing_objects(tracker: ProxyStateTracker) -> None:
    tracker.replace(SERVICE, [service(), service(name="other", cluster_ip="10.96.0.11")])
    tracker.replace(ENDPOINT_SLICE, [endpoint_slice()])
    tracker.take_changes()
    tracker.replace(SERVICE, [service()])
    tracker.replace(ENDPOINT_SLICE, [])
    changes = tracker.take_changes()
    assert set(changes.services) == {"ns/svc", "ns/other"}
    assert changes.services["ns/other"].ports == ()
    assert changes.services["ns/svc"].endpoints[HTTP] == ()


def test_malformed_service_logged_and_skipped(tracker: ProxyStateTracker) -> None:
    tracker.upsert(SERVICE, service())
    tracker.upsert(SERVICE, service(name="good", cluster_ip="10.96.0.12"))
    tracker.take_changes()
    bad = service()
    bad["spec"]["ports"][0]["port"] = 99999
    with structlog.testing.capture_logs() as logs:
        tracker.upsert(SERVICE, bad)
    assert logs[0]["event"] == "invalid object skipped"
    assert logs[0]["object"] == "ns/svc" and "99999" in logs[0]["reason"]
    state = tracker.snapshot()
    assert {n.name for n in state.ports} == {"good"}


def test_malformed_slice_skipped_others_kept(tracker: ProxyStateTracker) -> None:
    tracker.upsert(SERVICE, service())
    tracker.upsert(ENDPOINT_SLICE, endpoint_slice(name="a", endpoints=[endpoint("10.244.1.2")]))
    bad = endpoint_slice(name="b", endpoints=[endpoint("999.1.1.1")])
    with structlog.testing.capture_logs() as logs:
        tracker.upsert(ENDPOINT_SLICE, bad)
    assert logs[0]["object"] == "ns/b"
    assert [e.ip for e in tracker.snapshot().endpoints[HTTP]] == ["10.244.1.2"]


def test_node_change_forces_full_sync(tracker: ProxyStateTracker) -> None:
    tracker.upsert(SERVICE, service())
    tracker.take_changes()
    tracker.upsert(NODE, node(zone="a"))
    changes = tracker.take_changes()
    assert changes.full and changes.node.zone == "a"
    tracker.upsert(NODE, node(name="other-node", zone="b"))
    assert not tracker.take_changes().full


def test_family_filter() -> None:
    t = ProxyStateTracker("node1", family=4)
    dual = service(clusterIPs=["10.96.0.10", "fd00::10"])
    t.upsert(SERVICE, dual)
    t.upsert(ENDPOINT_SLICE, endpoint_slice(name="v6", address_type="IPv6", endpoints=[endpoint("fd00::2")]))
    t.upsert(ENDPOINT_SLICE, endpoint_slice(name="v4"))
    (port,) = t.snapshot().ports.values()
    assert port.cluster_ips == ("10.96.0.10",)
    assert [e.ip for e in t.snapshot().endpoints[HTTP]] == ["10.244.1.2"]


def test_on_change_called() -> None:
    calls = []
    t = ProxyStateTracker("node1", on_change=lambda: calls.append(1))
    t.upsert(SERVICE, service())
    t.upsert(SERVICE, service())  # unchanged: no new notification
    assert calls == [1]
