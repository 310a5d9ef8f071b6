"""The iptables backend's contact with the kernel: iptables-restore, -save and kube-proxy's jump rules.

Thin on purpose: every rule text comes from render.py or from JUMPS below; this module only runs the
iptables binaries of one variant (legacy or nft), in this namespace or behind a command prefix such as
("ip", "netns", "exec", NAME).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from pyroute2 import IPRoute

from kproxyd.backends.common import refused_line
from kproxyd.backends.iptables.names import (
    FILTER_CHAINS,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FIREWALL,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_CANARY,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    NAT_CHAINS,
    is_kproxyd_chain,
)

log = structlog.get_logger(__name__)

Variant = Literal["legacy", "nft"]

_CTSTATE_NEW = ("-m", "conntrack", "--ctstate", "NEW")
_LINE_NUMBER = re.compile(r"line:? (\d+)")
_CANARY_TABLES = ("mangle", "nat", "filter")
_COUNTED_RULE = re.compile(r"^\[(\d+):\d+\] -A (\S+) (.*)$")
_TABLES = ("filter", "nat", "mangle")


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of ours (kube-proxy's iptablesJumpChains)."""

    table: str
    source: str
    target: str
    comment: str
    extra: tuple[str, ...] = ()

    @property
    def args(self) -> tuple[str, ...]:
        """The rule's arguments after the chain name, as kube-proxy spells them."""
        return (*self.extra, "-m", "comment", "--comment", self.comment, "-j", self.target)

    @property
    def save_line(self) -> str:
        """The rule as iptables-save prints it."""
        return " ".join(
            ["-A", self.source, *self.extra, "-m", "comment", "--comment", f'"{self.comment}"', "-j", self.target]
        )


JUMPS = (
    Jump("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _CTSTATE_NEW),
    Jump(
        "filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _CTSTATE_NEW
    ),
    Jump("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    Jump("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", _CTSTATE_NEW),
    Jump("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _CTSTATE_NEW),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _CTSTATE_NEW),
    Jump("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _CTSTATE_NEW),
    Jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _CTSTATE_NEW),
    Jump("filter", "INPUT", KUBE_FIREWALL, "kubernetes firewall for dropping marked packets"),
    Jump("filter", "OUTPUT", KUBE_FIREWALL, "kubernetes firewall for dropping marked packets"),
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)

# Batched syncs write per-service chains, which jump to KUBE-MARK-MASQ, before the top level is written.
CANARY_CHAINS = tuple((table, KUBE_PROXY_CANARY) for table in _CANARY_TABLES)
_ENSURED_CHAINS = (
    *CANARY_CHAINS,
    *(("filter", chain) for chain in FILTER_CHAINS),
    *(("nat", chain) for chain in NAT_CHAINS),
)


class IptablesError(RuntimeError):
    """An iptables command failed."""


class IptablesRestoreError(IptablesError):
    """iptables-restore refused its input; nothing of it was applied."""

    def __init__(self, stderr: str, line: int | None, line_text: str | None) -> None:
        """Keep iptables' message and the offending input line, when it named one."""
        super().__init__(f"iptables-restore failed at line {line}: {line_text!r}: {stderr.strip()}")
        self.stderr = stderr
        self.line = line
        self.line_text = line_text


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def _count_kube_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-") and "kube-" in line.lower())


def local_addresses(family: int = 4) -> list[str]:
    """The addresses of one IP family (4 or 6) on every interface in this network namespace."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        # IFA_LOCAL is the local end of a point-to-point link, whose IFA_ADDRESS is the peer.
        return [str(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr(family=af)]


def _chains_and_rules(saved: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per table, the chains declared and the rule lines in an iptables-save output."""
    chains: dict[str, set[str]] = {}
    rules: dict[str, set[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chains.setdefault(table, set()).add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            rules.setdefault(table, set()).add(line)
    return chains, rules


def detect_iptables_variant(
    prefix: Sequence[str] = (),
    legacy_save: str = "iptables-legacy-save",
    nft_save: str = "iptables-nft-save",
    iptables: str = "iptables",
) -> Variant:
    """The variant the node already uses, as kube-proxy's iptables-wrapper decides it.

    The variant holding more KUBE-/kube- rules wins (legacy on a tie); with none anywhere, nft when
    `iptables --version` says "(nf_tables)", else legacy.
    """
    counts = {
        variant: _count_kube_rules(_run([*prefix, binary]).stdout)
        for variant, binary in (("legacy", legacy_save), ("nft", nft_save))
    }
    if counts["legacy"] or counts["nft"]:
        variant: Variant = "nft" if counts["nft"] > counts["legacy"] else "legacy"
    else:
        variant = "nft" if "nf_tables" in _run([*prefix, iptables, "--version"]).stdout else "legacy"
    log.info("iptables variant detected", variant=variant, kube_rules=counts)
    return variant


class IptablesKernel:
    """Runs one iptables variant's binaries, optionally behind a command prefix (e.g. ip netns exec)."""

    def __init__(
        self,
        variant: Variant,
        prefix: Sequence[str] = (),
        family: int = 4,
        jumps: Sequence[Jump] = JUMPS,
        chains: Sequence[tuple[str, str]] = _ENSURED_CHAINS,
    ) -> None:
        """Use (ip6)iptables-<variant>, -restore and -save, each run as prefix + argv.

        jumps and chains (table, chain) are what ensure_jumps creates: iptables mode's unless told.
        """
        self.variant = variant
        self._jumps = tuple(jumps)
        self._chains = tuple(chains)
        self._prefix = tuple(prefix)
        self.family = family
        self._binary = "iptables" if family == 4 else "ip6tables"
        self._iptables = f"{self._binary}-{variant}"

    def restore(self, text: str) -> None:
        """Apply a render with iptables-restore --noflush; atomic per table, raises on refusal."""
        proc = _run([*self._prefix, f"{self._iptables}-restore", "--noflush", "--wait"], text)
        if proc.returncode == 0:
            return
        line, line_text = refused_line(proc.stderr, text, _LINE_NUMBER)
        log.error("iptables-restore failed", line=line, line_text=line_text, stderr=proc.stderr.strip())
        raise IptablesRestoreError(proc.stderr, line, line_text)

    def save(self, table: str | None = None) -> str:
        """iptables-save output of one table, or of all tables."""
        argv = [*self._prefix, f"{self._iptables}-save"]
        return self._check([*argv, "-t", table] if table else argv).stdout

    def list_chains(self) -> set[str]:
        """Every kproxyd chain present in any table (what a full render may find and clean up)."""
        return {
            line[1:].split(" ", 1)[0]
            for line in self.save().splitlines()
            if line.startswith(":") and is_kproxyd_chain(line[1:].split(" ", 1)[0])
        }

    def ensure_jumps(self) -> None:
        """Create the canary and top-level chains (never flushing one) and kube-proxy's jumps, each once.

        One iptables-save says what exists; only what it lacks costs a command (`-C` confirms a jump before
        inserting it, in case iptables-save spells the rule differently).
        """
        chains, rules = _chains_and_rules(self.save())
        wanted = [*self._chains, *((jump.table, jump.target) for jump in self._jumps)]
        for table, chain in dict.fromkeys(wanted):
            if chain not in chains.get(table, set()):
                self._ensure_chain(table, chain)
        for jump in self._jumps:
            if jump.save_line not in rules.get(jump.table, set()) and not self._has_rule(jump):
                self._check([*self._prefix, self._iptables, "-w", "-t", jump.table, "-I", jump.source, *jump.args])

    def enable_route_localnet(self) -> None:
        """net.ipv4.conf.all.route_localnet=1 (in the prefix's namespace), so 127.0.0.1:NodePort is DNATed.

        Already 1 (set by an init container, say) means no write, so a read-only /proc/sys is fine then.
        """
        key = "net.ipv4.conf.all.route_localnet"
        if self._check([*self._prefix, "sysctl", "-n", key]).stdout.strip() != "1":
            self._check([*self._prefix, "sysctl", "-q", "-w", f"{key}=1"])

    def dispatch_counters(self) -> list[tuple[str, int, str]]:
        """(chain, packets, rule) of every nat KUBE-SERVICES and KUBE-NODEPORTS rule, from iptables-save -c."""
        text = self._check([*self._prefix, f"{self._iptables}-save", "-c", "-t", "nat"]).stdout
        counted = (_COUNTED_RULE.match(line) for line in text.splitlines())
        chains = (KUBE_SERVICES, KUBE_NODEPORTS)
        return [(m.group(2), int(m.group(1)), m.group(3)) for m in counted if m and m.group(2) in chains]

    def canary_present(self) -> bool:
        """True while KUBE-PROXY-CANARY exists in every table: gone means someone flushed our rules."""
        return all(
            _run([*self._prefix, self._iptables, "-w", "-t", table, "-S", KUBE_PROXY_CANARY]).returncode == 0
            for table in _CANARY_TABLES
        )

    def cleanup(self) -> None:
        """Remove our jumps and every kproxyd chain from filter, nat and mangle; leave the rest alone."""
        self.remove_jumps()
        sections: list[str] = []
        for table in _TABLES:
            chains = sorted(
                line[1:].split(" ", 1)[0] for line in self.save(table).splitlines() if line.startswith(":")
            )
            ours = [chain for chain in chains if is_kproxyd_chain(chain)]
            if ours:
                sections += [f"*{table}", *(f":{c} - [0:0]" for c in ours), *(f"-X {c}" for c in ours), "COMMIT"]
        if sections:
            self.restore("\n".join([*sections, ""]))
        log.info("iptables rules cleaned up", variant=self.variant)

    def remove_jumps(self) -> None:
        """Delete this kernel's jumps from the built-in chains (every copy of each)."""
        for jump in self._jumps:
            while self._has_rule(jump):
                self._check([*self._prefix, self._iptables, "-w", "-t", jump.table, "-D", jump.source, *jump.args])

    def _ensure_chain(self, table: str, chain: str) -> None:
        proc = _run([*self._prefix, self._iptables, "-w", "-t", table, "-N", chain])
        if proc.returncode not in (0, 1):  # 1: the chain exists already
            raise IptablesError(f"iptables -t {table} -N {chain}: {proc.stderr.strip()}")

    def _has_rule(self, jump: Jump) -> bool:
        argv = [*self._prefix, self._iptables, "-w", "-t", jump.table, "-C", jump.source, *jump.args]
        return _run(argv).returncode == 0

    def _check(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        proc = _run(argv)
        if proc.returncode != 0:
            raise IptablesError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc
