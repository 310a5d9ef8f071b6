"""API JSON (plain dicts) to model values; every malformed object is rejected with a reason."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
DELETION_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_AFFINITY_TIMEOUT = 10800


class ConversionError(ValueError):
    """An API object kproxyd cannot program; the message says why."""


@dataclass(frozen=True, slots=True)
class ConvertedService:
    """The ports of one Service, plus warnings about parts that were dropped (as kube-proxy drops them)."""

    key: str
    ports: tuple[ServicePort, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConvertedSlice:
    """One EndpointSlice: the Service it belongs to and its endpoints for each ServicePortName."""

    key: str
    service_key: str
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)
    trigger_time: float | None = None  # endpoints.kubernetes.io/last-change-trigger-time, as a timestamp


def object_key(obj: Mapping[str, Any]) -> str:
    """ "namespace/name" (or "name" for cluster-scoped objects), best effort for logging bad objects."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return "<no metadata>"
    name, namespace = meta.get("name"), meta.get("namespace")
    return f"{namespace}/{name}" if namespace else str(name)


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConversionError(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConversionError(f"{what} is not a list")
    return value


def _name(meta: Mapping[str, Any], field_name: str) -> str:
    value = meta.get(field_name)
    if not isinstance(value, str) or not value:
        raise ConversionError(f"metadata.{field_name} is missing")
    return value


def _ip(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ConversionError(f"{what} is not a string")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConversionError(f"{what} {value!r} is not an IP address") from None


def _port(value: Any, what: str) -> int:
    if value is None:
        raise ConversionError(f"{what} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConversionError(f"{what} {value!r} is not a port number (1-65535)")
    return value


def _optional_port(value: Any, what: str) -> int | None:
    return None if value in (None, 0) else _port(value, what)


def _protocol(value: Any, what: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise ConversionError(f"{what} {value!r} is not TCP, UDP or SCTP") from None


def _filtered_ips(values: Any, what: str, warnings: list[str]) -> tuple[str, ...]:
    ips = []
    for value in _list(values, what):
        try:
            ips.append(_ip(value, what))
        except ConversionError as err:
            warnings.append(f"ignored: {err}")
    return tuple(dict.fromkeys(ips))


def _source_ranges(values: Any, warnings: list[str]) -> tuple[str, ...]:
    cidrs = []
    for value in _list(values, "spec.loadBalancerSourceRanges"):
        try:
            cidrs.append(str(ipaddress.ip_network(str(value).strip(), strict=False)))
        except ValueError:
            warnings.append(f"ignored: loadBalancerSourceRange {value!r} is not a CIDR")
    return tuple(dict.fromkeys(cidrs))


def _load_balancer_ips(status: Mapping[str, Any], warnings: list[str]) -> tuple[str, ...]:
    lb = _mapping(status.get("loadBalancer"), "status.loadBalancer")
    ips = []
    for ingress in _list(lb.get("ingress"), "status.loadBalancer.ingress"):
        ingress = _mapping(ingress, "status.loadBalancer.ingress[]")
        if ingress.get("ipMode") == "Proxy" or not ingress.get("ip"):
            continue  # the load balancer proxies itself (KEP-1860), or it is a hostname
        try:
            ips.append(_ip(ingress["ip"], "status.loadBalancer.ingress[].ip"))
        except ConversionError as err:
            warnings.append(f"ignored: {err}")
    return tuple(dict.fromkeys(ips))


def _affinity_timeout(spec: Mapping[str, Any]) -> int | None:
    if spec.get("sessionAffinity") != "ClientIP":
        return None
    config = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
        raise ConversionError(f"sessionAffinityConfig.clientIP.timeoutSeconds {timeout!r} is not 1-86400")
    return timeout


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...]:
    ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or [spec.get("clusterIP")]
    return tuple(_ip(ip, "spec.clusterIP") for ip in ips)


def _is_skipped(spec: Mapping[str, Any]) -> bool:
    """kube-proxy's ShouldSkipService: ExternalName, headless, or no cluster IP assigned."""
    return spec.get("type") == ServiceType.EXTERNAL_NAME or spec.get("clusterIP") in (None, "", "None")


LB_ALGORITHM_ANNOTATION = "kproxyd.io/lb-algorithm"


def _lb_algorithm(meta: Mapping[str, Any]) -> str | None:
    """The Service's load-balancing algorithm annotation (ebpf mode), None when absent."""
    value = _mapping(meta.get("annotations"), "metadata.annotations").get(LB_ALGORITHM_ANNOTATION)
    return str(value) if value in ("random", "maglev") else None


def convert_service(obj: Mapping[str, Any]) -> ConvertedService:
    """A v1 Service as ServicePorts; headless and ExternalName Services convert to no ports."""
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace, name = _name(meta, "namespace"), _name(meta, "name")
    key = f"{namespace}/{name}"
    spec = _mapping(obj.get("spec"), "spec")
    if _is_skipped(spec):
        return ConvertedService(key, ())
    try:
        service_type = ServiceType(spec.get("type") or ServiceType.CLUSTER_IP)
    except ValueError:
        raise ConversionError(f"spec.type {spec.get('type')!r} is unknown") from None
    warnings: list[str] = []
    common = {
        "type": service_type,
        "cluster_ips": _cluster_ips(spec),
        "external_ips": _filtered_ips(spec.get("externalIPs"), "spec.externalIPs[]", warnings),
        "load_balancer_ips": _load_balancer_ips(_mapping(obj.get("status"), "status"), warnings),
        "load_balancer_source_ranges": _source_ranges(spec.get("loadBalancerSourceRanges"), warnings),
        "session_affinity_timeout": _affinity_timeout(spec),
        "internal_policy_local": spec.get("internalTrafficPolicy") == "Local",
        "health_check_node_port": _optional_port(spec.get("healthCheckNodePort"), "healthCheckNodePort"),
        "prefer_close": spec.get("trafficDistribution") == "PreferClose",
        "lb_algorithm": _lb_algorithm(meta),
    }
    if service_type is not ServiceType.LOAD_BALANCER:
        common["load_balancer_ips"] = ()
    ports = tuple(
        _service_port(namespace, name, port, spec, common, index)
        for index, port in enumerate(_list(spec.get("ports"), "spec.ports"))
    )
    if not ports:
        raise ConversionError("spec.ports is empty")
    names = [p.name for p in ports]
    if len(set(names)) != len(names):
        raise ConversionError("spec.ports has duplicate name/protocol pairs")
    return ConvertedService(key, ports, tuple(warnings))


def _service_port(
    namespace: str,
    name: str,
    raw: Any,
    spec: Mapping[str, Any],
    common: Mapping[str, Any],
    index: int,
) -> ServicePort:
    what = f"spec.ports[{index}]"
    raw = _mapping(raw, what)
    port_name = raw.get("name") or ""
    if not isinstance(port_name, str):
        raise ConversionError(f"{what}.name is not a string")
    spn = ServicePortName(namespace, name, port_name, _protocol(raw.get("protocol"), f"{what}.protocol"))
    node_port = _optional_port(raw.get("nodePort"), f"{what}.nodePort")
    if common["type"] is ServiceType.CLUSTER_IP:
        node_port = None
    accessible = node_port is not None or bool(common["external_ips"]) or bool(common["load_balancer_ips"])
    return ServicePort(
        name=spn,
        port=_port(raw.get("port"), f"{what}.port"),
        node_port=node_port,
        external_policy_local=accessible and spec.get("externalTrafficPolicy") == "Local",
        **common,
    )


def _conditions(raw: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """ready/serving/terminating with the API's defaults (unset ready is true, serving follows ready)."""
    cond = _mapping(raw.get("conditions"), "endpoints[].conditions")
    ready = cond.get("ready") is not False
    serving = ready if cond.get("serving") is None else cond.get("serving") is True
    return ready, serving, cond.get("terminating") is True


def _zone_hints(raw: Mapping[str, Any]) -> frozenset[str] | None:
    hints = _mapping(raw.get("hints"), "endpoints[].hints")
    zones = _list(hints.get("forZones"), "endpoints[].hints.forZones")
    names = {str(z["name"]) for z in zones if isinstance(z, Mapping) and isinstance(z.get("name"), str)}
    return frozenset(names) if names else None


def _slice_ports(obj: Mapping[str, Any]) -> list[tuple[str, int, Protocol]]:
    ports = []
    for index, raw in enumerate(_list(obj.get("ports"), "ports")):
        raw = _mapping(raw, f"ports[{index}]")
        port = _optional_port(raw.get("port"), f"ports[{index}].port")
        if port is None:
            continue  # a slice port without a number means "all ports": kube-proxy ignores it
        name = raw.get("name") or ""
        if not isinstance(name, str):
            raise ConversionError(f"ports[{index}].name is not a string")
        ports.append((name, port, _protocol(raw.get("protocol"), f"ports[{index}].protocol")))
    return ports


def _slice_endpoints(obj: Mapping[str, Any], family: int) -> list[Endpoint]:
    endpoints = []
    for index, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        raw = _mapping(raw, f"endpoints[{index}]")
        addresses = _list(raw.get("addresses"), f"endpoints[{index}].addresses")
        if not addresses:
            raise ConversionError(f"endpoints[{index}].addresses is empty")
        ip = _ip(addresses[0], f"endpoints[{index}].addresses[0]")
        if ipaddress.ip_address(ip).version != family:
            raise ConversionError(f"endpoints[{index}] address {ip} does not match addressType")
        ready, serving, terminating = _conditions(raw)
        node_name, zone = raw.get("nodeName"), raw.get("zone")
        endpoints.append(
            Endpoint(
                ip=ip,
                port=0,
                ready=ready,
                serving=serving,
                terminating=terminating,
                node_name=node_name if isinstance(node_name, str) else None,
                zone=zone if isinstance(zone, str) else None,
                zone_hints=_zone_hints(raw),
            )
        )
    return endpoints


def convert_endpoint_slice(obj: Mapping[str, Any]) -> ConvertedSlice:
    """A discovery.k8s.io/v1 EndpointSlice as endpoints per ServicePortName (FQDN slices convert empty)."""
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace, name = _name(meta, "namespace"), _name(meta, "name")
    key = f"{namespace}/{name}"
    service = _mapping(meta.get("labels"), "metadata.labels").get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise ConversionError(f"label {SERVICE_NAME_LABEL} is missing")
    service_key = f"{namespace}/{service}"
    family = {"IPv4": 4, "IPv6": 6}.get(str(obj.get("addressType")))
    if family is None:
        return ConvertedSlice(key, service_key)  # FQDN slices have no meaning for a proxy
    bare = _slice_endpoints(obj, family)
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for port_name, port, protocol in _slice_ports(obj):
        spn = ServicePortName(namespace, service, port_name, protocol)
        endpoints[spn] = tuple(replace(ep, port=port) for ep in bare)
    return ConvertedSlice(key, service_key, endpoints, _trigger_time(meta))


def _trigger_time(meta: Mapping[str, Any]) -> float | None:
    """The slice's last-change-trigger-time annotation (RFC 3339); None when absent or unreadable."""
    value = _mapping(meta.get("annotations"), "metadata.annotations").get(TRIGGER_TIME_ANNOTATION)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def convert_node(obj: Mapping[str, Any]) -> NodeInfo:
    """A v1 Node as what the proxy uses of it: name, addresses, pod CIDRs and labels."""
    meta = _mapping(obj.get("metadata"), "metadata")
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    addresses = [
        _ip(a.get("address"), "status.addresses[].address")
        for a in _list(status.get("addresses"), "status.addresses")
        if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP")
    ]
    cidrs = _list(spec.get("podCIDRs"), "spec.podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    labels = _mapping(meta.get("labels"), "metadata.labels")
    taints = _list(spec.get("taints"), "spec.taints")
    doomed = any(isinstance(t, Mapping) and t.get("key") == DELETION_TAINT for t in taints)
    return NodeInfo(
        name=_name(meta, "name"),
        addresses=tuple(addresses),
        pod_cidrs=tuple(str(c) for c in cidrs),
        labels={str(k): str(v) for k, v in labels.items()},
        deleting=bool(meta.get("deletionTimestamp")) or doomed,
    )
