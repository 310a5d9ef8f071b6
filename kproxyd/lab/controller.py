"""The lab's EndpointSlice controller: derives Services' EndpointSlices from Pods, like kube-controller-manager."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from kproxyd.lab.store import Obj, ObjectStore, now_rfc3339, object_key

log = structlog.get_logger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"

PortKey = tuple[tuple[str, str, int], ...]  # (name, protocol, resolved port) per Service port


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _labels(obj: Obj) -> dict[str, Any]:
    return _dict(_dict(obj.get("metadata")).get("labels"))


def _selects(selector: Mapping[str, Any], pod: Obj) -> bool:
    labels = _labels(pod)
    return all(labels.get(k) == v for k, v in selector.items())


def _selector(svc: Obj) -> dict[str, Any]:
    """The Service's selector when this controller manages its slices, else {}."""
    spec = _dict(svc.get("spec"))
    return {} if spec.get("type") == "ExternalName" else _dict(spec.get("selector"))


def _named_port(pod: Obj, name: str, protocol: str) -> int | None:
    for container in _dict(pod.get("spec")).get("containers") or []:
        for port in _dict(container).get("ports") or []:
            if port.get("name") == name and port.get("protocol", "TCP") == protocol:
                number = port.get("containerPort")
                return number if isinstance(number, int) else None
    return None


def _resolve_ports(svc: Obj, pod: Obj) -> PortKey | None:
    """The Service's ports with targetPort resolved for this pod; None when a named port is missing."""
    resolved = []
    for port in _dict(svc.get("spec")).get("ports") or []:
        protocol = port.get("protocol", "TCP")
        target = port.get("targetPort", port.get("port"))
        if isinstance(target, str) and not target.isdigit():
            number = _named_port(pod, target, protocol)
            if number is None:
                return None
        else:
            number = int(target)
        resolved.append((str(port.get("name", "")), protocol, number))
    return tuple(resolved)


def _scheduled_and_alive(pod: Obj) -> bool:
    phase = _dict(pod.get("status")).get("phase")
    return bool(_dict(pod.get("spec")).get("nodeName")) and phase not in ("Succeeded", "Failed")


def _pod_ip(pod: Obj, family: str) -> str | None:
    status = _dict(pod.get("status"))
    ips = [_dict(entry).get("ip") for entry in status.get("podIPs") or []] or [status.get("podIP")]
    for ip in ips:
        if isinstance(ip, str) and ip and (":" in ip) == (family == "IPv6"):
            return ip
    return None


def _endpoint(svc: Obj, pod: Obj, ip: str, zones: Mapping[str, str]) -> Obj:
    """The EndpointSlice endpoint for one pod address, with conditions, topology and hints."""
    spec, meta = _dict(svc.get("spec")), _dict(pod.get("metadata"))
    conditions = _dict(pod.get("status")).get("conditions") or []
    pod_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    terminating = bool(meta.get("deletionTimestamp"))
    publish = bool(spec.get("publishNotReadyAddresses"))
    node = _dict(pod.get("spec")).get("nodeName")
    endpoint: Obj = {
        "addresses": [ip],
        "conditions": {
            "ready": publish or (pod_ready and not terminating),
            "serving": publish or pod_ready,
            "terminating": terminating,
        },
        "nodeName": node,
        "targetRef": {
            "kind": "Pod",
            "namespace": meta.get("namespace"),
            "name": meta.get("name"),
            "uid": meta.get("uid"),
        },
    }
    zone = zones.get(str(node))
    if zone:
        endpoint["zone"] = zone
        if spec.get("trafficDistribution") == "PreferClose":
            endpoint["hints"] = {"forZones": [{"name": zone}]}
    return endpoint


def _slice_name(service: str, family: str, ports: PortKey) -> str:
    digest = hashlib.sha256(repr((family, ports)).encode()).hexdigest()[:5]
    return f"{service}-{digest}"


def _content(slice_: Obj) -> tuple[Any, ...]:
    """What a slice write would change (everything but the trigger-time annotation)."""
    meta = _dict(slice_.get("metadata"))
    fields = (slice_.get("addressType"), slice_.get("endpoints"), slice_.get("ports"))
    return (meta.get("labels"), meta.get("ownerReferences"), *fields)


class EndpointsController:
    """Keeps the EndpointSlices of every selector Service in an ObjectStore in step with its Pods."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._members: dict[tuple[str, str], set[str]] = {}
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        """Subscribe to the store and reconcile every Service once."""
        with self.store.lock:
            self._unsubscribe = self.store.subscribe(self._on_event)
            self.sync_all()

    def stop(self) -> None:
        """Stop following the store (existing slices stay)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def sync_all(self) -> None:
        """Reconcile every Service, and drop managed slices whose Service is gone."""
        with self.store.lock:
            names = {object_key(svc) for svc in self.store.list("Service")}
            for slice_ in self.store.list("EndpointSlice"):
                if _labels(slice_).get(MANAGED_BY_LABEL) == MANAGED_BY:
                    names.add((object_key(slice_)[0], str(_labels(slice_).get(SERVICE_NAME_LABEL))))
            for namespace, name in sorted(names):
                self.sync_service(namespace, name)

    def sync_service(self, namespace: str, name: str) -> None:
        """Bring the Service's slices to what its Pods say; never raises (malformed objects are logged)."""
        try:
            with self.store.lock:
                self._sync(namespace, name)
        except Exception:
            log.exception("endpointslice sync failed", namespace=namespace, service=name)

    def _on_event(self, kind: str, event_type: str, obj: Obj) -> None:
        namespace, name = object_key(obj)
        if kind == "Service":
            self.sync_service(namespace, name)
        elif kind == "Pod":
            for svc in self.store.list("Service", namespace):
                key = object_key(svc)
                selector = _selector(svc)
                if (selector and _selects(selector, obj)) or name in self._members.get(key, ()):
                    self.sync_service(*key)
        elif kind == "Node":
            self.sync_all()
        elif event_type == "DELETED" and _labels(obj).get(MANAGED_BY_LABEL) == MANAGED_BY:
            self.sync_service(namespace, str(_labels(obj).get(SERVICE_NAME_LABEL)))

    def _sync(self, namespace: str, name: str) -> None:
        svc = self.store.get("Service", namespace, name)
        if svc is None:
            self._members.pop((namespace, name), None)
        desired = self._desired(svc) if svc is not None else {}
        existing = {
            object_key(s)[1]: s
            for s in self.store.list("EndpointSlice", namespace)
            if _labels(s).get(SERVICE_NAME_LABEL) == name and _labels(s).get(MANAGED_BY_LABEL) == MANAGED_BY
        }
        for slice_name, slice_ in desired.items():
            old = existing.get(slice_name)
            if old is None:
                self.store.create("EndpointSlice", slice_)
            elif _content(old) != _content(slice_):
                self.store.update("EndpointSlice", slice_)
        for slice_name in existing.keys() - desired.keys():
            self.store.delete("EndpointSlice", namespace, slice_name)

    def _desired(self, svc: Obj) -> dict[str, Obj]:
        """The slices the Service should have, by name; {} when the controller doesn't manage it."""
        key = object_key(svc)
        selector = _selector(svc)
        if not selector:
            self._members.pop(key, None)
            return {}
        zones = {
            object_key(n)[1]: str(_labels(n)[ZONE_LABEL])
            for n in self.store.list("Node")
            if ZONE_LABEL in _labels(n)
        }
        families = _dict(svc.get("spec")).get("ipFamilies") or ["IPv4"]
        groups: dict[tuple[str, PortKey], list[Obj]] = {}
        members: set[str] = set()
        pods = sorted(self.store.list("Pod", key[0]), key=lambda p: object_key(p)[1])
        for pod in (p for p in pods if _selects(selector, p)):
            members.add(object_key(pod)[1])
            ports = _resolve_ports(svc, pod)
            if ports is None or not _scheduled_and_alive(pod):
                continue
            for family in families:
                if (ip := _pod_ip(pod, family)) is not None:
                    groups.setdefault((family, ports), []).append(_endpoint(svc, pod, ip, zones))
        self._members[key] = members
        if not groups:
            groups[(families[0], ())] = []
        return {
            _slice_name(key[1], family, ports): self._slice(svc, family, ports, endpoints)
            for (family, ports), endpoints in groups.items()
        }

    @staticmethod
    def _slice(svc: Obj, family: str, ports: PortKey, endpoints: list[Obj]) -> Obj:
        meta = _dict(svc.get("metadata"))
        labels = {**_labels(svc), SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: MANAGED_BY}
        if _dict(svc.get("spec")).get("clusterIP") == "None":
            labels[HEADLESS_LABEL] = ""
        owner = {
            "apiVersion": "v1",
            "kind": "Service",
            "name": meta["name"],
            "uid": meta.get("uid"),
            "controller": True,
            "blockOwnerDeletion": True,
        }
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": _slice_name(meta["name"], family, ports),
                "namespace": meta.get("namespace"),
                "labels": labels,
                "annotations": {TRIGGER_TIME: now_rfc3339()},
                "ownerReferences": [owner],
            },
            "addressType": family,
            "endpoints": endpoints,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
        }
