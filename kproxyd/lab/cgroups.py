"""Per-node cgroups, bpffs pin directories and socket factories for the lab (the ebpf mode's needs).

cgroups and bpffs are not per network namespace: every lab node gets its own cgroup under a lab-owned parent
(CGROUP2/kproxyd-lab-PREFIX/NODE) and its own pin directory (/sys/fs/bpf/kproxyd-PREFIX-NODE), which that
node's kproxyd is given. A socket's cgroup is fixed by the task that creates it, so the lab's client sockets
for a node and its pods come from a small process living in that node's cgroup, passed back over
SCM_RIGHTS (moving the multi-threaded test process between cgroups would be racy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import structlog

from kproxyd.backends.ebpf.kernel import cgroup2_root
from kproxyd.lab import nsutil

log = structlog.get_logger(__name__)

BPFFS = "/sys/fs/bpf"
RMDIR_TIMEOUT = 5.0


def lab_cgroup(prefix: str) -> str:
    """The parent cgroup of a lab's node cgroups."""
    root = cgroup2_root()
    if not root:
        raise RuntimeError("the lab needs a cgroup2 mount (for the ebpf mode's per-node cgroups)")
    return os.path.join(root, f"kproxyd-lab-{prefix}")


def pin_path(prefix: str, node: str) -> str:
    """A lab node's bpffs pin directory."""
    return os.path.join(BPFFS, f"kproxyd-{prefix}-{node}")


def in_cgroup(cgroup: str, argv: Sequence[str]) -> list[str]:
    """argv, run by a shell that first moves itself into cgroup (so nothing it creates is elsewhere)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv]


def _rmdir(path: str) -> None:
    """Remove an (empty of processes) cgroup, waiting for exiting processes to leave it."""
    deadline = time.monotonic() + RMDIR_TIMEOUT
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                log.error("lab cgroup still busy", cgroup=path)
                return
            time.sleep(0.05)


def remove_lab_cgroups(prefix: str) -> None:
    """Delete a lab's node cgroups (their BPF programs go with them), its parent cgroup and pin directories."""
    parent = lab_cgroup(prefix)
    with contextlib.suppress(FileNotFoundError):
        for child in os.scandir(parent):
            if child.is_dir():
                _rmdir(child.path)
    _rmdir(parent)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(BPFFS):
            if entry.startswith(f"kproxyd-{prefix}-"):
                shutil.rmtree(os.path.join(BPFFS, entry), ignore_errors=True)


class SocketFactory:
    """A process in a node's cgroup and network namespace that creates sockets in named network namespaces
    for the lab (in the node's namespace: the ebpf mode's socket destroyer searches its processes' ones).
    """

    def __init__(self, cgroup: str, netns: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        serve = [sys.executable, "-m", "kproxyd.lab.cgroups", str(theirs.fileno())]
        argv = nsutil.nsenter_argv(netns, in_cgroup(cgroup, serve))  # never in the cgroup outside netns
        self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        self._sock = ours
        self._lock = threading.Lock()

    def socket(self, netns: str, family: int, kind: int) -> socket.socket:
        """A new socket in netns, created by a task of the factory's cgroup."""
        with self._lock:
            self._sock.sendall(f"{netns} {family} {kind}\n".encode())
            message, fds, _, _ = socket.recv_fds(self._sock, 1024, 1)
        if not fds:
            errno, _, text = message.decode().partition(" ")
            raise OSError(int(errno or 0), f"socket factory: {text}")
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        """Stop the factory process."""
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _serve(fd: int) -> None:
    """The factory's loop: one request line "NETNS FAMILY TYPE" → one socket fd (or "errno text")."""
    with socket.socket(fileno=fd) as conn, conn.makefile("rb") as lines:
        for line in lines:
            netns, family, kind = line.decode().split()
            try:
                sock = nsutil.socket_in_netns(netns, int(family), int(kind))
            except OSError as err:
                conn.sendall(f"{err.errno or 0} {err}".encode())
                continue
            with sock:
                socket.send_fds(conn, [b"ok"], [sock.fileno()])


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
