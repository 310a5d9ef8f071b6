"""Reach into named network namespaces: sockets created in-process, commands and sysctls via `ip netns exec`."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence

from kproxyd.netns import socket_in

NETNS_RUN_DIR = "/run/netns"


class CommandError(RuntimeError):
    """A command exited non-zero; carries its argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {stderr.strip()}")


def netns_path(netns: str) -> str:
    """The bind-mount path of a named network namespace."""
    return os.path.join(NETNS_RUN_DIR, netns)


def netns_exists(netns: str) -> bool:
    """True when /run/netns/NAME exists."""
    return os.path.exists(netns_path(netns))


def socket_in_netns(netns: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """Create a socket inside network namespace NAME; the calling thread is always switched back."""
    with open(netns_path(netns), "rb") as target:
        return socket_in(target.fileno(), family, type, proto)


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise CommandError (with stderr) when check and it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs argv inside namespace NAME."""
    return ["ip", "netns", "exec", netns, *argv]


def nsenter_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs argv inside namespace NAME, keeping the host's mounts (its /sys, unlike ip netns)."""
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def run_in_netns(
    netns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace NAME (see run)."""
    return run(netns_argv(netns, argv), check=check, timeout=timeout, input=input)


def set_sysctls(netns: str, values: Mapping[str, str | int]) -> None:
    """Set sysctls (dotted keys) inside namespace NAME in one `sysctl -w` call."""
    if values:
        run_in_netns(netns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])


def ip_in(netns: str, *args: str) -> str:
    """Run `ip -n NETNS ARGS...` (always inside a namespace) and return its stdout."""
    return run(["ip", "-n", netns, *args]).stdout


def netns_pids(netns: str) -> list[int]:
    """Pids of the processes whose network namespace is NAME."""
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(tok) for tok in out.split()]
