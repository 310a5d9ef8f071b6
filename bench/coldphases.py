"""Where an nftables cold full sync spends its time, phase by phase, against `nft -f` of the same ruleset.

`coldphases.py N [REPEATS]`: for each repeat, the plans of bench/syncbench.py (N Services x 3 endpoints: the
model objects and plan_service_port), render (plans -> PortRules), transaction (full_sync), netlink
encoding, the netlink send in a fresh namespace (the kernel's share: it checks and commits the batch inside
sendmsg), and `nft -f` of the same transaction's text in another, with nft's user CPU (its parser, evaluation
and encoding) and system CPU (mostly the kernel). Prints one JSON line per repeat: wall and CPU seconds per
phase, the machine's load when it started.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from syncbench import NFT_CONFIG, NODE, make_plans, scratch_netns

from kproxyd.backends.nftables.backend import render_options
from kproxyd.backends.nftables.netlink import NetlinkSocket
from kproxyd.backends.nftables.render import NftRenderer
from kproxyd.backends.nftables.transaction import TableObjects, Transaction, full_sync

T = TypeVar("T")


def timed(phases: dict[str, Any], name: str, work: Callable[[], T]) -> T:
    """Run work, note its wall and CPU (this process) seconds under name."""
    start, cpu = time.perf_counter(), time.process_time()
    result = work()
    phases[name] = {"wall_s": round(time.perf_counter() - start, 3), "cpu_s": round(time.process_time() - cpu, 3)}
    return result


def nft_file(netns: str, text: str) -> dict[str, float]:
    """`nft -f -` of text in netns: wall, user and system seconds of the nft process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": round(wall, 3),
        "user_s": round(after.ru_utime - before.ru_utime, 3),
        "sys_s": round(after.ru_stime - before.ru_stime, 3),
    }


def measure(n: int) -> dict[str, Any]:
    """One cold sync of n Services, phase by phase, and nft -f of the same transaction."""
    phases: dict[str, Any] = {}
    gc.disable()  # as the backend's full sync (gc_paused)
    try:
        plans = timed(phases, "plans", lambda: make_plans(n))  # the ServicePorts and plan_service_port
        renderer = NftRenderer(render_options(NFT_CONFIG, NODE, []))
        ports = timed(phases, "render", lambda: {name: renderer.port(plan) for name, plan in plans.items()})
        tx = Transaction("ip")
        timed(phases, "transaction", lambda: full_sync(tx, renderer.static(), ports, TableObjects(), True))
        payload_size = timed(phases, "encode", lambda: tx.batch()).size
        batch = tx.batch()
        with scratch_netns() as netns:
            sock = NetlinkSocket(netns)
            timed(phases, "netlink_send", lambda: sock.send(batch))
            sock.close()
        text = timed(phases, "text", tx.text)
        with scratch_netns() as netns:
            phases["nft_f"] = nft_file(netns, text)
    finally:
        gc.enable()
    return {"services": n, "batch_bytes": payload_size, "text_bytes": len(text), "phases": phases}


def main(argv: list[str]) -> int:
    """Print one JSON line per repeat."""
    n, repeats = int(argv[0]), int(argv[1]) if len(argv) > 1 else 1
    for _ in range(repeats):
        load = round(os.getloadavg()[0], 1)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sys.stdout.write(json.dumps({**measure(n), "when": when, "load": load}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
