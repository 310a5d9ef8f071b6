"""A lab pod's server: answers every TCP connection and UDP datagram with "<name> <client_ip> <client_port>".

Run inside a pod namespace: `python -m kproxyd.lab.podserver --name NAME --tcp 8080,9090 --udp 5353`.
Prints "ready" on stdout once every socket is bound; exits on SIGTERM. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ")
READ_TIMEOUT = 2.0
MAX_LINE = 4096


def client_ip(addr: str) -> str:
    """The client's address, with an IPv4-mapped IPv6 address shown as plain IPv4."""
    return addr.removeprefix("::ffff:") if addr.startswith("::ffff:") and "." in addr else addr


def identity(name: str, peer: tuple[str, int] | tuple[str, int, int, int]) -> bytes:
    """The answer line "<name> <client_ip> <client_port>\\n"."""
    return f"{name} {client_ip(peer[0])} {peer[1]}\n".encode()


def bind(kind: int, port: int) -> socket.socket:
    """A socket bound to every address (dual-stack when IPv6 is available) on port."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr = "::"
    except OSError:
        sock = socket.socket(socket.AF_INET, kind)
        addr = "0.0.0.0"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    return sock


def read_until(conn: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    """Read until marker is seen, EOF, MAX_LINE bytes or the read timeout."""
    while marker not in data and len(data) < MAX_LINE:
        try:
            chunk = conn.recv(MAX_LINE)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def http_response(method: bytes, body: bytes) -> bytes:
    """A minimal HTTP/1.0 200 response carrying body (headers only for HEAD)."""
    head = (
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head if method == b"HEAD " else head + body


def handle_tcp(name: str, conn: socket.socket, peer: tuple[str, int]) -> None:
    """Answer one TCP connection, then close it."""
    with conn:
        conn.settimeout(READ_TIMEOUT)
        data = read_until(conn, b"\n")
        answer = identity(name, peer)
        method = next((m for m in HTTP_METHODS if data.startswith(m)), None)
        if method is not None:
            # Drain the request headers: closing with unread data would send RST and lose the answer.
            read_until(conn, b"\r\n\r\n", data)
            answer = http_response(method, answer)
        with contextlib.suppress(OSError):  # the client may be gone already
            conn.sendall(answer)
            conn.shutdown(socket.SHUT_WR)


def serve_tcp(name: str, sock: socket.socket) -> None:
    """Accept forever, one thread per connection."""
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=handle_tcp, args=(name, conn, peer), daemon=True).start()


def serve_udp(name: str, sock: socket.socket) -> None:
    """Answer every datagram to its sender."""
    while True:
        _, peer = sock.recvfrom(65535)
        with contextlib.suppress(OSError):
            sock.sendto(identity(name, peer), peer)


def parse_ports(text: str) -> list[int]:
    """ "8080,9090" -> [8080, 9090]; "" -> []."""
    return [int(p) for p in text.split(",") if p.strip()]


def start(name: str, tcp: list[int], udp: list[int]) -> None:
    """Bind every socket, then start one serving thread per socket."""
    servers: list[tuple[Callable[[str, socket.socket], None], socket.socket]] = [
        (serve_tcp, bind(socket.SOCK_STREAM, p)) for p in tcp
    ]
    servers += [(serve_udp, bind(socket.SOCK_DGRAM, p)) for p in udp]
    for target, sock in servers:
        threading.Thread(target=target, args=(name, sock), daemon=True).start()


def _exit(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, serve, print "ready", and wait for SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", default="", help="comma-separated TCP ports")
    parser.add_argument("--udp", default="", help="comma-separated UDP ports")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit)
    start(args.name, parse_ports(args.tcp), parse_ports(args.udp))
    print("ready", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
