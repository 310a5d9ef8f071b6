"""The daemon as operators run it: bad API data, API server outages and 410s, restarts, cleanup, health."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd.backends.ebpf.kernel import detach_and_unpin
from kproxyd.lab import nsutil
from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply
from tests.netns.expect import refused_error

FAILURES = {
    "iptables": "iptables_restore_failures",
    "nftables": "nftables_sync_failures",
    "ebpf": "ebpf_sync_failures",
}


def svc(name: str, app: str, **spec: Any) -> dict[str, Any]:
    """A one-port Service selecting app=<app>."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec},
    }


def reaches(lab: LabCluster, ip: str, pods: set[str], src: str = "client") -> bool:
    """Every request from src to ip:80 is answered, by exactly the given pods."""
    results = lab.answers(src, ip, 80, count=12, timeout=0.5)
    return all(isinstance(r, Reply) for r in results) and {r.pod for r in results if isinstance(r, Reply)} == pods


def refused(lab: LabCluster, ip: str, src: str = "client") -> bool:
    """A connection to ip:80 is refused at once."""
    try:
        lab.request(src, ip, 80, timeout=0.5)
    except refused_error(lab.mode, socket_lb=True):  # type: ignore[attr-defined]
        return True
    except OSError:
        return False
    return False


def healthz(lab: LabCluster, node: str = "node1") -> int:
    """The status of a node's /healthz, 0 while nothing listens."""
    try:
        return lab.http_get(node, "127.0.0.1", 10256, "/healthz")[0]
    except OSError:
        return 0


@pytest.fixture(scope="module")
def cluster(lab: LabCluster) -> Iterator[LabCluster]:
    """One node with kproxyd, a backend pod and a client pod."""
    lab.add_pod("web-0", "node1", {"app": "web"})
    lab.add_pod("client", "node1", {"app": "client"})
    lab.create_service(svc("web", "web"))
    lab.start_proxy("node1", [f"--proxy-mode={lab.mode}"])  # type: ignore[attr-defined]
    wait_until(lambda: reaches(lab, ip_of(lab, "web"), {"web-0"}), timeout=30, what="first sync")
    yield lab


def ip_of(lab: LabCluster, name: str) -> str:
    return str(lab.service(name)["spec"]["clusterIP"])


def test_malformed_objects_logged_and_skipped(cluster: LabCluster) -> None:
    bad_service = svc("bad-port", "web", clusterIP="10.96.0.200", clusterIPs=["10.96.0.200"])
    bad_service["spec"]["ports"][0]["port"] = 99999
    cluster.store.put_raw("Service", bad_service)
    cluster.create_service(svc("bad-slice", "nothing"))
    cluster.store.put_raw(
        "EndpointSlice",
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "bad-slice-x",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "bad-slice"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.300"]}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
    )
    cluster.create_service(svc("after", "web"))
    wait_until(
        lambda: reaches(cluster, ip_of(cluster, "after"), {"web-0"}), what="a Service created after bad ones"
    )
    assert reaches(cluster, ip_of(cluster, "web"), {"web-0"})
    assert refused(cluster, ip_of(cluster, "bad-slice"))  # the slice was skipped: no endpoints
    log = cluster.proxy_log("node1")
    assert "invalid object skipped" in log
    assert "default/bad-port" in log and "99999" in log
    assert "default/bad-slice-x" in log and "10.244.1.300" in log
    assert cluster.proxies["node1"].poll() is None  # still running


def test_api_server_outage_keeps_rules_and_converges(cluster: LabCluster) -> None:
    cluster.stop_api()
    assert reaches(cluster, ip_of(cluster, "web"), {"web-0"})  # rules stay while the API is gone
    cluster.add_pod("web-1", "node1", {"app": "web"})  # changes made while kproxyd cannot see them
    cluster.create_service(svc("while-down", "web"))
    cluster.start_api()
    wait_until(
        lambda: reaches(cluster, ip_of(cluster, "while-down"), {"web-0", "web-1"}),
        timeout=60,
        what="convergence after the API server came back",
    )
    assert reaches(cluster, ip_of(cluster, "web"), {"web-0", "web-1"})


def test_too_old_resource_version_relists_without_flushing(cluster: LabCluster) -> None:
    ip = ip_of(cluster, "while-down")
    cluster.stop_api()
    cluster.store.delete("Service", "default", "while-down")
    cluster.store.compact()  # history gone: resuming the watch gets 410 Gone, so kproxyd must re-list
    cluster.start_api()
    wait_until(
        lambda: "default/while-down" not in cluster.ruleset("node1"),
        timeout=60,
        what="the deleted Service's rules to go after the re-list",
    )
    assert reaches(cluster, ip_of(cluster, "web"), {"web-0", "web-1"})
    assert not reaches(cluster, ip, {"web-0", "web-1"})
    assert "410" in cluster.proxy_log("node1") or "relist" in cluster.proxy_log("node1").replace("-", "")


def test_healthz_livez_and_metrics(cluster: LabCluster) -> None:
    node_ip = cluster.net.node("node1").ip
    status, body = cluster.http_get("node1", node_ip, 10256, "/healthz")
    assert status == 200
    assert json.loads(body)["lastUpdated"] and json.loads(body)["nodeEligible"] is True
    assert cluster.http_get("node1", node_ip, 10256, "/livez")[0] == 200
    assert reaches(cluster, ip_of(cluster, "web"), {"web-0", "web-1"})
    wait_until(lambda: 'service="default/web:http"' in metrics(cluster), timeout=20, what="connection counters")
    text = metrics(cluster)
    names = [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kubeproxy_network_programming_duration_seconds_bucket",
        f"kubeproxy_sync_proxy_rules_{FAILURES[cluster.mode]}_total",  # type: ignore[attr-defined]
    ]
    if cluster.mode == "iptables":  # type: ignore[attr-defined]
        names.append('kubeproxy_sync_proxy_rules_iptables_total{table="nat"}')
    assert [name for name in names if name not in text] == []
    programmed = re.search(r"kubeproxy_network_programming_duration_seconds_count (\S+)", text)
    assert programmed and float(programmed.group(1)) > 0  # EndpointSlice changes were timed
    web = ip_of(cluster, "web")
    counted = re.search(
        rf'kproxyd_service_connections_total{{frontend="{web}:80/TCP",service="default/web:http"}} (\S+)', text
    )
    assert counted and float(counted.group(1)) >= 12, text[-2000:]


def test_node_being_deleted_fails_healthz_but_not_livez(cluster: LabCluster) -> None:
    node = cluster.store.get("Node", "", "node1")
    assert node is not None
    node["spec"]["taints"] = [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]
    cluster.store.update("Node", node)
    wait_until(lambda: healthz(cluster) == 503, timeout=20, what="healthz 503 for a node being deleted")
    assert json.loads(cluster.http_get("node1", "127.0.0.1", 10256, "/healthz")[1])["nodeEligible"] is False
    assert cluster.http_get("node1", "127.0.0.1", 10256, "/livez")[0] == 200
    node = cluster.store.get("Node", "", "node1")
    assert node is not None
    node["spec"]["taints"] = []
    cluster.store.update("Node", node)
    wait_until(lambda: healthz(cluster) == 200, timeout=20, what="healthz back to 200")


def metrics(lab: LabCluster) -> str:
    """node1's /metrics."""
    return lab.http_get("node1", "127.0.0.1", 10249, "/metrics")[1]


def test_sigterm_leaves_rules_and_cleanup_removes_them(cluster: LabCluster) -> None:
    web = ip_of(cluster, "web")
    assert cluster.stop_proxy("node1") == 0
    assert reaches(cluster, web, {"web-0", "web-1"})  # traffic flows while kproxyd is down
    cluster.start_proxy("node1", [f"--proxy-mode={cluster.mode}"])  # type: ignore[attr-defined]
    wait_until(lambda: healthz(cluster) == 200, timeout=30, what="healthz after restart")
    assert reaches(cluster, web, {"web-0", "web-1"})
    cluster.stop_proxy("node1")
    node = cluster.net.node("node1").netns  # with the host's /sys, as the daemon runs (cgroup2, bpffs)
    cleanup = nsutil.run(nsutil.nsenter_argv(node, [*cluster.proxy_argv("node1"), "--cleanup"]), check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    rules = cluster.ruleset("node1")
    assert "KUBE-" not in rules and "kube-proxy" not in rules
    assert not os.path.exists(cluster.net.pin_path("node1"))
    with pytest.raises(OSError):
        cluster.request("client", web, 80, timeout=0.5)


def test_external_flush_is_repaired(cluster: LabCluster) -> None:
    """Someone flushes the tables: the canary check (every sync period) forces a full resync."""
    mode = cluster.mode  # type: ignore[attr-defined]
    cluster.stop_proxy("node1")
    cluster.start_proxy("node1", [f"--proxy-mode={mode}", "--iptables-sync-period=1s"])
    web = ip_of(cluster, "web")
    wait_until(lambda: reaches(cluster, web, {"web-0", "web-1"}), timeout=30, what="traffic before the flush")
    if mode == "iptables":
        for table in ("nat", "filter", "mangle"):
            cluster.net.exec("node1", ["iptables", "-t", table, "-F"])
            cluster.net.exec("node1", ["iptables", "-t", table, "-X"])
    elif mode == "ebpf":  # the programs detached and unpinned, as a stray `kproxyd --cleanup` would
        detach_and_unpin(cluster.net.node_cgroup("node1"), cluster.net.pin_path("node1"))
    else:
        cluster.net.exec("node1", ["nft", "delete", "table", "ip", "kube-proxy"])
    assert not reaches(cluster, web, {"web-0", "web-1"})
    wait_until(
        lambda: reaches(cluster, web, {"web-0", "web-1"}), timeout=30, what="rules restored after the flush"
    )


def test_switching_modes_keeps_traffic_and_removes_the_old_rules(cluster: LabCluster) -> None:
    mode = cluster.mode  # type: ignore[attr-defined]
    other = "nftables" if mode == "iptables" else "iptables"
    web = ip_of(cluster, "web")
    for switch_to, left_behind in ((other, _mode_marker(mode)), (mode, _mode_marker(other))):
        cluster.stop_proxy("node1")
        assert reaches(cluster, web, {"web-0", "web-1"})  # the old mode's rules still carry traffic
        cluster.start_proxy("node1", [f"--proxy-mode={switch_to}"])
        wait_until(lambda m=left_behind: m not in cluster.ruleset("node1"), timeout=30, what="old rules removed")
        assert reaches(cluster, web, {"web-0", "web-1"})


def _mode_marker(mode: str) -> str:
    """Text only that mode's rules contain."""
    return "KUBE-SVC-" if mode == "iptables" else "table ip kube-proxy"


def test_bad_flag_is_a_clear_startup_error(cluster: LabCluster) -> None:
    proc = subprocess.run(
        [*cluster.proxy_argv("node1"), "--proxy-mode=userspace"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "--proxy-mode" in proc.stderr and "userspace" in proc.stderr


def test_nftables_partial_syncs_go_as_netlink_batches(cluster: LabCluster) -> None:
    """In nftables mode an endpoint change is written as one netlink batch, not through nft -f."""
    mode = cluster.mode  # type: ignore[attr-defined]
    if mode != "nftables":
        pytest.skip("netlink batches are the nftables backend's writer")
    cluster.stop_proxy("node1")
    written = cluster.proxy_log("node1").count("nftables rules written")
    cluster.start_proxy("node1", [f"--proxy-mode={mode}", "-v=4"])
    web = ip_of(cluster, "web")
    pods = {pod.name for pod in cluster.net.pods if pod.name.startswith("web-")}  # the module's app=web pods
    wait_until(
        lambda: cluster.proxy_log("node1").count("nftables rules written") > written, timeout=30, what="first sync"
    )
    wait_until(lambda: reaches(cluster, web, pods), timeout=30, what="traffic after the first sync")
    cluster.add_pod("web-nl", "node1", {"app": "web"})
    try:
        wait_until(lambda: reaches(cluster, web, pods | {"web-nl"}), timeout=30, what="the new endpoint")
        wait_until(
            lambda: re.search(r"nftables rules written .*full=False.*writer=netlink", cluster.proxy_log("node1")),
            timeout=10,
            what="a partial sync logged as written by netlink",
        )
    finally:
        cluster.delete_pod("web-nl")
    wait_until(lambda: reaches(cluster, web, pods), timeout=30, what="the endpoint removed")
