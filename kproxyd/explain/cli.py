"""`kproxyd explain`: how this node's kube-proxy rules treat one new connection."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from kproxyd.backends.nftables.kernel import NftError
from kproxyd.config import ProxyConfig
from kproxyd.explain import iptables, nftables
from kproxyd.explain.live import explain_live, live_packet
from kproxyd.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """The explain subcommand's flags."""
    parser = argparse.ArgumentParser(
        prog="kproxyd explain",
        description="Walk this node's live Service rules for one new connection: Service, endpoints and their "
        "probability, masquerading, or why it is rejected or dropped.",
    )
    parser.add_argument("--src", required=True, help="source IP of the connection")
    parser.add_argument("--dst", required=True, help="destination IP (cluster, external, LB or node IP)")
    parser.add_argument("--dport", required=True, type=int, help="destination port")
    parser.add_argument("--proto", default="TCP", type=str.upper, choices=["TCP", "UDP", "SCTP"])
    parser.add_argument("--mode", default="auto", choices=["auto", "iptables", "nftables", "ebpf"])
    parser.add_argument(
        "--bpf-pin-path",
        default=ProxyConfig().bpf_pin_path,
        help="ebpf: the daemon's pin directory (auto picks ebpf when its maps are pinned there)",
    )
    parser.add_argument("--iif", help="interface the packet arrives on (default: the route back to --src)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def explain_main(argv: Sequence[str]) -> int:
    """Run `kproxyd explain`; 0 on success, 2 when the mode's rules cannot be walked."""
    args = build_parser().parse_args(argv)
    configure_logging(-1)
    packet = live_packet(args.src, args.dst, args.dport, args.proto, args.iif)
    try:
        explanation = explain_live(packet, args.mode, args.bpf_pin_path)
    except (iptables.UnsupportedRule, nftables.UnsupportedRule, NftError, OSError) as err:
        print(f"kproxyd explain: {err}")
        return 2
    print(json.dumps(explanation.to_json(), indent=2) if args.json else explanation.to_text())
    return 0
