"""`kproxyd lab demo`: the Service tutorials, replayed live on a 2-node lab with one kproxyd per node."""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TextIO

from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply

BACKEND_LABELS = {"app": "backend"}


def _service(name: str, selector: dict[str, str], port: int, target: int | str, **spec: Any) -> dict[str, Any]:
    port_spec: dict[str, Any] = {"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}
    if "nodePort" in spec:
        port_spec["nodePort"] = spec.pop("nodePort")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": selector, "ports": [port_spec], **spec},
    }


class Demo:
    """Runs the steps, printing what a user would look at."""

    def __init__(self, lab: LabCluster, out: TextIO = sys.stdout) -> None:
        self.lab = lab
        self.out = out

    def say(self, text: str = "") -> None:
        """One line of the demo's narration."""
        print(text, file=self.out, flush=True)

    def step(self, title: str) -> None:
        """A step heading."""
        self.say()
        self.say(f"== {title}")

    def spread(self, src: str, ip: str, port: int, count: int = 30) -> collections.Counter[str]:
        """Send count requests and print how many each pod answered (errors counted by kind)."""
        tally: collections.Counter[str] = collections.Counter()
        for result in self.lab.answers(src, ip, port, count=count):
            tally[result.pod if isinstance(result, Reply) else type(result).__name__] += 1
        width = max(len(k) for k in tally)
        self.say(f"   {count} requests from {src} to {ip}:{port}:")
        for name, n in sorted(tally.items()):
            self.say(f"     {name:<{width}}  {n:>3}  {'#' * n}")
        return tally

    def endpoints(self, service: str) -> list[str]:
        """The endpoint addresses the controller published for a Service (what `kubectl get endpoints` shows)."""
        slices = [
            s
            for s in self.lab.store.list("EndpointSlice")
            if s["metadata"].get("labels", {}).get("kubernetes.io/service-name") == service
        ]
        return sorted(
            f"{ep['addresses'][0]}"
            for s in slices
            for ep in s.get("endpoints") or []
            if ep.get("conditions", {}).get("ready", True)
        )

    def converge(self, check: Callable[[], object], what: str) -> None:
        """Wait until kproxyd has programmed a change, and say how long it took."""
        start = time.monotonic()
        wait_until(check, timeout=20, what=what)
        self.say(f"   (programmed on the nodes after {time.monotonic() - start:.2f} s)")

    def run(self) -> None:
        """Every step of the tutorial."""
        lab = self.lab
        self.step("A 2-node cluster: nodes and pods are network namespaces; kproxyd runs on each node")
        for node in lab.net.nodes:
            lab.start_proxy(node.name)
            self.say(
                f"   {node.name}: node IP {node.ip}, pod CIDR {node.pod_cidr}, kproxyd pid "
                f"{lab.proxies[node.name].pid}"
            )
        self.say(f"   API server: {lab.api.url if lab.api else '?'} (real list/watch protocol)")

        self.step("Deployment 'backend' (3 replicas, label app=backend, port 8080) + a client pod")
        for pod in lab.add_deployment("backend", 3, BACKEND_LABELS):
            self.say(f"   pod {pod.name:<12} on {pod.node}  IP {pod.ip}")
        client = lab.add_pod("client", "node1", {"app": "client"})
        self.say(f"   pod {client.name:<12} on {client.node}  IP {client.ip}")

        self.step("ClusterIP Service 'backend-service' port 80 -> targetPort 8080, selector app=backend")
        svc = lab.create_service(_service("backend-service", BACKEND_LABELS, 80, 8080))
        cluster_ip = svc["spec"]["clusterIP"]
        self.say(f"   clusterIP {cluster_ip}; endpoints: {', '.join(self.endpoints('backend-service'))}")
        self.converge(lambda: _answers(lab, "client", cluster_ip, 80), "backend-service")
        self.say("   requests spread over every pod (random, round-robin-like), in the kernel:")
        self.spread("client", cluster_ip, 80)
        reply = lab.request("client", cluster_ip, 80)
        self.say(f"   the pod saw source {reply.source_ip} (the client pod's own IP: no masquerade)")

        self.step("NodePort Service 'frontend-service' on port 30080, reached from outside the cluster")
        lab.add_deployment("frontend", 2, {"app": "frontend"})
        lab.create_service(
            _service("frontend-service", {"app": "frontend"}, 80, 8080, type="NodePort", nodePort=30080)
        )
        for node in lab.net.nodes:
            self.converge(partial(_answers, lab, "ext", node.ip, 30080), f"NodePort on {node.name}")
            reply = lab.request("ext", node.ip, 30080)
            self.say(
                f"   ext ({lab.external.ip}) -> {node.ip}:30080 answered by {reply.pod}, which saw "
                f"source {reply.source_ip} (masqueraded to a node address)"
            )

        self.load_balancer_step()

        self.step("Pod backend-0 deleted: its endpoint goes away and it gets no more traffic")
        lab.delete_pod("backend-0")
        self.converge(lambda: _never_answers(lab, "client", cluster_ip, 80, "backend-0"), "endpoint removal")
        self.say(f"   endpoints: {', '.join(self.endpoints('backend-service'))}")
        self.spread("client", cluster_ip, 80)

        self.step("Selector mismatch: 'api-service' selects app=api, but the pods say app=backend")
        api = lab.create_service(_service("api-service", {"app": "api"}, 80, 8080))
        api_ip = api["spec"]["clusterIP"]
        self.say(f"   clusterIP {api_ip}; endpoints: {self.endpoints('api-service') or '<none>'}")
        self.converge(lambda: _refused(lab, "client", api_ip, 80), "REJECT for api-service")
        self.say("   connecting gives: connection refused (kproxyd REJECTs a Service without endpoints)")
        api["spec"]["selector"] = dict(BACKEND_LABELS)
        lab.update_service(api)
        self.say("   selector fixed to app=backend")
        self.converge(lambda: _answers(lab, "client", api_ip, 80), "api-service endpoints")
        self.say(f"   endpoints: {', '.join(self.endpoints('api-service'))}")
        self.spread("client", api_ip, 80, count=20)

        self.step("What kproxyd programmed on node1 (iptables-save -t nat, backend-service lines)")
        for line in lab.iptables_save("node1").splitlines():
            if "backend-service" in line or line.startswith(":KUBE-SERVICES"):
                self.say(f"   {line}")
        self.say()
        self.say("Done: every step above used real TCP connections between network namespaces.")

    def load_balancer_step(self) -> None:
        """LoadBalancer with externalTrafficPolicy Local: the client's own address reaches the pod."""
        lab = self.lab
        self.step("LoadBalancer 'frontend-lb' (externalTrafficPolicy: Local): the client's IP is preserved")
        lab.create_service(
            _service(
                "frontend-lb", {"app": "frontend"}, 80, 8080, type="LoadBalancer", externalTrafficPolicy="Local"
            )
        )
        lab.set_load_balancer("frontend-lb", [LB_IP])  # what a cloud controller or MetalLB would publish
        lab.route_from_outside("172.29.0.0/24", "node1")  # and the network routes the LB IP to a node
        self.say(f"   load-balancer IP {LB_IP}, routed by the outside network to node1")
        self.converge(partial(_answers, lab, "ext", LB_IP, 80), "the load-balancer IP")
        reply = lab.request("ext", LB_IP, 80)
        self.say(
            f"   ext ({lab.external.ip}) -> {LB_IP}:80 answered by {reply.pod} (on node1), which saw source "
            f"{reply.source_ip}: the client's own address, not masqueraded"
        )
        port = lab.service("frontend-lb")["spec"]["healthCheckNodePort"]
        for node in lab.net.nodes:
            status, body = lab.http_get("ext", node.ip, port, "/")
            self.say(f"   health check {node.ip}:{port} -> {status} {body}")
        self.say("   (a load balancer polls that port and sends traffic only to nodes with local endpoints)")


LB_IP = "172.29.0.10"


def _answers(lab: LabCluster, src: str, ip: str, port: int) -> bool:
    try:
        lab.request(src, ip, port, timeout=0.5)
    except OSError:
        return False
    return True


def _refused(lab: LabCluster, src: str, ip: str, port: int) -> bool:
    try:
        lab.request(src, ip, port, timeout=0.5)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _never_answers(lab: LabCluster, src: str, ip: str, port: int, pod: str) -> bool:
    results = lab.answers(src, ip, port, count=15, timeout=0.5)
    return all(isinstance(r, Reply) and r.pod != pod for r in results)


def run_demo(out: TextIO = sys.stdout) -> int:
    """Build the lab, run the demo, tear everything down."""
    with LabCluster(nodes=("node1", "node2")) as lab:
        try:
            Demo(lab, out).run()
        except Exception:
            for node in lab.proxies:
                print(f"--- kproxyd log of {node} ---\n{lab.proxy_log(node)[-4000:]}", file=sys.stderr)
            raise
    return 0
