"""The embedded lab: a cluster of namespace nodes and pods, an API server, the endpoints controller, kproxyds.

The API server listens on the LAN (172.28.0.1:6443, inside the lab's LAN namespace) so every node's kproxyd
reaches it the way a real node reaches its control plane. The demo and the tests both drive this class.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from kproxyd.lab.apiserver import LabApiServer, write_kubeconfig
from kproxyd.lab.controller import EndpointsController
from kproxyd.lab.netlab import TIME_SCALE, LabNode, LabPod, NetLab, Reply
from kproxyd.lab.nsutil import socket_in_netns
from kproxyd.lab.store import ObjectStore, now_rfc3339

log = structlog.get_logger(__name__)

API_PORT = 6443
CLUSTER_CIDR = "10.244.0.0/16,fd00:244::/32"
T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.1, what: str = "condition") -> T:
    """Poll check() until it returns something truthy (timeout stretched by TIME_SCALE); else TimeoutError."""
    deadline = time.monotonic() + timeout * TIME_SCALE
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = check()
    return last


class LabCluster:
    """Nodes, pods and Services in network namespaces, served by an in-process API server."""

    def __init__(self, nodes: Sequence[str] = ("node1", "node2"), zones: Sequence[str | None] = ()) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kproxyd-lab-"))
        self.net = NetLab()
        self.store = ObjectStore()
        self.controller = EndpointsController(self.store)
        self.proxies: dict[str, subprocess.Popen[Any]] = {}
        self.api: LabApiServer | None = None
        try:
            self._build(nodes, zones)
        except BaseException:
            self.close()
            raise

    def _build(self, nodes: Sequence[str], zones: Sequence[str | None]) -> None:
        self.start_api()
        assert self.api is not None
        self.kubeconfig = self.workdir / "kubeconfig"
        write_kubeconfig(self.kubeconfig, self.api.url)
        self.controller.start()
        for index, name in enumerate(nodes):
            self.add_node(name, zones[index] if index < len(zones) else None)
        self.external = self.net.add_external_client("ext")

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every kproxyd, the API server and the controller; delete every namespace."""
        for name in list(self.proxies):
            self.stop_proxy(name)
        self.controller.stop()
        self.stop_api()
        self.net.close()
        shutil.rmtree(self.workdir, ignore_errors=True)  # the kubeconfig and the kproxyd logs

    # The API server.

    def start_api(self) -> None:
        """Serve the store at 172.28.0.1:6443 inside the LAN namespace (again, after stop_api)."""
        listener = socket_in_netns(self.net.lan.netns, socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.net.lan.ip, API_PORT))
        listener.listen(64)
        self.api = LabApiServer(self.store, sock=listener)
        self.api.start()

    def stop_api(self) -> None:
        """Stop the API server as if it crashed: watches are cut, new connections refused."""
        if self.api is not None:
            self.api.stop()
            self.api = None

    # Nodes and their proxies.

    def add_node(self, name: str, zone: str | None = None) -> LabNode:
        """A node namespace and its Node object (addresses, pod CIDR, zone label)."""
        node = self.net.add_node(name)
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
        if zone:
            labels["topology.kubernetes.io/zone"] = zone
        self.store.create(
            "Node",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr, node.pod_cidr6]},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": node.ip},
                        {"type": "InternalIP", "address": node.ip6},
                        {"type": "Hostname", "address": name},
                    ]
                },
            },
        )
        return node

    def proxy_argv(self, node: str, extra: Iterable[str] = ()) -> list[str]:
        """The kproxyd command line for a node, with kube-proxy's flags."""
        return [
            sys.executable,
            "-m",
            "kproxyd",
            f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={node}",
            f"--cluster-cidr={CLUSTER_CIDR}",
            "--iptables-min-sync-period=100ms",
            f"--cgroup-root={self.net.node_cgroup(node)}",
            f"--bpf-pin-path={self.net.pin_path(node)}",
            *extra,
        ]

    def start_proxy(self, node: str, extra: Iterable[str] = ()) -> subprocess.Popen[Any]:
        """Run kproxyd in a node's namespace, logging to <workdir>/kproxyd-<node>.log."""
        log_file = open(self.workdir / f"kproxyd-{node}.log", "ab")  # noqa: SIM115 - owned by the process
        # The host's /sys: the ebpf mode attaches to the node's cgroup and pins in the host's bpffs.
        argv = self.proxy_argv(node, extra)
        proc = self.net.popen(node, argv, host_sys=True, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        self.proxies[node] = proc
        return proc

    def stop_proxy(self, node: str, sig: int = 15) -> int | None:
        """Stop a node's kproxyd (SIGTERM by default) and return its exit code."""
        proc = self.proxies.pop(node, None)
        if proc is None:
            return None
        proc.send_signal(sig)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def proxy_log(self, node: str) -> str:
        """What a node's kproxyd logged so far."""
        path = self.workdir / f"kproxyd-{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ruleset(self, node: str) -> str:
        """Everything programmed in a node's namespace, whatever the mode: iptables-save, ip6tables-save, nft."""
        run = [["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]]
        return "".join(self.net.exec(node, argv, check=False).stdout for argv in run)

    def iptables_save(self, node: str, table: str = "nat") -> str:
        """iptables-save of one table in a node's namespace."""
        return self.net.exec(node, ["iptables-save", "-t", table]).stdout

    # Workloads.

    def add_pod(
        self,
        name: str,
        node: str,
        labels: dict[str, str],
        ports: Sequence[dict[str, Any]] = ({"name": "http", "containerPort": 8080, "protocol": "TCP"},),
        namespace: str = "default",
        ready: bool = True,
    ) -> LabPod:
        """A pod: its namespace with a server on each container port, and its Pod object."""
        tcp = [p["containerPort"] for p in ports if p.get("protocol", "TCP") == "TCP"]
        udp = [p["containerPort"] for p in ports if p.get("protocol") == "UDP"]
        pod = self.net.add_pod(node, name, tcp_ports=tcp, udp_ports=udp)
        self.store.create(
            "Pod",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "app", "ports": list(ports)}]},
                "status": {
                    "phase": "Running",
                    "podIP": pod.ip,
                    "podIPs": [{"ip": pod.ip}, {"ip": pod.ip6}],
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                },
            },
        )
        return pod

    def add_deployment(
        self, name: str, replicas: int, labels: dict[str, str], nodes: Sequence[str] | None = None, **pod: Any
    ) -> list[LabPod]:
        """replicas pods named <name>-<i>, spread over the nodes round-robin."""
        spread = list(nodes or [n.name for n in self.net.nodes])
        return [self.add_pod(f"{name}-{i}", spread[i % len(spread)], labels, **pod) for i in range(replicas)]

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        """Delete a pod's object (its endpoint goes away) and its namespace."""
        self.store.delete("Pod", namespace, name)
        self.net.remove_pod(name)

    def set_pod_ready(self, name: str, ready: bool, namespace: str = "default") -> None:
        """Flip a pod's Ready condition."""
        pod = self.store.get("Pod", namespace, name)
        assert pod is not None, f"no pod {namespace}/{name}"
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        self.store.update("Pod", pod)

    def terminate_pod(self, name: str, namespace: str = "default") -> None:
        """Start a pod's graceful deletion: it keeps serving but its endpoint becomes terminating."""
        pod = self.store.get("Pod", namespace, name)
        assert pod is not None, f"no pod {namespace}/{name}"
        pod["metadata"]["deletionTimestamp"] = now_rfc3339()
        self.store.update("Pod", pod)

    def set_node_zone(self, node: str, zone: str) -> None:
        """Change a Node's topology.kubernetes.io/zone label."""
        obj = self.store.get("Node", "", node)
        assert obj is not None, f"no node {node}"
        obj["metadata"].setdefault("labels", {})["topology.kubernetes.io/zone"] = zone
        self.store.update("Node", obj)

    def set_load_balancer(self, name: str, ips: Sequence[str], namespace: str = "default", **ingress: Any) -> None:
        """Publish load-balancer ingress IPs in a Service's status, as a cloud controller would."""
        svc = self.service(name, namespace)
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip, **ingress} for ip in ips]}}
        self.store.update("Service", svc, part="status")

    def route_from_outside(self, cidr: str, node: str, host: str = "ext") -> None:
        """Route cidr (IPv4 or IPv6) from an external host to a node (what a load balancer or router would do)."""
        lab_node = self.net.node(node)
        self.net.exec(host, ["ip", "route", "replace", cidr, "via", lab_node.ip6 if ":" in cidr else lab_node.ip])

    def add_external_client(self, name: str) -> str:
        """Another machine on the node network; returns its IP."""
        return self.net.add_external_client(name).ip

    def create_service(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create a Service (defaulted and allocated like the real API server)."""
        return self.store.create("Service", obj)

    def update_service(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace a Service."""
        return self.store.update("Service", obj)

    def service(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """A Service as stored."""
        svc = self.store.get("Service", namespace, name)
        assert svc is not None, f"no service {namespace}/{name}"
        return svc

    # Traffic.

    def request(self, src: str, ip: str, port: int, proto: str = "TCP", timeout: float = 1.0) -> Reply:
        """One request from a host (node, pod or 'ext') to ip:port."""
        return self.net.request(src, ip, port, proto, timeout=timeout)

    def http_get(self, src: str, ip: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """A plain HTTP GET from inside a host's namespace: (status, body)."""
        with self.net.socket(src, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
        return int(head.split()[1]), body

    def answers(
        self, src: str, ip: str, port: int, proto: str = "TCP", count: int = 30, timeout: float = 1.0
    ) -> list[Reply | Exception]:
        """count requests; each a Reply or the error it got."""
        return self.net.request_many(src, ip, port, proto, count=count, timeout=timeout)
