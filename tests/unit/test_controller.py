"""The lab's EndpointSlice controller over an in-memory ObjectStore."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd.lab.controller import EndpointsController
from kproxyd.lab.store import ObjectStore


@pytest.fixture
def store() -> Iterator[ObjectStore]:
    store = ObjectStore()
    controller = EndpointsController(store)
    controller.start()
    try:
        yield store
    finally:
        controller.stop()


def pod(
    name: str, ip: str, node: str = "n1", ready: bool = True, app: str = "web", ports: list[Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def service(name: str = "web", target: Any = 8080, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": spec.pop("labels", {})},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": target}],
            **spec,
        },
    }


def slices(store: ObjectStore, svc: str = "web") -> list[dict[str, Any]]:
    found = store.list("EndpointSlice", "ns")
    return [s for s in found if s["metadata"]["labels"]["kubernetes.io/service-name"] == svc]


def endpoints(store: ObjectStore, svc: str = "web") -> dict[str, dict[str, Any]]:
    """Endpoints of the Service's slices by address (conditions and topology)."""
    return {e["addresses"][0]: e for s in slices(store, svc) for e in s["endpoints"]}


def test_endpoints_follow_pods(store: ObjectStore) -> None:
    store.create("Service", service())
    (empty,) = slices(store)
    assert empty["endpoints"] == []
    store.create("Pod", pod("p1", "10.0.0.1"))
    store.create("Pod", pod("p2", "10.0.0.2", ready=False))
    store.create("Pod", {**pod("unscheduled", ""), "spec": {}})
    (slice_,) = slices(store)
    meta = slice_["metadata"]
    assert meta["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert meta["ownerReferences"][0]["kind"] == "Service"
    assert "endpoints.kubernetes.io/last-change-trigger-time" in meta["annotations"]
    assert slice_["addressType"] == "IPv4"
    assert slice_["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    eps = endpoints(store)
    assert eps["10.0.0.1"]["conditions"] == {"ready": True, "serving": True, "terminating": False}
    assert eps["10.0.0.2"]["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert eps["10.0.0.1"]["targetRef"]["name"] == "p1" and eps["10.0.0.1"]["nodeName"] == "n1"

    store.update("Pod", pod("p2", "10.0.0.2", ready=True))
    assert endpoints(store)["10.0.0.2"]["conditions"]["ready"] is True
    terminating = pod("p1", "10.0.0.1")
    terminating["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    store.update("Pod", terminating)
    assert endpoints(store)["10.0.0.1"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    store.delete("Pod", "ns", "p1")
    store.update("Pod", pod("p2", "10.0.0.2", app="other"))
    assert endpoints(store) == {} and len(slices(store)) == 1


def test_named_target_port_splits_slices(store: ObjectStore) -> None:
    store.create("Pod", pod("a", "10.0.0.1", ports=[{"name": "web", "containerPort": 8080}]))
    store.create("Pod", pod("b", "10.0.0.2", ports=[{"name": "web", "containerPort": 9090}]))
    store.create("Pod", pod("c", "10.0.0.3", ports=[{"name": "web", "containerPort": 53, "protocol": "UDP"}]))
    store.create("Service", service(target="web"))
    by_port = {s["ports"][0]["port"]: [e["addresses"][0] for e in s["endpoints"]] for s in slices(store)}
    assert by_port == {8080: ["10.0.0.1"], 9090: ["10.0.0.2"]}
    names = {s["metadata"]["name"] for s in slices(store)}
    assert len(names) == 2 and all(n.startswith("web-") for n in names)


def test_selector_mismatch_gives_empty_slice(store: ObjectStore) -> None:
    store.create("Pod", pod("a", "10.0.0.1", app="other"))
    store.create("Service", service())
    (slice_,) = slices(store)
    assert slice_["endpoints"] == []


def test_service_deletion_removes_slices(store: ObjectStore) -> None:
    store.create("Pod", pod("a", "10.0.0.1"))
    store.create("Service", service())
    assert slices(store)
    store.delete("Service", "ns", "web")
    assert slices(store) == []


def test_selectorless_and_external_name_get_no_slices(store: ObjectStore) -> None:
    store.create("Service", {**service("manual"), "spec": {"ports": [{"port": 80}]}})
    store.create("Service", service("ext", type="ExternalName", externalName="example.com"))
    assert slices(store, "manual") == [] and slices(store, "ext") == []


def test_prefer_close_hints_and_zones(store: ObjectStore) -> None:
    store.create("Node", {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}}})
    store.create("Pod", pod("a", "10.0.0.1"))
    store.create("Pod", pod("b", "10.0.0.2", node="n2"))
    store.create("Service", service(trafficDistribution="PreferClose"))
    eps = endpoints(store)
    assert eps["10.0.0.1"]["zone"] == "z1" and eps["10.0.0.1"]["hints"] == {"forZones": [{"name": "z1"}]}
    assert "zone" not in eps["10.0.0.2"] and "hints" not in eps["10.0.0.2"]
    store.create("Node", {"metadata": {"name": "n2", "labels": {"topology.kubernetes.io/zone": "z2"}}})
    assert endpoints(store)["10.0.0.2"]["hints"] == {"forZones": [{"name": "z2"}]}


def test_labels_mirrored_for_kube_proxy_selector(store: ObjectStore) -> None:
    store.create("Service", service("hl", clusterIP="None"))
    store.create("Service", service("owned", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    assert "service.kubernetes.io/headless" in slices(store, "hl")[0]["metadata"]["labels"]
    owned = slices(store, "owned")[0]["metadata"]["labels"]
    assert owned["service.kubernetes.io/service-proxy-name"] == "other"


def test_no_spurious_slice_writes(store: ObjectStore) -> None:
    store.create("Service", service())
    store.create("Pod", pod("a", "10.0.0.1"))
    writes: list[str] = []
    store.subscribe(lambda kind, event_type, obj: writes.append(kind) if kind == "EndpointSlice" else None)
    unrelated = pod("a", "10.0.0.1")
    unrelated["metadata"]["annotations"] = {"x": "y"}
    store.update("Pod", unrelated)
    store.create("Service", service("other-svc", target=9999, selector={"app": "none"}))
    assert writes == ["EndpointSlice"]  # only the new Service's placeholder slice


def test_malformed_service_is_tolerated(store: ObjectStore) -> None:
    store.put_raw(
        "Service", {"metadata": {"name": "bad", "namespace": "ns"}, "spec": {"selector": {"app": "web"}}}
    )
    store.create("Pod", pod("a", "10.0.0.1"))
    store.create("Service", service())
    assert endpoints(store).keys() == {"10.0.0.1"}
