"""Who gets masqueraded on the way to a cluster IP, for each way kube-proxy recognises pod traffic.

kproxyd restarts on node1 with each configuration; client1 is a pod on node1, ext a machine outside the
cluster that routes the service CIDR to node1.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply

EXT = "172.28.0.200"


@pytest.fixture(scope="module")
def cluster(lab: LabCluster) -> Iterator[LabCluster]:
    """Two backends on node1, a client pod, and a route from ext to the service CIDR."""
    if lab.mode == "ebpf":  # type: ignore[attr-defined]
        pytest.skip(
            "ebpf translates cluster IPs at connect(): no NAT, so nothing is masqueraded, and cluster IPs are"
            " not served to traffic from outside the node (tests/netns/test_semantics.py asserts both)"
        )
    lab.route_from_outside("10.96.0.0/16", "node1")
    lab.add_pod("web-0", "node1", {"app": "web"})
    lab.add_pod("web-1", "node1", {"app": "web"})
    lab.add_pod("client1", "node1", {"app": "client"})
    lab.create_service(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }
    )
    yield lab


def healthy(lab: LabCluster) -> bool:
    """node1's kproxyd has completed a sync."""
    try:
        return lab.http_get("node1", "127.0.0.1", 10256, "/healthz")[0] == 200
    except OSError:
        return False


def masqueraded(lab: LabCluster, src: str, src_ip: str) -> bool:
    """Whether the pods behind web saw another source than src's own address (all replies must agree)."""
    ip = lab.service("web")["spec"]["clusterIP"]
    replies = [r for r in lab.answers(src, ip, 80, count=10) if isinstance(r, Reply)]
    assert len(replies) == 10
    seen = {r.source_ip != src_ip for r in replies}
    assert len(seen) == 1, {r.source_ip for r in replies}
    return seen.pop()


@pytest.mark.parametrize(
    ("flags", "pod_masqueraded", "outside_masqueraded"),
    [
        (["--cluster-cidr=10.244.0.0/16"], False, True),
        (["--detect-local-mode=NodeCIDR"], False, True),
        (["--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cbr0"], False, True),
        # Pod veths are bridge ports here, so iptables sees cbr0 as the input interface (prefix "cbr").
        (["--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=cbr"], False, True),
        (["--masquerade-all"], True, True),
        (["--cluster-cidr="], False, False),  # nothing recognises pod traffic: nothing is masqueraded
    ],
    ids=["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix", "masquerade-all", "no-detector"],
)
def test_masquerade(
    cluster: LabCluster, flags: list[str], pod_masqueraded: bool, outside_masqueraded: bool
) -> None:
    cluster.stop_proxy("node1")
    mode = f"--proxy-mode={cluster.mode}"  # type: ignore[attr-defined]
    cluster.start_proxy("node1", [mode, *flags])
    wait_until(lambda: healthy(cluster), timeout=30, what="kproxyd's first sync")
    assert masqueraded(cluster, "client1", cluster.net.pod("client1").ip) is pod_masqueraded
    assert masqueraded(cluster, "ext", EXT) is outside_masqueraded
