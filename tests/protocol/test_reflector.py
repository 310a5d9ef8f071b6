"""The daemon's Reflector against the lab API server: list, watch, resume, 410 re-list, reconnect."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kproxyd.k8s.client import build_api_client
from kproxyd.k8s.reflector import NODES, PROXY_LABEL_SELECTOR, SERVICES, Reflector
from kproxyd.lab.apiserver import LabApiServer, write_kubeconfig
from kproxyd.lab.store import ObjectStore


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll condition until it holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class Recorder:
    """An ObjectHandler that keeps the current set by namespace/name and counts replaces."""

    def __init__(self, fail_on: str = "") -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, Any]] = {}
        self.replaces = 0
        self.fail_on = fail_on

    @staticmethod
    def key(obj: dict[str, Any]) -> str:
        return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        with self.lock:
            self.objects = {self.key(o): o for o in objects}
            self.replaces += 1

    def upsert(self, kind: str, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == self.fail_on:
            raise RuntimeError("handler bug")
        with self.lock:
            self.objects[self.key(obj)] = obj

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.objects.pop(self.key(obj), None)

    def names(self) -> set[str]:
        with self.lock:
            return set(self.objects)


def service(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": labels or {}},
        "spec": {"ports": [{"port": 80}]},
    }


@pytest.fixture
def reflectors(server: LabApiServer) -> Iterator[Callable[..., Reflector]]:
    started: list[Reflector] = []
    clients: list[kubernetes.client.ApiClient] = []

    def make(handler: Recorder, resource: Any = SERVICES, **kwargs: Any) -> Reflector:
        clients.append(build_api_client(None, server.url))
        kwargs = {"read_timeout": 2.0, "backoff_initial": 0.05, "backoff_max": 0.3, **kwargs}
        reflector = Reflector(clients[-1], resource, handler, **kwargs)
        reflector.start()
        started.append(reflector)
        assert reflector.wait_synced(10)
        return reflector

    try:
        yield make
    finally:
        for reflector in started:
            reflector.stop()
        for client in clients:
            client.close()


def test_list_then_watch_events(server: LabApiServer, reflectors: Callable[..., Reflector]) -> None:
    store = server.store
    store.create("Service", service("a"))
    store.create("Service", service("other", {"service.kubernetes.io/service-proxy-name": "x"}))
    handler = Recorder()
    reflectors(handler, label_selector=PROXY_LABEL_SELECTOR)
    assert handler.names() == {"ns/a"} and handler.replaces == 1
    store.create("Service", service("b"))
    svc = store.get("Service", "ns", "a")
    assert svc is not None
    svc["spec"]["ports"][0]["port"] = 81
    store.update("Service", svc)
    wait_until(lambda: handler.objects.get("ns/a", {}).get("spec", {}).get("ports", [{}])[0].get("port") == 81)
    store.delete("Service", "ns", "b")
    svc["metadata"] = {**svc["metadata"], "labels": {"service.kubernetes.io/headless": ""}, "resourceVersion": ""}
    store.update("Service", svc)
    wait_until(lambda: handler.names() == set())
    assert handler.replaces == 1


def test_resumes_after_watch_timeout_without_relist(
    server: LabApiServer, reflectors: Callable[..., Reflector]
) -> None:
    handler = Recorder()
    reflector = reflectors(handler, watch_timeout=0.5)  # timeoutSeconds=1: the server ends each watch
    wait_until(lambda: reflector.watch_attempts >= 2)
    server.store.create("Service", service("late"))
    wait_until(lambda: handler.names() == {"ns/late"})
    assert handler.replaces == 1


def test_node_field_selector(server: LabApiServer, reflectors: Callable[..., Reflector]) -> None:
    server.store.create("Node", {"metadata": {"name": "me"}})
    server.store.create("Node", {"metadata": {"name": "other"}})
    handler = Recorder()
    reflectors(handler, NODES, field_selector="metadata.name=me")
    assert handler.names() == {"/me"}


def test_handler_exception_does_not_kill_reflector(
    server: LabApiServer, reflectors: Callable[..., Reflector]
) -> None:
    handler = Recorder(fail_on="boom")
    reflectors(handler)
    server.store.create("Service", service("boom"))
    server.store.create("Service", service("fine"))
    wait_until(lambda: handler.names() == {"ns/fine"})


def restart(server: LabApiServer, during_outage: Callable[[ObjectStore], None]) -> LabApiServer:
    """Stop the server, change the store while it is down, and start a new server on the same port."""
    server.stop()
    during_outage(server.store)
    again = LabApiServer(store=server.store, port=server.port, bookmark_interval=0.2)
    again.start()
    return again


def test_reconnects_after_server_restart_and_resumes(
    server: LabApiServer, reflectors: Callable[..., Reflector]
) -> None:
    server.store.create("Service", service("a"))
    handler = Recorder()
    reflector = reflectors(handler)
    watches = reflector.watch_attempts

    def outage(store: ObjectStore) -> None:
        wait_until(lambda: reflector.watch_attempts > watches + 1)  # retried against the dead server
        store.create("Service", service("b"))
        store.delete("Service", "ns", "a")

    again = restart(server, outage)
    try:
        wait_until(lambda: handler.names() == {"ns/b"})
        assert handler.replaces == 1
    finally:
        again.stop()


def test_relists_after_410(server: LabApiServer, reflectors: Callable[..., Reflector]) -> None:
    server.store.create("Service", service("a"))
    server.store.create("Service", service("keep"))
    handler = Recorder()
    reflectors(handler)

    def outage(store: ObjectStore) -> None:
        store.delete("Service", "ns", "a")
        store.create("Service", service("c"))
        store.compact()

    again = restart(server, outage)
    try:
        wait_until(lambda: handler.replaces == 2)
        assert handler.names() == {"ns/keep", "ns/c"}
        again.store.create("Service", service("d"))
        wait_until(lambda: handler.names() == {"ns/keep", "ns/c", "ns/d"})
    finally:
        again.stop()


def test_build_api_client_from_kubeconfig_with_master_override(server: LabApiServer, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    write_kubeconfig(path, "http://127.0.0.1:1")
    for client in (build_api_client(str(path), server.url), build_api_client(None, server.url)):
        try:
            assert kubernetes.client.CoreV1Api(client).list_node().items == []
        finally:
            client.close()
    unreachable = build_api_client(str(path), None)
    try:
        assert unreachable.configuration.host == "http://127.0.0.1:1"
    finally:
        unreachable.close()
