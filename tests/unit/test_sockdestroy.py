"""The ebpf mode's socket destroyer without a kernel: which backends a sync removed, and the sock_diag
protocol against a fake kernel on a socketpair (dump, SOCK_DESTROY, errors).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kproxyd import sockdestroy
from kproxyd.model import Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName, ServiceType
from kproxyd.plan import ServicePlan, plan_service_port
from kproxyd.sockdestroy import SockDiag, UdpSocketDestroyer, destroy_connected_udp
from kproxyd.stale import removed_udp_backends

NODE = NodeInfo("node1")
DNS = ServicePortName("default", "dns", "dns", Protocol.UDP)
WEB = ServicePortName("default", "web", "http", Protocol.TCP)
HDR = struct.Struct("=IHHII")
V4, V6 = socket.AF_INET, socket.AF_INET6


def plan(
    name: ServicePortName = DNS, ips: tuple[str, ...] = ("10.0.0.1", "10.0.0.2"), port: int = 5353
) -> ServicePlan:
    """A plan for 10.96.0.10:53 with ready endpoints on port."""
    service_port = ServicePort(name, ServiceType.CLUSTER_IP, ("10.96.0.10",), 53)
    return plan_service_port(service_port, [Endpoint(ip, port) for ip in ips], NODE)


def test_removed_endpoint() -> None:
    assert removed_udp_backends({DNS: plan()}, {DNS: plan(ips=("10.0.0.1",))}, {DNS}) == {("10.0.0.2", 5353)}


def test_deleted_service_removes_every_endpoint() -> None:
    assert removed_udp_backends({DNS: plan()}, {}) == {("10.0.0.1", 5353), ("10.0.0.2", 5353)}


def test_changed_target_port_removes_the_old_one() -> None:
    assert removed_udp_backends({DNS: plan()}, {DNS: plan(port=5454)}) == {("10.0.0.1", 5353), ("10.0.0.2", 5353)}


def test_added_endpoints_tcp_and_unchanged_ports_remove_nothing() -> None:
    assert removed_udp_backends({DNS: plan(ips=("10.0.0.1",))}, {DNS: plan()}) == set()
    assert removed_udp_backends({WEB: plan(WEB)}, {}) == set()
    assert removed_udp_backends({DNS: plan()}, {DNS: plan(ips=())}, set()) == set()


# A fake kernel: answers dumps with its sockets and SOCK_DESTROY with 0 or -ENOENT, as sock_diag does.


def sockid(family: int, peer: str, port: int, cookie: int) -> bytes:
    """An inet_diag_sockid with a peer address and a cookie (source 0)."""
    addr = socket.inet_pton(family, peer).ljust(16, b"\0")
    return struct.pack("!HH", 40000, port) + bytes(16) + addr + struct.pack("=IQ", 0, cookie)


class FakeKernel:
    """The other end of a datagram socketpair, serving sock_diag requests from a thread."""

    def __init__(self, sockets: list[tuple[int, bytes]]) -> None:
        self.sockets = sockets  # (family, sockid)
        self.destroyed: list[bytes] = []
        self.dumped: list[int] = []
        ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.diag = SockDiag(ours)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while request := self._theirs.recv(4096):
            _len, msg_type, _flags, seq, _pid = HDR.unpack_from(request)
            family, proto, _ext, states = struct.unpack_from("=BBBxI", request, HDR.size)
            assert (proto, states) == (socket.IPPROTO_UDP, 1 << 1)  # connected UDP sockets only
            wanted = request[HDR.size + 8 :]
            if msg_type == sockdestroy.SOCK_DIAG_BY_FAMILY:
                self.dumped.append(family)
                for fam, sid in self.sockets:
                    if fam == family:
                        self._reply(20, seq, struct.pack("=BBBB", fam, 1, 0, 0) + sid + bytes(20))
                self._reply(sockdestroy.NLMSG_DONE, seq, struct.pack("=i", 0))
            else:
                found = (family, wanted) in self.sockets
                if found:
                    self.sockets.remove((family, wanted))
                    self.destroyed.append(wanted)
                self._reply(sockdestroy.NLMSG_ERROR, seq, struct.pack("=i", 0 if found else -errno.ENOENT))

    def _reply(self, msg_type: int, seq: int, payload: bytes) -> None:
        self._theirs.send(HDR.pack(HDR.size + len(payload), msg_type, 0, seq, 0) + payload)

    def close(self) -> None:
        self._theirs.shutdown(socket.SHUT_RDWR)
        self.diag.__exit__()
        self._thread.join(2)
        self._theirs.close()


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[FakeKernel]:
    fake = FakeKernel(list(request.param))
    yield fake
    fake.close()


DEAD4 = sockid(V4, "10.0.0.2", 5353, 1)
LIVE4 = sockid(V4, "10.0.0.1", 5353, 2)
OTHER_PORT4 = sockid(V4, "10.0.0.2", 53, 3)
MAPPED = sockid(V6, "::ffff:10.0.0.2", 5353, 4)
DEAD6 = sockid(V6, "fd00::2", 5353, 5)


def backends(*pairs: tuple[str, int]) -> set[tuple[Any, int]]:
    return {(ipaddress.ip_address(ip), port) for ip, port in pairs}


@pytest.mark.parametrize(
    "kernel", [[(V4, DEAD4), (V4, LIVE4), (V4, OTHER_PORT4), (V6, MAPPED), (V6, DEAD6)]], indirect=True
)
def test_only_sockets_connected_to_a_removed_backend_are_destroyed(kernel: FakeKernel) -> None:
    assert destroy_connected_udp(kernel.diag, backends(("10.0.0.2", 5353))) == 2
    assert kernel.destroyed == [MAPPED, DEAD4]  # an IPv6 socket connected to an IPv4-mapped address too
    assert sorted(kernel.dumped) == [V4, V6]


@pytest.mark.parametrize("kernel", [[(V4, DEAD4), (V6, DEAD6)]], indirect=True)
def test_ipv6_backends_dump_only_ipv6_sockets(kernel: FakeKernel) -> None:
    assert destroy_connected_udp(kernel.diag, backends(("fd00::2", 5353))) == 1
    assert kernel.destroyed == [DEAD6]
    assert kernel.dumped == [V6]


@pytest.mark.parametrize("kernel", [[(V4, LIVE4)]], indirect=True)
def test_a_socket_gone_meanwhile_counts_nothing(kernel: FakeKernel) -> None:
    closed = sockdestroy.ConnectedSocket(V4, (ipaddress.ip_address("10.0.0.2"), 5353), DEAD4)
    assert kernel.diag.destroy(closed) is False  # ENOENT: closed between the dump and the destroy
    assert kernel.diag.connected_udp(V4)[0].peer == (ipaddress.ip_address("10.0.0.1"), 5353)


def test_no_removed_backend_searches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockdestroy, "cgroup_netns", None)  # any search would raise (and be logged)
    counted: list[int] = []
    UdpSocketDestroyer("/nonexistent", counted.append).on_sync({DNS: plan()}, {DNS: plan()}, None)
    assert counted == []


def test_failures_are_logged_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_cgroup: str) -> Iterator[int]:
        raise OSError("no cgroup")

    monkeypatch.setattr(sockdestroy, "cgroup_netns", broken)
    counted: list[int] = []
    UdpSocketDestroyer("/nonexistent", counted.append).on_sync({DNS: plan()}, {}, None)
    assert counted == []


def test_on_sync_counts_what_it_destroyed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[Any]] = []

    def destroy(_self: UdpSocketDestroyer, wanted: set[Any]) -> tuple[int, int]:
        seen.append(wanted)
        return 3, 2

    monkeypatch.setattr(UdpSocketDestroyer, "destroy", destroy)
    counted: list[int] = []
    UdpSocketDestroyer("/x", counted.append).on_sync({DNS: plan()}, {DNS: plan(ips=("10.0.0.1",))}, {DNS})
    assert seen == [backends(("10.0.0.2", 5353))] and counted == [3]
