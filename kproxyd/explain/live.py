"""Reads what the walkers need from this node: the live rules of the running mode and its addresses."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess

import structlog
from pyroute2 import IPRoute

from kproxyd.backends.ebpf import tc
from kproxyd.backends.ebpf.kernel import PinnedFrontends
from kproxyd.backends.iptables.kernel import IptablesKernel, detect_iptables_variant, local_addresses
from kproxyd.backends.nftables.kernel import NftError, NftKernel
from kproxyd.backends.nftables.names import TABLE
from kproxyd.explain import ebpf
from kproxyd.explain.common import Explanation, Packet
from kproxyd.explain.iptables import IptablesWalker, parse_save
from kproxyd.explain.nftables import NftablesWalker, NftTable, parse_json

log = structlog.get_logger(__name__)


def detect_mode(pin_path: str) -> str:
    """ebpf when the socket load balancer's maps are pinned at pin_path, nftables when kube-proxy's nftables
    table exists here, else iptables.
    """
    if os.path.exists(os.path.join(pin_path, "frontends")):
        return "ebpf"
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


def explain_live(packet: Packet, mode: str, pin_path: str) -> Explanation:
    """Walk this node's live rules (ebpf: maps) of the given mode ("auto": the one in use)."""
    mode = detect_mode(pin_path) if mode == "auto" else mode
    if mode == "ebpf":
        return explain_ebpf(packet, pin_path)
    if mode == "nftables":
        return NftablesWalker(nft_table(packet)).explain(packet)
    kernel = IptablesKernel(detect_iptables_variant())
    log.debug("reading iptables rules", variant=kernel.variant)
    return IptablesWalker(parse_save(kernel.save("nat") + kernel.save("filter"))).explain(packet)


def nft_table(packet: Packet, missing_ok: bool = False) -> NftTable:
    """kube-proxy's nftables table of the packet's family (missing_ok: an empty one when there is none)."""
    family = "ip6" if ipaddress.ip_address(packet.dst).version == 6 else "ip"
    log.debug("reading nftables rules", family=family)
    try:
        return parse_json(NftKernel().list("-j", "list", "table", family, TABLE))
    except NftError as err:
        if missing_ok and "No such file or directory" in err.stderr:
            return NftTable((), {}, {})
        raise


def explain_ebpf(packet: Packet, pin_path: str) -> Explanation:
    """The ebpf mode's pinned maps, tc on the packet's interface, and the nftables fallback (its table is
    deleted while no frontend needs it).
    """
    with contextlib.ExitStack() as stack:
        socket_lb = PinnedFrontends(pin_path)
        stack.callback(socket_lb.close)
        tc_maps: PinnedFrontends | None = None
        pod_sources: tuple[str, ...] = ()
        if packet.iif and tc.running(pin_path) and tc_ingress_on(packet.iif):
            tc_maps = PinnedFrontends(pin_path, tc.MAP_PREFIX)
            stack.callback(tc_maps.close)
            pod_sources = tc_maps.pod_sources()
        uplinks = default_route_interfaces(ipaddress.ip_address(packet.dst).version)
        node = ebpf.EbpfNode(socket_lb, tc_maps, pod_sources, uplinks, fallback_walk)
        return ebpf.explain(packet, node)


def fallback_walk(packet: Packet) -> Explanation:
    """The ebpf mode's nftables fallback table walked for packet."""
    return NftablesWalker(nft_table(packet, missing_ok=True)).explain(packet)


def tc_ingress_on(interface: str) -> bool:
    """True when the daemon's tc program is attached at the interface's ingress."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
    return bool(found) and tc.ours(found[0], tc.PARENTS["tc_ingress"])


def default_route_interfaces(version: int) -> frozenset[str]:
    """The interfaces this node's default routes of a family leave by."""
    with IPRoute() as ipr:
        routes = ipr.get_default_routes(family=socket.AF_INET6 if version == 6 else socket.AF_INET)
        indexes = {route.get_attr("RTA_OIF") for route in routes} - {None}
        return frozenset(str(ipr.get_links(index)[0].get_attr("IFLA_IFNAME")) for index in indexes)
