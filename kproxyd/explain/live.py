"""Reads what the walkers need from this node: the live rules of the running mode and its addresses."""

from __future__ import annotations

import ipaddress
import subprocess

import structlog
from pyroute2 import IPRoute

from kproxyd.backends.iptables.kernel import IptablesKernel, detect_iptables_variant, local_addresses
from kproxyd.backends.nftables.kernel import NftKernel
from kproxyd.backends.nftables.names import TABLE
from kproxyd.explain.common import Explanation, Packet
from kproxyd.explain.iptables import IptablesWalker, parse_save
from kproxyd.explain.nftables import NftablesWalker, parse_json

log = structlog.get_logger(__name__)


def detect_mode() -> str:
    """nftables when kube-proxy's nftables table exists here, else iptables."""
    probe = subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True, check=False)
    return "nftables" if probe.returncode == 0 else "iptables"


def arrival_interface(src: str) -> str:
    """The interface a packet from src arrives on: the one the route back to src leaves by."""
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=src)
        index = routes[0].get_attr("RTA_OIF") if routes else None
        if index is None:
            return ""
        return str(ipr.get_links(index)[0].get_attr("IFLA_IFNAME"))


def live_packet(src: str, dst: str, dport: int, proto: str, iif: str | None) -> Packet:
    """The packet, with this node's addresses and (unless given) the interface it would arrive on."""
    local = frozenset(local_addresses(ipaddress.ip_address(dst).version))
    if iif is None:
        iif = "" if src in local else arrival_interface(src)
    return Packet(src, dst, dport, proto.upper(), iif, local)


def explain_live(packet: Packet, mode: str) -> Explanation:
    """Walk this node's live rules of the given mode ("auto": the one in use)."""
    mode = detect_mode() if mode == "auto" else mode
    if mode == "nftables":
        family = "ip6" if ipaddress.ip_address(packet.dst).version == 6 else "ip"
        log.debug("reading nftables rules", family=family)
        return NftablesWalker(parse_json(NftKernel().list("-j", "list", "table", family, TABLE))).explain(packet)
    kernel = IptablesKernel(detect_iptables_variant())
    log.debug("reading iptables rules", variant=kernel.variant)
    return IptablesWalker(parse_save(kernel.save("nat") + kernel.save("filter"))).explain(packet)
