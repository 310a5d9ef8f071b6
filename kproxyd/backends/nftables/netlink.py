"""nf_tables netlink messages for the kube-proxy table, and a socket that sends them as one batch.

The encoding half is pure (bytes out, no kernel). Every object is named, never looked up by handle: the
kernel resolves table, chain, set and jump-target names itself, so a write needs no cache of the table and
costs the same whatever the table holds. Attribute numbers are those of linux/netfilter/nf_tables.h.

A cold full sync encodes hundreds of thousands of rules, so encoding is cheap by construction: a value that
varies (an address, a chain name) is always the last thing in its expression, so the bytes before it depend
only on the value's length and are built once per (shape, length) and patched (`tail`); expressions with
only constant arguments are built once. Both caches are bounded by the vocabulary, never by the values.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

# Netlink and nfnetlink framing.
NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLMSG_ERROR = 2
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_NFTABLES = 10
NLA_F_NESTED = 0x8000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SOCKET_BUFFER = 64 << 20  # a burst of changes can make a batch of several MB; one sendmsg carries it

# nf_tables message types.
NEWTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSET, DELSET, NEWSETELEM, DELSETELEM = (
    0,
    3,
    5,
    6,
    8,
    9,
    11,
    12,
    14,
)

# Attributes: table, chain, hook, rule, expression list, set element list, set element, data, verdict.
TABLE_NAME, TABLE_FLAGS, TABLE_USERDATA = 1, 2, 6
CHAIN_TABLE, CHAIN_NAME, CHAIN_HOOK, CHAIN_TYPE = 1, 3, 4, 7
HOOK_NUM, HOOK_PRIORITY = 1, 2
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS, RULE_USERDATA = 1, 2, 4, 7
LIST_ELEM, EXPR_NAME, EXPR_DATA = 1, 1, 2
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS, ELEM_LIST_SET_ID = 1, 2, 3, 4
ELEM_KEY, ELEM_DATA, ELEM_FLAGS = 1, 2, 3
ELEM_INTERVAL_END = 0x1
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
SET_TABLE, SET_NAME, SET_FLAGS, SET_KEY_TYPE, SET_KEY_LEN, SET_DATA_TYPE, SET_DATA_LEN = 1, 2, 3, 4, 5, 6, 7
SET_DESC, SET_DESC_SIZE, SET_ID, SET_TIMEOUT, SET_USERDATA, SET_EXPR = 9, 1, 10, 11, 13, 17
SET_ANONYMOUS, SET_CONSTANT, SET_INTERVAL, SET_MAP, SET_TIMEOUT_FLAG, SET_EVAL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
ANONYMOUS_SET = "__set%d"  # the kernel names it __set0, __set1, …; the batch refers to it by its id
DATA_TYPE_VERDICT = 0xFFFFFF00

# Verdict codes (signed, sent as big-endian 32 bits).
VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
NFPROTO = {"ip": 2, "ip6": 10}
ELEMENTS_PER_MESSAGE = 256
NFPROTO_NAMES = {value: key for key, value in NFPROTO.items()}


class Unsupported(ValueError):
    """Something outside the vocabulary this encoder knows; write it as `nft -f` text instead."""


_HEADER = struct.Struct("=HH")
PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # by length % 4: what pads it to 4 bytes


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = 4 + len(payload)
    return _HEADER.pack(size, kind) + payload + PAD[size % 4]


@functools.cache
def _head(build: Callable[[bytes], bytes], size: int) -> bytes:
    """What build puts before a value of this size (build must end with the value and its padding)."""
    return build(bytes(size))[: -size - len(PAD[size % 4]) or None]


def tail(build: Callable[[bytes], bytes], value: bytes) -> bytes:
    """build(value), built once per value length: every enclosing length depends only on that length."""
    size = len(value)
    return _head(build, size) + value + PAD[size % 4]


def nested(kind: int, *children: bytes) -> bytes:
    """A nested attribute holding already-encoded attributes."""
    return attr(kind | NLA_F_NESTED, b"".join(children))


def u32(kind: int, value: int) -> bytes:
    """A big-endian 32-bit attribute (nf_tables sends every number so)."""
    return attr(kind, struct.pack(">i" if value < 0 else ">I", value))


def string(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, value.encode() + b"\0")


def data_value(kind: int, value: bytes) -> bytes:
    """An nft_data attribute holding a value."""
    return nested(kind, attr(DATA_VALUE, value))


def verdict_data(kind: int, verdict: str, chain: str = "") -> bytes:
    """An nft_data attribute holding a verdict, naming its chain for jump and goto."""
    if chain:
        return tail(_verdict_builder(kind, verdict), chain.encode() + b"\0")
    return nested(kind, nested(DATA_VERDICT, u32(VERDICT_CODE, VERDICTS[verdict])))


@functools.cache
def _verdict_builder(kind: int, verdict: str) -> Callable[[bytes], bytes]:
    code = u32(VERDICT_CODE, VERDICTS[verdict])
    return lambda chain: nested(kind, nested(DATA_VERDICT, code, attr(VERDICT_CHAIN, chain)))


def expr(name: str, *attrs: bytes) -> bytes:
    """One element of a rule's expression list."""
    return nested(LIST_ELEM, string(EXPR_NAME, name), nested(EXPR_DATA, *attrs))


def comment_userdata(comment: str) -> bytes:
    """The rule userdata nft stores a comment in: TLV type 0, length, text with NUL."""
    text = comment.encode() + b"\0"
    return bytes((0, len(text))) + text


def address(ip: str) -> bytes:
    """An IPv4 or IPv6 address in network byte order."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        return ipaddress.ip_address(ip).packed  # raises ValueError as ipaddress does


def element_key(key: str) -> bytes:
    """A set element key as nft writes it: "10.0.0.1", "10.0.0.1 . tcp . 80", "udp . 30053".

    A single address is its bytes; each part of a concatenation takes a multiple of 4 bytes.
    """
    parts = key.split(" . ")
    if len(parts) == 1:
        return address(key)
    return b"".join(_key_part(part) for part in parts)


def _key_part(part: str) -> bytes:
    if part in PROTOCOL_NUMBERS:
        return bytes((PROTOCOL_NUMBERS[part], 0, 0, 0))
    if part.isdigit():
        return _port_part(part)
    return address(part)


@functools.cache
def _port_part(port: str) -> bytes:
    return struct.pack(">H", int(port)) + b"\0\0"


def _element_key(key: bytes) -> bytes:
    return data_value(ELEM_KEY, key)


def element_verdict(value: str) -> bytes | None:
    """A map element's verdict data ("goto CHAIN", "drop"); None for a set element ("")."""
    if not value:
        return None
    verdict, _, chain = value.partition(" ")
    if verdict not in VERDICTS:
        raise Unsupported(f"verdict {value!r}")
    return verdict_data(ELEM_DATA, verdict, chain)


_NLMSG = struct.Struct("=IHHII")


def _batch_marker(kind: int, seq: int) -> bytes:
    body = struct.pack("=BBH", 0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    return _NLMSG.pack(16 + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def udata(kind: int, value: bytes) -> bytes:
    """One TLV of the userdata nft stores with a table, set or rule (type, length, value; no padding)."""
    return bytes((kind, len(value))) + value


class Encodable(Protocol):
    """A rule the batch can write: its expression list (without the list's header) and comment."""

    @property
    def comment(self) -> str | None:
        """The rule's comment, if any."""
        ...

    def expressions(self, batch: Batch) -> bytes:
        """The encoded expressions (an anonymous set they look up is added to batch first)."""
        ...


class EncodedRule(NamedTuple):
    """A rule already encoded."""

    encoded: bytes
    comment: str | None = None

    def expressions(self, batch: Batch) -> bytes:
        """The encoded expressions."""
        return self.encoded


class Batch:
    """The messages of one nf_tables transaction against one table; the kernel applies all or none."""

    def __init__(self, family: str, table: str) -> None:
        """Messages address `family table` by name."""
        self.family = family
        self._table = string(TABLE_NAME, table)  # every message kind names its table in attribute 1
        self._nfgenmsg = struct.pack("=BBH", NFPROTO[family], 0, 0)
        # One buffer from BATCH_BEGIN on: a full sync's 100 MB are neither held twice nor joined.
        self._data = bytearray(_batch_marker(NFNL_MSG_BATCH_BEGIN, 0))
        self.count = 0  # messages so far; a message's sequence number is its 1-based index
        self._last = 0  # where the last message starts

    def _add(self, kind: int, flags: int, *attrs: bytes) -> None:
        """Append one message: nlmsghdr, nfgenmsg (family, version 0, res_id 0), attributes."""
        body = b"".join(attrs)
        kind |= NFNL_SUBSYS_NFTABLES << 8
        self.count += 1
        self._last = len(self._data)
        self._data += _NLMSG.pack(20 + len(body), kind, NLM_F_REQUEST | flags, self.count, 0)
        self._data += self._nfgenmsg
        self._data += body

    def add_table(self, comment: str) -> None:
        """`add table { comment … }`: create the table unless it exists."""
        userdata = attr(TABLE_USERDATA, comment_userdata(comment))
        self._add(NEWTABLE, NLM_F_CREATE, self._table, u32(TABLE_FLAGS, 0), userdata)

    def add_chain(self, name: str) -> None:
        """`add chain`: create a regular chain unless it exists."""
        self._add(NEWCHAIN, NLM_F_CREATE, self._table, string(CHAIN_NAME, name))

    def add_base_chain(self, name: str, kind: str, hook: str, priority: int) -> None:
        """`add chain { type K hook H priority P ; }`: a chain on a netfilter hook, unless it exists."""
        hook_attr = nested(CHAIN_HOOK, u32(HOOK_NUM, HOOKS[hook]), u32(HOOK_PRIORITY, priority))
        self._add(
            NEWCHAIN, NLM_F_CREATE, self._table, string(CHAIN_NAME, name), string(CHAIN_TYPE, kind), hook_attr
        )

    def delete_chain(self, name: str) -> None:
        """`delete chain` by name."""
        self._add(DELCHAIN, 0, self._table, string(CHAIN_NAME, name))

    def flush_chain(self, name: str) -> None:
        """`flush chain`: delete every rule of the chain (DELRULE naming only the chain)."""
        self._add(DELRULE, 0, self._table, string(RULE_CHAIN, name))

    def add_rule(self, chain: str, expressions: bytes, comment: str | None = None) -> None:
        """`add rule`: append a rule of encoded expressions, with nft's comment userdata."""
        self.add_rules(chain, (EncodedRule(expressions, comment),))

    def add_rules(self, chain: str, rules: Iterable[Encodable]) -> None:
        """Append rules to one chain; the hot loop of a full sync."""
        head = self._nfgenmsg + self._table + string(RULE_CHAIN, chain)
        kind, flags = NEWRULE | NFNL_SUBSYS_NFTABLES << 8, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND
        size = 16 + len(head) + 4
        pack_message, pack_attr, nested_list = _NLMSG.pack, _HEADER.pack, RULE_EXPRESSIONS | NLA_F_NESTED
        data, length = self._data, 0
        for rule in rules:
            expressions, comment = rule.expressions(self), rule.comment  # may add the rule's anonymous sets
            userdata = b"" if comment is None else attr(RULE_USERDATA, comment_userdata(comment))
            listed = len(expressions)
            length = size + listed + len(userdata)
            self.count += 1
            data += pack_message(length, kind, flags, self.count, 0)
            data += head
            data += pack_attr(4 + listed, nested_list)
            data += expressions
            data += userdata
        if length:
            self._last = len(data) - length

    def add_set(
        self,
        name: str,
        key: tuple[int, int],
        flags: int,
        timeout_ms: int | None = None,
        userdata: bytes = b"",
        counter: bool = False,
    ) -> None:
        """`add set` / `add map` (flags SET_MAP: verdict data) of a (type, length) key, unless it exists."""
        attrs = [self._table, string(SET_NAME, name), u32(SET_FLAGS, flags), u32(SET_KEY_TYPE, key[0])]
        attrs.append(u32(SET_KEY_LEN, key[1]))
        if flags & SET_MAP:
            attrs += [u32(SET_DATA_TYPE, DATA_TYPE_VERDICT), u32(SET_DATA_LEN, 0)]
        if timeout_ms is not None:
            attrs.append(attr(SET_TIMEOUT, struct.pack(">Q", timeout_ms)))
        attrs.append(u32(SET_ID, self.count + 1))
        if userdata:
            attrs.append(attr(SET_USERDATA, userdata))
        if counter:  # the set's expression: the kernel gives every element added without one its own copy
            attrs.append(nested(SET_EXPR, string(EXPR_NAME, "counter"), nested(EXPR_DATA)))
        self._add(NEWSET, NLM_F_CREATE, *attrs)

    def add_anonymous_set(self, key: tuple[int, int], intervals: Sequence[tuple[bytes, bool]]) -> int:
        """A constant interval set of (key, ends an interval) elements, bound to the next rule; returns its id."""
        set_id = self.count + 1
        userdata = udata(0, struct.pack("=I", 2)) + udata(2, struct.pack("=I", 1))  # big-endian key, auto-merged
        self._add(
            NEWSET,
            NLM_F_CREATE,
            self._table,
            string(SET_NAME, ANONYMOUS_SET),
            u32(SET_FLAGS, SET_ANONYMOUS | SET_CONSTANT | SET_INTERVAL),
            u32(SET_KEY_TYPE, key[0]),
            u32(SET_KEY_LEN, key[1]),
            u32(SET_ID, set_id),
            nested(SET_DESC, u32(SET_DESC_SIZE, len(intervals))),
            attr(SET_USERDATA, userdata),
        )
        end = u32(ELEM_FLAGS, ELEM_INTERVAL_END)
        elements = [nested(LIST_ELEM, *((end,) if ends else ()), data_value(ELEM_KEY, k)) for k, ends in intervals]
        named = (self._table, string(ELEM_LIST_SET, ANONYMOUS_SET), u32(ELEM_LIST_SET_ID, set_id))
        for start in range(0, len(elements), ELEMENTS_PER_MESSAGE):  # a nested attribute holds at most 64 KiB
            chunk = elements[start : start + ELEMENTS_PER_MESSAGE]
            self._add(NEWSETELEM, NLM_F_CREATE, *named, nested(ELEM_LIST_ELEMENTS, *chunk))
        return set_id

    def delete_set(self, name: str) -> None:
        """`delete set` (or map) by name."""
        self._add(DELSET, 0, self._table, string(SET_NAME, name))

    def flush_set(self, name: str) -> None:
        """`flush set` (or map): DELSETELEM without an element list."""
        self._add(DELSETELEM, 0, self._table, string(ELEM_LIST_SET, name))

    def elements(self, verb: str, target: str, items: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Add or delete (key, encoded verdict data or None) elements of a set or map, 256 per message."""
        encoded = []
        for key, value in items:
            keyed = tail(_element_key, key)
            if value is None:
                encoded.append(_HEADER.pack(4 + len(keyed), LIST_ELEM | NLA_F_NESTED) + keyed)
            else:
                encoded.append(_HEADER.pack(4 + len(keyed) + len(value), LIST_ELEM | NLA_F_NESTED) + keyed + value)
        kind, flags = (NEWSETELEM, NLM_F_CREATE) if verb == "add" else (DELSETELEM, 0)
        attrs = (self._table, string(ELEM_LIST_SET, target))
        for start in range(0, len(encoded), ELEMENTS_PER_MESSAGE):  # a nested attribute holds at most 64 KiB
            chunk = encoded[start : start + ELEMENTS_PER_MESSAGE]
            self._add(kind, flags, *attrs, nested(ELEM_LIST_ELEMENTS, *chunk))

    @property
    def size(self) -> int:
        """The payload's length in bytes (with the 20-byte batch markers), 0 without messages."""
        return len(self._data) + 20 if self.count else 0

    def chunks(self) -> tuple[bytes | bytearray, ...]:
        """BATCH_BEGIN and the messages, then BATCH_END (one sendmsg); only the last message asks for an ack."""
        if not self.count:
            return ()
        flags = self._last + 6
        struct.pack_into("=H", self._data, flags, struct.unpack_from("=H", self._data, flags)[0] | NLM_F_ACK)
        return self._data, _batch_marker(NFNL_MSG_BATCH_END, self.count + 1)

    def payload(self) -> bytes:
        """The chunks as one bytes object."""
        return b"".join(self.chunks())

    @property
    def messages(self) -> list[bytes]:
        """The messages one by one, for tests and debugging."""
        found, offset = [], 20
        while offset < len(self._data):
            length = struct.unpack_from("=I", self._data, offset)[0]
            found.append(bytes(self._data[offset : offset + length]))
            offset += length
        return found


class NetlinkError(RuntimeError):
    """The kernel refused a batch; nothing of it was applied."""

    def __init__(self, code: int, seq: int) -> None:
        """Keep the errno and the sequence number (1-based message index) of the refused message."""
        super().__init__(
            f"nf_tables refused message {seq}: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
        )
        self.code = code
        self.seq = seq


class NetlinkSocket:
    """A NETLINK_NETFILTER socket (in a named namespace or this one) that sends batches and reads acks."""

    def __init__(self, netns: str | None = None) -> None:
        """Open the socket, in network namespace netns when given."""
        if netns is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        else:
            from kproxyd.lab.nsutil import socket_in_netns

            self._sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        for option in (SO_SNDBUFFORCE, SO_RCVBUFFORCE):
            # Without CAP_NET_ADMIN: the default buffers, and larger batches go through nft -f.
            with contextlib.suppress(PermissionError):
                self._sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self._sock.bind((0, 0))
        self._sock.settimeout(30)

    def send(self, batch: Batch) -> None:
        """Send one batch and wait for the kernel's verdict on it; raises NetlinkError on refusal."""
        size = batch.size
        if not size:
            return
        if size > self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32:
            try:  # as nft does: one sendmsg carries the whole batch, whatever its size
                self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
            except PermissionError as why:
                raise Unsupported(f"a {size}-byte batch exceeds the socket's send buffer") from why
        self._sock.sendmsg(batch.chunks())  # a datagram: the kernel takes all of it or fails
        while True:
            reply = self._sock.recv(65536)
            for seq, code in _acks(reply):
                if code:
                    raise NetlinkError(code, seq)
                if seq == batch.count:
                    return

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def _acks(reply: bytes) -> Iterable[tuple[int, int]]:
    """(sequence number, errno or 0) of every NLMSG_ERROR in a reply buffer."""
    offset = 0
    while offset + 16 <= len(reply):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply, offset)
        if kind == NLMSG_ERROR:
            yield seq, -struct.unpack_from("=i", reply, offset + 16)[0]
        offset += max(16, (length + 3) & ~3)
