"""The nft rule vocabulary kproxyd renders, as structures that give both `nft -f` text and netlink expressions.

A Rule is rendered once; its text goes to `nft -f` (and the goldens, and explain), its expressions to the
netlink writer. Each statement encodes to what nft 1.0.6 itself sends for the same text (checked against
`nft --debug=netlink`), so both paths leave the same table behind.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol, cast

from kproxyd.backends.nftables.netlink import (
    ANONYMOUS_SET,
    PROTOCOL_NUMBERS,
    Batch,
    Unsupported,
    address,
    attr,
    data_value,
    expr,
    string,
    tail,
    u32,
    verdict_data,
)

# Expression attributes (linux/netfilter/nf_tables.h) and the values kproxyd uses.
REG_VERDICT, REG_1, REG32_00 = 0, 1, 8
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
META_MARK, META_IIFNAME, META_L4PROTO = 3, 6, 16
CMP_EQ, CMP_NEQ = 0, 1
CT_STATE, CT_STATE_NEW = 0, 8
FIB_SADDR, FIB_DADDR, FIB_ADDRTYPE, RTN_LOCAL = 1, 2, 3, 2
NUMGEN_RANDOM = 1
NAT_DNAT, NAT_PROTO_SPECIFIED, NAT_RANDOM_FULLY = 1, 0x2, 0x10
DYNSET_UPDATE = 1
LOOKUP_F_INV = 0x1
IFNAMSIZ = 16

_ADDR_OFFSETS = {("ip", "saddr"): 12, ("ip", "daddr"): 16, ("ip6", "saddr"): 8, ("ip6", "daddr"): 24}
_ADDR_LEN = {"ip": 4, "ip6": 16}
_ADDR_TYPE = {"ip": 7, "ip6": 8}  # nft's ipv4_addr, ipv6_addr
_PORT_UNREACHABLE = {"ip": 3, "ip6": 4}  # ICMP / ICMPv6 code of nft's plain `reject`


@functools.cache
def payload(base: int, offset: int, length: int, dreg: int = REG_1) -> bytes:
    """Load packet bytes into a register."""
    return expr("payload", u32(1, dreg), u32(2, base), u32(3, offset), u32(4, length))


def cmp(op: int, value: bytes, sreg: int = REG_1) -> bytes:
    """Compare a register with a value."""
    return tail(_cmp(op, sreg), value)


@functools.cache
def _cmp(op: int, sreg: int) -> Callable[[bytes], bytes]:
    return lambda value: expr("cmp", u32(1, sreg), u32(2, op), data_value(3, value))


@functools.cache
def meta(key: int, dreg: int = REG_1) -> bytes:
    """Load packet metadata into a register."""
    return expr("meta", u32(1, dreg), u32(2, key))


@functools.cache
def bitwise(mask: bytes, xor: bytes, reg: int = REG_1) -> bytes:
    """reg = (reg & mask) ^ xor."""
    return expr("bitwise", u32(1, reg), u32(2, reg), u32(3, len(mask)), data_value(4, mask), data_value(5, xor))


def immediate_verdict(verdict: str, chain: str = "") -> bytes:
    """Set the verdict register."""
    if chain:
        return tail(_immediate_verdict(verdict), chain.encode() + b"\0")
    return expr("immediate", u32(1, REG_VERDICT), verdict_data(2, verdict))


@functools.cache
def _immediate_verdict(verdict: str) -> Callable[[bytes], bytes]:
    code = u32(1, REG_VERDICT)
    # verdict_data's own template ends with the chain name, so this expression does too
    return lambda chain: expr("immediate", code, verdict_data(2, verdict, chain[:-1].decode()))


def immediate(value: bytes, dreg: int) -> bytes:
    """Load a constant into a register."""
    return tail(_immediate(dreg), value)


@functools.cache
def _immediate(dreg: int) -> Callable[[bytes], bytes]:
    return lambda value: expr("immediate", u32(1, dreg), data_value(2, value))


def lookup(name: str, sreg: int = REG_1, vmap: bool = False) -> bytes:
    """Look the register up in a named set, or (vmap) take the verdict a named map gives it."""
    dreg = (u32(3, REG_VERDICT),) if vmap else ()
    return expr("lookup", string(1, name), u32(2, sreg), *dreg)


def _mark(value: int) -> bytes:
    return struct.pack("=I", value)  # registers hold the mark in host byte order


class Stmt(Protocol):
    """One statement (match or action): its nft text and its netlink expressions."""

    @property
    def text(self) -> str:
        """The statement as nft prints it."""
        ...

    def encode(self) -> tuple[bytes, ...]:
        """The netlink expressions nft sends for it."""
        ...


class Addr(NamedTuple):
    """`ip daddr 10.0.0.1`, `ip saddr != 10.0.0.0/8`: an address or prefix match."""

    family: str
    field: str
    value: str
    negate: bool = False

    @property
    def text(self) -> str:
        """E.g. "ip saddr != 10.0.0.0/8"."""
        return f"{self.family} {self.field} {'!= ' if self.negate else ''}{self.value}"

    def encode(self) -> tuple[bytes, ...]:
        """nft's encoding: whole bytes of the prefix when it ends on a byte, else load, mask and compare."""
        offset, size, op = (
            _ADDR_OFFSETS[self.family, self.field],
            _ADDR_LEN[self.family],
            CMP_NEQ if self.negate else CMP_EQ,
        )
        if "/" not in self.value:  # one address (most rules): no network arithmetic
            return payload(PAYLOAD_NETWORK, offset, size), cmp(op, address(self.value))
        return _prefix_match(offset, size, op, self.value)


@functools.lru_cache(maxsize=1024)  # the node's CIDRs, and LB source ranges compared without a set
def _prefix_match(offset: int, size: int, op: int, value: str) -> tuple[bytes, ...]:
    """A prefix match as nft encodes it."""
    net = ipaddress.ip_network(value, strict=False)
    if net.prefixlen == 0:
        raise Unsupported(f"zero-length prefix {value}")
    if net.prefixlen % 8 == 0:
        size = net.prefixlen // 8
        return payload(PAYLOAD_NETWORK, offset, size), cmp(op, net.network_address.packed[:size])
    mask = net.netmask.packed
    return (
        payload(PAYLOAD_NETWORK, offset, size),
        bitwise(mask, bytes(size)),
        cmp(op, net.network_address.packed),
    )


class AddrIn(NamedTuple):
    """`ip daddr @set`: the address is in a named set."""

    family: str
    field: str
    set: str

    @property
    def text(self) -> str:
        """E.g. "ip saddr @affinity-…"."""
        return f"{self.family} {self.field} @{self.set}"

    def encode(self) -> tuple[bytes, ...]:
        """Load the address, look it up."""
        offset = _ADDR_OFFSETS[self.family, self.field]
        return payload(PAYLOAD_NETWORK, offset, _ADDR_LEN[self.family]), lookup(self.set)


class AddrNotInAnonymous(NamedTuple):
    """`ip saddr != { a, b/24 }`: not in an anonymous interval set (created in the rule's batch)."""

    family: str
    field: str
    values: tuple[str, ...]

    @property
    def text(self) -> str:
        """E.g. "ip saddr != { 10.0.0.0/8, 192.168.0.2 }"."""
        return f"{self.family} {self.field} != {{ {', '.join(self.values)} }}"

    def encode(self) -> tuple[bytes, ...]:
        """Without a batch to create the set in: left to nft."""
        raise Unsupported("anonymous set")

    def encode_into(self, batch: Batch) -> tuple[bytes, ...]:
        """Add the set (its intervals as nft sends them) to batch, then load the address and look it up; one
        value is compared as nft does, without a set.
        """
        if len(self.values) == 1:
            return Addr(self.family, self.field, self.values[0], negate=True).encode()
        size = _ADDR_LEN[self.family]
        set_id = batch.add_anonymous_set((_ADDR_TYPE[self.family], size), intervals(self.values, size))
        lookup = expr("lookup", string(1, ANONYMOUS_SET), u32(2, REG_1), u32(4, set_id), u32(5, LOOKUP_F_INV))
        return payload(PAYLOAD_NETWORK, _ADDR_OFFSETS[self.family, self.field], size), lookup


def intervals(values: tuple[str, ...], size: int) -> list[tuple[bytes, bool]]:
    """nft's interval elements for addresses and prefixes: merged ranges as (start) and (end + 1, ends),
    in order, after a leading (0, ends) unless the first range starts at 0; no end past the last address.
    """
    ranges: list[list[int]] = []
    for value in sorted((ipaddress.ip_network(v, strict=False) for v in values), key=lambda n: int(n[0])):
        first, past = int(value[0]), int(value[-1]) + 1
        if ranges and first <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], past)
        else:
            ranges.append([first, past])
    out = [] if ranges and ranges[0][0] == 0 else [(bytes(size), True)]
    for first, past in ranges:
        out.append((first.to_bytes(size, "big"), False))
        if past < 1 << (8 * size):
            out.append((past.to_bytes(size, "big"), True))
    return out


class PortMatch(NamedTuple):
    """`tcp dport 80`."""

    protocol: str
    port: int

    @property
    def text(self) -> str:
        """E.g. "tcp dport 80"."""
        return f"{self.protocol} dport {self.port}"

    def encode(self) -> tuple[bytes, ...]:
        """The protocol dependency nft adds, then the port."""
        return (
            *L4Proto(self.protocol).encode(),
            payload(PAYLOAD_TRANSPORT, 2, 2),
            cmp(CMP_EQ, struct.pack(">H", self.port)),
        )


class L4Proto(NamedTuple):
    """`meta l4proto tcp`."""

    protocol: str

    @property
    def text(self) -> str:
        """E.g. "meta l4proto tcp"."""
        return f"meta l4proto {self.protocol}"

    def encode(self) -> tuple[bytes, ...]:
        """Load l4proto (one byte), compare."""
        return meta(META_L4PROTO), cmp(CMP_EQ, bytes((PROTOCOL_NUMBERS[self.protocol],)))


class CtStateNew(NamedTuple):
    """`ct state new`."""

    @property
    def text(self) -> str:
        """The statement text."""
        return "ct state new"

    def encode(self) -> tuple[bytes, ...]:
        """Load the ct state bits, keep NEW, compare with zero."""
        return (
            expr("ct", u32(1, REG_1), u32(2, CT_STATE)),
            bitwise(_mark(CT_STATE_NEW), bytes(4)),
            cmp(CMP_NEQ, bytes(4)),
        )


class FibLocal(NamedTuple):
    """`fib saddr type local` / `fib daddr type local`."""

    field: str

    @property
    def text(self) -> str:
        """E.g. "fib daddr type local"."""
        return f"fib {self.field} type local"

    def encode(self) -> tuple[bytes, ...]:
        """A fib address-type lookup compared with RTN_LOCAL."""
        flags = FIB_SADDR if self.field == "saddr" else FIB_DADDR
        return expr("fib", u32(1, REG_1), u32(2, FIB_ADDRTYPE), u32(3, flags)), cmp(CMP_EQ, _mark(RTN_LOCAL))


class IifName(NamedTuple):
    """`iifname "eth0"`, `iifname != "veth*"` (a trailing * matches a prefix)."""

    name: str
    negate: bool = False

    @property
    def text(self) -> str:
        """E.g. 'iifname != "veth*"'."""
        return f'iifname {"!= " if self.negate else ""}"{self.name}"'

    def encode(self) -> tuple[bytes, ...]:
        """Compare the interface name: the prefix bytes, or the whole NUL-padded name."""
        raw = self.name.encode()
        value = raw[:-1] if raw.endswith(b"*") else raw.ljust(IFNAMSIZ, b"\0")
        return meta(META_IIFNAME), cmp(CMP_NEQ if self.negate else CMP_EQ, value)


class Numgen(NamedTuple):
    """`numgen random mod N == 0`."""

    modulus: int

    @property
    def text(self) -> str:
        """E.g. "numgen random mod 3 == 0"."""
        return f"numgen random mod {self.modulus} == 0"

    def encode(self) -> tuple[bytes, ...]:
        """A random number below modulus, compared with zero."""
        return expr("numgen", u32(1, REG_1), u32(2, self.modulus), u32(3, NUMGEN_RANDOM)), cmp(CMP_EQ, bytes(4))


class MarkClear(NamedTuple):
    """`mark and M == 0`."""

    mask: int

    @property
    def text(self) -> str:
        """E.g. "mark and 0x00004000 == 0"."""
        return f"mark and {self.mask:#010x} == 0"

    def encode(self) -> tuple[bytes, ...]:
        """Load the mark, keep the bits, compare with zero."""
        return meta(META_MARK), bitwise(_mark(self.mask), bytes(4)), cmp(CMP_EQ, bytes(4))


class MarkSet(NamedTuple):
    """`mark set mark or M` / `mark set mark xor M`."""

    op: str
    bits: int

    @property
    def text(self) -> str:
        """E.g. "mark set mark or 0x00004000"."""
        return f"mark set mark {self.op} {self.bits:#010x}"

    def encode(self) -> tuple[bytes, ...]:
        """Load the mark, or/xor the bits (as nft does: and-mask then xor), store it."""
        mask = 0xFFFFFFFF & ~self.bits if self.op == "or" else 0xFFFFFFFF
        return (
            meta(META_MARK),
            bitwise(_mark(mask), _mark(self.bits)),
            expr("meta", u32(2, META_MARK), u32(3, REG_1)),
        )


class Verdict(NamedTuple):
    """`jump X`, `goto X`, `return`, `drop`."""

    verdict: str
    chain: str = ""

    @property
    def text(self) -> str:
        """E.g. "goto service-…"."""
        return f"{self.verdict} {self.chain}" if self.chain else self.verdict

    def encode(self) -> tuple[bytes, ...]:
        """An immediate verdict naming its chain."""
        return (immediate_verdict(self.verdict, self.chain),)


class Reject(NamedTuple):
    """`reject`: ICMP(v6) port unreachable."""

    family: str

    @property
    def text(self) -> str:
        """The statement text."""
        return "reject"

    def encode(self) -> tuple[bytes, ...]:
        """Reject type ICMP unreachable with the family's port-unreachable code."""
        return (expr("reject", u32(1, 0), attr(2, bytes((_PORT_UNREACHABLE[self.family],)))),)


class Masquerade(NamedTuple):
    """`masquerade fully-random`."""

    @property
    def text(self) -> str:
        """The statement text."""
        return "masquerade fully-random"

    def encode(self) -> tuple[bytes, ...]:
        """Masquerade with fully random source ports."""
        return (expr("masq", u32(1, NAT_RANDOM_FULLY)),)


class Dnat(NamedTuple):
    """`dnat to 10.0.0.1:80` / `dnat to [fd00::1]:80`."""

    family: str
    ip: str
    port: int

    @property
    def text(self) -> str:
        """E.g. "dnat to 10.1.0.1:8080"."""
        host = f"[{self.ip}]" if self.family == "ip6" else self.ip
        return f"dnat to {host}:{self.port}"

    def encode(self) -> tuple[bytes, ...]:
        """Address into reg 1, port into reg 2, DNAT with a specified port."""
        return (
            immediate(address(self.ip), REG_1),
            immediate(struct.pack(">H", self.port), REG_1 + 1),
            _dnat(self.family),
        )


@functools.cache
def _dnat(family: str) -> bytes:
    """DNAT to the address in reg 1 and the port in reg 2."""
    nfproto = 2 if family == "ip" else 10
    return expr(
        "nat", u32(1, NAT_DNAT), u32(2, nfproto), u32(3, REG_1), u32(5, REG_1 + 1), u32(7, NAT_PROTO_SPECIFIED)
    )


class UpdateSet(NamedTuple):
    """`update @set { ip saddr }`: add or refresh the source address in a dynamic set."""

    family: str
    set: str

    @property
    def text(self) -> str:
        """E.g. "update @affinity-… { ip saddr }"."""
        return f"update @{self.set} {{ {self.family} saddr }}"

    def encode(self) -> tuple[bytes, ...]:
        """Load the source address, dynset update."""
        offset = _ADDR_OFFSETS[self.family, "saddr"]
        load = payload(PAYLOAD_NETWORK, offset, _ADDR_LEN[self.family])
        return load, expr("dynset", u32(4, REG_1), u32(3, DYNSET_UPDATE), string(1, self.set))


class Vmap(NamedTuple):
    """`ip daddr . meta l4proto . th dport vmap @M` (family None: `meta l4proto . th dport vmap @M`)."""

    family: str | None
    map: str

    @property
    def text(self) -> str:
        """E.g. "ip daddr . meta l4proto . th dport vmap @service-ips"."""
        key = "meta l4proto . th dport"
        return f"{f'{self.family} daddr . ' if self.family else ''}{key} vmap @{self.map}"

    def encode(self) -> tuple[bytes, ...]:
        """Load the key parts into consecutive registers (nft's register choice), look up the verdict."""
        loads: list[bytes] = []
        offset = 0
        if self.family is not None:
            loads.append(payload(PAYLOAD_NETWORK, _ADDR_OFFSETS[self.family, "daddr"], _ADDR_LEN[self.family]))
            offset = _ADDR_LEN[self.family]
        loads.append(meta(META_L4PROTO, _concat_register(offset)))
        loads.append(payload(PAYLOAD_TRANSPORT, 2, 2, _concat_register(offset + 4)))
        return (*loads, lookup(self.map, vmap=True))


def _concat_register(offset: int) -> int:
    """The register a concatenation part at byte offset starts in: a 16-byte one when aligned, as nft picks."""
    return REG_1 + offset // 16 if offset % 16 == 0 else REG32_00 + offset // 4


class Rule:
    """One rule: its nft text (what equality compares) and the statements it was rendered from."""

    __slots__ = ("comment", "stmts", "text")

    def __init__(self, text: str, stmts: tuple[Stmt, ...], comment: str | None = None) -> None:
        """Use rule() to build one."""
        self.text = text
        self.stmts = stmts
        self.comment = comment

    def __str__(self) -> str:
        """The rule as `nft -f` input (after `add rule FAMILY TABLE CHAIN`)."""
        return self.text

    def __repr__(self) -> str:
        """Rule('…text…')."""
        return f"Rule({self.text!r})"

    def __eq__(self, other: object) -> bool:
        """Rules are equal when their text is."""
        return isinstance(other, Rule) and other.text == self.text

    def __hash__(self) -> int:
        """The hash of the text."""
        return hash(self.text)

    def expressions(self, batch: Batch) -> bytes:
        """The rule's netlink expression list (without the list's header); its anonymous sets go to batch."""
        parts = []
        for stmt in self.stmts:  # the hot loop of a full sync: _BOUNDED's cache inlined
            kind = type(stmt)
            if kind in _BOUNDED:
                encoded = _ENCODED.get((kind, stmt))
                if encoded is None:
                    encoded = _ENCODED[kind, stmt] = b"".join(stmt.encode())
                parts.append(encoded)
            elif kind is AddrNotInAnonymous:
                parts.extend(cast(AddrNotInAnonymous, stmt).encode_into(batch))
            else:
                parts.extend(stmt.encode())
        return b"".join(parts)


# Statements whose values come from a small set (protocols, ports, moduli, the node's configuration): each
# distinct one is encoded once. Keyed with the type: NamedTuples of equal fields compare equal across types.
_BOUNDED = frozenset(
    {PortMatch, L4Proto, CtStateNew, FibLocal, IifName, Numgen, MarkClear, MarkSet, Reject, Masquerade, Vmap}
)
_ENCODED: dict[tuple[type, Stmt], bytes] = {}


def rule(*stmts: Stmt, comment: str | None = None) -> Rule:
    """A Rule of statements, with an optional comment."""
    text = " ".join([stmt.text for stmt in stmts])
    return Rule(f'{text} comment "{comment}"' if comment else text, stmts, comment)
