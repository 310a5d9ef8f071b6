"""API JSON → model conversion, including malformed objects."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxyd.k8s.convert import ConversionError, convert_endpoint_slice, convert_node, convert_service
from kproxyd.model import Protocol, ServicePortName, ServiceType
from tests.factories import endpoint, endpoint_slice, node, service


def test_cluster_ip_service_ports() -> None:
    converted = convert_service(
        service(ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    )
    assert converted.key == "ns/svc"
    http, dns = converted.ports
    assert http.name == ServicePortName("ns", "svc", "http", Protocol.TCP)
    assert str(http.name) == "ns/svc:http"
    assert (http.port, http.cluster_ips, http.node_port) == (80, ("10.96.0.10",), None)
    assert dns.protocol is Protocol.UDP


def test_unnamed_port_spelling() -> None:
    (port,) = convert_service(service(ports=[{"port": 80}])).ports
    assert str(port.name) == "ns/svc"


def test_node_port_and_policies() -> None:
    obj = service(type="NodePort", externalTrafficPolicy="Local", ports=[{"port": 80, "nodePort": 30080}])
    (port,) = convert_service(obj).ports
    assert port.type is ServiceType.NODE_PORT
    assert port.node_port == 30080
    assert port.external_policy_local


def test_cluster_ip_service_ignores_node_port_and_local_policy() -> None:
    (port,) = convert_service(
        service(externalTrafficPolicy="Local", ports=[{"port": 80, "nodePort": 30080}])
    ).ports
    assert port.node_port is None
    assert not port.external_policy_local


def test_load_balancer_ingress_and_proxy_ip_mode() -> None:
    obj = service(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30080}])
    obj["status"] = {
        "loadBalancer": {
            "ingress": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2", "ipMode": "Proxy"}, {"hostname": "lb"}]
        }
    }
    (port,) = convert_service(obj).ports
    assert port.load_balancer_ips == ("192.0.2.1",)


def test_affinity_default_timeout() -> None:
    (port,) = convert_service(service(sessionAffinity="ClientIP")).ports
    assert port.session_affinity_timeout == 10800


def test_bad_external_ip_dropped_with_warning() -> None:
    converted = convert_service(service(externalIPs=["192.0.2.9", "not-an-ip"]))
    assert converted.ports[0].external_ips == ("192.0.2.9",)
    assert any("not-an-ip" in w for w in converted.warnings)


@pytest.mark.parametrize(
    "obj", [service(cluster_ip="None"), service(type="ExternalName", cluster_ip=""), service(cluster_ip="")]
)
def test_headless_external_name_and_unallocated_program_nothing(obj: dict[str, Any]) -> None:
    assert convert_service(obj).ports == ()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s["spec"].update(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]), "not an IP address"),
        (lambda s: s["spec"]["ports"][0].update(port=70000), "not a port number"),
        (lambda s: s["spec"]["ports"][0].update(port="80"), "not a port number"),
        (lambda s: s["spec"]["ports"][0].update(protocol="ICMP"), "not TCP, UDP or SCTP"),
        (lambda s: s["spec"].update(ports=[]), "spec.ports is empty"),
        (lambda s: s["metadata"].pop("name"), "metadata.name is missing"),
        (lambda s: s["spec"].update(type="Weird"), "spec.type"),
        (lambda s: s.update(spec=[]), "spec is not an object"),
    ],
)
def test_malformed_service_rejected_with_reason(mutate: Any, reason: str) -> None:
    obj = service()
    mutate(obj)
    with pytest.raises(ConversionError, match=reason):
        convert_service(obj)


def test_slice_endpoints_per_port() -> None:
    obj = endpoint_slice(
        endpoints=[
            endpoint("10.244.1.2"),
            endpoint("10.244.2.2", node="node2", ready=False, serving=True, terminating=True),
        ],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
    )
    converted = convert_endpoint_slice(obj)
    assert converted.service_key == "ns/svc"
    http = converted.endpoints[ServicePortName("ns", "svc", "http", Protocol.TCP)]
    assert [(e.ip, e.port, e.ready, e.serving, e.terminating, e.node_name) for e in http] == [
        ("10.244.1.2", 8080, True, True, False, "node1"),
        ("10.244.2.2", 8080, False, True, True, "node2"),
    ]
    assert converted.endpoints[ServicePortName("ns", "svc", "dns", Protocol.UDP)][0].port == 53


def test_slice_condition_defaults() -> None:
    obj = endpoint_slice(endpoints=[{"addresses": ["10.244.1.2"]}])
    (ep,) = next(iter(convert_endpoint_slice(obj).endpoints.values()))
    assert (ep.ready, ep.serving, ep.terminating) == (True, True, False)


def test_fqdn_slice_is_empty() -> None:
    assert convert_endpoint_slice(endpoint_slice(address_type="FQDN")).endpoints == {}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s["metadata"].pop("labels"), "kubernetes.io/service-name"),
        (lambda s: s["endpoints"][0].update(addresses=["10.244.1.999"]), "not an IP address"),
        (lambda s: s["endpoints"][0].update(addresses=["fd00::1"]), "does not match addressType"),
        (lambda s: s["endpoints"][0].update(addresses=[]), "addresses is empty"),
        (lambda s: s["ports"][0].update(port=0x10000), "not a port number"),
        (lambda s: s["ports"][0].update(protocol="XYZ"), "not TCP, UDP or SCTP"),
    ],
)
def test_malformed_slice_rejected_with_reason(mutate: Any, reason: str) -> None:
    obj = endpoint_slice()
    mutate(obj)
    with pytest.raises(ConversionError, match=reason):
        convert_endpoint_slice(obj)


def test_node() -> None:
    info = convert_node(node(zone="zone-a"))
    assert info.name == "node1"
    assert info.addresses == ("172.28.0.11",)
    assert info.pod_cidrs == ("10.244.1.0/24",)
    assert info.zone == "zone-a"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.text(max_size=12)
    | st.sampled_from(["10.96.0.1", "TCP", "None", "Local"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    def put(path_value: tuple[list[str], Any]) -> dict[str, Any]:
        import copy

        obj = copy.deepcopy(base)
        path, value = path_value
        target: Any = obj
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                return obj
        target[path[-1]] = value
        return obj

    paths = st.sampled_from(
        [
            ["spec"],
            ["spec", "ports"],
            ["spec", "clusterIP"],
            ["spec", "type"],
            ["metadata"],
            ["endpoints"],
            ["ports"],
            ["addressType"],
            ["status"],
            ["spec", "externalIPs"],
        ]
    )
    return st.tuples(paths, json_values).map(put)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_mutations(service()), _mutations(endpoint_slice())))
def test_fuzzed_objects_convert_or_fail_cleanly(obj: dict[str, Any]) -> None:
    """Whatever the API sends, conversion either succeeds or raises ConversionError — never anything else."""
    for convert in (convert_service, convert_endpoint_slice, convert_node):
        with contextlib.suppress(ConversionError):
            convert(obj)


@pytest.mark.parametrize(("value", "expected"), [("maglev", "maglev"), ("random", "random"), ("bogus", None)])
def test_lb_algorithm_annotation(value: str, expected: str | None) -> None:
    obj = service()
    obj["metadata"]["annotations"] = {"kproxyd.io/lb-algorithm": value}
    (port,) = convert_service(obj).ports
    assert port.lb_algorithm == expected
    (plain,) = convert_service(service()).ports
    assert plain.lb_algorithm is None
