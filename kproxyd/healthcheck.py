"""kube-proxy's health endpoints: /healthz (syncs are current) and /livez, with kube-proxy's JSON body."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

log = structlog.get_logger(__name__)


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ProxyHealth:
    """Decides health from sync times: healthy once a sync succeeded and no change waited over the timeout."""

    def __init__(self, timeout: float, last_success: Callable[[], float], oldest_pending: Callable[[], float]):
        self.timeout = timeout
        self._last_success = last_success
        self._oldest_pending = oldest_pending

    def status(self) -> tuple[bool, dict[str, object]]:
        """(healthy, body) as kube-proxy's /healthz reports it."""
        now = time.time()
        last, pending = self._last_success(), self._oldest_pending()
        healthy = last > 0 and (pending == 0 or now - pending < self.timeout)
        body: dict[str, object] = {
            "lastUpdated": _rfc3339(last) if last else "",
            "currentTime": _rfc3339(now),
            "nodeEligible": True,
        }
        return healthy, body


def parse_bind_address(value: str, default_port: int) -> tuple[str, int] | None:
    """kube-proxy's "ip:port" bind address; an empty value or port 0 disables the server."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    number = int(port)
    return None if number == 0 else (host, number)


class HealthServer:
    """Serves /healthz and /livez on the healthz bind address in a thread."""

    def __init__(self, address: tuple[str, int], health: ProxyHealth) -> None:
        handler = _handler_for(health)
        self._server = ThreadingHTTPServer(address, handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _handler_for(health: ProxyHealth) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/healthz", "/livez"):
                self.send_error(404)
                return
            healthy, body = health.status()
            data = json.dumps(body).encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("healthz request", request=format % args)

    return Handler
