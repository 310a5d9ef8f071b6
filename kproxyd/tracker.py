"""The current Services, EndpointSlices and Node, and which Services changed since the last sync.

Informer callbacks only convert and record here (as kube-proxy's change trackers do); the sync thread takes
the changes. A malformed object is logged with its name and treated as absent, so it harms nothing else.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from kproxyd.k8s.convert import (
    ConversionError,
    ConvertedService,
    ConvertedSlice,
    convert_endpoint_slice,
    convert_node,
    convert_service,
    object_key,
)
from kproxyd.model import Endpoint, NodeInfo, ProxyState, ServicePort, ServicePortName

log = structlog.get_logger(__name__)

SERVICE, ENDPOINT_SLICE, NODE = "Service", "EndpointSlice", "Node"


@dataclass(frozen=True, slots=True)
class ServiceView:
    """One Service as the sync sees it: its ports in this IP family and their merged endpoints."""

    key: str
    ports: tuple[ServicePort, ...]
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]]


@dataclass(frozen=True, slots=True)
class Changes:
    """What a sync has to do: the changed Services (None: all of them, a full sync) and this node."""

    services: Mapping[str, ServiceView]
    full: bool
    node: NodeInfo
    service_events: int
    endpoint_events: int
    trigger_times: Mapping[str, float] = field(default_factory=dict)  # Service → its oldest slice change


def _family_of(ip: str) -> int:
    return ipaddress.ip_address(ip.split("/")[0]).version


def port_for_family(port: ServicePort, family: int) -> ServicePort | None:
    """The part of a ServicePort in one IP family, or None when it has no cluster IP of that family."""
    cluster_ips = tuple(ip for ip in port.cluster_ips if _family_of(ip) == family)
    if not cluster_ips:
        return None
    return replace(
        port,
        cluster_ips=cluster_ips,
        external_ips=tuple(ip for ip in port.external_ips if _family_of(ip) == family),
        load_balancer_ips=tuple(ip for ip in port.load_balancer_ips if _family_of(ip) == family),
        load_balancer_source_ranges=tuple(
            cidr for cidr in port.load_balancer_source_ranges if _family_of(cidr) == family
        ),
    )


class ProxyStateTracker:
    """Holds converted API objects for one IP family and records which Services changed (an ObjectHandler)."""

    def __init__(self, node_name: str, family: int = 4, on_change: Callable[[], None] | None = None) -> None:
        self._family = family
        self._on_change = on_change or (lambda: None)
        self._lock = threading.Lock()
        self._services: dict[str, ConvertedService] = {}
        self._slices: dict[str, ConvertedSlice] = {}
        self._slices_by_service: dict[str, set[str]] = {}
        self._node = NodeInfo(name=node_name)
        self._pending: set[str] = set()
        self._full_pending = True
        self._service_events = 0
        self._endpoint_events = 0
        self._trigger_times: dict[str, float] = {}

    # ObjectHandler: called from the informer threads.

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        """A (re)list: the complete set of one kind; objects no longer present are removed."""
        if kind == NODE:
            for obj in objects:
                self.upsert(kind, obj)
            return
        current = self._services if kind == SERVICE else self._slices
        seen: set[str] = set()
        for obj in objects:
            self.upsert(kind, obj)
            seen.add(object_key(obj))
        for key in set(current) - seen:
            self._remove(kind, key)

    def upsert(self, kind: str, obj: dict[str, Any]) -> None:
        """An object was added or modified."""
        try:
            if kind == SERVICE:
                self._set_service(convert_service(obj))
            elif kind == ENDPOINT_SLICE:
                self._set_slice(convert_endpoint_slice(obj))
            elif kind == NODE:
                self._set_node(convert_node(obj))
        except ConversionError as err:
            log.error("invalid object skipped", kind=kind, object=object_key(obj), reason=str(err))
            self._remove(kind, object_key(obj))

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        """An object was deleted."""
        if kind != NODE:
            self._remove(kind, object_key(obj))

    # Read side: called from the sync thread.

    def take_changes(self) -> Changes:
        """The Services changed since the last call (all of them after a node change or at start)."""
        with self._lock:
            full = self._full_pending
            keys: Iterable[str] = set(self._services) | set(self._slices_by_service) if full else self._pending
            views = {key: self._view(key) for key in keys}
            changes = Changes(
                views, full, self._node, self._service_events, self._endpoint_events, self._trigger_times
            )
            self._pending, self._full_pending, self._trigger_times = set(), False, {}
            self._service_events = self._endpoint_events = 0
        return changes

    def request_full(self) -> None:
        """Make the next take_changes a full one (periodic resync, or after a failed apply)."""
        with self._lock:
            self._full_pending = True

    def snapshot(self) -> ProxyState:
        """Everything, as one ProxyState (for tools and tests; the sync uses take_changes)."""
        with self._lock:
            views = [self._view(key) for key in set(self._services) | set(self._slices_by_service)]
            node = self._node
        ports = {p.name: p for view in views for p in view.ports}
        endpoints = {name: eps for view in views for name, eps in view.endpoints.items() if name in ports}
        return ProxyState(ports=ports, endpoints=endpoints, node=node)

    @property
    def pending_events(self) -> tuple[int, int]:
        """(Service, EndpointSlice) changes recorded and not yet synced."""
        return self._service_events, self._endpoint_events

    @property
    def node(self) -> NodeInfo:
        """This node as last seen."""
        return self._node

    # Internals (the lock is taken here).

    def _set_service(self, converted: ConvertedService) -> None:
        for warning in converted.warnings:
            log.warning("service field ignored", object=converted.key, reason=warning)
        with self._lock:
            if self._services.get(converted.key) == converted:
                return
            self._services[converted.key] = converted
            self._mark(converted.key, service=True)

    def _set_slice(self, converted: ConvertedSlice) -> None:
        with self._lock:
            old = self._slices.get(converted.key)
            if old == converted:
                return
            if old is not None and old.service_key != converted.service_key:
                self._unlink_slice(old)
            self._slices[converted.key] = converted
            self._slices_by_service.setdefault(converted.service_key, set()).add(converted.key)
            if converted.trigger_time is not None:
                previous = self._trigger_times.get(converted.service_key, converted.trigger_time)
                self._trigger_times[converted.service_key] = min(previous, converted.trigger_time)
            self._mark(converted.service_key, service=False)

    def _set_node(self, node: NodeInfo) -> None:
        if node.name != self._node.name:
            return
        with self._lock:
            if node != self._node:
                self._node = node
                self._full_pending = True
                self._notify()

    def _remove(self, kind: str, key: str) -> None:
        with self._lock:
            if kind == SERVICE and self._services.pop(key, None) is not None:
                self._mark(key, service=True)
            elif kind == ENDPOINT_SLICE and (old := self._slices.pop(key, None)) is not None:
                self._unlink_slice(old)
                self._mark(old.service_key, service=False)

    def _unlink_slice(self, old: ConvertedSlice) -> None:
        keys = self._slices_by_service.get(old.service_key, set())
        keys.discard(old.key)
        if not keys:
            self._slices_by_service.pop(old.service_key, None)

    def _mark(self, service_key: str, *, service: bool) -> None:
        self._pending.add(service_key)
        if service:
            self._service_events += 1
        else:
            self._endpoint_events += 1
        self._notify()

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:  # a sync scheduler failure must not break the informer
            log.exception("change notification failed")

    def _view(self, key: str) -> ServiceView:
        converted = self._services.get(key)
        ports = tuple(
            p for p in (port_for_family(p, self._family) for p in (converted.ports if converted else ())) if p
        )
        merged: dict[ServicePortName, dict[tuple[str, int], Endpoint]] = {p.name: {} for p in ports}
        for slice_key in sorted(self._slices_by_service.get(key, ())):
            for name, endpoints in self._slices[slice_key].endpoints.items():
                if name in merged:
                    for ep in endpoints:
                        if _family_of(ep.ip) == self._family:
                            merged[name].setdefault((ep.ip, ep.port), ep)  # dedup across slices
        return ServiceView(key, ports, {name: tuple(eps.values()) for name, eps in merged.items()})


class FanOut:
    """Hands every informer event to several handlers: one ProxyStateTracker per IP family."""

    def __init__(self, handlers: Iterable[ProxyStateTracker]) -> None:
        self._handlers = tuple(handlers)

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        """A (re)list, to every handler."""
        for handler in self._handlers:
            handler.replace(kind, objects)

    def upsert(self, kind: str, obj: dict[str, Any]) -> None:
        """An added or modified object, to every handler."""
        for handler in self._handlers:
            handler.upsert(kind, obj)

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        """A deleted object, to every handler."""
        for handler in self._handlers:
            handler.delete(kind, obj)
