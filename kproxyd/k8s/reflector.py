"""List/watch of one resource into an ObjectHandler, with resume, 410 re-list and backoff, like client-go."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import kubernetes
import orjson
import structlog

log = structlog.get_logger(__name__)

# kube-proxy's selector: Services (and their slices) another proxy owns, and headless ones, are not ours.
PROXY_LABEL_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


@dataclass(frozen=True, slots=True)
class Resource:
    """A listable kind: its name, the generated API class and its all-namespaces list method."""

    kind: str
    api: Callable[[kubernetes.client.ApiClient], Any]
    list_method: str


SERVICES = Resource("Service", kubernetes.client.CoreV1Api, "list_service_for_all_namespaces")
ENDPOINT_SLICES = Resource(
    "EndpointSlice", kubernetes.client.DiscoveryV1Api, "list_endpoint_slice_for_all_namespaces"
)
NODES = Resource("Node", kubernetes.client.CoreV1Api, "list_node")

_API_VERSIONS = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1", "Node": "v1"}


class ObjectHandler(Protocol):
    """Receives a reflector's objects as plain dicts; called from the reflector's thread."""

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        """The complete current set, after every (re)list."""

    def upsert(self, kind: str, obj: dict[str, Any]) -> None:
        """An object was added or modified."""

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        """An object was deleted (obj is its last state)."""


class _Gone(Exception):
    """The resourceVersion we watch from is no longer in the server's history: re-list."""


class _WatchError(Exception):
    """The server ended the watch with an ERROR event other than 410."""


class _Backoff:
    """Jittered exponential backoff: initial doubling up to maximum, reset after a success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self._attempts = 0

    def next(self) -> float:
        """The next delay, in seconds."""
        delay = min(self.maximum, self.initial * 2**self._attempts)
        self._attempts = min(self._attempts + 1, 32)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Start again from the initial delay."""
        self._attempts = 0


def _lines(response: Any) -> Iterator[bytes]:
    """The non-empty lines of a streamed HTTP body, as soon as each arrives."""
    chunks = response.read_chunked() if response.chunked else iter(lambda: response.read1(65536), b"")
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def _name(meta: dict[str, Any]) -> str:
    """namespace/name of an object's metadata (name alone for cluster-scoped objects)."""
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}".lstrip("/")


def _describe(err: Exception) -> str:
    """A short, secret-free description of a request failure."""
    if isinstance(err, kubernetes.client.ApiException):
        return f"HTTP {err.status} {err.reason}"
    return f"{type(err).__name__}: {str(err)[:200]}"


class Reflector:
    """Keeps an ObjectHandler in step with one resource of the API server, from a daemon thread."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        resource: Resource,
        handler: ObjectHandler,
        label_selector: str = "",
        field_selector: str = "",
        *,
        watch_timeout: float = 300.0,
        read_timeout: float = 90.0,
        connect_timeout: float = 10.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        self.resource = resource
        self.handler = handler
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self._list_fn = getattr(resource.api(api_client), resource.list_method)
        self._timeouts = (connect_timeout, read_timeout)
        self._backoff = _Backoff(backoff_initial, backoff_max)
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._response_lock = threading.Lock()
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self.resource_version = ""
        self.watch_attempts = 0  # watch requests tried so far, failed ones included

    def start(self) -> None:
        """List and watch in a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.resource.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, cutting an open watch."""
        self._stop.set()
        with self._response_lock:
            if self._response is not None:
                with contextlib.suppress(Exception):
                    self._response.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list has been handed to the handler (waits up to timeout seconds)."""
        return self._synced.wait(timeout)

    def _run(self) -> None:
        relist = True
        while not self._stop.is_set():
            try:
                if relist:
                    self._list()
                    relist = False
                self._watch()
            except _Gone:
                log.info(
                    "watch expired, re-listing", kind=self.resource.kind, resource_version=self.resource_version
                )
                relist = True
            except Exception as err:
                if self._stop.is_set():
                    break
                if isinstance(err, kubernetes.client.ApiException) and err.status == 410:
                    log.info("watch expired, re-listing", kind=self.resource.kind)
                    relist = True
                    continue
                relist = relist or isinstance(err, _WatchError)
                delay = self._backoff.next()
                log.warning(
                    "list/watch failed, reconnecting",
                    kind=self.resource.kind,
                    error=_describe(err),
                    backoff_seconds=round(delay, 3),
                    relist=relist,
                )
                self._stop.wait(delay)

    def _request(self, **params: Any) -> Any:
        if self.label_selector:
            params["label_selector"] = self.label_selector
        if self.field_selector:
            params["field_selector"] = self.field_selector
        return self._list_fn(_preload_content=False, _request_timeout=self._timeouts, **params)

    def _list(self) -> None:
        log.info("listing", kind=self.resource.kind, label_selector=self.label_selector)
        response = self._request()
        try:
            body = orjson.loads(response.data)
        finally:
            response.release_conn()
        items: list[dict[str, Any]] = body.get("items") or []
        for item in items:
            item.setdefault("kind", self.resource.kind)
            item.setdefault("apiVersion", _API_VERSIONS[self.resource.kind])
        self.resource_version = body["metadata"]["resourceVersion"]
        self._backoff.reset()
        log.info("listed", kind=self.resource.kind, count=len(items), resource_version=self.resource_version)
        try:
            self.handler.replace(self.resource.kind, items)
        except Exception:
            log.exception("handler failed on replace", kind=self.resource.kind, count=len(items))
        self._synced.set()

    def _watch(self) -> None:
        """One watch request from resource_version, until the server ends it or stop()."""
        timeout = max(1, int(self.watch_timeout * (1 + random.random())))
        log.info("watching", kind=self.resource.kind, resource_version=self.resource_version, timeout=timeout)
        self.watch_attempts += 1
        response = self._request(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
        )
        with self._response_lock:
            self._response = response
        try:
            for line in _lines(response):
                self._backoff.reset()
                self._event(orjson.loads(line))
                if self._stop.is_set():
                    return
        finally:
            with self._response_lock:
                self._response = None
            response.release_conn()

    def _event(self, event: dict[str, Any]) -> None:
        event_type, obj = event.get("type"), event.get("object") or {}
        if event_type == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(obj.get("message", ""))
            raise _WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        meta = obj.get("metadata") or {}
        if event_type in ("ADDED", "MODIFIED", "DELETED"):
            obj.setdefault("kind", self.resource.kind)
            obj.setdefault("apiVersion", _API_VERSIONS[self.resource.kind])
            method = self.handler.delete if event_type == "DELETED" else self.handler.upsert
            try:
                method(self.resource.kind, obj)
            except Exception:
                log.exception("handler failed", kind=self.resource.kind, event_type=event_type, object=_name(meta))
            else:
                log.debug(
                    "watch event handled",
                    kind=self.resource.kind,
                    event_type=event_type,
                    object=_name(meta),
                    resource_version=meta.get("resourceVersion"),
                )
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
