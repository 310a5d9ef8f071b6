"""`kproxyd status`: rows from plain API dicts (converted and planned as kproxyd does), the no-endpoint
diagnosis, the table; and one read of the lab API server with the official client."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kproxyd.lab.apiserver import LabApiServer, write_kubeconfig
from kproxyd.status import ApiSnapshot, diagnose, format_table, service_rows, status_main


def service(name: str, selector: dict[str, str] | None, **spec: Any) -> dict[str, Any]:
    ports = spec.pop("ports", [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}])
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": selector, "clusterIP": spec.pop("clusterIP", "10.96.0.10"), "ports": ports, **spec},
    }


def pod(name: str, labels: dict[str, str], ready: bool = True) -> dict[str, Any]:
    status = "True" if ready else "False"
    return {
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": status}]},
    }


def endpoint_slice(svc: str, *endpoints: tuple[str, str, bool, bool]) -> dict[str, Any]:
    """A slice of (ip, node, ready, terminating) endpoints on port http/8080."""
    return {
        "metadata": {"name": f"{svc}-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "nodeName": node,
                "conditions": {"ready": ready, "serving": True, "terminating": terminating},
            }
            for ip, node, ready, terminating in endpoints
        ],
    }


NODE = {
    "metadata": {"name": "node1", "labels": {}},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
}


def test_rows_count_ready_terminating_and_local_endpoints() -> None:
    web = service(
        "web",
        {"app": "web"},
        type="NodePort",
        externalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}],
    )
    slices = [
        endpoint_slice(
            "web",
            ("10.0.1.1", "node1", True, False),
            ("10.0.2.1", "node2", True, False),
            ("10.0.1.2", "node1", False, True),
        )
    ]
    [row] = service_rows(ApiSnapshot([web], slices, [], NODE), "node1")
    assert (row.service, row.type, row.ready, row.terminating, row.local) == ("default/web", "NodePort", 2, 1, 1)
    assert row.frontends == ["10.96.0.10:80/TCP", "nodePort 30080/TCP"]
    assert (row.external_policy, row.internal_policy, row.diagnosis) == ("Local", "Cluster", None)


def test_headless_services_are_not_listed() -> None:
    headless = service("db", {"app": "db"}, clusterIP="None")
    assert service_rows(ApiSnapshot([headless], [], [], None), "node1") == []


@pytest.mark.parametrize(
    ("selector", "pods", "expected"),
    [
        (
            {"app": "api"},
            [pod("b-0", {"app": "backend"}), pod("c-0", {"app": "client"})],
            "selector app=api matches no pod; pods in default have app=backend,app=client",
        ),
        ({"app": "api"}, [], "selector app=api matches no pod; no pod in default has those labels"),
        (
            {"app": "api"},
            [pod("api-0", {"app": "api"}, ready=False)],
            "selector app=api matches 1 pod(s), none ready: api-0",
        ),
        (
            {"app": "api"},
            [pod("api-0", {"app": "api"})],
            "selector app=api matches ready pod(s) (api-0) but none serves a port of the Service (targetPort?)",
        ),
        (None, [], "no selector: endpoints are managed by hand, and no EndpointSlice gives this Service any"),
    ],
)
def test_diagnosis(selector: dict[str, str] | None, pods: list[dict[str, Any]], expected: str) -> None:
    assert diagnose(service("api", selector), pods) == expected


def test_table_flags_services_without_endpoints() -> None:
    snapshot = ApiSnapshot(
        [service("api", {"app": "api"}), service("web", {"app": "web"}, clusterIP="10.96.0.11")],
        [endpoint_slice("web", ("10.0.1.1", "node1", True, False))],
        [pod("b-0", {"app": "backend"})],
        NODE,
    )
    lines = format_table(service_rows(snapshot, "node1")).splitlines()
    assert lines[0].split() == [
        "SERVICE",
        "TYPE",
        "FRONTENDS",
        "READY",
        "TERMINATING",
        "LOCAL",
        "POLICY",
        "ext/int",
    ]
    assert lines[1].split() == ["default/api", "ClusterIP", "10.96.0.10:80/TCP", "0", "0", "0", "Cluster/Cluster"]
    assert lines[2].split() == ["default/web", "ClusterIP", "10.96.0.11:80/TCP", "1", "0", "1", "Cluster/Cluster"]
    assert lines[3:] == [
        "",
        "Services without endpoints:",
        "  default/api: selector app=api matches no pod; pods in default have app=backend",
    ]


def test_status_against_the_lab_api_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The official client lists the lab API server once; the selector mismatch is explained."""
    server = LabApiServer()
    server.start()
    try:
        server.store.create("Pod", {"apiVersion": "v1", "kind": "Pod", **pod("backend-0", {"app": "backend"})})
        server.store.create("Service", {"apiVersion": "v1", "kind": "Service", **service("api", {"app": "api"})})
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, server.url)
        assert status_main(["--kubeconfig", str(kubeconfig), "--hostname-override", "node1"]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "default/api" in out
    assert "default/api: selector app=api matches no pod; pods in default have app=backend" in out


NODE_PORT = {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}


def test_ebpf_mode_shows_what_runs_where() -> None:
    snapshot = ApiSnapshot(
        [
            service("web", {"app": "web"}),
            service("np", {"app": "web"}, clusterIP="10.96.0.12", type="NodePort", ports=[NODE_PORT]),
        ],
        [endpoint_slice("web", ("10.0.1.1", "node1", True, False))],
        [],
        NODE,
    )
    rows = {row.service: row.dataplane for row in service_rows(snapshot, "node1", "ebpf")}
    assert rows == {
        "default/web": "ebpf(cluster-ip v4)",
        "default/np": "ebpf(cluster-ip v4, external from node)+nftables(external)",
    }
    assert format_table(service_rows(snapshot, "node1", "ebpf")).splitlines()[0].endswith("DATAPLANE")
    served = replace(snapshot, slices=[*snapshot.slices, endpoint_slice("np", ("10.0.1.1", "node1", True, False))])
    rows = {row.service: row.dataplane for row in service_rows(served, "node1", "ebpf", tc=True)}
    assert rows["default/np"] == "ebpf(cluster-ip v4, external from node)+tc(external v4)"
    rows = {row.service: row.dataplane for row in service_rows(served, "node1", "ebpf", tc=False)}
    assert (
        rows["default/np"] == "ebpf(cluster-ip v4, external from node)+nftables(external)"
    )  # tc not running here


def test_ipv6_services_show_in_both_families() -> None:
    """Each family is planned apart, as the daemon does: an IPv6-only Service shows, a dual-stack one lists
    both cluster IPs (its node port once) and counts a pod once, not once per address.
    """
    six_slice = {**endpoint_slice("dual", ("fd00:244::1", "node1", True, False)), "addressType": "IPv6"}
    six_slice["metadata"] = {**six_slice["metadata"], "name": "dual-six"}
    snapshot = ApiSnapshot(
        [
            service(
                "dual",
                {"app": "web"},
                clusterIPs=["10.96.0.10", "fd00:96::10"],
                type="NodePort",
                ports=[NODE_PORT],
            ),
            service("six", {"app": "none"}, clusterIP="fd00:96::11", clusterIPs=["fd00:96::11"]),
        ],
        [endpoint_slice("dual", ("10.0.1.1", "node1", True, False)), six_slice],
        [],
        NODE,
    )
    rows = {row.service: row for row in service_rows(snapshot, "node1", "ebpf")}
    assert rows["default/dual"].frontends == ["10.96.0.10:80/TCP", "nodePort 30080/TCP", "fd00:96::10:80/TCP"]
    assert rows["default/dual"].ready == 1
    assert rows["default/dual"].dataplane == "ebpf(cluster-ip v4+v6, external from node)+nftables(external)"
    assert rows["default/six"].dataplane == "ebpf(cluster-ip v6)"
    dual = {row.service: row.dataplane for row in service_rows(snapshot, "node1", "ebpf", tc=True)}["default/dual"]
    assert dual == "ebpf(cluster-ip v4+v6, external from node)+tc(external v4+v6)"
