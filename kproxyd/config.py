"""kube-proxy's configuration: the KubeProxyConfiguration file and flags, flags overriding the file."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
import yaml

from kproxyd.model import DetectLocalMode, LocalTrafficDetector, NodeInfo

log = structlog.get_logger(__name__)

PROXY_MODES = ("iptables", "nftables", "ebpf", "ipvs")
LB_ALGORITHMS = ("random", "maglev")
API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"


class ConfigError(ValueError):
    """An invalid flag or configuration field; the message names it."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Every setting the daemon uses, with kube-proxy's defaults."""

    kubeconfig: str | None = None
    master: str | None = None
    hostname: str = field(default_factory=lambda: socket.gethostname().lower())
    mode: str = "iptables"
    cluster_cidrs: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    detect_local_mode: DetectLocalMode | None = None
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""
    localhost_nodeports: bool = True
    bind_address: str = "0.0.0.0"
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    verbosity: int = 0
    log_format: str = "text"
    cleanup: bool = False
    cgroup_root: str = ""  # ebpf: the cgroup2 directory whose processes' sockets are balanced; "": the root
    bpf_pin_path: str = "/sys/fs/bpf/kproxyd"  # ebpf: where maps and programs are pinned
    ebpf_lb_algorithm: str = "random"  # ebpf: backend choice unless a Service's annotation says otherwise
    ipvs_scheduler: str = "rr"
    ipvs_strict_arp: bool = False
    ipvs_tcp_timeout: float = 0.0  # 0: leave the kernel's IPVS timeout as it is
    ipvs_tcpfin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    ipvs_exclude_cidrs: tuple[str, ...] = ()  # virtual services there are never deleted


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float | int) -> float:
    """A Go duration ("30s", "1m0s", "500ms") in seconds; a bare number is seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"invalid duration {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_bool(value: str | bool) -> bool:
    """Go's strconv.ParseBool spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "t", "true"):
        return True
    if text in ("0", "f", "false"):
        return False
    raise ConfigError(f"invalid boolean {value!r}")


def parse_cidrs(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list (or YAML list) of CIDRs, normalised; "primary" is kept as a keyword."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item == "primary":
            out.append(item)
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"invalid CIDR {item!r}") from None
    return tuple(out)


def parse_mode(value: str) -> str:
    mode = value or "iptables"
    if mode not in PROXY_MODES:
        raise ConfigError(f"unsupported proxy mode {value!r} (supported: {', '.join(PROXY_MODES)})")
    return mode


def parse_lb_algorithm(value: str) -> str:
    if value not in LB_ALGORITHMS:
        raise ConfigError(f"invalid load-balancing algorithm {value!r} (one of {', '.join(LB_ALGORITHMS)})")
    return value


# kube-proxy's IPVS schedulers (pkg/proxy/ipvs/util); each is a kernel module ip_vs_<name>.
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos")


def parse_scheduler(value: str) -> str:
    scheduler = str(value).strip() or "rr"
    if scheduler not in IPVS_SCHEDULERS:
        raise ConfigError(f"unknown IPVS scheduler {value!r} (one of {', '.join(IPVS_SCHEDULERS)})")
    return scheduler


def parse_detect_local_mode(value: str) -> DetectLocalMode | None:
    if not value:
        return None
    try:
        return DetectLocalMode(value)
    except ValueError:
        known = ", ".join(m.value for m in DetectLocalMode)
        raise ConfigError(f"invalid detect-local-mode {value!r} (one of {known})") from None


def parse_masquerade_bit(value: Any) -> int:
    bit = int(value)
    if not 0 <= bit <= 31:
        raise ConfigError(f"masquerade bit {bit} is not in 0-31")
    return bit


def parse_log_format(value: str) -> str:
    if value not in ("text", "json"):
        raise ConfigError(f"invalid log format {value!r} (text or json)")
    return value


# Config-file field path → (ProxyConfig field, parser). Paths not listed here but in _IGNORED are accepted
# with a warning; anything else is an error naming the field.
_FILE_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "mode": ("mode", parse_mode),
    "clusterCIDR": ("cluster_cidrs", parse_cidrs),
    "hostnameOverride": ("hostname", lambda v: str(v).strip().lower()),
    "bindAddress": ("bind_address", str),
    "healthzBindAddress": ("healthz_bind_address", str),
    "metricsBindAddress": ("metrics_bind_address", str),
    "nodePortAddresses": ("nodeport_addresses", parse_cidrs),
    "clientConnection.kubeconfig": ("kubeconfig", str),
    "iptables.masqueradeAll": ("masquerade_all", parse_bool),
    "iptables.masqueradeBit": ("masquerade_bit", parse_masquerade_bit),
    "iptables.syncPeriod": ("sync_period", parse_duration),
    "iptables.minSyncPeriod": ("min_sync_period", parse_duration),
    "iptables.localhostNodePorts": ("localhost_nodeports", parse_bool),
    "syncPeriod": ("sync_period", parse_duration),
    "minSyncPeriod": ("min_sync_period", parse_duration),
    "detectLocalMode": ("detect_local_mode", parse_detect_local_mode),
    "detectLocal.bridgeInterface": ("pod_bridge_interface", str),
    "detectLocal.interfaceNamePrefix": ("pod_interface_name_prefix", str),
    "logging.format": ("log_format", parse_log_format),
    "logging.verbosity": ("verbosity", int),
    "nftables.masqueradeAll": ("masquerade_all", parse_bool),
    "nftables.masqueradeBit": ("masquerade_bit", parse_masquerade_bit),
    "nftables.syncPeriod": ("sync_period", parse_duration),
    "nftables.minSyncPeriod": ("min_sync_period", parse_duration),
    "ipvs.syncPeriod": ("sync_period", parse_duration),
    "ipvs.minSyncPeriod": ("min_sync_period", parse_duration),
    "ipvs.scheduler": ("ipvs_scheduler", parse_scheduler),
    "ipvs.strictARP": ("ipvs_strict_arp", parse_bool),
    "ipvs.tcpTimeout": ("ipvs_tcp_timeout", parse_duration),
    "ipvs.tcpFinTimeout": ("ipvs_tcpfin_timeout", parse_duration),
    "ipvs.udpTimeout": ("ipvs_udp_timeout", parse_duration),
    "ipvs.excludeCIDRs": ("ipvs_exclude_cidrs", parse_cidrs),
}
_MODE_SECTIONS = ("nftables", "ipvs")  # a mode's own section applies only when that is the mode
_IGNORED_PREFIXES = ("winkernel.", "conntrack.", "clientConnection.", "logging.", "featureGates.")
_IGNORED = {
    "apiVersion",
    "kind",
    "bindAddressHardFail",
    "enableProfiling",
    "configSyncPeriod",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "udpIdleTimeout",
    "featureGates",
    "windowsRunAsService",
    "ipvs",
    "winkernel",
    "conntrack",
    "logging",
    "detectLocal",
    "iptables",
    "nftables",
    "clientConnection",
}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in ("featureGates",):
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def _is_unset(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def load_config_file(path: str, base: ProxyConfig | None = None) -> ProxyConfig:
    """Read a KubeProxyConfiguration YAML/JSON file (as kubeadm's kube-proxy ConfigMap holds it)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} is not a mapping")
    if data.get("kind", "KubeProxyConfiguration") != "KubeProxyConfiguration":
        raise ConfigError(f"config file {path}: kind {data.get('kind')!r} is not KubeProxyConfiguration")
    if data.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(f"config file {path}: apiVersion {data.get('apiVersion')!r} is not {API_VERSION}")
    return _apply_file_fields(_flatten(data), base or ProxyConfig())


def _apply_file_fields(flat: Mapping[str, Any], config: ProxyConfig) -> ProxyConfig:
    values: dict[str, Any] = {}
    per_mode: dict[str, dict[str, Any]] = {}  # nftables.* and ipvs.*, applied only in their mode
    for path, value in flat.items():
        if path in _FILE_FIELDS:
            target, parse = _FILE_FIELDS[path]
            try:
                parsed = None if _is_unset(value) else parse(value)
            except (ConfigError, ValueError, TypeError) as err:
                raise ConfigError(f"config field {path}: {err}") from None
            if parsed is not None and not (parse is parse_duration and parsed == 0):
                # kube-proxy defaults zero durations, as it defaults nulls
                section = path.split(".", 1)[0]
                (per_mode.setdefault(section, {}) if section in _MODE_SECTIONS else values)[target] = parsed
        elif path in ("apiVersion", "kind"):
            continue
        elif path in _IGNORED or path.startswith(_IGNORED_PREFIXES):
            if not _is_unset(value) and value not in (0, False, "0", "0s"):
                log.warning("config field not implemented by kproxyd; ignored", field=path)
        else:
            raise ConfigError(f"unknown config field {path!r}")
    config = replace(config, **values)
    return replace(config, **per_mode.get(config.mode, {}))


def local_traffic_detector(config: ProxyConfig, node: NodeInfo, family: int = 4) -> LocalTrafficDetector | None:
    """How pod traffic of one IP family is recognised (kube-proxy's --detect-local-mode; ClusterCIDR default).

    None when the chosen mode has nothing to go on (no cluster CIDR of the family, or the Node has no pod
    CIDR yet), as kube-proxy's no-op detector: then only --masquerade-all masquerades cluster-IP traffic.
    """
    mode = config.detect_local_mode or DetectLocalMode.CLUSTER_CIDR
    if mode in (DetectLocalMode.CLUSTER_CIDR, DetectLocalMode.NODE_CIDR):
        source = config.cluster_cidrs if mode is DetectLocalMode.CLUSTER_CIDR else node.pod_cidrs
        cidrs = tuple(c for c in source if ipaddress.ip_network(c).version == family)
        return LocalTrafficDetector(mode, cidrs=cidrs) if cidrs else None
    interface = (
        config.pod_bridge_interface
        if mode is DetectLocalMode.BRIDGE_INTERFACE
        else config.pod_interface_name_prefix
    )
    return LocalTrafficDetector(mode, interface=interface) if interface else None
