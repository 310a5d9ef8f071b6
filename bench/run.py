"""kproxyd's benchmark harness: data plane, control plane, resources and growth, in one run.

Run as root: .venv/bin/python bench/run.py [--quick] [--sizes 100,1000,...] [--no-docs]
(`make bench`, `make bench QUICK=1`; one mode alone: `--modes ebpf`, `make bench MODES=ebpf`). Everything runs inside lab namespaces (kproxyd.lab.cluster.LabCluster)
or scratch namespaces created and deleted here; every load loop is bounded in count and time. Writes
bench/results/<date>.json (<date>-quick.json with --quick), PNG plots next to it, and regenerates
docs/benchmarks.md from a full run (bench/report.py renders both; it can be re-run on a saved JSON).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
import syncbench

from kproxyd.lab.cgroups import in_cgroup
from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import LabPod
from kproxyd.tracker import ENDPOINT_SLICE, SERVICE, ProxyStateTracker

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MODES = ("iptables", "nftables", "ebpf")
SERVER_PORT = 9000  # the C server in the target pods (the lab pod server on 8080 is Python, too slow to load)
HAPROXY_PORT = 8000
THREADS = 4  # client threads per measurement (the machine has 2 CPUs, shared with servers and daemon)
# Server threads per pod: each serves one connection at a time and SO_REUSEPORT pins a connection to one
# thread, so with fewer threads than clients a random spread (any Service) queues behind busy threads where
# a fixed client-to-pod split (the direct runs) never does: that measured the server, not the proxy.
SERVER_THREADS = 8
PORT_RANGE_KINDS = ("direct", "service", "direct_with_rules")  # haproxy and others: the 4th range
TARGET_IP, PROBE_IP = "10.96.250.1", "10.96.250.2"
START = time.monotonic()


def progress(message: str) -> None:
    """One progress line with the elapsed time."""
    elapsed = time.monotonic() - START
    sys.stdout.write(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------
# Objects


def cluster_ip(i: int) -> str:
    """The i-th filler Service's cluster IP in the lab's 10.96.0.0/16."""
    host = 10 + i
    return f"10.96.{host // 256}.{host % 256}"


def service_obj(namespace: str, name: str, ip: str) -> dict[str, Any]:
    """A single-stack ClusterIP Service with one TCP port 80 -> 9000, as the API server would store it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": SERVER_PORT}],
        },
    }


def slice_obj(namespace: str, service: str, ips: list[str]) -> dict[str, Any]:
    """The Service's one EndpointSlice with ready endpoints at ips (port 9000)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-bench",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "bench"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False}} for ip in ips
        ],
        "ports": [{"name": "http", "protocol": "TCP", "port": SERVER_PORT}],
    }


def filler(i: int, generation: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The i-th filler Service and its slice: 3 fake endpoints (never contacted)."""
    namespace, name = f"b{i // 500}", f"s{i}"
    ips = [f"10.{200 + j}.{i // 256 % 256}.{i % 256}" for j in range(2)]
    ips.append(f"10.{202 + generation % 50}.{i // 256 % 256}.{i % 256}")
    return service_obj(namespace, name, cluster_ip(i)), slice_obj(namespace, name, ips)


# ---------------------------------------------------------------------------------------------------------------
# Tools


def build_loadgen() -> str:
    """Compile bench/loadgen.c into a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="kproxyd-bench-")) / "loadgen"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(out), str(BENCH / "loadgen.c")], check=True)
    return str(out)


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints for its version, or 'missing'."""
    if not shutil.which(argv[0]):
        return "missing"
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else "?"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": tool_version(["iptables", "--version"]),
        "nft": tool_version(["nft", "--version"]),
        "haproxy": tool_version(["haproxy", "-v"]),
        "loadavg_at_start": os.getloadavg(),
    }


class Lab:
    """A one-node lab: 3 target pods and a probe pod running the C server, a client pod, N Services."""

    def __init__(self, loadgen: str, n: int, services: bool = True) -> None:
        self.loadgen = loadgen
        self.probe_interval_us = 1000  # between one probe's end and the next one's start
        self.procs: list[subprocess.Popen[str]] = []
        self.cluster = LabCluster(nodes=("node1",))
        try:
            self.cluster.controller.stop()  # slices are written here; its per-Service relists are O(N) each
            self.cluster.store._max_history = 10**7
            self.node = self.cluster.net.node("node1")
            self.cgroup = self.cluster.net.node_cgroup("node1")
            self.targets = [self.cluster.add_pod(f"target-{i}", "node1", {"app": "t"}) for i in range(3)]
            self.probe_pod = self.cluster.add_pod("probe-a", "node1", {"app": "p"})
            self.client = self.cluster.add_pod("client", "node1", {"app": "c"})
            for ns in (self.client.netns, self.node.netns):
                subprocess.run(
                    ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000"],
                    check=True,
                )
            for pod in [*self.targets, self.probe_pod]:
                self.start_server(pod)
            if services:
                self.load_services(n)
        except BaseException:
            self.close()
            raise

    def start_server(self, pod: LabPod) -> None:
        """The C HTTP server on port 9000 inside the pod."""
        proc = subprocess.Popen(
            in_cgroup(
                self.cgroup,
                ["ip", "netns", "exec", pod.netns, self.loadgen, "server", str(SERVER_PORT), str(SERVER_THREADS)],
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def load_services(self, n: int) -> None:
        """n Services: n-2 fillers, then the probe Service (no endpoints) and the target (3 real pods), last."""
        store = self.cluster.store
        for i in range(max(n - 2, 0)):
            svc, slc = filler(i)
            store.put_raw("Service", svc)
            store.put_raw("EndpointSlice", slc)
        store.put_raw("Service", service_obj("zz", "probe", PROBE_IP))
        store.put_raw("EndpointSlice", slice_obj("zz", "probe", []))
        store.put_raw("Service", service_obj("zz", "target", TARGET_IP))
        store.put_raw("EndpointSlice", slice_obj("zz", "target", [p.ip for p in self.targets]))

    def exec(self, ns: str, argv: list[str], timeout: float) -> str:
        """Run argv inside ns; its stdout."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, check=True
        ).stdout

    def load(self, kinds: dict[str, tuple[list[str], int]], seconds: float, repeats: int) -> dict[str, Any]:
        """Bounded runs of new connections from the client pod, the kinds interleaved repeats times.

        Each kind is (target IPs, port): THREADS client threads spread over the IPs. Each kind gets its own
        client port range so that no kind reuses another's 4-tuples (a direct connection whose reply tuple
        matches a still-tracked NATed one would clash in conntrack); medians per kind.
        """
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for _ in range(repeats):
            for kind, (ips, port) in kinds.items():
                low = 1024 + 16000 * (list(PORT_RANGE_KINDS).index(kind) if kind in PORT_RANGE_KINDS else 3)
                self.exec(
                    self.client.netns,
                    ["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={low} {low + 15999}"],
                    10,
                )
                share = [THREADS // len(ips) + (1 if i < THREADS % len(ips) else 0) for i in range(len(ips))]
                procs = [
                    subprocess.Popen(
                        self.in_node(
                            [self.loadgen, "client", ip, str(port), str(threads), str(seconds), "200000"]
                        ),
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for ip, threads in zip(ips, share, strict=True)
                    if threads
                ]
                used = cgroup_cpu_us(self.cgroup)
                out = []
                for proc in procs:
                    stdout, _ = proc.communicate(timeout=seconds + 30)
                    out.append(json.loads(stdout))
                run = merge_runs(out)
                run["cpu_us_per_conn"] = round((cgroup_cpu_us(self.cgroup) - used) / max(run["ok"], 1), 1)
                runs[kind].append(run)
        return {kind: summarise(samples) for kind, samples in runs.items()}

    def probe(self, ip: str, want: str, timeout: float) -> subprocess.Popen[str]:
        """Start a probe of ip:80 from the client pod; returns once it saw the opposite state."""
        proc = subprocess.Popen(
            self.in_node([self.loadgen, "probe", ip, "80", want, str(timeout), str(self.probe_interval_us)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first != "ready":
            proc.wait(5)
            raise RuntimeError(f"probe {ip} {want}: {first or 'no answer'} before the change")
        return proc

    def in_node(self, argv: list[str]) -> list[str]:
        """argv in the client pod, in node1's cgroup (as a pod's processes are: ebpf balances that cgroup)."""
        return in_cgroup(self.cgroup, ["ip", "netns", "exec", self.client.netns, *argv])

    def close(self) -> None:
        """Stop the processes started here, then the lab."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(5)
        self.cluster.close()


def cgroup_cpu_us(cgroup: str) -> int:
    """CPU time used so far by the processes of a cgroup (cgroup v2 cpu.stat), in microseconds.

    The client and the pod servers run in node1's cgroup, and packet processing on veth runs in the sending
    task's context, so CPU per connection compares paths even when other work shares the machine: the
    connection rate of a saturated 2-CPU node follows it, while the rate itself swings with that other work.
    """
    with open(os.path.join(cgroup, "cpu.stat")) as stat:
        return next(int(line.split()[1]) for line in stat if line.startswith("usage_usec "))


def merge_runs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Parallel client processes' results as one run (rates add; latencies: the ok-weighted mean of each)."""
    ok = sum(p["ok"] for p in parts)
    merged: dict[str, Any] = {"ok": ok, "errors": sum(p["errors"] for p in parts)}
    merged["rate"] = round(sum(p["rate"] for p in parts), 1)
    for key in ("connect_p50_us", "connect_p99_us", "request_p50_us", "request_p99_us"):
        merged[key] = round(sum(p[key] * p["ok"] for p in parts) / ok, 1) if ok else None
    return merged


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats."""
    out: dict[str, Any] = {"samples": runs}
    keys = ("rate", "cpu_us_per_conn", "connect_p50_us", "connect_p99_us", "request_p50_us", "request_p99_us")
    for key in (*keys, "errors"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# The daemon


def log_events(cluster: LabCluster) -> list[dict[str, Any]]:
    """The daemon's JSON log lines so far."""
    events = []
    for line in cluster.proxy_log("node1").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                event["t"] = (
                    dt.datetime.fromisoformat(event["timestamp"]).timestamp() if "timestamp" in event else 0
                )
                events.append(event)
    return events


def syncs_after(cluster: LabCluster, t0: float) -> list[dict[str, Any]]:
    """IPv4 'synced' lines logged after t0."""
    return [
        e for e in log_events(cluster) if e.get("event") == "synced" and e.get("family") == "IPv4" and e["t"] > t0
    ]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS/VmHWM in MB and CPU seconds (own, and reaped children such as iptables-restore/nft)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mb": int(fields["VmRSS"]) / 1024,
        "hwm_mb": int(fields["VmHWM"]) / 1024,
        "cpu_s": (int(stat[11]) + int(stat[12])) / tick,
        "children_cpu_s": (int(stat[13]) + int(stat[14])) / tick,
    }


def wait_probe(proc: subprocess.Popen[str], timeout: float) -> float:
    """The CLOCK_REALTIME at which the probe saw the new state."""
    stdout, _ = proc.communicate(timeout=timeout + 10)
    if proc.returncode != 0:
        raise TimeoutError(f"probe did not see the change within {timeout}s")
    return float(stdout.strip().splitlines()[-1])


def one_change(lab: Lab, pid: int, ips: list[str], want: str, timeout: float) -> dict[str, Any]:
    """Set the probe Service's endpoints to ips; time until the probe sees it, and the sync that did it."""
    probe = lab.probe(PROBE_IP, want, timeout)
    before = proc_status(pid)
    t0 = time.time()
    written = lab.cluster.store.put_raw("EndpointSlice", slice_obj("zz", "probe", ips))
    t_seen = wait_probe(probe, timeout)
    syncs = wait_until(lambda: syncs_after(lab.cluster, t0), timeout=timeout, interval=0.02, what="sync log line")
    time.sleep(0.05)
    after = proc_status(pid)
    return {
        "written_at": t0,
        "seen_at": t_seen,
        "resource_version": written["metadata"]["resourceVersion"],
        "e2e_s": round(t_seen - t0, 4),
        "sync_s": syncs[0]["seconds"],
        "syncs": len(syncs),
        "cpu_s": round(after["cpu_s"] + after["children_cpu_s"] - before["cpu_s"] - before["children_cpu_s"], 3),
    }


def measure_mode(loadgen: str, n: int, mode: str, quick: bool) -> dict[str, Any]:
    """One lab with n Services under kproxyd in mode: cold start, data plane, changes, burst, resources."""
    seconds, repeats, changes = (1.0, 1, 3) if quick else (2.0, 3, 5)
    if n >= 20000 and mode == "iptables":
        changes = 2  # each one-change sync takes about a minute there: 5 + 5 would not fit the budget
    timeout = 120 + n / 100
    lab = Lab(loadgen, n)
    result: dict[str, Any] = {"services": n, "mode": mode}
    try:
        result.update(lab.load({"direct": ([p.ip for p in lab.targets], SERVER_PORT)}, seconds, repeats))
        t_start = time.time()
        proc = lab.cluster.start_proxy(
            "node1", [f"--proxy-mode={mode}", "--logging-format=json", "--iptables-sync-period=1h"]
        )
        first = wait_until(
            lambda: syncs_after(lab.cluster, t_start), timeout=timeout, interval=0.05, what="first sync"
        )
        started = proc_status(proc.pid)
        result["cold_start_s"] = round(first[0]["t"] - t_start, 3)
        result["first_sync_s"] = first[0]["seconds"]
        result["first_sync_bytes"] = first[0].get("bytes")
        result["cold_cpu_s"] = round(started["cpu_s"] + started["children_cpu_s"], 2)
        result["rss_after_start_mb"] = round(started["rss_mb"], 1)
        if mode == "ebpf":
            result["bpf_maps"] = bpf_map_memory(lab.cluster.net.pin_path("node1"))
            progress(f"  ebpf     N={n}: pinned maps hold {result['bpf_maps']['total_mb']:.1f} MB (memlock)")
        progress(
            f"  {mode:<8} N={n}: programmed {result['cold_start_s']:.2f}s after start "
            f"(sync {result['first_sync_s']:.3f}s)"
        )
        result.update(
            lab.load(
                {"service": ([TARGET_IP], 80), "direct_with_rules": ([p.ip for p in lab.targets], SERVER_PORT)},
                seconds,
                repeats,
            )
        )
        progress(
            f"  {mode:<8} N={n}: {result['service']['rate']:.0f} conn/s via ClusterIP, "
            f"{result['direct']['rate']:.0f} direct before start, "
            f"{result['direct_with_rules']['rate']:.0f} direct (rules loaded)"
        )
        adds, removes = [], []
        for _ in range(changes):
            adds.append(one_change(lab, proc.pid, [lab.probe_pod.ip], "up", timeout))
            time.sleep(0.3)
            removes.append(one_change(lab, proc.pid, [], "down", timeout))
            time.sleep(0.3)
        result["add"], result["remove"] = adds, removes
        for key, samples in (("add", adds), ("remove", removes)):
            result[f"{key}_e2e_s"] = statistics.median(s["e2e_s"] for s in samples)
            result[f"{key}_sync_s"] = statistics.median(s["sync_s"] for s in samples)
            result[f"{key}_cpu_s"] = statistics.median(s["cpu_s"] for s in samples)
        progress(
            f"  {mode:<8} N={n}: one change programmed in {result['add_e2e_s'] * 1000:.0f} ms (add) / "
            f"{result['remove_e2e_s'] * 1000:.0f} ms (remove); sync {result['add_sync_s'] * 1000:.1f} ms"
        )
        result["burst"] = burst(lab, n, timeout)
        progress(
            f"  {mode:<8} N={n}: burst of {result['burst']['changes']} changes programmed in "
            f"{result['burst']['e2e_s']:.2f}s ({result['burst']['syncs']} syncs)"
        )
        final = proc_status(proc.pid)
        result["peak_rss_mb"] = round(final["hwm_mb"], 1)
        result["total_cpu_s"] = round(final["cpu_s"] + final["children_cpu_s"], 2)
        result["errors_in_log"] = sum(
            1 for e in log_events(lab.cluster) if e.get("level") in ("error", "critical")
        )
    finally:
        lab.cluster.stop_proxy("node1")
        lab.close()
    return result


def bpf_map_memory(pin_path: str) -> dict[str, Any]:
    """The kernel memory (memlock bytes, from fdinfo) and entry limits of the ebpf mode's pinned maps."""
    from bcc.libbcc import lib

    maps: dict[str, Any] = {}
    for name in sorted(os.listdir(pin_path)):
        if name.startswith("prog_"):
            continue
        fd = lib.bpf_obj_get(os.path.join(pin_path, name).encode())
        try:
            info = dict(
                line.split(":\t", 1)
                for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                if ":\t" in line
            )
        finally:
            os.close(fd)
        maps[name] = {"memlock_bytes": int(info["memlock"]), "max_entries": int(info["max_entries"])}
    total = sum(m["memlock_bytes"] for m in maps.values())
    return {"maps": maps, "total_mb": round(total / 2**20, 2)}


def burst(lab: Lab, n: int, timeout: float, changes: int = 1000) -> dict[str, Any]:
    """changes endpoint changes across the filler Services, then the probe's; time until the probe sees it."""
    probe = lab.probe(PROBE_IP, "up", timeout)
    t0 = time.time()
    fillers = max(n - 2, 1)
    for k in range(changes):
        _, slc = filler(k % fillers, generation=1 + k // fillers)
        lab.cluster.store.put_raw("EndpointSlice", slc)
    written = time.time()
    lab.cluster.store.put_raw("EndpointSlice", slice_obj("zz", "probe", [lab.probe_pod.ip]))
    t_seen = wait_probe(probe, timeout)
    syncs = [s for s in syncs_after(lab.cluster, t0) if s["t"] <= t_seen + 0.5]
    return {
        "changes": changes + 1,
        "write_s": round(written - t0, 3),
        "e2e_s": round(t_seen - t0, 3),
        "syncs": len(syncs),
        "sync_s_total": round(sum(s["seconds"] for s in syncs), 3),
    }


def measure_baseline(loadgen: str, n: int, quick: bool) -> dict[str, Any]:
    """No kproxyd: direct to the pods, and HAProxy (tcp mode) in the node namespace to the same pods."""
    seconds, repeats = (1.0, 1) if quick else (2.0, 3)
    lab = Lab(loadgen, n, services=False)
    result: dict[str, Any] = {"services": n}
    cfg = Path(lab.cluster.workdir) / "haproxy.cfg"
    servers = "\n".join(f"  server p{i} {p.ip}:{SERVER_PORT}" for i, p in enumerate(lab.targets))
    cfg.write_text(
        "global\n  maxconn 8000\n  nbthread 2\n"
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n"
        f"listen svc\n  bind {lab.node.pod_gateway}:{HAPROXY_PORT}\n  balance roundrobin\n{servers}\n"
    )
    try:
        kinds = {"direct": ([p.ip for p in lab.targets], SERVER_PORT)}
        if shutil.which("haproxy"):
            haproxy = subprocess.Popen(
                ["ip", "netns", "exec", lab.node.netns, "haproxy", "-f", str(cfg), "-db"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            lab.procs.append(haproxy)
            check = [lab.loadgen, "client", lab.node.pod_gateway, str(HAPROXY_PORT), "1", "0.2", "1"]
            wait_until(
                lambda: json.loads(lab.exec(lab.client.netns, check, 10))["ok"] == 1, timeout=10, what="haproxy"
            )
            kinds["haproxy"] = ([lab.node.pod_gateway], HAPROXY_PORT)
        result.update(lab.load(kinds, seconds, repeats))
        if "haproxy" in kinds:
            result["haproxy_peak_rss_mb"] = round(proc_status(haproxy.pid)["hwm_mb"], 1)
    finally:
        lab.close()
    progress(
        f"  baseline N={n}: direct {result['direct']['rate']:.0f} conn/s, "
        f"haproxy {result.get('haproxy', {}).get('rate', 0):.0f} conn/s"
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# API decode


def measure_decode(n: int) -> dict[str, Any]:
    """Services and EndpointSlices per second through kproxyd.k8s.convert and the tracker (one relist)."""
    objects = [filler(i) for i in range(n)]
    tracker = ProxyStateTracker("node1")
    start = time.perf_counter()
    tracker.replace(SERVICE, [o[0] for o in objects])
    tracker.replace(ENDPOINT_SLICE, [o[1] for o in objects])
    seconds = time.perf_counter() - start
    t_json = time.perf_counter()
    json.loads(json.dumps({"items": [o[0] for o in objects]}))
    json_s = time.perf_counter() - t_json
    return {
        "services": n,
        "objects": 2 * n,
        "seconds": round(seconds, 4),
        "objects_per_s": round(2 * n / seconds),
        "json_services_per_s": round(n / json_s) if json_s else None,
    }


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (100, 1000), short runs: a few minutes")
    parser.add_argument("--sizes", help="comma-separated Service counts (default 100,1000,10000,30000)")
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="skip sizes that would not fit")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    parser.add_argument(
        "--modes",
        help="comma-separated modes to measure alone (e.g. ebpf): no baseline, kernel tools, plots or docs",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root (network namespaces)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([100, 1000] if args.quick else [100, 1000, 10000, 30000])
    )
    today = dt.date.today().isoformat()
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    name = (f"{today}-quick" if args.quick else today) + ("-" + "-".join(modes) if args.modes else "")
    loadgen = build_loadgen()
    atexit.register(shutil.rmtree, os.path.dirname(loadgen), True)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "sizes": sizes,
        "machine": machine_info(),
        "skipped": [],
        "decode": [],
        "kernel": [],
        "baseline": [],
        "modes": [],
    }
    out = RESULTS / f"{name}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    progress(f"kproxyd bench: sizes {sizes}; results -> {out.relative_to(BENCH.parent)}")
    for n in sizes:
        results["decode"].append(measure_decode(n))
        progress(f"decode N={n}: {results['decode'][-1]['objects_per_s']} objects/s")
    budget = args.budget_minutes * 60
    for n in sizes:
        elapsed = time.monotonic() - START
        # The 30k size costs about as much as everything below it together, times three: skip what won't fit.
        if n >= 20000 and elapsed > budget * 0.4:
            results["skipped"].append(
                {"services": n, "reason": f"{elapsed / 60:.0f} min used of {budget / 60:.0f}"}
            )
            progress(f"N={n}: skipped, it would not fit in the {args.budget_minutes:.0f} min budget")
            continue
        if not args.modes:
            progress(f"N={n}: baseline (direct, haproxy)")
            results["baseline"].append(measure_baseline(loadgen, n, args.quick))
            save()
        for mode in modes:
            progress(f"N={n}: kproxyd --proxy-mode={mode}")
            try:
                results["modes"].append(measure_mode(loadgen, n, mode, args.quick))
            except Exception as err:  # record and go on: one failing size must not lose the others
                progress(f"  {mode} N={n} FAILED: {err!r}")
                results["modes"].append({"services": n, "mode": mode, "failed": repr(err)})
            save()
        for variant in syncbench.variants(n) if not args.modes else ():
            r = syncbench.measure(n, variant)
            results["kernel"].append(r)
            progress(
                f"  kernel tool N={n} {variant:<15} cold {r['cold']['kernel_s']:.3f}s of {r['cold']['total_s']:.3f}s, "
                f"partial {r['partial']['kernel_s']:.3f}s of {r['partial']['total_s']:.3f}s"
            )
            save()
    results["elapsed_s"] = round(time.monotonic() - START, 1)
    if args.modes:
        save()
        progress(f"done in {results['elapsed_s'] / 60:.1f} min")
        return 0
    results["slopes"] = report.slopes(results)
    save()
    report.plots(results, RESULTS, name)
    if not args.quick and not args.no_docs:
        report.write_docs(results, out, name)
    progress(f"done in {results['elapsed_s'] / 60:.1f} min")
    sys.stdout.write(report.summary(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
