"""The ebpf mode's own promises: its programs compile and load here, a restart under load drops nothing
(pinned maps, programs replaced in place), Maglev keeps flows on their backend when another goes, and the
tc program serves node ports from the network (IPv4 and IPv6, TCP and UDP) and goes away with --cleanup, and
connected UDP sockets to a removed endpoint are destroyed.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd.backends.ebpf.image import ADDRESS_ENTRY, F_NO_ENDPOINTS, FrontendEntry, FrontendKey, address_key
from kproxyd.backends.ebpf.kernel import (
    HOOKS,
    PinnedFrontends,
    SockLbKernel,
    cgroup2_root,
    detach_and_unpin,
)
from kproxyd.lab import nsutil
from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply
from kproxyd.model import Protocol
from tests.netns.expect import TC_ATTACHED, assert_served_by_tc

ATTACHED = "eBPF socket load balancer attached"
UDP = [{"name": "dns", "containerPort": 8053, "protocol": "UDP"}, {"name": "http", "containerPort": 8080}]
NODE_PORTS = {"http": 30080, "dns": 30053}
LB_NODE_PORTS = {"http": 30081, "dns": 30054}
LOCAL_NODE_PORTS = {"http": 30082, "dns": 30055}
LB_IP, LOCAL_LB_IP, EXTERNAL_IP = "172.29.0.10", "172.29.0.11", "172.29.0.20"  # never routed: translated


def svc(name: str, app: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A Service with TCP 80 -> 8080 and UDP 53 -> 8053."""
    ports = [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "dns", "port": 53, "targetPort": 8053, "protocol": "UDP"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}},
        "spec": {"selector": {"app": app}, "ports": ports, **spec},
    }


@pytest.fixture
def scratch() -> Iterator[tuple[str, str]]:
    """A cgroup of our own (never the root) and a pin directory, both removed afterwards."""
    cgroup = os.path.join(cgroup2_root(), f"kproxyd-test-{secrets.token_hex(3)}")
    pin = f"/sys/fs/bpf/kproxyd-test-{secrets.token_hex(3)}"
    os.mkdir(cgroup)
    try:
        yield cgroup, pin
    finally:
        detach_and_unpin(cgroup, pin)
        os.rmdir(cgroup)


def test_programs_compile_load_attach_and_clean_up(scratch: tuple[str, str]) -> None:
    cgroup, pin = scratch
    kernel = SockLbKernel(cgroup, pin)
    started = time.monotonic()
    kernel.load()
    print(f"compile+load: {time.monotonic() - started:.2f} s")
    assert not kernel.attached()  # attached only once the first write filled the maps
    kernel.attach()
    assert kernel.attached()
    assert {"frontends", "slots", "counters", "affinity", "reverse", "prog_connect6"} <= set(os.listdir(pin))
    assert kernel.read_image(4) == kernel.read_image(6) == {}
    assert sorted(detach_and_unpin(cgroup, pin)) == sorted(HOOKS)  # the v4 and the v6 programs
    assert not os.path.exists(pin)
    assert detach_and_unpin(cgroup, pin) == []  # nothing there: a no-op, no compile


def test_pinned_frontends_read_what_the_daemon_wrote(scratch: tuple[str, str]) -> None:
    """`kproxyd explain`'s reader (no compile) sees the entries, slots and names the loader wrote."""
    cgroup, pin = scratch
    kernel = SockLbKernel(cgroup, pin)
    kernel.load()
    web = FrontendKey("10.96.0.10", 80, Protocol.TCP)
    entry = FrontendEntry((("10.244.1.2", 8080), ("10.244.1.3", 8080)), 0, 600, "default/web:http")
    empty = FrontendKey("fd00:96::11", 53, Protocol.UDP)
    kernel.write({web: entry, address_key(web.ip): ADDRESS_ENTRY, empty: FrontendEntry((), F_NO_ENDPOINTS)}, [])
    maps = PinnedFrontends(pin)
    try:
        found = maps.frontend(web)
        assert found is not None and found.entry == entry and found.rev > 0 and found.connections == 0
        assert maps.frontend(address_key(web.ip)) is not None
        no_endpoints = maps.frontend(empty)
        assert no_endpoints is not None and no_endpoints.entry == FrontendEntry((), F_NO_ENDPOINTS)
        assert maps.frontend(FrontendKey("10.96.0.10", 81, Protocol.TCP)) is None
        assert maps.service_at(web.ip) == "default/web" and maps.service_at("fd00:96::11") == ""
    finally:
        maps.close()
    kernel.write({}, [web])
    maps = PinnedFrontends(pin)
    try:
        assert maps.service_at(web.ip) == ""  # its name went with it
    finally:
        maps.close()


def test_maps_pinned_by_an_earlier_layout_are_replaced(scratch: tuple[str, str]) -> None:
    """bcc would reuse a pinned map of another key size as it is (the IPv4-only layout's 8-byte keys)."""
    from bcc import BPF

    cgroup, pin = scratch
    os.makedirs(pin)
    old = BPF(text=f'BPF_TABLE_PINNED("hash", u64, u64, frontends, 16, "{pin}/frontends");'.encode())
    old.cleanup()
    kernel = SockLbKernel(cgroup, pin)
    kernel.load()
    image = {
        FrontendKey("fd00:96::10", 80, Protocol.TCP): FrontendEntry((("fd00:244::2", 8080),), service="ns/a:b")
    }
    kernel.write(image, [])
    assert kernel.read_image(6) == image  # the ServicePort's name too (the names map)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    """One node in ebpf mode with two backends and a client pod."""
    with LabCluster(nodes=("node1",)) as lab:
        lab.add_pod("web-0", "node1", {"app": "web"}, ports=UDP)
        lab.add_pod("web-1", "node1", {"app": "web"}, ports=UDP)
        lab.add_pod("client", "node1", {"app": "client"})
        lab.create_service(svc("web", "web", ipFamilyPolicy="RequireDualStack"))
        node_port = svc("web-np", "web", type="NodePort", ipFamilyPolicy="RequireDualStack")
        for port in node_port["spec"]["ports"]:
            port["nodePort"] = NODE_PORTS[port["name"]]
        lab.create_service(node_port)
        for name, ports, spec in (
            ("web-lb", LB_NODE_PORTS, {"externalIPs": [EXTERNAL_IP]}),
            ("web-local", LOCAL_NODE_PORTS, {"externalTrafficPolicy": "Local"}),
        ):
            lb = svc(name, "web", type="LoadBalancer", ipFamilyPolicy="PreferDualStack", **spec)
            for port in lb["spec"]["ports"]:
                port["nodePort"] = ports[port["name"]]
            lab.create_service(lb)
        lab.set_load_balancer("web-lb", [LB_IP])
        lab.set_load_balancer("web-local", [LOCAL_LB_IP])
        lab.start_proxy("node1", ["--proxy-mode=ebpf"])
        wait_until(lambda: TC_ATTACHED in lab.proxy_log("node1"), timeout=60, what="tc attached")
        yield lab


def _cluster_ip(lab: LabCluster, name: str) -> str:
    return str(lab.service(name)["spec"]["clusterIP"])


def _answered(lab: LabCluster, ip: str, pods: set[str], src: str = "client", port: int = 80) -> bool:
    replies = lab.answers(src, ip, port, count=10, timeout=0.5)
    return all(isinstance(r, Reply) for r in replies) and {r.pod for r in replies if isinstance(r, Reply)} == pods


@pytest.mark.parametrize("via", ["cluster-ip", "node-port", "node-port-v6"])
@pytest.mark.parametrize("sig", [15, 9], ids=["SIGTERM", "SIGKILL"])
def test_restart_under_a_connection_loop_loses_nothing(cluster: LabCluster, sig: int, via: str) -> None:
    """Through the socket load balancer from a pod, or through tc from outside (node port, either family)."""
    node = cluster.net.node("node1")
    src, ip, port, pin, attached_log = (
        ("client", _cluster_ip(cluster, "web"), 80, "frontends", ATTACHED)
        if via == "cluster-ip"
        else (
            "ext",
            node.ip6 if via == "node-port-v6" else node.ip,
            NODE_PORTS["http"],
            "tc_frontends",
            TC_ATTACHED,
        )
    )
    wait_until(lambda: _answered(cluster, ip, {"web-0", "web-1"}, src, port), timeout=30, what="web served")
    frontends = os.path.join(cluster.net.pin_path("node1"), pin)
    inode = os.stat(frontends).st_ino
    results: list[Reply | Exception] = []
    stop = threading.Event()

    def loop() -> None:
        # 3 s: a SYN the busy (Python) pod server's backlog dropped is retransmitted after 1 s, not lost.
        while not stop.is_set():
            results.extend(cluster.answers(src, ip, port, count=1, timeout=3.0))
            time.sleep(0.002)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(0.5)
        cluster.stop_proxy("node1", sig)
        time.sleep(0.5)
        attached = cluster.proxy_log("node1").count(attached_log)
        cluster.start_proxy("node1", ["--proxy-mode=ebpf"])
        wait_until(
            lambda: cluster.proxy_log("node1").count(attached_log) > attached, timeout=60, what="reattached"
        )
        time.sleep(1.0)  # keep connecting after the new programs replaced the old ones
    finally:
        stop.set()
        thread.join()
    failures = [r for r in results if not isinstance(r, Reply)]
    assert len(results) > 50 and not failures, (len(results), failures[:3])
    assert os.stat(frontends).st_ino == inode  # the same pinned map: adopted, not recreated


def _flows(lab: LabCluster, ip: str, ports: range) -> dict[int, str]:
    """The pod answering each UDP source port (a flow); each port is bound before connect(), so hashed."""
    out = {}
    for port in ports:
        try:
            out[port] = lab.net.request("client", ip, 53, "UDP", timeout=1.0, source_port=port).pod
        except OSError as err:
            out[port] = repr(err)
    return out


def test_maglev_keeps_flows_when_a_backend_goes(cluster: LabCluster) -> None:
    """In both families: a dual-stack Service's IPv4 and IPv6 cluster IPs each hash flows Maglev's way."""
    for i in range(4):
        cluster.add_pod(f"mag-{i}", "node1", {"app": "mag"}, ports=UDP)
    maglev = svc("mag", "mag", {"kproxyd.io/lb-algorithm": "maglev"}, ipFamilyPolicy="RequireDualStack")
    ips = cluster.create_service(maglev)["spec"]["clusterIPs"]
    ports = range(43000, 43080)
    for ip in ips:
        wait_until(
            lambda ip=ip: len(set(_flows(cluster, ip, ports[:20]).values())) == 4, timeout=30, what="4 pods"
        )
    before = {ip: _flows(cluster, ip, ports) for ip in ips}
    assert before == {ip: _flows(cluster, ip, ports) for ip in ips}  # a flow keeps its backend: hashed
    cluster.delete_pod("mag-3")
    for ip in ips:
        wait_until(lambda ip=ip: "mag-3" not in _flows(cluster, ip, ports).values(), timeout=30, what="mag-3 gone")
    for ip in ips:
        after = _flows(cluster, ip, ports)
        moved = [p for p in ports if before[ip][p] != "mag-3" and after[p] != before[ip][p]]
        assert len(moved) <= len(ports) * 0.1, (ip, moved)  # only mag-3's flows (about 1/4) had to move


@pytest.mark.parametrize("kind", ["IPv4", "IPv6", "IPv4-mapped"])
def test_applications_see_the_service_address(cluster: LabCluster, kind: str) -> None:
    """getpeername() of a translated TCP connection, and recvfrom() of an unconnected UDP socket's reply,
    show the cluster IP the application asked for, not the backend (the getpeername and recvmsg programs);
    an IPv6 socket naming ::ffff:<IPv4 cluster IP> runs the "6" programs on the IPv4 frontend.
    """
    v4, v6 = cluster.service("web")["spec"]["clusterIPs"]
    ip = {"IPv4": v4, "IPv6": v6, "IPv4-mapped": f"::ffff:{v4}"}[kind]
    family = socket.AF_INET if kind == "IPv4" else socket.AF_INET6
    wait_until(lambda: _answered(cluster, ip, {"web-0", "web-1"}), timeout=30, what="web served")
    with cluster.net.socket("client", family, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(2)
        tcp.connect((ip, 80))
        assert tcp.getpeername()[:2] == (ip, 80)
    with cluster.net.socket("client", family, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        udp.sendto(b"HELLO\n", (ip, 53))
        data, peer = udp.recvfrom(4096)
    assert peer[:2] == (ip, 53)
    assert data.split()[0].decode() in {"web-0", "web-1"}


@pytest.mark.parametrize("family", [4, 6], ids=["IPv4", "IPv6"])
def test_node_ports_from_outside_run_in_tc_tcp_and_udp(cluster: LabCluster, family: int) -> None:
    """Counted in tc's own counters (tc_counters), masqueraded to the pod bridge's address (Cluster policy)."""
    node = cluster.net.node("node1")
    node_ip, gateway = (node.ip, node.pod_gateway) if family == 4 else (node.ip6, node.pod_gateway6)
    for proto, port in (("TCP", NODE_PORTS["http"]), ("UDP", NODE_PORTS["dns"])):
        assert_served_by_tc(cluster, "ext", "node1", node_ip, port, proto)
        replies = [cluster.request("ext", node_ip, port, proto, timeout=1.0) for _ in range(10)]
        assert {r.pod for r in replies} == {"web-0", "web-1"}
        assert {r.source_ip for r in replies} == {gateway}


def _ask(sock: socket.socket) -> str:
    """One request on a connected UDP socket: the pod that answered."""
    sock.send(b"HELLO\n")
    return Reply.parse(sock.recv(4096).split(b"\n")[0]).pod


def _connected_to(lab: LabCluster, ip: str, family: int, pod: str) -> socket.socket:
    """A UDP socket of the client pod connected to ip:53 that the socket load balancer gave to pod."""
    for _ in range(64):
        sock = lab.net.socket("client", family, socket.SOCK_DGRAM)
        sock.settimeout(2)
        sock.connect((ip, 53))
        if _ask(sock) == pod:
            return sock
        sock.close()
    raise AssertionError(f"no connect() to {ip} went to {pod}")


def _aborted(sock: socket.socket) -> bool:
    """True once a call on the socket fails with ECONNABORTED (it was destroyed)."""
    sock.settimeout(0.2)
    try:
        sock.recv(4096)
    except ConnectionAbortedError:
        return True
    except TimeoutError:
        return False
    raise AssertionError("an answer nobody asked for")


@pytest.mark.parametrize("kind", ["IPv4", "IPv6", "IPv4-mapped"])
def test_connected_udp_socket_to_a_removed_backend_is_destroyed(cluster: LabCluster, kind: str) -> None:
    """A connected UDP socket was translated once, at connect(): when its endpoint goes, kproxyd destroys it
    (the ebpf mode's conntrack cleanup). Its owner gets ECONNABORTED, a new socket reaches the live pod, and a
    socket connected to the live endpoint of the same Service is untouched.
    """
    app = {"IPv4": "sd4", "IPv6": "sd6", "IPv4-mapped": "sdm"}[kind]
    dead_pod, live_pod = f"{app}-0", f"{app}-1"
    for pod in (dead_pod, live_pod):
        cluster.add_pod(pod, "node1", {"app": app}, ports=UDP)
    v4, v6 = cluster.create_service(svc(app, app, ipFamilyPolicy="RequireDualStack"))["spec"]["clusterIPs"]
    ip = {"IPv4": v4, "IPv6": v6, "IPv4-mapped": f"::ffff:{v4}"}[kind]
    family = socket.AF_INET if kind == "IPv4" else socket.AF_INET6
    wait_until(lambda: _answered(cluster, ip, {dead_pod, live_pod}), timeout=30, what=f"{app} served")
    destroyed = cluster.proxy_log("node1").count("UDP sockets destroyed")
    with (
        _connected_to(cluster, ip, family, dead_pod) as dead,
        _connected_to(cluster, ip, family, live_pod) as live,
    ):
        cluster.delete_pod(dead_pod)
        wait_until(lambda: _aborted(dead), timeout=10, what="the removed endpoint's socket destroyed")
        with pytest.raises(OSError):
            dead.getpeername()  # disconnected: the application opens a new socket
        live.settimeout(2)
        assert _ask(live) == live_pod
    wait_until(lambda: cluster.proxy_log("node1").count("UDP sockets destroyed") > destroyed, what="logged")
    for _ in range(5):  # new sockets: only the live pod is left
        with cluster.net.socket("client", family, socket.SOCK_DGRAM) as fresh:
            fresh.settimeout(2)
            fresh.connect((ip, 53))
            assert _ask(fresh) == live_pod


def test_sockets_destroyed_metric(cluster: LabCluster) -> None:
    """After the test above: kproxyd_sockets_destroyed_total counted the destroyed sockets."""
    status, body = cluster.http_get("node1", "127.0.0.1", 10249, "/metrics")
    assert status == 200
    count = next(
        line.split()[1] for line in body.splitlines() if line.startswith("kproxyd_sockets_destroyed_total")
    )
    assert float(count) >= 3


def _local_frontends(lab: LabCluster) -> list[tuple[str, int, int]]:
    """(ip, TCP port, UDP port) of the external frontends a process of node1 may dial."""
    node = lab.net.node("node1")
    return [
        (node.ip, LB_NODE_PORTS["http"], LB_NODE_PORTS["dns"]),
        (node.ip6, LB_NODE_PORTS["http"], LB_NODE_PORTS["dns"]),
        (EXTERNAL_IP, 80, 53),
        (LB_IP, 80, 53),
        (node.ip, LOCAL_NODE_PORTS["http"], LOCAL_NODE_PORTS["dns"]),  # externalTrafficPolicy Local
        (LOCAL_LB_IP, 80, 53),
    ]


def _translated(maps: PinnedFrontends, key: FrontendKey) -> int:
    """Connections the socket load balancer translated at key so far (its pinned counters map)."""
    found = maps.frontend(key)
    assert found is not None, f"no socket load balancer frontend {key}"
    return found.connections


@pytest.mark.parametrize("src", ["node1", "client"])
def test_local_processes_reach_external_frontends_through_the_socket_load_balancer(
    cluster: LabCluster, src: str
) -> None:
    """The node and its pods dialing the node's IPs at node ports, external IPs and LB IPs (Cluster and Local
    policy) are translated inside connect()/sendmsg(): the socket load balancer's counter moves by every
    request; UDP replies come from the frontend the application named.
    """
    maps = PinnedFrontends(cluster.net.pin_path("node1"))
    try:
        for ip, tcp, udp in _local_frontends(cluster):
            for port, proto in ((tcp, Protocol.TCP), (udp, Protocol.UDP)):
                key = FrontendKey(ip, port, proto)
                wait_until(lambda k=key: maps.frontend(k) is not None, timeout=30, what=f"frontend {key}")
                before = _translated(maps, key)
                replies = cluster.answers(src, ip, port, str(proto), count=20, timeout=1.0)
                assert {r.pod for r in replies if isinstance(r, Reply)} == {"web-0", "web-1"}, replies
                assert all(isinstance(r, Reply) for r in replies), replies
                assert _translated(maps, key) >= before + 20, key
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            with cluster.net.socket(src, family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2)
                sock.sendto(b"HELLO\n", (ip, udp))
                data, peer = sock.recvfrom(4096)
            assert peer[:2] == (ip, udp) and data.split()[0].decode() in {"web-0", "web-1"}
    finally:
        maps.close()


@pytest.mark.parametrize("src", ["node1", "client"])
def test_a_node_ip_on_another_port_still_reaches_the_node(cluster: LabCluster, src: str) -> None:
    """Node IPs get no address entry (only cluster IPs do): a listener of the node (ssh, say) stays reachable."""
    node_ip = cluster.net.node("node1").ip
    with cluster.net.socket("node1", socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((node_ip, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        listener.settimeout(2)
        with cluster.net.socket(src, socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(2)
            client.connect((node_ip, port))
            accepted, _ = listener.accept()
            accepted.close()
            assert client.getpeername()[:2] == (node_ip, port)


def test_cleanup_detaches_the_tc_programs(cluster: LabCluster) -> None:
    """Last in the module: --cleanup removes our tc filters from every interface of the node."""
    filters = cluster.net.exec("node1", ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    assert "kproxyd_tc_nat" in filters
    cluster.stop_proxy("node1")
    node = cluster.net.node("node1").netns
    cleanup = nsutil.run(nsutil.nsenter_argv(node, [*cluster.proxy_argv("node1"), "--cleanup"]), check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    for dev in ("eth0", "cbr0"):
        for direction in ("ingress", "egress"):
            shown = cluster.net.exec("node1", ["tc", "filter", "show", "dev", dev, direction], check=False).stdout
            assert "kproxyd_tc_nat" not in shown, (dev, direction)
    assert not os.path.exists(cluster.net.pin_path("node1"))
    with pytest.raises(OSError):
        cluster.request("ext", cluster.net.node("node1").ip, NODE_PORTS["http"], timeout=0.5)
