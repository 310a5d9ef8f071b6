"""The nftables backend's contact with the kernel: `nft -f -` transactions, netlink batches, listing, deleting.

Thin on purpose: every command comes from transaction.py; this module only runs the nft binary (in this
namespace or behind a command prefix such as ("ip", "netns", "exec", NAME)) or sends a netlink batch on a
socket of the same namespace. KPROXYD_NFT_WRITER=nft sends everything through `nft -f` (for debugging).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator, Sequence

import structlog

from kproxyd.backends.common import refused_line
from kproxyd.backends.nftables.names import TABLE
from kproxyd.backends.nftables.netlink import Batch, NetlinkSocket
from kproxyd.backends.nftables.transaction import TableObjects

log = structlog.get_logger(__name__)

_LINE_NUMBER = re.compile(r"^/dev/stdin:(\d+):", re.MULTILINE)


class NftError(RuntimeError):
    """nft refused a transaction; nothing of it was applied."""

    def __init__(self, stderr: str, line: int | None, line_text: str | None) -> None:
        """Keep nft's message and the offending input line, when it named one."""
        super().__init__(f"nft failed at line {line}: {line_text!r}: {stderr.strip()[:2000]}")
        self.stderr = stderr
        self.line = line
        self.line_text = line_text


WRITER_ENV = "KPROXYD_NFT_WRITER"


class NftKernel:
    """Runs the nft binary, optionally behind a command prefix (e.g. ip netns exec), and sends netlink batches."""

    def __init__(self, prefix: Sequence[str] = (), nft: str = "nft", netns: str | None = None) -> None:
        """Run nft as prefix + argv; netlink goes to netns (this namespace when None, and then only unprefixed)."""
        self._argv = (*prefix, nft)
        self._netns = netns
        self._socket: NetlinkSocket | None = None
        wanted = os.environ.get(WRITER_ENV, "netlink") == "netlink"
        self.netlink = wanted and (netns is not None or not prefix)

    @classmethod
    def in_netns(cls, netns: str) -> NftKernel:
        """nft through `ip netns exec NETNS`, netlink on a socket opened in NETNS."""
        return cls(prefix=("ip", "netns", "exec", netns), netns=netns)

    def send(self, batch: Batch) -> None:
        """Apply one netlink batch; atomic, raises NetlinkError on refusal."""
        if self._socket is None:
            self._socket = NetlinkSocket(self._netns)
        try:
            self._socket.send(batch)
        except Exception:
            self._socket.close()  # a fresh socket next time: no stale replies
            self._socket = None
            raise

    def run(self, text: str) -> None:
        """Apply one transaction with `nft -f -`; atomic, raises NftError on refusal."""
        proc = subprocess.run([*self._argv, "-f", "-"], input=text, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        line, line_text = refused_line(proc.stderr, text, _LINE_NUMBER)
        log.error("nft failed", line=line, line_text=line_text, stderr=proc.stderr.strip()[:2000])
        raise NftError(proc.stderr, line, line_text)

    def list(self, *args: str) -> str:
        """The output of `nft ARGS`."""
        proc = subprocess.run([*self._argv, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NftError(proc.stderr, None, None)
        return proc.stdout

    def objects(self, family: str, table: str = TABLE) -> TableObjects:
        """The chains and sets (maps included) of one table; empty when it does not exist."""
        found: dict[str, set[str]] = {"chain": set(), "set": set(), "map": set()}
        for kind in found:
            for item in json.loads(self.list("-j", "list", f"{kind}s", family))["nftables"]:
                obj = item.get(kind)
                if obj is not None and obj["table"] == table:
                    found[kind].add(obj["name"])
        return TableObjects(frozenset(found["chain"]), frozenset(found["set"] | found["map"]))

    def map_counters(
        self, family: str, name: str, table: str = TABLE
    ) -> Iterator[tuple[tuple[str, ...], int, str]]:
        """(key parts, packets, goto target) of every element of a counting verdict map; none without it."""
        try:
            listing = json.loads(self.list("-j", "list", "map", family, table, name))["nftables"]
        except NftError:
            return
        for item in listing:
            for key, verdict in (item.get("map") or {}).get("elem", []):
                elem = key.get("elem", {})
                value = elem.get("val")
                parts = value["concat"] if isinstance(value, dict) else [value]
                target = (verdict.get("goto") or verdict.get("jump") or {}).get("target", "")
                yield tuple(str(p) for p in parts), int((elem.get("counter") or {}).get("packets", 0)), target

    def has_chain(self, family: str, chain: str, table: str = TABLE) -> bool:
        """True when the table holds the chain."""
        argv = [*self._argv, "list", "chain", family, table, chain]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def delete_table(self, family: str, table: str = TABLE) -> None:
        """Delete the table if it exists (adding it first makes the delete unconditional)."""
        self.run(f"add table {family} {table}\ndelete table {family} {table}\n")
        log.info("nftables table removed", family=family, table=table)
