"""IPVS mode's kernel layer against real IPVS: virtual services, NAT real servers, kube-ipvs0, cleanup.

Needs a kernel with IPVS (run it in the guest: python -m tests.guest.run -- tests/netns/test_ipvs_backend.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kproxyd.backends.ipvs.kernel import ipvs_available

pytestmark = pytest.mark.netns


@pytest.fixture
def probe(netns: str) -> dict[str, dict[str, object]]:
    if not ipvs_available():
        pytest.skip("needs a kernel with IPVS (not this one); run it in the guest: python -m tests.guest.run")
    # The node's address, as on a node: IPVS refuses real servers (EINVAL) while the namespace has no local
    # address at all, and the probe binds kube-ipvs0's addresses only after the real servers.
    subprocess.run(["ip", "-n", netns, "addr", "add", "192.168.0.2/24", "dev", "lo"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.netns.ipvs_probe"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_sync_partial_sync_drain_and_cleanup(probe: dict[str, dict[str, object]]) -> None:
    full = probe["full"]
    assert full["link"] is True and full["addresses"] == ["172.30.0.41"]
    assert full["services"] == {
        "TCP/172.30.0.41:80": {
            "scheduler": "rr",
            "persistence": 600,
            "servers": ["10.180.0.1:80/1", "10.180.0.2:80/1"],
        },
        "TCP/192.168.0.2:30080": {
            "scheduler": "rr",
            "persistence": 600,
            "servers": ["10.180.0.1:80/1", "10.180.0.2:80/1"],
        },
    }
    partial = probe["partial"]["services"]
    assert isinstance(partial, dict)
    assert partial["TCP/172.30.0.41:80"]["servers"] == ["10.180.0.1:80/1"]  # no connections: removed at once
    drained = probe["drained"]["services"]
    assert isinstance(drained, dict)
    assert drained["TCP/172.30.0.41:80"]["servers"] == ["10.180.0.1:80/0"]
    assert probe["cleaned"] == {"services": {}, "addresses": [], "link": False}
