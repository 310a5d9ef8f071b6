"""The socket destroyer against the kernel, without a cluster: sock_diag SOCK_DESTROY in every network
namespace of the processes under a cgroup of our own (nested cgroups included, each namespace once), and
nowhere else.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from kproxyd.backends.ebpf.kernel import cgroup2_root
from kproxyd.lab.cgroups import in_cgroup
from kproxyd.lab.cluster import wait_until
from kproxyd.lab.nsutil import ip_in, nsenter_argv, socket_in_netns
from kproxyd.sockdestroy import UdpSocketDestroyer

REMOVED = (ipaddress.ip_address("10.0.0.2"), 53)


@pytest.fixture
def cgroup() -> Iterator[str]:
    """A cgroup of our own (never the root) with a child; every process started in them is killed after."""
    parent = os.path.join(cgroup2_root(), f"kproxyd-test-{secrets.token_hex(3)}")
    child = os.path.join(parent, "child")
    os.makedirs(child)
    try:
        yield parent
    finally:
        _rmdir(child)
        _rmdir(parent)


@pytest.fixture
def sleepers() -> Iterator[Callable[[str, str], None]]:
    """Start a sleeping process in a cgroup and a network namespace; all stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cgroup: str, netns: str) -> None:
        # Into the namespace first, then the cgroup: never in the cgroup while in this process' namespace.
        proc = subprocess.Popen(nsenter_argv(netns, in_cgroup(cgroup, ["sleep", "60"])))
        procs.append(proc)
        wait_until(lambda: str(proc.pid) in _procs(cgroup), timeout=5, what="the sleeper in its cgroup")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _procs(cgroup: str) -> list[str]:
    with open(os.path.join(cgroup, "cgroup.procs")) as procs:
        return procs.read().split()


def _rmdir(cgroup: str) -> None:
    wait_until(lambda: not _procs(cgroup), timeout=5, what="the cgroup emptied")
    os.rmdir(cgroup)


def _connected(netns: str, peer: str, port: int = 53) -> socket.socket:
    ip_in(netns, "link", "set", "lo", "up")
    ip_in(netns, "addr", "replace", "10.0.0.1/24", "dev", "lo")
    sock = socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((peer, port))
    sock.setblocking(False)
    return sock


def _error(sock: socket.socket) -> int:
    try:
        sock.recv(64)
    except OSError as err:
        return err.errno or 0
    return 0


def test_destroys_in_the_cgroups_namespaces_only(
    cgroup: str, sleepers: Callable[[str, str], None], make_netns: Callable[[], str]
) -> None:
    nested, top, outside = make_netns(), make_netns(), make_netns()
    sleepers(os.path.join(cgroup, "child"), nested)
    sleepers(cgroup, nested)  # a second process in the same namespace: searched once
    sleepers(cgroup, top)
    socks = {
        "nested": _connected(nested, "10.0.0.2"),
        "top": _connected(top, "10.0.0.2"),
        "live": _connected(top, "10.0.0.3"),
        "other port": _connected(top, "10.0.0.2", 54),
        "outside": _connected(outside, "10.0.0.2"),  # no process of the cgroup lives there
    }
    try:
        assert UdpSocketDestroyer(cgroup).destroy({REMOVED}) == (2, 2)  # (sockets, namespaces)
        errors = {name: _error(sock) for name, sock in socks.items()}
        assert errors == {
            "nested": errno.ECONNABORTED,
            "top": errno.ECONNABORTED,
            "live": errno.EAGAIN,
            "other port": errno.EAGAIN,
            "outside": errno.EAGAIN,
        }
        assert socks["outside"].getpeername() == ("10.0.0.2", 53)
    finally:
        for sock in socks.values():
            sock.close()
