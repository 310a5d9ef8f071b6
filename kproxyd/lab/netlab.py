"""A lab cluster network built from network namespaces: a LAN switch, nodes with pod bridges, pods, clients.

Layout (PREFIX is "kp" + 4 random hex digits, unique per lab):
  PREFIX-lan      bridge br0 172.28.0.1/24 (LAN gateway and API host; forwarding off)
  PREFIX-NODE     eth0 172.28.0.(10+i)/24, cbr0 10.244.i.1/24, default via 172.28.0.1
  PREFIX-p-N      a pod: eth0 10.244.i.(2..254)/24, default via 10.244.i.1, runs kproxyd.lab.podserver
  PREFIX-x-NAME   an external client: eth0 172.28.0.(200+k)/24, default via 172.28.0.1
Every host is dual-stack: the LAN is also fd00:28::/64 (gateway ::1, node i ::(10+i), clients ::(200+k)),
node i's pods also fd00:244:i::/64 (cbr0 ::1), a pod's host part the same as in its IPv4 address.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import structlog

from kproxyd.lab import cgroups, nsutil
from kproxyd.lab.nsutil import ip_in

log = structlog.get_logger(__name__)

STATE_DIR = "/run/kproxyd-lab"
LAN_GATEWAY = "172.28.0.1"
LAN_PREFIXLEN = 24
LAN_GATEWAY6 = "fd00:28::1"
API_PORT = 6443
MAX_NODES = 100
# Slow machines (the qemu TCG guest of tests/guest runs Python ~10x slower) stretch every lab wait by this.
TIME_SCALE = float(os.environ.get("KPROXYD_LAB_TIME_SCALE", "1"))
POD_READY_TIMEOUT = 10.0 * TIME_SCALE
STOP_TIMEOUT = 3.0 * TIME_SCALE
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")

# Every lab namespace: answer REJECTs at once, and never drop asymmetric pod/service paths.
_COMMON_SYSCTLS = {
    "net.ipv4.icmp_ratelimit": 0,
    "net.ipv6.icmp.ratelimit": 0,
    # The global ICMP budget (per namespace on this kernel) also throttles REJECT answers under probing.
    "net.ipv4.icmp_msgs_per_sec": 100000,
    "net.ipv4.icmp_msgs_burst": 10000,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
}
_NODE_SYSCTLS = {
    **_COMMON_SYSCTLS,
    "net.ipv4.ip_forward": 1,
    "net.ipv6.conf.all.forwarding": 1,
    "net.bridge.bridge-nf-call-iptables": 1,
    "net.bridge.bridge-nf-call-ip6tables": 1,
}
_LAN_SYSCTLS = {**_COMMON_SYSCTLS, "net.ipv4.ip_forward": 0, "net.bridge.bridge-nf-call-iptables": 0}


class Host(Protocol):
    """Anything with a namespace and a primary address."""

    @property
    def name(self) -> str: ...
    @property
    def netns(self) -> str: ...
    @property
    def ip(self) -> str: ...


@dataclass(frozen=True, slots=True)
class LabHost:
    """A plain host on the LAN (the LAN namespace itself, or an external client)."""

    name: str
    netns: str
    ip: str
    ip6: str = ""


@dataclass(frozen=True, slots=True)
class LabNode:
    """A cluster node: eth0 on the LAN and a pod bridge cbr0 that is the pods' gateway."""

    name: str
    netns: str
    ip: str
    pod_cidr: str
    gateway: str
    index: int
    ip6: str = ""
    pod_cidr6: str = ""

    @property
    def pod_gateway(self) -> str:
        """cbr0's address, the first host of the pod CIDR."""
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def pod_gateway6(self) -> str:
        """cbr0's IPv6 address."""
        return str(next(ipaddress.ip_network(self.pod_cidr6).hosts()))


@dataclass(frozen=True, slots=True)
class LabPod:
    """A pod: its own namespace on a node's cbr0, running the pod server."""

    name: str
    node: str
    ip: str
    netns: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    ip6: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """What a pod server answered: which pod, and the client address it saw."""

    pod: str
    source_ip: str
    source_port: int

    @classmethod
    def parse(cls, line: bytes) -> Reply:
        """Parse "<pod> <ip> <port>"; ValueError when the answer is not that."""
        parts = line.decode(errors="replace").split()
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"unexpected pod server answer: {line!r}")
        return cls(parts[0], parts[1], int(parts[2]))


@dataclass(slots=True)
class _NodeState:
    node: LabNode
    next_host: int = 2
    free: set[int] = field(default_factory=set)


def _process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _bridge_mac(index: int) -> str:
    """A fixed, locally administered MAC for bridge index (0: the LAN).

    A bridge whose address was never set takes the lowest MAC of its ports, so it changes as pods come
    and go; hosts that cached the old gateway MAC then send frames the bridge no longer accepts for
    itself (dropped as for another host) until their neighbour entry expires, up to ~45 s. CNI bridge
    plugins pin the address for the same reason.
    """
    return f"02:6b:70:00:{index:02x}:01"


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers, and reap the leader."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
    log.error("process did not exit", pid=proc.pid)


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs in a lab namespace (never this process)."""
    for pid in nsutil.netns_pids(netns):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
    nsutil.run(["ip", "netns", "del", netns], check=False)


def cleanup_stale_labs() -> None:
    """Delete the namespaces of earlier labs whose owning process is gone (identified by their state file)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(STATE_DIR):
            _cleanup_stale_lab(os.path.join(STATE_DIR, entry))


def _cleanup_stale_lab(path: str) -> None:
    try:
        with open(path) as f:
            record = json.load(f)
        prefix, pid, start = str(record["prefix"]), int(record["pid"]), record["start"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable lab state file", path=path)
        return
    if not re.fullmatch(r"kp[0-9a-f]{4}", prefix):
        return
    if start is not None and _process_start_time(pid) == start:
        return  # its owner is still running
    with contextlib.suppress(FileNotFoundError):
        for netns in os.listdir(nsutil.NETNS_RUN_DIR):
            if netns.startswith(prefix + "-"):
                log.info("removing stale lab namespace", netns=netns)
                _delete_netns(netns)
    cgroups.remove_lab_cgroups(prefix)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class NetLab:
    """A lab cluster network, built on construction and torn down by close(); only request* is thread-safe."""

    def __init__(self) -> None:
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._hosts: dict[str, Host] = {}
        self._nodes: dict[str, _NodeState] = {}
        self._pods: dict[str, LabPod] = {}
        self._pod_procs: dict[str, subprocess.Popen[Any]] = {}
        self._pod_veths: dict[str, str] = {}
        self._factories: dict[str, cgroups.SocketFactory] = {}
        self._counter = 0
        self._externals = 0
        self._closed = False
        self._state_file = ""
        cleanup_stale_labs()
        self.prefix = self._claim_prefix()
        atexit.register(self.close)
        try:
            self.lan = self._build_lan()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process the lab started and delete every namespace it created; idempotent."""
        if self._closed:
            return
        # Pop as we go, and only mark closed at the end, so an interrupted close can simply be re-run.
        while self._factories:
            self._factories.popitem()[1].close()
        while self._procs:
            _stop_process(self._procs.pop())
        while self._namespaces:
            _delete_netns(self._namespaces.pop())
        cgroups.remove_lab_cgroups(self.prefix)
        if self._state_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._state_file)
        self._closed = True
        atexit.unregister(self.close)
        log.info("lab closed", prefix=self.prefix)

    def _claim_prefix(self) -> str:
        """Pick an unused prefix and record it with this process's identity (for stale cleanup)."""
        os.makedirs(STATE_DIR, exist_ok=True)
        pid = os.getpid()
        record = {"pid": pid, "start": _process_start_time(pid)}
        while True:
            prefix = "kp" + secrets.token_hex(2)
            path = os.path.join(STATE_DIR, prefix + ".json")
            if nsutil.netns_exists(f"{prefix}-lan"):
                continue
            try:
                with open(path, "x") as f:
                    json.dump({"prefix": prefix, **record}, f)
            except FileExistsError:
                continue
            self._state_file = path
            return prefix

    def _new_netns(self, suffix: str, sysctls: dict[str, int]) -> str:
        netns = f"{self.prefix}-{suffix}"
        nsutil.run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        nsutil.set_sysctls(netns, sysctls)
        ip_in(netns, "link", "set", "lo", "up")
        return netns

    def _register(self, host: Host) -> None:
        if host.name in self._hosts:
            raise ValueError(f"lab host {host.name!r} already exists")
        self._hosts[host.name] = host

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.match(name) or name in self._hosts:
            raise ValueError(f"invalid or duplicate lab host name {name!r}")

    # -- topology ----------------------------------------------------------------------------------

    def _build_lan(self) -> LabHost:
        netns = self._new_netns("lan", _LAN_SYSCTLS)
        ip_in(netns, "link", "add", "br0", "address", _bridge_mac(0), "type", "bridge")
        ip_in(netns, "addr", "add", f"{LAN_GATEWAY}/{LAN_PREFIXLEN}", "dev", "br0")
        ip_in(netns, "addr", "add", f"{LAN_GATEWAY6}/64", "dev", "br0", "nodad")
        ip_in(netns, "link", "set", "br0", "up")
        lan = LabHost("lan", netns, LAN_GATEWAY, LAN_GATEWAY6)
        self._register(lan)
        log.info("lab LAN up", prefix=self.prefix, netns=netns)
        return lan

    def _plug_into_lan(self, lan_veth: str, netns: str, address: str, address6: str) -> None:
        """A veth from the LAN bridge to eth0 of netns, with addresses and default routes via the gateway."""
        ip_in(self.lan.netns, "link", "add", lan_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip_in(self.lan.netns, "link", "set", lan_veth, "master", "br0", "up")
        ip_in(netns, "addr", "add", f"{address}/{LAN_PREFIXLEN}", "dev", "eth0")
        ip_in(netns, "addr", "add", f"{address6}/64", "dev", "eth0", "nodad")
        ip_in(netns, "link", "set", "eth0", "up")
        ip_in(netns, "route", "add", "default", "via", LAN_GATEWAY)
        ip_in(netns, "-6", "route", "add", "default", "via", LAN_GATEWAY6)

    def add_node(self, name: str) -> LabNode:
        """Add node i: eth0 172.28.0.(10+i), cbr0 10.244.i.1/24, routes to every other node's pod CIDR."""
        self._check_name(name)
        index = len(self._nodes) + 1
        if index > MAX_NODES:
            raise ValueError(f"a lab holds at most {MAX_NODES} nodes")
        netns = self._new_netns(name, _NODE_SYSCTLS)
        node = LabNode(
            name,
            netns,
            f"172.28.0.{10 + index}",
            f"10.244.{index}.0/24",
            LAN_GATEWAY,
            index,
            ip6=f"fd00:28::{10 + index}",
            pod_cidr6=f"fd00:244:{index}::/64",
        )
        state = _NodeState(node)
        os.makedirs(self.node_cgroup(name))
        self._factories[name] = cgroups.SocketFactory(self.node_cgroup(name), netns)
        self._plug_into_lan(f"{self.prefix}n{index}", netns, node.ip, node.ip6)
        ip_in(netns, "link", "add", "cbr0", "address", _bridge_mac(index), "type", "bridge")
        ip_in(netns, "addr", "add", f"{node.pod_gateway}/24", "dev", "cbr0")
        ip_in(netns, "addr", "add", f"{node.pod_gateway6}/64", "dev", "cbr0", "nodad")
        ip_in(netns, "link", "set", "cbr0", "up")
        for other in self._nodes.values():
            ip_in(netns, "route", "add", other.node.pod_cidr, "via", other.node.ip)
            ip_in(other.node.netns, "route", "add", node.pod_cidr, "via", node.ip)
            ip_in(netns, "-6", "route", "add", other.node.pod_cidr6, "via", other.node.ip6)
            ip_in(other.node.netns, "-6", "route", "add", node.pod_cidr6, "via", node.ip6)
        self._nodes[name] = state
        self._register(node)
        log.info("lab node up", node=name, netns=netns, ip=node.ip, pod_cidr=node.pod_cidr)
        return node

    def add_external_client(self, name: str = "ext") -> LabHost:
        """A machine outside the cluster on the LAN: 172.28.0.(200+k), default route via the gateway."""
        self._check_name(name)
        k = self._externals
        if k > 54:
            raise ValueError("no LAN addresses left for external clients")
        netns = self._new_netns(f"x-{name}", _COMMON_SYSCTLS)
        self._externals += 1
        host = LabHost(name, netns, f"172.28.0.{200 + k}", f"fd00:28::{200 + k}")
        self._plug_into_lan(f"{self.prefix}x{k}", netns, host.ip, host.ip6)
        self._register(host)
        log.info("lab external client up", name=name, netns=netns, ip=host.ip)
        return host

    def _allocate_pod_ip(self, state: _NodeState) -> str:
        """The next never-used host of the pod CIDR; freed ones only once those run out."""
        if state.next_host <= 254:
            host = state.next_host
            state.next_host += 1
        elif state.free:
            host = min(state.free)
            state.free.discard(host)
        else:
            raise RuntimeError(f"pod CIDR {state.node.pod_cidr} is full")
        return str(ipaddress.ip_network(state.node.pod_cidr)[host])

    def add_pod(
        self, node: str, name: str, tcp_ports: Iterable[int] = (8080,), udp_ports: Iterable[int] = (8080,)
    ) -> LabPod:
        """Add a pod on node's cbr0 running the pod server on the given ports; returns once it listens."""
        if name in self._hosts or not name or any(c.isspace() for c in name):
            raise ValueError(f"invalid or duplicate lab host name {name!r}")
        state = self._nodes[node]
        self._counter += 1
        netns = self._new_netns(f"p-{self._counter}", _COMMON_SYSCTLS)
        pod_ip = self._allocate_pod_ip(state)
        host_part = int(ipaddress.ip_address(pod_ip)) - int(ipaddress.ip_network(state.node.pod_cidr)[0])
        pod_ip6 = str(ipaddress.ip_network(state.node.pod_cidr6)[host_part])
        pod = LabPod(name, node, pod_ip, netns, tuple(tcp_ports), tuple(udp_ports), pod_ip6)
        self._register(pod)
        self._pods[name] = pod
        host_veth = self._pod_veths[name] = f"{self.prefix}v{self._counter}"
        node_ns = state.node.netns
        ip_in(node_ns, "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip_in(node_ns, "link", "set", host_veth, "master", "cbr0", "up")
        # As kubelet's hairpin-veth mode: a pod reaching itself through a Service is bridged back to its port.
        ip_in(node_ns, "link", "set", host_veth, "type", "bridge_slave", "hairpin", "on")
        ip_in(netns, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        ip_in(netns, "addr", "add", f"{pod_ip6}/64", "dev", "eth0", "nodad")
        ip_in(netns, "link", "set", "eth0", "up")
        ip_in(netns, "route", "add", "default", "via", state.node.pod_gateway)
        ip_in(netns, "-6", "route", "add", "default", "via", state.node.pod_gateway6)
        self._pod_procs[name] = self._start_pod_server(pod)
        log.info("lab pod up", pod=name, node=node, ip=pod_ip, netns=netns)
        return pod

    def _start_pod_server(self, pod: LabPod) -> subprocess.Popen[Any]:
        argv = [sys.executable, "-m", "kproxyd.lab.podserver", "--name", pod.name]
        argv += ["--tcp", ",".join(map(str, pod.tcp_ports)), "--udp", ",".join(map(str, pod.udp_ports))]
        proc = self.popen(pod.name, argv, stdout=subprocess.PIPE, cgroup=self.node_cgroup(pod.node))
        assert proc.stdout is not None
        with proc.stdout:
            ready, _, _ = select.select([proc.stdout], [], [], POD_READY_TIMEOUT)
            line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"pod server of {pod.name} did not get ready (exit {proc.poll()})")
        return proc

    def remove_pod(self, name: str) -> None:
        """Stop the pod's server and delete its namespace (its veth goes with it); frees its IP."""
        pod = self._pods.pop(name)
        del self._hosts[name]
        proc = self._pod_procs.pop(name)
        _stop_process(proc)
        self._procs.remove(proc)
        state = self._nodes[pod.node]
        # Namespace teardown is asynchronous in the kernel; deleting the veth makes the pod vanish now.
        ip_in(state.node.netns, "link", "del", self._pod_veths.pop(name))
        _delete_netns(pod.netns)
        self._namespaces.remove(pod.netns)
        state.free.add(int(ipaddress.ip_address(pod.ip)) - int(ipaddress.ip_network(state.node.pod_cidr)[0]))
        log.info("lab pod removed", pod=name)

    # -- lookups -----------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        """The node, pod, external client or "lan" called name."""
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"no lab host {name!r}") from None

    @property
    def nodes(self) -> list[LabNode]:
        """The nodes in order of creation."""
        return [s.node for s in self._nodes.values()]

    @property
    def pods(self) -> list[LabPod]:
        """The live pods in order of creation."""
        return list(self._pods.values())

    def pod(self, name: str) -> LabPod:
        """The live pod called name."""
        return self._pods[name]

    def node(self, name: str) -> LabNode:
        """The node called name."""
        return self._nodes[name].node

    def node_cgroup(self, name: str) -> str:
        """The cgroup of a node's processes and pods: the one its kproxyd's socket load balancer serves."""
        return os.path.join(cgroups.lab_cgroup(self.prefix), name)

    def pin_path(self, name: str) -> str:
        """The bpffs directory a node's kproxyd pins its maps in."""
        return cgroups.pin_path(self.prefix, name)

    def socket(self, host: str, family: int, kind: int) -> socket.socket:
        """A socket in host's namespace; a node's or pod's is created in the node's cgroup (as its process'
        would be), an external host's or the LAN's directly.
        """
        target = self.host(host)
        node = target.node if isinstance(target, LabPod) else target.name
        factory = self._factories.get(node)
        if factory is None:
            return nsutil.socket_in_netns(target.netns, family, kind)
        return factory.socket(target.netns, family, kind)

    # -- commands and traffic ----------------------------------------------------------------------

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv to completion inside host's namespace; CommandError (with stderr) when check and it fails."""
        return nsutil.run_in_netns(self.host(host).netns, argv, check=check, timeout=timeout, input=input)

    def popen(
        self, host: str, argv: Sequence[str], cgroup: str | None = None, host_sys: bool = False, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start argv inside host's namespace (and cgroup) in its own process group; close() stops it.

        host_sys: keep the host's /sys (cgroup2, bpffs) rather than `ip netns exec`'s sysfs of the namespace
        (always so with a cgroup: the process joins it from inside the namespace, so that no process of the
        cgroup is ever in this one's namespace, which the ebpf mode's socket destroyer would search).
        """
        netns = self.host(host).netns
        if cgroup:
            argv = nsutil.nsenter_argv(netns, cgroups.in_cgroup(cgroup, argv))
        else:
            argv = nsutil.nsenter_argv(netns, argv) if host_sys else nsutil.netns_argv(netns, argv)
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def request(
        self,
        src: str,
        ip: str,
        port: int,
        proto: str = "TCP",
        timeout: float = 1.0,
        source_port: int | None = None,
    ) -> Reply:
        """From host src talk to ip:port once; ConnectionRefusedError when refused, TimeoutError on timeout.

        Only the wait for a TCP reply after the connection is up is stretched by TIME_SCALE: the handshake is
        the kernel's (a drop must still time out at once), the reply is the pod server's Python, which an
        emulated CPU can hold up for longer than the timeout.
        """
        kind = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM}[proto.upper()]
        family = _family(ip)
        deadline = time.monotonic() + timeout
        with self.socket(src, family, kind) as sock:
            sock.settimeout(timeout)
            if source_port is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
            sock.connect((ip, port))
            sock.sendall(b"HELLO\n")
            if kind == socket.SOCK_STREAM:
                deadline = time.monotonic() + timeout * TIME_SCALE
            return Reply.parse(_read_line(sock, deadline))

    def request_many(
        self, src: str, ip: str, port: int, proto: str = "TCP", count: int = 20, timeout: float = 1.0
    ) -> list[Reply | Exception]:
        """count independent requests (new socket, new source port each); each result a Reply or the error."""
        results: list[Reply | Exception] = []
        for _ in range(count):
            try:
                results.append(self.request(src, ip, port, proto, timeout))
            except (OSError, ValueError) as exc:
                results.append(exc)
        return results


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """Read one line (or up to EOF) before deadline; TimeoutError past it."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for the reply")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]
