"""Fixtures for namespace tests: a lab cluster with kproxyd running on each node, per proxy mode."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from kproxyd.backends.ipvs.kernel import ipvs_available
from kproxyd.lab.cluster import LabCluster
from tests.scratch_netns import scratch_netns

PROXY_MODES = ["iptables", "nftables", "ebpf", "ipvs"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/netns needs root and builds namespaces."""
    for item in items:
        if "/netns/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("namespace tests need root (CI runs as root)")


@pytest.fixture(scope="module", params=PROXY_MODES)
def proxy_mode(request: pytest.FixtureRequest) -> str:
    """The dataplane the module's lab runs; ipvs only where the kernel has IPVS (skipped, saying so, elsewhere)."""
    mode = str(request.param)
    if mode == "ipvs" and not ipvs_available():
        pytest.skip(
            "ipvs mode needs a kernel with IPVS (not this one); run it in the guest: python -m tests.guest.run"
        )
    return mode


@pytest.fixture(scope="module")
def lab(proxy_mode: str) -> Iterator[LabCluster]:
    """A 2-node lab, torn down after the module even when tests fail."""
    with LabCluster(nodes=("node1", "node2")) as cluster:
        cluster.mode = proxy_mode  # type: ignore[attr-defined]
        yield cluster
        if os.environ.get("KPROXYD_SHOW_LOGS"):
            for node in ("node1", "node2"):
                print(cluster.proxy_log(node))


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace, deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with scratch_netns() as name:
        yield name


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Makes fresh, empty network namespaces, all deleted afterwards."""
    with ExitStack() as namespaces:
        yield lambda: namespaces.enter_context(scratch_netns())
