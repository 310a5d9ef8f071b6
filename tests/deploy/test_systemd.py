"""systemd/: the unit passes `systemd-analyze verify`, stays hardened, and its flags parse."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kproxyd.cli import parse_config
from tests.deploy.conftest import REPO

UNIT = REPO / "systemd" / "kproxyd.service"
DEFAULTS = REPO / "systemd" / "kproxyd.default"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install -y systemd)"
)


def directives(text: str) -> dict[str, list[str]]:
    """Key → every value it is given, in order (systemd allows repeating most keys)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's kproxyd, which verify requires to exist."""
    kproxyd = Path(sys.executable).with_name("kproxyd")
    assert kproxyd.exists(), f"{kproxyd} missing: pip install -e ."
    text = UNIT.read_text()
    assert "ExecStart=/opt/kproxyd/.venv/bin/kproxyd " in text
    path = tmp_path / "kproxyd.service"
    path.write_text(text.replace("ExecStart=/opt/kproxyd/.venv/bin/kproxyd ", f"ExecStart={kproxyd} "))
    return path


@needs_systemd_analyze
def test_unit_verifies(local_unit: Path) -> None:
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", str(local_unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # verify reports unknown keys and bad values as warnings with exit status 0: none may mention the unit
    assert [line for line in result.stderr.splitlines() if "kproxyd.service" in line] == []


@needs_systemd_analyze
def test_unit_security_exposure_is_ok(local_unit: Path) -> None:
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "security", "--offline=true", "--no-pager", str(local_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for kproxyd\.service: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, f"exposure {match.group(1)} regressed (docs/deploy.md records 2.2)"


def test_unit_is_hardened() -> None:
    unit = directives(UNIT.read_text())
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "Restart": "always",
    }.items():
        assert unit.get(key) == [value], key
    assert set(unit["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(unit["AmbientCapabilities"][0].split()) <= {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_NETLINK AF_UNIX"]
    # only the xtables lock is writable; /proc/sys must stay writable for route_localnet
    assert unit["ReadWritePaths"] == ["-/run/xtables.lock"]
    assert "ProtectKernelTunables" not in unit


def test_default_flags_parse() -> None:
    env = directives(DEFAULTS.read_text())
    (args,) = env["KPROXYD_ARGS"]
    config = parse_config(shlex.split(shlex.split(args)[0]))
    assert config.kubeconfig == "/etc/kubernetes/kproxyd.kubeconfig"
    assert config.cluster_cidrs == ("10.244.0.0/16",)
