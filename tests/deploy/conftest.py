"""Fixtures for the deployment artifacts: deploy/ manifests, the systemd unit, vagrant/, the image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kproxyd.yaml"


def load_manifests() -> list[dict[str, Any]]:
    """Every object in deploy/*.yaml, in file order."""
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "deploy").glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


def manifest(kind: str, name: str = "kproxyd") -> dict[str, Any]:
    """The one object of that kind and name."""
    found = [d for d in load_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/, found {len(found)}"
    return found[0]


def daemonset_container() -> dict[str, Any]:
    """The DaemonSet's one container."""
    containers: list[dict[str, Any]] = manifest("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_argv(env: dict[str, str]) -> list[str]:
    """The DaemonSet's command and args with $(VAR) expanded as the kubelet does."""
    container = daemonset_container()
    argv = [*container["command"], *container.get("args", [])]
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg) for arg in argv]
