"""The ebpf mode's stale-UDP cleanup: destroy UDP sockets connected to an endpoint a sync removed.

The socket load balancer translates a connected UDP socket once, at connect(): the socket itself holds the
backend's address, and no conntrack entry exists to delete. As Cilium does, kproxyd destroys such sockets
(sock_diag SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY): the owner's next call fails with ECONNABORTED, and a new
socket is balanced to a live endpoint. Sockets are found in every network namespace of the processes under
the balanced cgroup. A socket does not tell whether a Service connected it: any UDP socket connected to a
removed endpoint's ip:port is destroyed (Cilium's rule too).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass

import structlog

from kproxyd.model import ServicePortName
from kproxyd.netns import socket_in
from kproxyd.plan import ServicePlan
from kproxyd.stale import removed_udp_backends

log = structlog.get_logger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
TCPF_ESTABLISHED = 1 << 1  # a connected UDP socket's state
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_DIAG_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans; then the socket id
_SOCKID_LEN = 48  # inet_diag_sockid: sport, dport (network order), src, dst (16 bytes each), ifindex, cookie

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Backend = tuple[Address, int]


@dataclass(frozen=True, slots=True)
class ConnectedSocket:
    """A connected UDP socket as sock_diag lists it: its family, peer and raw id (what SOCK_DESTROY takes)."""

    family: int
    peer: Backend
    sockid: bytes


def _peer(family: int, sockid: bytes) -> Backend:
    """The socket's peer address (an IPv4-mapped IPv6 one as IPv4) and port."""
    port = struct.unpack_from("!H", sockid, 2)[0]
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(sockid[20:24]), port
    address = ipaddress.IPv6Address(sockid[20:36])
    return address.ipv4_mapped or address, port


def _request(family: int, sockid: bytes = bytes(_SOCKID_LEN)) -> bytes:
    """An inet_diag_req_v2 for UDP sockets in the connected state (sockid selects one for SOCK_DESTROY)."""
    return struct.pack("=BBBxI", family, socket.IPPROTO_UDP, 0, TCPF_ESTABLISHED) + sockid


class SockDiag:
    """A NETLINK_SOCK_DIAG socket in one network namespace: list connected UDP sockets, destroy one."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = 0

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._sock.close()

    def _send(self, msg_type: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, self._seq, 0) + payload)
        return self._seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of the answers to request seq, up to NLMSG_DONE or an error/ack (raised if nonzero)."""
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, msg_type, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield msg_type, payload

    def connected_udp(self, family: int) -> list[ConnectedSocket]:
        """Every connected UDP socket of family in this namespace."""
        seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, _request(family))
        found = []
        for _type, payload in self._replies(seq):
            sock_family = _DIAG_MSG_HEAD.unpack_from(payload)[0]
            sockid = payload[_DIAG_MSG_HEAD.size : _DIAG_MSG_HEAD.size + _SOCKID_LEN]
            found.append(ConnectedSocket(sock_family, _peer(sock_family, sockid), sockid))
        return found

    def destroy(self, sock: ConnectedSocket) -> bool:
        """Destroy one socket (its owner gets ECONNABORTED); False when it is gone already."""
        seq = self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, _request(sock.family, sock.sockid))
        try:
            for _ in self._replies(seq):
                pass
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
            return False
        return True


def destroy_connected_udp(diag: SockDiag, backends: Set[Backend]) -> int:
    """Destroy the namespace's UDP sockets connected to one of backends (IPv4 ones also as IPv4-mapped)."""
    families = [socket.AF_INET6] + ([socket.AF_INET] if any(ip.version == 4 for ip, _ in backends) else [])
    return sum(
        diag.destroy(sock) for family in families for sock in diag.connected_udp(family) if sock.peer in backends
    )


def cgroup_netns(cgroup: str) -> Iterator[int]:
    """An open fd of each network namespace of the processes under cgroup (recursively), each once."""
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, _files in os.walk(cgroup):
        for pid in _procs(directory):
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            except OSError:  # exited meanwhile
                continue
            try:
                stat = os.fstat(fd)
                if (stat.st_dev, stat.st_ino) not in seen:
                    seen.add((stat.st_dev, stat.st_ino))
                    yield fd
            finally:
                os.close(fd)


def _procs(cgroup: str) -> list[str]:
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as procs:
            return procs.read().split()
    except OSError:  # removed meanwhile
        return []


class UdpSocketDestroyer:
    """A Proxier sync observer (ebpf mode): destroy the sockets connected to the endpoints a sync removed."""

    def __init__(self, cgroup: str, on_destroyed: Callable[[int], None] = lambda _count: None) -> None:
        self._cgroup = cgroup
        self._on_destroyed = on_destroyed

    def on_sync(
        self,
        old: Mapping[ServicePortName, ServicePlan],
        new: Mapping[ServicePortName, ServicePlan],
        changed: Set[ServicePortName] | None,
    ) -> None:
        """Destroy the sockets connected to the UDP endpoints this sync removed; never raises (logs)."""
        backends = {(ipaddress.ip_address(ip), port) for ip, port in removed_udp_backends(old, new, changed)}
        if not backends:
            return
        try:
            destroyed, namespaces = self.destroy(backends)
        except Exception:
            log.exception("destroying UDP sockets failed", backends=len(backends))
            return
        self._on_destroyed(destroyed)
        log.info("UDP sockets destroyed", backends=len(backends), namespaces=namespaces, destroyed=destroyed)

    def destroy(self, backends: Set[Backend]) -> tuple[int, int]:
        """Destroy the matching sockets in every namespace under the cgroup: (sockets, namespaces searched)."""
        destroyed = namespaces = 0
        for netns in cgroup_netns(self._cgroup):
            namespaces += 1
            try:
                with SockDiag(socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)) as diag:
                    destroyed += destroy_connected_udp(diag, backends)
            except OSError as err:  # this namespace only (EOPNOTSUPP: no CONFIG_INET_DIAG_DESTROY)
                log.warning("destroying UDP sockets in a network namespace failed", error=str(err))
        return destroyed, namespaces
