"""The lab API server's object store: resourceVersions, bounded watch history and Service allocation."""

from __future__ import annotations

import builtins
import datetime
import ipaddress
import itertools
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog

log = structlog.get_logger(__name__)

Obj = dict[str, Any]
Subscriber = Callable[[str, str, Obj], None]
UpdatePart = Literal["all", "spec", "status"]


@dataclass(frozen=True, slots=True)
class KindInfo:
    """How one kind is spelled in the API."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool


KINDS: dict[str, KindInfo] = {
    "Service": KindInfo("Service", "v1", "services", True),
    "EndpointSlice": KindInfo("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True),
    "Node": KindInfo("Node", "v1", "nodes", False),
    "Pod": KindInfo("Pod", "v1", "pods", True),
}


class ApiError(Exception):
    """A request the API server refuses; rendered as a Status object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Obj:
        """The Status object a real API server sends for this error."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def invalid(message: str) -> ApiError:
    """A 422 Invalid error."""
    return ApiError(422, "Invalid", message)


@dataclass(frozen=True, slots=True)
class Event:
    """One change in the store: obj is the new state (the last state for DELETED), prev the old one."""

    rv: int
    kind: str
    type: str
    obj: Obj
    prev: Obj | None


def clone(obj: Obj) -> Obj:
    """A deep copy of a JSON object (faster than copy.deepcopy)."""
    copied: Obj = orjson.loads(orjson.dumps(obj))
    return copied


def now_rfc3339() -> str:
    """The current time as the API spells timestamps."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of an object, tolerating malformed metadata."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return "", ""
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return labels if isinstance(labels, dict) else {}


_KEY = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^)]*)\)$")
_EQUALITY = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*([A-Za-z0-9._-]*)$")


def _split_requirements(selector: str) -> Iterator[str]:
    depth, start = 0, 0
    for i, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            yield selector[start:i].strip()
            start = i + 1
    yield selector[start:].strip()


def _requirement(text: str) -> Callable[[Mapping[str, Any]], bool]:
    if m := _EXISTS.match(text):
        negate, key = m.group(1) == "!", m.group(2)
        return lambda labels: (key in labels) != negate
    if m := _SET.match(text):
        key, op = m.group(1), m.group(2)
        values = {v.strip() for v in m.group(3).split(",")}
        if op == "in":
            return lambda labels: key in labels and labels[key] in values
        return lambda labels: key not in labels or labels[key] not in values
    if m := _EQUALITY.match(text):
        key, op, value = m.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: key in labels and labels[key] == value
    raise ApiError(400, "BadRequest", f"unable to parse requirement: {text!r}")


def parse_label_selector(selector: str) -> Callable[[Obj], bool]:
    """A predicate on objects for a label selector string (comma = AND); raises ApiError 400."""
    requirements = [_requirement(r) for r in _split_requirements(selector) if r]
    return lambda obj: all(req(_labels(obj)) for req in requirements)


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def parse_field_selector(selector: str) -> Callable[[Obj], bool]:
    """A predicate for a field selector (path=value, path==value, path!=value; comma = AND)."""
    terms: list[tuple[str, bool, str]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        m = re.match(r"^([A-Za-z0-9.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term!r}")
        terms.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return lambda obj: all((_field(obj, path) == value) == equal for path, equal, value in terms)


class ServiceAllocator:
    """Cluster IPs and node ports owned by Services, validated and allocated like the real registry."""

    def __init__(self, service_cidrs: Sequence[str], node_port_range: tuple[int, int]) -> None:
        networks = [ipaddress.ip_network(cidr) for cidr in service_cidrs]
        self.networks = {f"IPv{net.version}": net for net in networks}
        self.node_port_range = node_port_range
        self._ips: dict[str, str] = {}
        self._ports: dict[int, str] = {}
        self._held: dict[str, tuple[list[str], list[int]]] = {}
        self._next_ip = dict.fromkeys(self.networks, 10)
        self._next_port = node_port_range[0]

    def apply(self, key: str, svc: Obj, old: Obj | None) -> None:
        """Default, validate and allocate svc (in place) for the Service key; raises ApiError 422."""
        spec = svc.setdefault("spec", {})
        if not isinstance(spec, dict):
            raise invalid("spec: Invalid value: must be an object")
        old_spec = (old or {}).get("spec")
        old_spec = old_spec if isinstance(old_spec, dict) else {}
        _default_service(spec)
        ips = self._cluster_ips(key, spec, old_spec)
        ports = self._node_ports(key, spec, old_spec)
        self.release(key)
        for ip in ips:
            self._ips[ip] = key
        for port in ports:
            self._ports[port] = key
        self._held[key] = (ips, ports)

    def release(self, key: str) -> None:
        """Free every IP and port the Service key holds."""
        ips, ports = self._held.pop(key, ([], []))
        for ip in ips:
            del self._ips[ip]
        for port in ports:
            del self._ports[port]

    def _cluster_ips(self, key: str, spec: Obj, old_spec: Obj) -> list[str]:
        """Keep, validate or allocate one cluster IP per IP family the Service asks for."""
        if spec["type"] == "ExternalName":
            for field in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                spec.pop(field, None)
            return []
        old = old_spec.get("clusterIPs") or ([old_spec["clusterIP"]] if old_spec.get("clusterIP") else [])
        given = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []) or old
        if old and given[0] != old[0]:
            raise invalid(f"spec.clusterIPs[0]: Invalid value: {given[0]!r}: field is immutable")
        families = self._families(spec, given)
        if given == ["None"]:
            spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            return []
        ips = [
            self._claim_ip(key, family, given[i] if i < len(given) else None) for i, family in enumerate(families)
        ]
        spec["clusterIP"], spec["clusterIPs"], spec["ipFamilies"] = ips[0], ips, families
        return ips

    def _families(self, spec: Obj, given: list[str]) -> list[str]:
        """ipFamilies after the registry's defaulting: single stack, or both families in the asked order."""
        policy = spec.setdefault("ipFamilyPolicy", "SingleStack")
        if policy not in ("SingleStack", "PreferDualStack", "RequireDualStack"):
            raise invalid(f"spec.ipFamilyPolicy: Unsupported value: {policy!r}")
        asked = list(spec.get("ipFamilies") or [])
        if not asked and given and given != ["None"]:
            asked = [f"IPv{ipaddress.ip_address(ip).version}" for ip in given if _is_ip(ip)]
        families = list(dict.fromkeys(asked or ["IPv4"]))
        if policy != "SingleStack":
            families += [f for f in ("IPv4", "IPv6") if f not in families]
        families = [f for f in families if f in self.networks]
        if not families or any(f not in ("IPv4", "IPv6") for f in asked):
            raise invalid(f"spec.ipFamilies: Invalid value: {asked!r}: not configured on this cluster")
        return families[:1] if policy == "SingleStack" else families

    def _claim_ip(self, key: str, family: str, ip: str | None) -> str:
        network = self.networks[family]
        if not ip:
            return self._free_ip(key, family)
        if not _in_network(ip, network):
            raise invalid(f"spec.clusterIPs: Invalid value: {ip!r}: not in the service CIDR {network}")
        if self._ips.get(ip, key) != key:
            raise invalid(f"spec.clusterIPs: Invalid value: {ip!r}: provided IP is already allocated")
        return str(ipaddress.ip_address(ip))

    def _free_ip(self, key: str, family: str) -> str:
        network = self.networks[family]
        hosts = min(network.num_addresses - 2, 1 << 20)
        for _ in range(hosts):
            offset = self._next_ip[family]
            self._next_ip[family] = offset + 1 if offset < hosts else 2
            ip = str(network.network_address + offset)
            if self._ips.get(ip, key) == key:
                return ip
        raise ApiError(500, "InternalError", "failed to allocate a serviceIP: range is full")

    def _node_ports(self, key: str, spec: Obj, old_spec: Obj) -> list[int]:
        """Keep, validate or allocate nodePorts and healthCheckNodePort; returns every port claimed."""
        allowed = spec["type"] in ("NodePort", "LoadBalancer")
        auto = allowed and spec.get("allocateLoadBalancerNodePorts") is not False
        old_ports = {
            (p.get("port"), p.get("protocol")): p.get("nodePort")
            for p in old_spec.get("ports") or []
            if isinstance(p, dict)
        }
        claimed: list[int] = []
        for port in spec["ports"]:
            kept = old_ports.get((port["port"], port["protocol"]))
            given = port.get("nodePort")
            if given and not allowed:
                if given != kept:
                    raise invalid(f"spec.ports.nodePort: Forbidden: may not be used with type {spec['type']}")
                given = None  # left over from a type change: dropped like the real server does
            wanted = given or (kept if allowed else None)
            if wanted is None and not auto:
                port.pop("nodePort", None)
                continue
            port["nodePort"] = self._claim_port(key, wanted, claimed, "spec.ports.nodePort")
        if spec["type"] == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            wanted = spec.get("healthCheckNodePort") or old_spec.get("healthCheckNodePort")
            spec["healthCheckNodePort"] = self._claim_port(key, wanted, claimed, "spec.healthCheckNodePort")
        else:
            spec.pop("healthCheckNodePort", None)
        return claimed

    def _claim_port(self, key: str, wanted: Any, claimed: list[int], field: str) -> int:
        low, high = self.node_port_range
        if wanted is None:
            wanted = self._free_port(key, claimed)
        elif not isinstance(wanted, int) or not low <= wanted <= high:
            raise invalid(f"{field}: Invalid value: {wanted!r}: provided port is not in the valid range")
        elif self._ports.get(wanted, key) != key or wanted in claimed:
            raise invalid(f"{field}: Invalid value: {wanted}: provided port is already allocated")
        claimed.append(wanted)
        return int(wanted)

    def _free_port(self, key: str, claimed: list[int]) -> int:
        low, high = self.node_port_range
        for _ in range(high - low + 1):
            port = self._next_port
            self._next_port = port + 1 if port < high else low
            if self._ports.get(port, key) == key and port not in claimed:
                return port
        raise ApiError(500, "InternalError", "failed to allocate a nodePort: range is full")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _in_network(ip: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(ip) in network
    except ValueError:
        return False


def _default_service(spec: Obj) -> None:
    """Apply the API server's defaults to a Service spec and reject what it rejects that matters."""
    svc_type = spec.setdefault("type", "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise invalid(f"spec.type: Unsupported value: {svc_type!r}")
    spec.setdefault("sessionAffinity", "None")
    if spec["sessionAffinity"] == "ClientIP":
        client_ip = spec.setdefault("sessionAffinityConfig", {}).setdefault("clientIP", {})
        client_ip.setdefault("timeoutSeconds", 10800)
    ports = spec.setdefault("ports", [])
    if svc_type == "ExternalName":
        if not spec.get("externalName"):
            raise invalid("spec.externalName: Required value")
    else:
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if not ports and spec.get("clusterIP") != "None":
            raise invalid("spec.ports: Required value")
    if svc_type in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    _default_ports(ports)


def _default_ports(ports: list[Obj]) -> None:
    seen: set[tuple[int, str]] = set()
    names: set[str] = set()
    for port in ports:
        if not isinstance(port, dict):
            raise invalid("spec.ports: Invalid value: must be objects")
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            raise invalid(f"spec.ports.port: Invalid value: {number!r}: must be between 1 and 65535")
        protocol = port.setdefault("protocol", "TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise invalid(f"spec.ports.protocol: Unsupported value: {protocol!r}")
        port.setdefault("targetPort", number)
        if (number, protocol) in seen:
            raise invalid(f"spec.ports: Duplicate value: {number}/{protocol}")
        seen.add((number, protocol))
        name = port.get("name", "")
        if len(ports) > 1 and (not name or name in names):
            raise invalid(f"spec.ports.name: Invalid value: {name!r}: must be set and unique")
        names.add(name)


class ObjectStore:
    """Thread-safe objects of the lab's kinds with one global resourceVersion and a bounded history."""

    def __init__(
        self,
        history: int = 1000,
        service_cidrs: Sequence[str] = ("10.96.0.0/16", "fd00:96::/112"),
        node_port_range: tuple[int, int] = (30000, 32767),
    ) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {kind: {} for kind in KINDS}
        self._history: deque[Event] = deque()
        self._max_history = history
        self._rv = 0
        self._floor = 0  # a watch from an rv below this is Expired
        self._subscribers: list[Subscriber] = []
        self._pending: deque[Event] = deque()
        self._dispatching = False
        self.allocator = ServiceAllocator(service_cidrs, node_port_range)

    @property
    def lock(self) -> threading.RLock:
        """The store's reentrant lock: hold it to make several calls atomic (subscribers run under it)."""
        return self._lock

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        with self._lock:
            return self._rv

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A copy of the object, or None when it doesn't exist."""
        with self._lock:
            obj = self._table(kind).get((self._ns(kind, namespace), name))
            return clone(obj) if obj is not None else None

    def list(self, kind: str, namespace: str = "") -> list[Obj]:
        """Copies of every object of the kind (in one namespace when given)."""
        return self.snapshot(kind, namespace)[1]

    def snapshot(self, kind: str, namespace: str = "") -> tuple[int, builtins.list[Obj]]:
        """The current resourceVersion and copies of the objects of the kind, atomically."""
        with self._lock:
            items = [o for (ns, _), o in self._table(kind).items() if not namespace or ns == namespace]
            return self._rv, [clone(o) for o in items]

    def create(self, kind: str, obj: Obj) -> Obj:
        """Create with defaulting and validation like the real API server; returns the stored object."""
        obj = clone(obj)
        info = KINDS[kind]
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if not meta.get("name"):
            raise invalid("metadata.name: Required value: name or generateName is required")
        with self._lock:
            key = self._key(kind, obj)
            if key in self._table(kind):
                raise ApiError(409, "AlreadyExists", f'{info.plural} "{key[1]}" already exists')
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            self._validate(kind, obj, None)
            return self._store(kind, key, obj)

    def update(self, kind: str, obj: Obj, *, part: UpdatePart = "all") -> Obj:
        """Replace an existing object; part="spec" keeps the old status, "status" keeps all but status."""
        obj = clone(obj)
        with self._lock:
            key = self._key(kind, obj)
            old = self._table(kind).get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{KINDS[kind].plural} "{key[1]}" not found')
            rv = obj["metadata"].get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {KINDS[kind].plural} "{key[1]}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                )
            if part == "status":
                obj = {**clone(old), "status": obj.get("status", {})}
            elif part == "spec" and "status" in old:
                obj["status"] = clone(old["status"])
            for field in ("uid", "creationTimestamp"):
                obj["metadata"][field] = old["metadata"].get(field)
            self._validate(kind, obj, old)
            return self._store(kind, key, obj)

    def put_raw(self, kind: str, obj: Obj) -> Obj:
        """Store an object as is, without validation or defaulting (only its resourceVersion is set)."""
        obj = clone(obj)
        with self._lock:
            return self._store(kind, object_key(obj), obj)

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        """Delete an object and release what it held; returns its last state."""
        with self._lock:
            key = (self._ns(kind, namespace), name)
            old = self._table(kind).pop(key, None)
            if old is None:
                raise ApiError(404, "NotFound", f'{KINDS[kind].plural} "{name}" not found')
            if kind == "Service":
                self.allocator.release("/".join(key))
            last = clone(old)
            self._rv += 1
            last.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
            self._emit(Event(self._rv, kind, "DELETED", last, old))
            return clone(last)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call callback(kind, type, object) for every later change, in order; returns an unsubscriber."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def compact(self) -> None:
        """Drop all history, so a watch from any older resourceVersion gets 410 Expired."""
        with self._lock:
            self._history.clear()
            self._floor = self._rv

    def events_after(self, rv: int) -> builtins.list[Event]:
        """Retained events newer than rv; raises ApiError 410 when some of them were dropped."""
        with self._lock:
            if rv < self._floor:
                raise ApiError(410, "Expired", f"too old resource version: {rv} ({self._floor + 1})")
            # From the newest end: a watcher is usually a few events behind a history of up to millions.
            newer = list(itertools.takewhile(lambda event: event.rv > rv, reversed(self._history)))
            return newer[::-1]

    def wait_events(self, rv: int, timeout: float, stop: threading.Event) -> builtins.list[Event]:
        """events_after(rv) once there are some, or [] after timeout or when stop is set."""
        with self._cond:
            self._cond.wait_for(lambda: self._rv > rv or stop.is_set(), timeout)
            return self.events_after(rv)

    def wake(self) -> None:
        """Wake every wait_events caller (so they notice their stop flag)."""
        with self._cond:
            self._cond.notify_all()

    def _table(self, kind: str) -> dict[tuple[str, str], Obj]:
        if kind not in self._objects:
            raise ApiError(404, "NotFound", f"unknown kind {kind!r}")
        return self._objects[kind]

    @staticmethod
    def _ns(kind: str, namespace: str) -> str:
        return namespace if KINDS[kind].namespaced else ""

    def _key(self, kind: str, obj: Obj) -> tuple[str, str]:
        info = KINDS[kind]
        meta = obj.setdefault("metadata", {})
        obj["kind"], obj["apiVersion"] = info.kind, info.api_version
        if info.namespaced:
            meta["namespace"] = meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        return object_key(obj)

    def _validate(self, kind: str, obj: Obj, old: Obj | None) -> None:
        if kind == "Service":
            self.allocator.apply("/".join(object_key(obj)), obj, old)
        elif kind == "EndpointSlice":
            if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
                raise invalid(f"addressType: Unsupported value: {obj.get('addressType')!r}")
            obj.setdefault("endpoints", [])

    def _store(self, kind: str, key: tuple[str, str], obj: Obj) -> Obj:
        table = self._table(kind)
        old = table.get(key)
        self._rv += 1
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            meta["resourceVersion"] = str(self._rv)
        table[key] = obj
        self._emit(Event(self._rv, kind, "MODIFIED" if old is not None else "ADDED", obj, old))
        return clone(obj)

    def _emit(self, event: Event) -> None:
        """Record the event, wake watchers, and run subscribers in event order (nested writes queue up)."""
        self._history.append(event)
        while len(self._history) > self._max_history:
            self._floor = self._history.popleft().rv
        self._cond.notify_all()
        self._pending.append(event)
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._pending:
                self._dispatch(self._pending.popleft())
        finally:
            self._dispatching = False

    def _dispatch(self, event: Event) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event.kind, event.type, clone(event.obj))
            except Exception:
                log.exception("subscriber failed", kind=event.kind, type=event.type)
