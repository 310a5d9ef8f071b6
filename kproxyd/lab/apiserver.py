"""An in-process HTTP server speaking the Kubernetes list/watch/CRUD JSON protocol over an ObjectStore."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog

from kproxyd.lab.store import (
    KINDS,
    ApiError,
    Event,
    KindInfo,
    Obj,
    ObjectStore,
    clone,
    parse_field_selector,
    parse_label_selector,
)

log = structlog.get_logger(__name__)

_GROUPS = {"/api/v1": "v1", "/apis/discovery.k8s.io/v1": "discovery.k8s.io/v1"}
_BY_PLURAL = {(info.api_version, info.plural): info for info in KINDS.values()}
_VERBS = ["create", "delete", "get", "list", "update", "watch"]


@dataclass(frozen=True, slots=True)
class _Route:
    info: KindInfo
    namespace: str
    name: str
    subresource: str


def _route(path: str) -> _Route | None:
    """Parse /api/v1[/namespaces/{ns}]/{plural}[/{name}[/status]] and the discovery.k8s.io equivalent."""
    for prefix, api_version in _GROUPS.items():
        if not path.startswith(prefix + "/"):
            continue
        parts = path[len(prefix) + 1 :].strip("/").split("/")
        namespace = ""
        if len(parts) >= 3 and parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        info = _BY_PLURAL.get((api_version, parts[0]))
        if info is None or len(parts) > 3 or (namespace and not info.namespaced):
            return None
        subresource = parts[2] if len(parts) == 3 else ""
        if subresource not in ("", "status"):
            return None
        return _Route(info, namespace, parts[1] if len(parts) > 1 else "", subresource)
    return None


def _discovery(path: str, address: str) -> Obj | None:
    """Minimal discovery documents (/version, /api, /apis, resource lists), or None."""
    if path == "/version":
        return {
            "major": "1",
            "minor": "31",
            "gitVersion": "v1.31.0-kproxyd-lab",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-01-01T00:00:00Z",
            "goVersion": "go1.22",
            "compiler": "gc",
            "platform": "linux/amd64",
        }
    if path == "/api":
        cidrs = [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}]
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": cidrs}
    if path == "/apis":
        version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
        group = {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version}
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
    api_version = _GROUPS.get(path.rstrip("/"))
    if api_version is None:
        return None
    resources = []
    for info in KINDS.values():
        if info.api_version == api_version:
            common = {"singularName": info.kind.lower(), "namespaced": info.namespaced, "kind": info.kind}
            resources.append({"name": info.plural, **common, "verbs": _VERBS})
            resources.append({"name": f"{info.plural}/status", **common, "verbs": ["get", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version, "resources": resources}


class _Handler(BaseHTTPRequestHandler):
    """One connection; the owning LabApiServer is reached through self.server.lab."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http request", client=self.client_address[0], line=format % args)

    def setup(self) -> None:
        super().setup()
        self.server.lab.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.lab.track(self.connection, add=False)
        super().finish()

    def do_GET(self) -> None:
        self._serve(self._get)

    def do_POST(self) -> None:
        self._serve(self._post)

    def do_PUT(self) -> None:
        self._serve(self._put)

    def do_DELETE(self) -> None:
        self._serve(self._delete)

    def do_PATCH(self) -> None:
        self._serve(self._unsupported)

    def _serve(self, method: Callable[[str, dict[str, str]], None]) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            method(url.path.rstrip("/") or "/", query)
        except ApiError as err:
            self._send(err.code, err.status())
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("request failed", method=self.command, path=url.path)
            self._send(500, ApiError(500, "InternalError", "internal error").status())

    def _unsupported(self, path: str, query: dict[str, str]) -> None:
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {path}")

    def _send(self, code: int, body: Obj) -> None:
        data = orjson.dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Obj:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = orjson.loads(self.rfile.read(length))
        except orjson.JSONDecodeError as err:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {err}") from err
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        return body

    def _object_route(self, path: str) -> _Route:
        route = _route(path)
        if route is None or not route.name:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource: {path}")
        return route

    def _get(self, path: str, query: dict[str, str]) -> None:
        if path in ("/healthz", "/readyz", "/livez"):
            self._send_text("ok")
            return
        if (doc := _discovery(path, self.server.lab.address)) is not None:
            self._send(200, doc)
            return
        route = _route(path)
        if route is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource: {path}")
        store = self.server.lab.store
        if route.name:
            obj = store.get(route.info.kind, route.namespace, route.name)
            if obj is None:
                raise ApiError(404, "NotFound", f'{route.info.plural} "{route.name}" not found')
            self._send(200, obj)
            return
        matches = _matcher(route, query)
        if query.get("watch", "").lower() in ("true", "1"):
            _Watch(self, route.info, matches, query).run()
            return
        rv, items = store.snapshot(route.info.kind, route.namespace)
        self._send(
            200,
            {
                "kind": f"{route.info.kind}List",
                "apiVersion": route.info.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": [o for o in items if matches(o)],
            },
        )

    def _send_text(self, text: str) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _post(self, path: str, query: dict[str, str]) -> None:
        route = _route(path)
        body = self._body()
        if route is None or route.name:
            raise ApiError(405, "MethodNotAllowed", f"POST is not allowed on {path}")
        self._check_namespace(route, body)
        self._send(201, self.server.lab.store.create(route.info.kind, body))

    def _put(self, path: str, query: dict[str, str]) -> None:
        route = self._object_route(path)
        body = self._body()
        self._check_namespace(route, body)
        if body.get("metadata", {}).get("name") != route.name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        store = self.server.lab.store
        self._send(200, store.update(route.info.kind, body, part="status" if route.subresource else "spec"))

    def _delete(self, path: str, query: dict[str, str]) -> None:
        route = self._object_route(path)
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))  # DeleteOptions: ignored
        self._send(200, self.server.lab.store.delete(route.info.kind, route.namespace, route.name))

    @staticmethod
    def _check_namespace(route: _Route, body: Obj) -> None:
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if route.namespace and meta.setdefault("namespace", route.namespace) != route.namespace:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the request")


def _matcher(route: _Route, query: dict[str, str]) -> Callable[[Obj], bool]:
    labels = parse_label_selector(query.get("labelSelector", ""))
    fields = parse_field_selector(query.get("fieldSelector", ""))
    namespace = route.namespace

    def matches(obj: Obj) -> bool:
        ns_ok = not namespace or obj.get("metadata", {}).get("namespace") == namespace
        return ns_ok and labels(obj) and fields(obj)

    return matches


class _Watch:
    """One watch stream: initial state when asked, then filtered events, bookmarks, a timeout."""

    def __init__(
        self, handler: _Handler, info: KindInfo, matches: Callable[[Obj], bool], query: dict[str, str]
    ) -> None:
        self.handler = handler
        self.lab = handler.server.lab
        self.info = info
        self.matches = matches
        self.rv = query.get("resourceVersion", "")
        self.bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = int(query.get("timeoutSeconds") or 0) or random.uniform(1800, 3600)  # 0: unset
        self.deadline = time.monotonic() + timeout

    def run(self) -> None:
        """Stream until the timeout, a server stop, a 410 or a client disconnect."""
        if not self.rv.isdigit() and self.rv:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {self.rv!r}")
        self.handler.send_response(200)
        self.handler.send_header("Content-Type", "application/json")
        self.handler.send_header("Transfer-Encoding", "chunked")
        self.handler.end_headers()
        self.handler.close_connection = True
        try:
            self._stream()
            self.handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            log.debug("watch client went away", kind=self.info.kind)

    def _stream(self) -> None:
        store, stop = self.lab.store, self.lab.stopping
        if self.rv in ("", "0"):
            pos, items = store.snapshot(self.info.kind)
            for obj in items:
                if self.matches(obj):
                    self._send("ADDED", obj)
        else:
            pos = int(self.rv)
        next_bookmark = time.monotonic() + self.lab.bookmark_interval
        while not stop.is_set():
            now = time.monotonic()
            if now >= self.deadline:
                return
            try:
                events = store.wait_events(pos, min(self.deadline, next_bookmark) - now, stop)
            except ApiError as err:
                self._send("ERROR", err.status())
                return
            for event in events:
                pos = event.rv
                if event.kind == self.info.kind:
                    self._deliver(event)
            if self.bookmarks and time.monotonic() >= next_bookmark:
                meta = {"resourceVersion": str(pos)}
                self._send(
                    "BOOKMARK", {"kind": self.info.kind, "apiVersion": self.info.api_version, "metadata": meta}
                )
            if time.monotonic() >= next_bookmark:
                next_bookmark = time.monotonic() + self.lab.bookmark_interval

    def _deliver(self, event: Event) -> None:
        """Send the event as this watcher's selectors see it (leaving the selection is a DELETED)."""
        now = self.matches(event.obj)
        if event.type != "MODIFIED":
            if now:
                self._send(event.type, event.obj)
            return
        before = event.prev is not None and self.matches(event.prev)
        if now:
            self._send("MODIFIED" if before else "ADDED", event.obj)
        elif before and event.prev is not None:
            gone = clone(event.prev)
            gone["metadata"]["resourceVersion"] = str(event.rv)
            self._send("DELETED", gone)

    def _send(self, event_type: str, obj: Obj) -> None:
        line = orjson.dumps({"type": event_type, "object": obj}) + b"\n"
        if event_type != "BOOKMARK":  # one a second per watch: noise
            log.debug(
                "watch event sent",
                kind=self.info.kind,
                event_type=event_type,
                resource_version=obj.get("metadata", {}).get("resourceVersion"),
            )
        self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    lab: LabApiServer


class LabApiServer:
    """The lab's Kubernetes API server: serves an ObjectStore over HTTP on 127.0.0.1 or a given socket."""

    def __init__(
        self,
        store: ObjectStore | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        bookmark_interval: float = 1.0,
        history: int = 1000,
    ) -> None:
        self.store = store if store is not None else ObjectStore(history=history)
        self.bookmark_interval = bookmark_interval
        self.stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if sock is None:
            self._http = _HTTPServer((host, port), _Handler)
        else:
            self._http = _HTTPServer(sock.getsockname()[:2], _Handler, bind_and_activate=False)
            self._http.socket.close()
            self._http.socket = sock
        self._http.lab = self
        self.host, self.port = self._http.socket.getsockname()[:2]

    @property
    def address(self) -> str:
        """host:port clients connect to."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The server's base URL (plain http)."""
        return f"http://{self.address}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name="lab-apiserver", daemon=True
        )
        self._thread.start()
        log.info("lab apiserver started", url=self.url)

    def stop(self) -> None:
        """Stop serving, end every watch and drop every connection; the listening socket is closed."""
        self.stopping.set()
        self.store.wake()
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            _cut(conn)
        log.info("lab apiserver stopped", url=self.url)

    def track(self, conn: socket.socket, *, add: bool) -> None:
        """Remember open connections so stop() can cut them like a dying server."""
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)
        if add and self.stopping.is_set():
            _cut(conn)


def _cut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def write_kubeconfig(path: str | Path, url: str) -> None:
    """Write a kubeconfig for url (plain http, no auth) usable by kubernetes.config.load_kube_config."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": url}}],
        "users": [{"name": "lab", "user": {}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab", "namespace": "default"}}],
        "current-context": "lab",
    }
    Path(path).write_text(json.dumps(config, indent=2) + "\n")
