"""vagrant/ and image/: the Vagrantfile parses (ruby -c), every script passes shellcheck, and the cluster
they build is the one docs/deploy.md describes (kube-proxy skipped, two kproxyd node pools)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO, manifest

VAGRANT = REPO / "vagrant"
SCRIPTS = sorted([*(VAGRANT / "scripts").glob("*.sh"), *(REPO / "image").glob("*.sh")])


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install -y {name}); static check skipped")
    return path


def test_vagrantfile_is_valid_ruby() -> None:
    result = subprocess.run(
        [tool("ruby"), "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--severity=style", "--external-sources", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


def test_vagrantfile_provisions_scripts_that_exist() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    paths = re.findall(r'path: "([^"]+)"', text)
    assert paths, "no provisioning scripts"
    for path in paths:
        assert (VAGRANT / path).is_file(), path


def test_cluster_has_one_control_plane_and_two_pools() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    nodes = re.findall(r'\{ name: "(\w+)",.*role: "([\w-]+)", pool: "(\w+)"', text)
    assert [(role, pool) for _, role, pool in nodes] == [
        ("control-plane", "daemonset"),
        ("worker", "daemonset"),
        ("worker", "systemd"),
    ]


def test_kube_proxy_is_skipped() -> None:
    text = (VAGRANT / "scripts" / "control-plane.sh").read_text()
    assert "--skip-phases=addon/kube-proxy" in text
    assert "kubectl apply" in text and "deploy/kproxyd.yaml" in text


def test_systemd_pool_label_is_what_the_daemonset_avoids() -> None:
    """common.sh labels nodes kproxyd.io/install=<pool>; the DaemonSet must exclude exactly 'systemd'."""
    common = (VAGRANT / "scripts" / "common.sh").read_text()
    assert "--node-labels=kproxyd.io/install=${NODE_POOL}" in common
    affinity = manifest("DaemonSet")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": "kproxyd.io/install", "operator": "NotIn", "values": ["systemd"]}]}
    ]
    worker = (VAGRANT / "scripts" / "worker.sh").read_text()
    assert "systemd/kproxyd.service" in worker and "systemctl enable kproxyd" in worker


def test_placeholder_server_is_what_the_scripts_replace() -> None:
    kubeconfig = manifest("ConfigMap")["data"]["kubeconfig.conf"]
    assert "server: https://CONTROL_PLANE_ENDPOINT:6443" in kubeconfig
    assert "s#https://CONTROL_PLANE_ENDPOINT:6443#" in (VAGRANT / "scripts" / "control-plane.sh").read_text()
