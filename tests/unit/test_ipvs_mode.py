"""ipvs mode's wiring: flags and the config file's ipvs section, refusing a kernel without IPVS, cleanup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kproxyd.backends.ipvs.backend import IpvsBackend
from kproxyd.backends.ipvs.kernel import ipvs_available, kernel_version
from kproxyd.cli import parse_config
from kproxyd.config import ConfigError, ProxyConfig, load_config_file

IPVS_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: {mode}
ipvs:
  scheduler: sh
  syncPeriod: 10s
  minSyncPeriod: 2s
  strictARP: true
  tcpTimeout: 900s
  tcpFinTimeout: 120s
  udpTimeout: 300s
  excludeCIDRs: [10.210.0.0/16]
"""


def test_config_file_ipvs_section(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(IPVS_CONFIG.format(mode="ipvs"))
    config = load_config_file(str(path))
    assert (config.mode, config.ipvs_scheduler, config.sync_period, config.min_sync_period) == (
        "ipvs",
        "sh",
        10,
        2,
    )
    assert config.ipvs_strict_arp and config.ipvs_exclude_cidrs == ("10.210.0.0/16",)
    assert (config.ipvs_tcp_timeout, config.ipvs_tcpfin_timeout, config.ipvs_udp_timeout) == (900, 120, 300)


def test_config_file_ipvs_section_applies_in_ipvs_mode_only(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(IPVS_CONFIG.format(mode="iptables"))
    config = load_config_file(str(path))
    assert (config.sync_period, config.min_sync_period, config.ipvs_scheduler) == (30, 1, "rr")


def test_ipvs_flags() -> None:
    config = parse_config(
        ["--proxy-mode=ipvs", "--ipvs-scheduler=mh", "--ipvs-sync-period=5s", "--ipvs-min-sync-period=500ms",
         "--ipvs-strict-arp", "--ipvs-udp-timeout=1m", "--ipvs-exclude-cidrs=10.0.0.0/8,fd00::/8"]
    )  # fmt: skip
    assert (config.ipvs_scheduler, config.sync_period, config.min_sync_period) == ("mh", 5, 0.5)
    assert config.ipvs_strict_arp and config.ipvs_udp_timeout == 60
    assert config.ipvs_exclude_cidrs == ("10.0.0.0/8", "fd00::/8")
    assert parse_config(["--ipvs-sync-period=5s"]).sync_period == 30  # iptables mode: not its flag


def test_unknown_scheduler_is_an_error() -> None:
    with pytest.raises(ConfigError, match="--ipvs-scheduler"):
        parse_config(["--ipvs-scheduler=fastest"])


@pytest.mark.skipif(ipvs_available(load=False), reason="this kernel has IPVS: nothing to refuse")
def test_ipvs_mode_refused_without_ipvs() -> None:
    """The daemon stops before touching anything, naming the reason."""
    argv = [sys.executable, "-m", "kproxyd", "--proxy-mode=ipvs", "--kubeconfig=/dev/null",
            "--healthz-bind-address=", "--metrics-bind-address="]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "proxy mode ipvs needs IPVS in the kernel" in proc.stdout + proc.stderr


@pytest.mark.skipif(ipvs_available(load=False), reason="this kernel has IPVS: cleanup has work to do")
def test_cleanup_is_a_no_op_without_ipvs() -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"cleanup used {name} on a kernel without IPVS")

    backend = IpvsBackend(ProxyConfig(), iptables=Untouchable(), ipset=Untouchable(), link=Untouchable())  # type: ignore[arg-type]
    backend.cleanup()


def test_kernel_version() -> None:
    assert kernel_version("6.1.0-56-amd64") == (6, 1) and kernel_version("4.19.0") < (5, 9)
