"""config.py and cli.py: kube-proxy's flags and KubeProxyConfiguration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxyd.cli import parse_config
from kproxyd.config import ConfigError, load_config_file, parse_duration
from kproxyd.model import DetectLocalMode

KUBEADM_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("1m0s", 60), ("500ms", 0.5), ("1h2m3s", 3723), ("2", 2)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_bad_duration() -> None:
    with pytest.raises(ConfigError):
        parse_duration("thirty")


def test_kube_proxy_flags() -> None:
    config = parse_config(
        [
            "--kubeconfig=/k",
            "--hostname-override",
            "Node-1",
            "-v=4",
            "--masquerade-all",
            "--iptables-sync-period=1m",
            "--iptables-min-sync-period",
            "100ms",
            "--cluster-cidr=10.244.0.0/16",
            "--nodeport-addresses=172.28.0.0/24",
            "--iptables-masquerade-bit=13",
            "--proxy-mode=iptables",
            "--detect-local-mode=ClusterCIDR",
            "--healthz-bind-address=0.0.0.0:10256",
            "--conntrack-min=0",
        ]
    )
    assert config.kubeconfig == "/k" and config.hostname == "node-1" and config.verbosity == 4
    assert config.masquerade_all and config.sync_period == 60 and config.min_sync_period == 0.1
    assert config.cluster_cidrs == ("10.244.0.0/16",) and config.nodeport_addresses == ("172.28.0.0/24",)
    assert config.masquerade_bit == 13 and config.detect_local_mode is DetectLocalMode.CLUSTER_CIDR


@pytest.mark.parametrize(
    "flag",
    [
        "--proxy-mode=userspace",
        "--iptables-masquerade-bit=40",
        "--cluster-cidr=nope",
        "--detect-local-mode=Magic",
        "--masquerade-all=maybe",
    ],
)
def test_bad_flag_is_an_error_naming_it(flag: str) -> None:
    with pytest.raises(ConfigError, match=flag.split("=")[0]):
        parse_config([flag])


def test_kubeadm_configmap_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text(KUBEADM_CONFIG)
    config = load_config_file(str(path))
    assert config.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    assert config.mode == "iptables" and config.sync_period == 30 and config.masquerade_bit == 14


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text(KUBEADM_CONFIG.replace("masqueradeAll: false", "masqueradeAll: true"))
    config = parse_config([f"--config={path}", "--hostname-override=n2", "--cluster-cidr=10.0.0.0/8"])
    assert config.masquerade_all and config.hostname == "n2" and config.cluster_cidrs == ("10.0.0.0/8",)


def test_unknown_file_field_named(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text("kind: KubeProxyConfiguration\niptables:\n  masqueradeBits: 3\n")
    with pytest.raises(ConfigError, match=r"iptables\.masqueradeBits"):
        load_config_file(str(path))


def test_invalid_file_value_named(tmp_path: Path) -> None:
    path = tmp_path / "config.conf"
    path.write_text("kind: KubeProxyConfiguration\niptables:\n  syncPeriod: soon\n")
    with pytest.raises(ConfigError, match=r"iptables\.syncPeriod"):
        load_config_file(str(path))
