"""`kproxyd status`: the Services kproxyd programs on this node, their frontends and endpoints, and why a
Service has none (the tutorials' "debugging Services" checks: selector vs pod labels, readiness).

The API is read once with the official client; conversion and planning are kproxyd's own, so the table
shows what kproxyd programs.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import kubernetes
import structlog

from kproxyd.backends.ebpf.image import dataplane
from kproxyd.backends.ebpf.tc import running as tc_running
from kproxyd.config import ProxyConfig
from kproxyd.k8s.client import build_api_client
from kproxyd.logs import configure_logging
from kproxyd.model import Endpoint, ProxyState, ServicePort
from kproxyd.plan import ServicePlan, plan_all
from kproxyd.tracker import ENDPOINT_SLICE, NODE, SERVICE, ProxyStateTracker

log = structlog.get_logger(__name__)

Obj = dict[str, Any]
_COLUMNS = ("SERVICE", "TYPE", "FRONTENDS", "READY", "TERMINATING", "LOCAL", "POLICY ext/int")


@dataclass(frozen=True, slots=True)
class ApiSnapshot:
    """What status reads from the API: Services, EndpointSlices, Pods and this node's Node (if found)."""

    services: list[Obj]
    slices: list[Obj]
    pods: list[Obj]
    node: Obj | None


@dataclass(frozen=True, slots=True)
class ServiceRow:
    """One Service as status shows it."""

    service: str
    type: str
    frontends: list[str]
    ready: int
    terminating: int
    local: int
    external_policy: str
    internal_policy: str
    diagnosis: str | None  # set when the Service has no endpoint kproxyd can use
    dataplane: str | None = None  # ebpf mode: what runs in eBPF and what falls back to nftables


def _items(response: Any) -> list[Obj]:
    return list(json.loads(response.data)["items"])


def read_api(api: kubernetes.client.ApiClient, node_name: str) -> ApiSnapshot:
    """List Services, EndpointSlices and Pods, and get the Node: one read each."""
    core = kubernetes.client.CoreV1Api(api)
    discovery = kubernetes.client.DiscoveryV1Api(api)
    try:
        response: Any = core.read_node(node_name, _preload_content=False)
        node: Obj | None = json.loads(response.data)
    except kubernetes.client.ApiException as err:
        log.warning("node not found: no endpoint counts as local", node=node_name, status=err.status)
        node = None
    return ApiSnapshot(
        services=_items(core.list_service_for_all_namespaces(_preload_content=False)),
        slices=_items(discovery.list_endpoint_slice_for_all_namespaces(_preload_content=False)),
        pods=_items(core.list_pod_for_all_namespaces(_preload_content=False)),
        node=node,
    )


def service_rows(snapshot: ApiSnapshot, node_name: str, mode: str = "", tc: bool = False) -> list[ServiceRow]:
    """Convert and plan the snapshot as kproxyd does (each IP family apart), then describe each programmed
    Service: its frontends in both families, its endpoints counted in its first family (a dual-stack pod
    has an address in each). tc: ebpf mode's tc programs run on this node.
    """
    plans: dict[str, list[ServicePlan]] = {}
    endpoints: dict[str, list[Endpoint]] = {}
    for family in (4, 6):
        state = _state(snapshot, node_name, family)
        family_plans: dict[str, list[ServicePlan]] = {}
        for name, plan in sorted(plan_all(state).items()):
            family_plans.setdefault(name.service_key, []).append(plan)
        for key, port_plans in family_plans.items():
            plans.setdefault(key, []).extend(port_plans)
            endpoints.setdefault(key, [ep for plan in port_plans for ep in state.endpoints.get(plan.name, ())])
    raw = {f"{s['metadata'].get('namespace')}/{s['metadata']['name']}": s for s in snapshot.services}
    rows = [_row(key, plans[key], endpoints[key], raw[key], snapshot.pods, node_name) for key in sorted(plans)]
    if mode == "ebpf":
        rows = [replace(row, dataplane=dataplane(plans[row.service], tc)) for row in rows]
    return rows


def _state(snapshot: ApiSnapshot, node_name: str, family: int) -> ProxyState:
    tracker = ProxyStateTracker(node_name, family=family)
    tracker.replace(SERVICE, snapshot.services)
    tracker.replace(ENDPOINT_SLICE, snapshot.slices)
    if snapshot.node is not None:
        tracker.replace(NODE, [snapshot.node])
    return tracker.snapshot()


def _row(
    key: str, plans: list[ServicePlan], endpoints: list[Endpoint], raw: Obj, pods: list[Obj], node_name: str
) -> ServiceRow:
    port = plans[0].port
    unique = {(ep.ip, ep.ready, ep.serving, ep.terminating, ep.node_name) for ep in endpoints}
    no_endpoints = not any(plan.has_any_endpoints for plan in plans)
    return ServiceRow(
        service=key,
        type=port.type.value,
        frontends=list(dict.fromkeys(f for plan in plans for f in frontends(plan.port))),  # one node port
        ready=len({ip for ip, ready, *_ in unique if ready}),
        terminating=len({ip for ip, ready, serving, term, _ in unique if not ready and serving and term}),
        local=len({ip for ip, ready, *_, node in unique if ready and node == node_name}),
        external_policy="Local" if port.external_policy_local else "Cluster",
        internal_policy="Local" if port.internal_policy_local else "Cluster",
        diagnosis=diagnose(raw, pods) if no_endpoints else None,
    )


def frontends(port: ServicePort) -> list[str]:
    """Every address of one ServicePort: cluster IPs, node port, external IPs, load-balancer IPs."""
    suffix = f":{port.port}/{port.protocol.value}"
    out = [ip + suffix for ip in port.cluster_ips]
    if port.node_port is not None:
        out.append(f"nodePort {port.node_port}/{port.protocol.value}")
    out += [f"external {ip}{suffix}" for ip in port.external_ips]
    out += [f"LB {ip}{suffix}" for ip in port.load_balancer_ips]
    return out


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in pairs)


def diagnose(service: Obj, pods: Sequence[Obj]) -> str:
    """Why a Service has no endpoints: no selector, a selector no pod matches, or matching pods not ready."""
    namespace = service["metadata"].get("namespace", "default")
    selector: dict[str, str] = service.get("spec", {}).get("selector") or {}
    if not selector:
        return "no selector: endpoints are managed by hand, and no EndpointSlice gives this Service any"
    in_namespace = [p for p in pods if p["metadata"].get("namespace") == namespace]
    matched = [p for p in in_namespace if _matches(selector, p["metadata"].get("labels") or {})]
    wanted = _labels(sorted(selector.items()))
    if not matched:
        seen = sorted(
            {(k, v) for p in in_namespace for k, v in (p["metadata"].get("labels") or {}).items() if k in selector}
        )
        have = f"pods in {namespace} have {_labels(seen)}" if seen else f"no pod in {namespace} has those labels"
        return f"selector {wanted} matches no pod; {have}"
    names = ", ".join(sorted(p["metadata"]["name"] for p in matched))
    if not any(_ready(p) for p in matched):
        return f"selector {wanted} matches {len(matched)} pod(s), none ready: {names}"
    return f"selector {wanted} matches ready pod(s) ({names}) but none serves a port of the Service (targetPort?)"


def format_table(rows: Sequence[ServiceRow]) -> str:
    """The rows as aligned columns, then the diagnosis of each Service without endpoints."""
    dataplanes = any(r.dataplane for r in rows)
    columns = [*_COLUMNS, "DATAPLANE"] if dataplanes else list(_COLUMNS)
    cells = [
        [
            r.service,
            r.type,
            ", ".join(r.frontends),
            str(r.ready),
            str(r.terminating),
            str(r.local),
            f"{r.external_policy}/{r.internal_policy}",
            *([r.dataplane or ""] if dataplanes else []),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [columns, *cells]) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [columns, *cells]
    ]
    flagged = [r for r in rows if r.diagnosis]
    if flagged:
        lines += ["", "Services without endpoints:"]
        lines += [f"  {r.service}: {r.diagnosis}" for r in flagged]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The status subcommand's flags (kube-proxy's spelling for the API and the node)."""
    parser = argparse.ArgumentParser(prog="kproxyd status", description="Services as kproxyd programs them here.")
    parser.add_argument("--kubeconfig", help="kubeconfig with the API server and credentials")
    parser.add_argument("--master", help="API server URL (overrides the kubeconfig's server)")
    parser.add_argument("--hostname-override", help="this node's name (default: the hostname)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--proxy-mode", default="", help="ebpf: add a DATAPLANE column (what runs in eBPF, what in nftables)"
    )
    parser.add_argument(
        "--bpf-pin-path", default=ProxyConfig().bpf_pin_path, help="ebpf: the daemon's pin directory (tc running?)"
    )
    return parser


def status_main(argv: Sequence[str]) -> int:
    """Run `kproxyd status`; 0 on success."""
    args = build_parser().parse_args(argv)
    configure_logging(-1)
    node_name = (args.hostname_override or socket.gethostname()).strip().lower()
    with build_api_client(args.kubeconfig, args.master) as api:
        tc = args.proxy_mode == "ebpf" and tc_running(args.bpf_pin_path)
        rows = service_rows(read_api(api, node_name), node_name, args.proxy_mode, tc)
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else format_table(rows))
    return 0
