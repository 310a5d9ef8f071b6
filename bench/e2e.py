"""One endpoint change end to end, stage by stage (issue #5), in one mode at a few sizes.

Run as root: .venv/bin/python bench/e2e.py [--services 1000,30000] [--changes 10] [--mode ebpf]
             [--probe-interval-us 1000] [--label NAME] [--quiet-daemon]       (make bench-e2e SIZES=... MODE=...)

bench/run.py's lab (one node, a client pod, N Services) and its one_change (API write → the first probe
from the client pod that sees the new state), with each change split into stages by timestamps (CLOCK_REALTIME
throughout, one machine):

  sent       the lab API server (in this process) is about to write the watch event to kproxyd's watch
  handled    kproxyd decoded the event and recorded it in the trackers ("watch event handled", -v=4)
  started    the sync thread started the sync ("sync started")
  maps       the socket load balancer's maps were written ("eBPF maps written"; ebpf mode only)
  seen       the probe's first attempt that saw the new state started
  synced     kproxyd logged the IPv4 sync as done (after the fallback, tc, metrics and observers)

Each stage is reported as the milliseconds since the previous one logged, and e2e as write → seen. The
probe's pause between attempts (1 ms) bounds its resolution: a finer one (200 µs) made "seen" ~0.3 ms
shorter but the daemon's stages as much longer on 2 CPUs (one run each at 1k: its attempts compete with
the daemon). --quiet-daemon
runs kproxyd at the default verbosity (the debug lines cost a little): then only e2e, sent and synced are
known. Writes bench/results/<date>-e2e-<label>.json.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

from kproxyd.lab.cluster import wait_until

STAGES = ("sent", "handled", "started", "maps", "seen")
SENT: dict[str, float] = {}  # resourceVersion → when the lab API server was about to send that EndpointSlice


def capture_sent(_logger: object, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: note when the lab API server sends each EndpointSlice watch event; only warnings
    and errors go on to be printed."""
    if event.get("event") == "watch event sent" and event.get("kind") == "EndpointSlice":
        SENT.setdefault(str(event["resource_version"]), time.time())
    if method in ("debug", "info"):
        raise structlog.DropEvent
    return event


class GcPauses:
    """The cyclic collections of this process (the lab API server's) longer than 0.5 ms: (start, ms, gen)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.time()
        elif (ms := (time.time() - self._start) * 1000) > 0.5:
            self.pauses.append((self._start, round(ms, 3), info["generation"]))

    def between(self, start: float, end: float) -> float:
        """Milliseconds of pauses that started between start and end."""
        return round(sum(ms for at, ms, _ in self.pauses if start <= at <= end), 3)


GC = GcPauses()


def settle(pid: int, timeout: float = 120.0) -> float:
    """Wait until the daemon's CPU use stops (its first sync's follow-up work, e.g. other modes' cleanup)."""
    start = time.monotonic()
    used = run.proc_status(pid)
    while time.monotonic() - start < timeout:
        time.sleep(0.5)
        now = run.proc_status(pid)
        if now["cpu_s"] + now["children_cpu_s"] - used["cpu_s"] - used["children_cpu_s"] < 0.02:
            break
        used = now
    return round(time.monotonic() - start, 1)


def first(events: list[dict[str, Any]], after: float, **match: Any) -> float | None:
    """The timestamp of the first daemon log line at or after `after` whose fields match."""
    return next((e["t"] for e in events if e["t"] >= after and all(e.get(k) == v for k, v in match.items())), None)


def stages(lab: run.Lab, change: dict[str, Any]) -> dict[str, Any]:
    """The change's stage timestamps, as milliseconds since the previous stage (None: not logged)."""
    t0, rv = change["written_at"], change["resource_version"]
    events = run.log_events(lab.cluster)
    at: dict[str, float | None] = {"write": t0, "sent": SENT.get(rv)}
    at["handled"] = first(events, t0, event="watch event handled", kind="EndpointSlice", resource_version=rv)
    at["started"] = first(events, at["handled"] or t0, event="sync started")
    at["maps"] = first(events, at["started"] or t0, event="eBPF maps written")
    at["seen"] = change["seen_at"]
    at["synced"] = first(events, t0, event="synced", family="IPv4")
    out: dict[str, Any] = {"e2e_ms": ms(at["seen"], t0), "sync_ms": round(change["sync_s"] * 1000, 3)}
    previous: float | None = t0
    for stage in STAGES:  # a stage not logged (maps outside ebpf mode) is counted in the next one
        out[stage] = ms(at[stage], previous)
        previous = at[stage] or previous
    out["synced_after_maps"] = ms(at["synced"], at["maps"])
    out["synced"] = ms(at["synced"], t0)
    out["lab_gc_ms"] = GC.between(t0, change["seen_at"])
    return out


def ms(t: float | None, since: float | None) -> float | None:
    """t - since in milliseconds, or None when either is unknown."""
    return None if t is None or since is None else round((t - since) * 1000, 3)


def medians(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of every numeric field over the samples."""
    out: dict[str, float | None] = {}
    for key in ("e2e_ms", "sync_ms", *STAGES, "synced_after_maps", "synced", "cpu_s", "lab_gc_ms"):
        values = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def measure(loadgen: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """A lab with n Services under kproxyd: args.changes endpoint changes (add, remove, ...), per stage."""
    timeout = 120 + n / 100
    result: dict[str, Any] = {"services": n, "mode": args.mode, "loadavg_before": os.getloadavg()}
    lab = run.Lab(loadgen, n)
    lab.probe_interval_us = args.probe_interval_us
    try:
        flags = [f"--proxy-mode={args.mode}", "--logging-format=json", "--iptables-sync-period=1h"]
        t_start = time.time()
        proc = lab.cluster.start_proxy("node1", [*flags, *([] if args.quiet_daemon else ["-v=4"])])
        wait_until(
            lambda: run.syncs_after(lab.cluster, t_start), timeout=timeout, interval=0.05, what="first sync"
        )
        result["cold_start_s"] = round(time.time() - t_start, 1)
        result["settled_s"] = settle(proc.pid)
        samples = []
        for k in range(args.changes):
            up = k % 2 == 0
            ips = [lab.probe_pod.ip] if up else []
            change = run.one_change(lab, proc.pid, ips, "up" if up else "down", timeout)
            samples.append({"kind": "add" if up else "remove", **stages(lab, change), "cpu_s": change["cpu_s"]})
            time.sleep(args.gap)
        result["samples"] = samples
        result["median"] = medians(samples)
        result["loadavg_after"] = os.getloadavg()
    finally:
        lab.cluster.stop_proxy("node1")
        lab.close()
    m = result["median"]
    run.progress(
        f"  N={n}: e2e median {m['e2e_ms']} ms (min {min(s['e2e_ms'] for s in samples)}, "
        f"max {max(s['e2e_ms'] for s in samples)}); stages "
        + ", ".join(f"{stage} {m.get(stage)}" for stage in STAGES)
        + f"; load {result['loadavg_before'][0]:.2f}"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", default="1000,30000", help="comma-separated Service counts")
    parser.add_argument("--changes", type=int, default=12, help="changes per size (alternately add and remove)")
    parser.add_argument("--mode", default="ebpf", choices=run.MODES)
    parser.add_argument("--probe-interval-us", type=int, default=1000, help="pause between probe attempts")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between changes")
    parser.add_argument("--quiet-daemon", action="store_true", help="kproxyd at default verbosity (no stages)")
    parser.add_argument("--label", default="", help="suffix of the results file name")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/e2e.py needs root (network namespaces)")
    structlog.configure(
        processors=[capture_sent, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    loadgen = run.build_loadgen()
    atexit.register(shutil.rmtree, os.path.dirname(loadgen), True)
    name = f"{dt.date.today().isoformat()}-e2e" + (f"-{args.label}" if args.label else "")
    out = run.RESULTS / f"{name}.json"
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "machine": run.machine_info(),
        "sizes": [],
    }
    for n in (int(s) for s in args.services.split(",")):
        run.progress(f"N={n}: kproxyd --proxy-mode={args.mode}")
        results["sizes"].append(measure(loadgen, n, args))
        out.write_text(json.dumps(results, indent=1) + "\n")
    run.progress(f"results -> {out.relative_to(run.BENCH.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
