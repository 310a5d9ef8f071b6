"""The kproxyd command line: kube-proxy's flags for the daemon, plus `kproxyd lab …` for the embedded lab."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import structlog

from kproxyd.config import (
    ConfigError,
    ProxyConfig,
    load_config_file,
    parse_bool,
    parse_cidrs,
    parse_detect_local_mode,
    parse_duration,
    parse_lb_algorithm,
    parse_log_format,
    parse_masquerade_bit,
    parse_mode,
    parse_scheduler,
)
from kproxyd.logs import configure_logging

log = structlog.get_logger(__name__)

# kube-proxy flag → (ProxyConfig field, parser, help).
_FLAGS: dict[str, tuple[str, Callable[[Any], Any], str]] = {
    "kubeconfig": ("kubeconfig", str, "path to a kubeconfig file with the API server and credentials"),
    "master": ("master", str, "API server URL (overrides the kubeconfig's server)"),
    "hostname-override": ("hostname", lambda v: v.strip().lower(), "this node's name, instead of the hostname"),
    "proxy-mode": ("mode", parse_mode, "dataplane: iptables (default), nftables, ebpf or ipvs"),
    "cgroup-root": ("cgroup_root", str, "ebpf: cgroup2 dir whose sockets are balanced (default: cgroup2 root)"),
    "bpf-pin-path": ("bpf_pin_path", str, "ebpf: bpffs directory for pinned maps (default /sys/fs/bpf/kproxyd)"),
    "ebpf-lb-algorithm": (
        "ebpf_lb_algorithm",
        parse_lb_algorithm,
        "ebpf: random (default) or maglev; a Service's kproxyd.io/lb-algorithm annotation overrides it",
    ),
    "cluster-cidr": (
        "cluster_cidrs",
        parse_cidrs,
        "pod network CIDRs (comma-separated); traffic from outside them to a cluster IP is masqueraded",
    ),
    "nodeport-addresses": (
        "nodeport_addresses",
        parse_cidrs,
        "CIDRs (or 'primary') of the node addresses that accept NodePort traffic; default all local addresses",
    ),
    "masquerade-all": ("masquerade_all", parse_bool, "SNAT all traffic sent to cluster IPs"),
    "iptables-masquerade-bit": (
        "masquerade_bit",
        parse_masquerade_bit,
        "fwmark bit (0-31) marking packets to masquerade (default 14)",
    ),
    "iptables-sync-period": ("sync_period", parse_duration, "period of full resyncs (default 30s)"),
    "iptables-min-sync-period": ("min_sync_period", parse_duration, "minimum interval between syncs (default 1s)"),
    "iptables-localhost-nodeports": (
        "localhost_nodeports",
        parse_bool,
        "accept NodePort connections to 127.0.0.1 (default true)",
    ),
    "detect-local-mode": (
        "detect_local_mode",
        parse_detect_local_mode,
        "ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
    ),
    "pod-bridge-interface": ("pod_bridge_interface", str, "bridge name for detect-local-mode BridgeInterface"),
    "pod-interface-name-prefix": (
        "pod_interface_name_prefix",
        str,
        "interface prefix for detect-local-mode InterfaceNamePrefix",
    ),
    "bind-address": ("bind_address", str, "IP address the proxy serves on (default 0.0.0.0)"),
    "healthz-bind-address": (
        "healthz_bind_address",
        str,
        "ip:port of /healthz and /livez (default 0.0.0.0:10256; empty disables)",
    ),
    "metrics-bind-address": (
        "metrics_bind_address",
        str,
        "ip:port of /metrics (default 127.0.0.1:10249; empty disables)",
    ),
    "v": ("verbosity", int, "log verbosity (4 or more: debug)"),
    "logging-format": ("log_format", parse_log_format, "text (default) or json"),
    "log-format": ("log_format", parse_log_format, "text (default) or json"),
    "cleanup": ("cleanup", parse_bool, "remove every rule kproxyd programmed, then exit"),
    "ipvs-scheduler": ("ipvs_scheduler", parse_scheduler, "IPVS scheduler: rr (default), wrr, lc, sh, mh, ..."),
    "ipvs-strict-arp": ("ipvs_strict_arp", parse_bool, "arp_ignore=1, arp_announce=2 (ipvs mode)"),
    "ipvs-tcp-timeout": ("ipvs_tcp_timeout", parse_duration, "IPVS idle TCP session timeout (0: unchanged)"),
    "ipvs-tcpfin-timeout": (
        "ipvs_tcpfin_timeout",
        parse_duration,
        "IPVS TCP timeout after a FIN (0: unchanged)",
    ),
    "ipvs-udp-timeout": ("ipvs_udp_timeout", parse_duration, "IPVS UDP timeout (0: unchanged)"),
    "ipvs-exclude-cidrs": (
        "ipvs_exclude_cidrs",
        parse_cidrs,
        "CIDRs whose IPVS virtual services kproxyd never deletes (comma-separated)",
    ),
}
# Flags of one mode's own: they apply only when that is the mode, as kube-proxy's per-mode config.
_MODE_FLAGS: dict[str, tuple[str, str, Callable[[Any], Any], str]] = {
    "ipvs-sync-period": ("ipvs", "sync_period", parse_duration, "ipvs mode: period of rule checks (default 30s)"),
    "ipvs-min-sync-period": (
        "ipvs",
        "min_sync_period",
        parse_duration,
        "ipvs mode: minimum interval between syncs (default 1s)",
    ),
}
_BOOL_FLAGS = {"masquerade-all", "iptables-localhost-nodeports", "cleanup", "ipvs-strict-arp"}

# kube-proxy flags kproxyd accepts so existing manifests keep working, but does not act on.
_ACCEPTED_FLAGS = (
    "bind-address-hard-fail",
    "config-sync-period",
    "conntrack-max-per-core",
    "conntrack-min",
    "conntrack-tcp-timeout-close-wait",
    "conntrack-tcp-timeout-established",
    "conntrack-tcp-be-liberal",
    "conntrack-udp-timeout",
    "conntrack-udp-timeout-stream",
    "feature-gates",
    "healthz-port",
    "metrics-port",
    "init-only",
    "kube-api-burst",
    "kube-api-content-type",
    "kube-api-qps",
    "oom-score-adj",
    "profiling",
    "proxy-port-range",
    "show-hidden-metrics-for-version",
    "write-config-to",
    "log-flush-frequency",
    "vmodule",
    "log_dir",
    "log-dir",
    "logtostderr",
    "alsologtostderr",
    "add-dir-header",
    "skip-headers",
    "one-output",
)


def _normalise(argv: Sequence[str]) -> list[str]:
    """Go-style spellings argparse does not know: -v=2, -v 2 and single-dash long flags."""
    out = []
    for arg in argv:
        if arg.startswith("-v=") or arg == "-v":
            arg = "--v" + arg[2:]
        elif arg.startswith("-") and not arg.startswith("--") and len(arg.split("=")[0]) > 2:
            arg = "-" + arg
        out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The daemon's parser, with kube-proxy's flag names."""
    parser = argparse.ArgumentParser(
        prog="kproxyd",
        description="kube-proxy replacement. Subcommands: 'kproxyd lab demo' runs the embedded lab demo.",
    )
    parser.add_argument("--config", help="KubeProxyConfiguration file; flags given override it")
    for flag, (_, _, help_text) in _FLAGS.items():
        nargs = "?" if flag in _BOOL_FLAGS else None
        const = "true" if flag in _BOOL_FLAGS else None
        parser.add_argument(f"--{flag}", dest=flag, nargs=nargs, const=const, default=None, help=help_text)
    for flag, (_, _, _, help_text) in _MODE_FLAGS.items():
        parser.add_argument(f"--{flag}", dest=flag, default=None, help=help_text)
    for flag in _ACCEPTED_FLAGS:
        parser.add_argument(f"--{flag}", dest=flag, nargs="?", const="true", default=None, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: Sequence[str]) -> ProxyConfig:
    """Flags (and the --config file) as a ProxyConfig; raises ConfigError naming a bad flag."""
    args = vars(build_parser().parse_args(_normalise(argv)))
    config = load_config_file(args["config"]) if args.get("config") else ProxyConfig()
    values = {}
    for flag, (target, parse, _) in _FLAGS.items():
        if args.get(flag) is not None:
            try:
                values[target] = parse(args[flag])
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"--{flag}: {err}") from None
    for flag in _ACCEPTED_FLAGS:
        if args.get(flag) is not None:
            log.warning("flag accepted for kube-proxy compatibility but not implemented", flag=f"--{flag}")
    config = replace(config, **values)
    for flag, (mode, target, parse, _) in _MODE_FLAGS.items():
        if args.get(flag) is not None and config.mode == mode:
            try:
                config = replace(config, **{target: parse(args[flag])})
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"--{flag}: {err}") from None
    return config


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `kproxyd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lab"]:
        from kproxyd.lab.cli import lab_main

        sys.exit(lab_main(argv[1:]))
    if argv[:1] == ["explain"]:
        from kproxyd.explain.cli import explain_main

        sys.exit(explain_main(argv[1:]))
    if argv[:1] == ["status"]:
        from kproxyd.status import status_main

        sys.exit(status_main(argv[1:]))
    configure_logging()
    for signum in (signal.SIGTERM, signal.SIGINT):  # until the daemon installs its own: nothing to undo yet
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        config = parse_config(argv)
    except ConfigError as err:
        log.error("invalid configuration", error=str(err))
        sys.exit(2)
    configure_logging(config.verbosity, config.log_format == "json")
    from kproxyd.backends import BackendUnavailableError
    from kproxyd.daemon import cleanup, run_daemon

    try:
        sys.exit(cleanup(config) if config.cleanup else run_daemon(config))
    except BackendUnavailableError as err:
        log.error("proxy mode not available on this kernel", mode=config.mode, error=str(err))
        sys.exit(1)
    except ConfigError as err:
        log.error("invalid configuration", error=str(err))
        sys.exit(1)
