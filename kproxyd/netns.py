"""Sockets in another network namespace: the calling thread enters it for the socket() call only.

A socket stays in the namespace it was created in, so one setns() there and back is all it takes; setns()
on a network namespace moves only the calling thread, and this always moves it back.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import structlog

log = structlog.get_logger(__name__)

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns_fd: int, family: int, type: int, proto: int = 0) -> socket.socket:
    """A new socket in the network namespace netns_fd refers to (an open /run/netns/X or /proc/PID/ns/net)."""
    with _lock, open("/proc/thread-self/ns/net", "rb") as home:
        _setns(netns_fd)
        try:
            return socket.socket(family, type, proto)
        finally:
            # If this fails the thread is stranded in another namespace: never let it go on silently.
            try:
                _setns(home.fileno())
            except OSError:
                log.critical("setns back to the original namespace failed")
                os.abort()
