"""The lab API server against the official kubernetes client: CRUD, defaulting, list/watch protocol."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import orjson
import pytest

from kproxyd.lab.apiserver import LabApiServer, write_kubeconfig

PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


@pytest.fixture
def core(server: LabApiServer, tmp_path: Path) -> Iterator[kubernetes.client.CoreV1Api]:
    path = tmp_path / "kubeconfig"
    write_kubeconfig(path, server.url)
    api = kubernetes.config.new_client_from_config(config_file=str(path))
    try:
        yield kubernetes.client.CoreV1Api(api)
    finally:
        api.close()


def svc_body(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"port": 80}])
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"selector": {"app": name}, **spec}}


def raw_watch(core: kubernetes.client.CoreV1Api, until: int = 0, **params: Any) -> list[dict[str, Any]]:
    """Events of one Service watch: until that many non-bookmark events, else until the 1 s timeout."""
    params.setdefault("timeout_seconds", 1)
    response = core.list_service_for_all_namespaces(watch=True, _preload_content=False, **params)
    events: list[dict[str, Any]] = []
    try:
        for chunk in response.read_chunked():
            events += [orjson.loads(line) for line in chunk.splitlines() if line.strip()]
            if until and len(names(events)) >= until:
                break
    finally:
        response.close()
    return events


def names(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events if e["type"] != "BOOKMARK"]


def test_create_defaults_and_allocates(core: kubernetes.client.CoreV1Api) -> None:
    svc = core.create_namespaced_service("default", svc_body("web", type="NodePort"))
    assert ipaddress.ip_address(svc.spec.cluster_ip) in ipaddress.ip_network("10.96.0.0/16")
    assert svc.spec.cluster_ips == [svc.spec.cluster_ip]
    port = svc.spec.ports[0]
    assert (port.protocol, port.target_port) == ("TCP", 80)
    assert 30000 <= port.node_port <= 32767
    assert svc.spec.session_affinity == "None"
    assert svc.spec.external_traffic_policy == "Cluster"
    assert svc.spec.internal_traffic_policy == "Cluster"
    assert svc.metadata.uid and svc.metadata.creation_timestamp and svc.metadata.resource_version

    lb = core.create_namespaced_service(
        "default", svc_body("lb", type="LoadBalancer", externalTrafficPolicy="Local")
    )
    assert 30000 <= lb.spec.health_check_node_port <= 32767
    assert lb.spec.health_check_node_port != lb.spec.ports[0].node_port != port.node_port
    headless = core.create_namespaced_service("default", svc_body("hl", clusterIP="None", ports=[]))
    assert headless.spec.cluster_ip == "None"


def test_get_list_replace_delete(core: kubernetes.client.CoreV1Api) -> None:
    created = core.create_namespaced_service("ns1", svc_body("a"))
    got = core.read_namespaced_service("a", "ns1")
    assert got.spec.cluster_ip == created.spec.cluster_ip
    got.spec.ports[0].port = 8080
    replaced = core.replace_namespaced_service("a", "ns1", got)
    assert replaced.spec.ports[0].port == 8080
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    assert replaced.spec.cluster_ip == created.spec.cluster_ip
    assert [s.metadata.name for s in core.list_service_for_all_namespaces().items] == ["a"]
    assert core.list_namespaced_service("other").items == []
    core.delete_namespaced_service("a", "ns1")
    with pytest.raises(kubernetes.client.ApiException) as err:
        core.read_namespaced_service("a", "ns1")
    assert err.value.status == 404


def test_errors_are_status_objects(core: kubernetes.client.CoreV1Api) -> None:
    first = core.create_namespaced_service("default", svc_body("a", type="NodePort"))
    taken = first.spec.ports[0].node_port
    cases: list[tuple[dict[str, Any], int]] = [
        (svc_body("a"), 409),
        (svc_body("dup", type="NodePort", ports=[{"port": 80, "nodePort": taken}]), 422),
        (svc_body("range", type="NodePort", ports=[{"port": 80, "nodePort": 80}]), 422),
        (svc_body("noports", ports=[]), 422),
    ]
    for body, code in cases:
        with pytest.raises(kubernetes.client.ApiException) as err:
            core.create_namespaced_service("default", body)
        assert err.value.status == code
        assert orjson.loads(err.value.body)["kind"] == "Status"
    stale = core.read_namespaced_service("a", "default")
    core.replace_namespaced_service("a", "default", stale)
    with pytest.raises(kubernetes.client.ApiException) as err:
        core.replace_namespaced_service("a", "default", stale)
    assert err.value.status == 409


def test_delete_releases_allocations(core: kubernetes.client.CoreV1Api) -> None:
    body = svc_body("a", type="NodePort", clusterIP="10.96.5.5", ports=[{"port": 80, "nodePort": 31000}])
    core.create_namespaced_service("default", body)
    core.delete_namespaced_service("a", "default")
    again = core.create_namespaced_service("default", body)
    assert (again.spec.cluster_ip, again.spec.ports[0].node_port) == ("10.96.5.5", 31000)


def test_watch_streams_changes_after_resource_version(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_service("default", svc_body("before"))
    start = core.list_service_for_all_namespaces().metadata.resource_version
    svc = core.create_namespaced_service("default", svc_body("a"))
    svc.metadata.labels = {"x": "y"}
    core.replace_namespaced_service("a", "default", svc)
    core.delete_namespaced_service("a", "default")
    events = raw_watch(core, until=3, resource_version=start)
    assert names(events) == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert names(raw_watch(core, until=1, resource_version="0")) == [("ADDED", "before")]


def test_official_watch_and_bookmarks(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_service("default", svc_body("a"))
    stream = kubernetes.watch.Watch().stream(
        core.list_service_for_all_namespaces, timeout_seconds=1, allow_watch_bookmarks=True
    )
    events = list(stream)
    assert events[0]["type"] == "ADDED" and events[0]["object"].metadata.name == "a"
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and bookmarks[-1]["raw_object"]["metadata"]["resourceVersion"] == "1"
    assert not any(e["type"] == "BOOKMARK" for e in raw_watch(core, resource_version="1"))


def test_compacted_history_gives_410(server: LabApiServer, core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_service("default", svc_body("a"))
    core.create_namespaced_service("default", svc_body("b"))
    server.store.compact()
    events = raw_watch(core, resource_version="1")
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith("too old resource version: 1")
    assert raw_watch(core, resource_version="2") == []


def test_bounded_history_expires_old_versions() -> None:
    srv = LabApiServer(history=2)
    try:
        for name in "abc":
            srv.store.create("Node", {"metadata": {"name": name}})
        assert srv.store.events_after(1)[0].obj["metadata"]["name"] == "b"
        with pytest.raises(Exception, match="too old resource version: 0"):
            srv.store.events_after(0)
    finally:
        srv.stop()


def test_label_and_field_selectors(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_service("default", svc_body("plain", {"tier": "web"}))
    core.create_namespaced_service("default", svc_body("other", {"service.kubernetes.io/service-proxy-name": "x"}))
    core.create_namespaced_service("default", svc_body("hl", {"service.kubernetes.io/headless": ""}))
    core.create_namespaced_service("ns2", svc_body("db", {"tier": "db"}))

    def listed(**kw: str) -> list[str]:
        return sorted(s.metadata.name for s in core.list_service_for_all_namespaces(**kw).items)

    assert listed(label_selector=PROXY_SELECTOR) == ["db", "plain"]
    assert listed(label_selector="tier in (web,db)") == ["db", "plain"]
    assert listed(label_selector="tier notin (web)") == ["db", "hl", "other"]
    assert listed(label_selector="tier!=web,tier") == ["db"]
    assert listed(label_selector="tier==db") == ["db"]
    assert listed(field_selector="metadata.name=plain") == ["plain"]
    assert listed(field_selector="metadata.namespace=ns2") == ["db"]
    with pytest.raises(kubernetes.client.ApiException) as err:
        listed(label_selector="tier in web")
    assert err.value.status == 400


def test_watch_sends_deleted_when_object_leaves_selector(core: kubernetes.client.CoreV1Api) -> None:
    svc = core.create_namespaced_service("default", svc_body("a"))
    svc.metadata.labels = {"service.kubernetes.io/headless": ""}
    core.replace_namespaced_service("a", "default", svc)
    assert names(raw_watch(core, resource_version="0", label_selector=PROXY_SELECTOR)) == []
    events = raw_watch(
        core, until=1, resource_version=svc.metadata.resource_version, label_selector=PROXY_SELECTOR
    )
    assert names(events) == [("DELETED", "a")]


def test_put_raw_skips_validation(server: LabApiServer, core: kubernetes.client.CoreV1Api) -> None:
    server.store.put_raw("Service", {"metadata": {"name": "bad", "namespace": "default"}, "spec": {"ports": "x"}})
    response = core.list_service_for_all_namespaces(_preload_content=False)
    items = orjson.loads(response.data)["items"]
    assert items[0]["spec"] == {"ports": "x"} and items[0]["metadata"]["resourceVersion"] == "1"


def test_other_kinds_and_discovery(server: LabApiServer, core: kubernetes.client.CoreV1Api) -> None:
    core.create_node({"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}}})
    assert core.read_node("n1").metadata.labels["topology.kubernetes.io/zone"] == "z"
    pod = core.create_namespaced_pod("default", {"metadata": {"name": "p"}, "spec": {"containers": []}})
    pod.status = {"podIP": "10.0.0.5"}
    core.replace_namespaced_pod_status("p", "default", pod)
    assert core.read_namespaced_pod("p", "default").status.pod_ip == "10.0.0.5"
    slices = kubernetes.client.DiscoveryV1Api(core.api_client)
    body = {"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": []}
    slices.create_namespaced_endpoint_slice("default", body)
    assert [s.metadata.name for s in slices.list_endpoint_slice_for_all_namespaces().items] == ["s"]
    assert kubernetes.client.VersionApi(core.api_client).get_code().major == "1"
    assert core.get_api_resources().group_version == "v1"


def test_restart_on_same_port_over_same_store(server: LabApiServer, core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_service("default", svc_body("a"))
    server.stop()
    with pytest.raises(Exception):  # noqa: B017 - urllib3 raises a MaxRetryError wrapped by the client
        core.list_service_for_all_namespaces(_request_timeout=2)
    again = LabApiServer(store=server.store, port=server.port)
    again.start()
    try:
        assert [s.metadata.name for s in core.list_service_for_all_namespaces().items] == ["a"]
    finally:
        again.stop()
