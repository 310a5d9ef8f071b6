"""kube-proxy's health endpoints: /healthz (syncs are current) and /livez, with kube-proxy's JSON body."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Set
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

from kproxyd.model import ServicePortName
from kproxyd.plan import ServicePlan

log = structlog.get_logger(__name__)


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ProxyHealth:
    """Decides health from sync times: healthy once a sync succeeded and no change waited over the timeout."""

    def __init__(
        self,
        timeout: float,
        last_success: Callable[[], float],
        oldest_pending: Callable[[], float],
        node_eligible: Callable[[], bool] = lambda: True,
    ):
        self.timeout = timeout
        self._last_success = last_success
        self._oldest_pending = oldest_pending
        self._node_eligible = node_eligible

    def status(self) -> tuple[bool, dict[str, object]]:
        """(healthy, body) as kube-proxy's /healthz reports it."""
        now = time.time()
        last, pending = self._last_success(), self._oldest_pending()
        healthy = last > 0 and (pending == 0 or now - pending < self.timeout)
        body: dict[str, object] = {
            "lastUpdated": _rfc3339(last) if last else "",
            "currentTime": _rfc3339(now),
            "nodeEligible": self._node_eligible(),
        }
        return healthy, body

    def answer(self, path: str = "/healthz") -> tuple[int, dict[str, object]]:
        """(HTTP status, body): /livez follows syncs only; /healthz also fails on a Node being deleted,

        so a load balancer polling /healthz stops sending traffic to a node the autoscaler is removing.
        """
        healthy, body = self.status()
        if path == "/healthz":
            healthy = healthy and bool(body["nodeEligible"])
        return (200 if healthy else 503), body


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
        handler = _json_handler(health.answer, ("/healthz", "/livez"))
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


def _json_handler(
    answer: Callable[[str], tuple[int, dict[str, object]]], paths: tuple[str, ...] = ()
) -> type[BaseHTTPRequestHandler]:
    """A request handler answering GETs (on any path, or only on paths) with answer(path)'s status and body."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if paths and path not in paths:
                self.send_error(404)
                return
            status, body = answer(path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("health request", request=format % args)

    return Handler


class ServiceHealthServers:
    """kube-proxy's per-Service health check node ports (externalTrafficPolicy Local).

    Each Service with a healthCheckNodePort gets an HTTP server answering 200 while this node has ready
    local endpoints for it and 503 otherwise, so a load balancer sends traffic only to nodes that serve it.
    """

    def __init__(self, bind_host: str, proxy_healthy: Callable[[], bool]) -> None:
        self._bind_host = bind_host
        self._proxy_healthy = proxy_healthy
        self._local: dict[tuple[str, str], int] = {}
        self._checked: dict[tuple[int, ServicePortName], tuple[int, tuple[str, str], int]] = {}
        self._servers: dict[int, tuple[tuple[str, str], ThreadingHTTPServer]] = {}
        self._lock = threading.Lock()

    def update(self, services: Mapping[int, tuple[tuple[str, str], int]]) -> None:
        """Serve exactly these ports: port → ((namespace, name), ready local endpoints)."""
        with self._lock:
            self._local = {service: count for service, count in services.values()}
            for port in [p for p, (svc, _) in self._servers.items() if services.get(p, (None,))[0] != svc]:
                self._close(port)
            for port, (service, _) in services.items():
                if port not in self._servers:
                    self._open(port, service)

    def on_sync(
        self, plans: Mapping[ServicePortName, ServicePlan], changed: Set[ServicePortName] | None, family: int = 4
    ) -> None:
        """Follow one IP family's successful sync: open, close and update servers (Local external policy).

        A dual-stack Service is counted in both families; its port reports the larger local count.
        """
        names = plans.keys() if changed is None else changed
        if changed is None:
            self._checked = {key: value for key, value in self._checked.items() if key[0] != family}
        for name in names:
            plan = plans.get(name)
            port = plan.port.health_check_node_port if plan and plan.port.external_policy_local else None
            if plan and port:
                self._checked[family, name] = (port, (name.namespace, name.name), plan.local_ready_count)
            else:
                self._checked.pop((family, name), None)
        wanted: dict[int, tuple[tuple[str, str], int]] = {}
        for port, service, count in self._checked.values():
            previous = wanted.get(port, (service, 0))[1]
            wanted[port] = (service, max(previous, count))
        self.update(wanted)

    def stop(self) -> None:
        """Close every server."""
        with self._lock:
            for port in list(self._servers):
                self._close(port)

    def status(self, service: tuple[str, str]) -> tuple[int, dict[str, object]]:
        """(HTTP status, body) for one Service, as kube-proxy answers it."""
        count = self._local.get(service, 0)
        healthy = self._proxy_healthy()
        body: dict[str, object] = {
            "service": {"namespace": service[0], "name": service[1]},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        }
        return (200 if count > 0 and healthy else 503), body

    def _open(self, port: int, service: tuple[str, str]) -> None:
        try:
            server = ThreadingHTTPServer(
                (self._bind_host, port), _json_handler(lambda _path: self.status(service))
            )
        except OSError as err:
            log.error("cannot open health check node port", port=port, service="/".join(service), error=str(err))
            return
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"healthcheck-{port}", daemon=True).start()
        self._servers[port] = (service, server)
        log.info("health check node port opened", port=port, service="/".join(service))

    def _close(self, port: int) -> None:
        service, server = self._servers.pop(port)
        server.shutdown()
        server.server_close()
        log.info("health check node port closed", port=port, service="/".join(service))
