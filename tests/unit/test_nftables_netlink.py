"""The nf_tables netlink encoder: keys, nft's encoding choices, templates, batch framing, what nft is left."""

from __future__ import annotations

import struct

import pytest

from kproxyd.backends.nftables.netlink import (
    DATA_VERDICT,
    NEWCHAIN,
    NEWRULE,
    NEWSET,
    NEWSETELEM,
    NEWTABLE,
    NLM_F_ACK,
    SET_MAP,
    VERDICT_CHAIN,
    VERDICT_CODE,
    VERDICTS,
    Batch,
    Unsupported,
    data_value,
    element_key,
    element_verdict,
    expr,
    nested,
    string,
    u32,
)
from kproxyd.backends.nftables.render import NftRenderer, NftRenderOptions, SetSpec
from kproxyd.backends.nftables.rules import (
    CMP_NEQ,
    Addr,
    AddrNotInAnonymous,
    PortMatch,
    Verdict,
    Vmap,
    _concat_register,
    cmp,
    immediate,
    immediate_verdict,
    intervals,
    rule,
)
from kproxyd.backends.nftables.transaction import TableObjects, Transaction, full_sync


def test_element_keys_pad_each_concatenated_part_to_four_bytes() -> None:
    assert element_key("10.0.0.1") == bytes((10, 0, 0, 1))
    assert element_key("10.0.0.1 . tcp . 80") == bytes((10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0))
    assert element_key("udp . 30053") == bytes((17, 0, 0, 0)) + struct.pack(">H", 30053) + b"\0\0"
    assert len(element_key("fd00::1 . sctp . 80")) == 24


def test_element_verdicts() -> None:
    assert element_verdict("") is None
    assert b"chain-x\0" in (element_verdict("goto chain-x") or b"")
    with pytest.raises(Unsupported):
        element_verdict("queue")


def test_prefixes_are_encoded_as_nft_does() -> None:
    byte_aligned = Addr("ip", "saddr", "10.0.0.0/8").encode()
    assert len(byte_aligned) == 2 and b"bitwise" not in b"".join(byte_aligned)  # load 1 byte, compare
    assert b"bitwise" in b"".join(Addr("ip", "saddr", "10.16.0.0/12", negate=True).encode())
    with pytest.raises(Unsupported):
        Addr("ip", "saddr", "0.0.0.0/0").encode()


def test_concatenations_use_nfts_registers() -> None:
    assert [_concat_register(o) for o in (0, 4, 8)] == [1, 9, 10]  # ip daddr . l4proto . dport
    assert [_concat_register(o) for o in (0, 16, 20)] == [1, 2, 13]  # ip6 daddr . l4proto . dport
    assert str(rule(Vmap(None, "m"))) == "meta l4proto . th dport vmap @m"


def test_batch_is_framed_and_only_its_last_message_asks_for_an_ack() -> None:
    batch = Batch("ip", "kube-proxy")
    batch.add_chain("a")
    batch.flush_chain("a")
    data = batch.payload()
    flags, seqs, offset = [], [], 0
    while offset < len(data):
        length, kind, flag, seq, _ = struct.unpack_from("=IHHII", data, offset)
        flags.append(flag & NLM_F_ACK)
        seqs.append((kind, seq))
        offset += length
    assert seqs == [(0x10, 0), ((10 << 8) | 3, 1), ((10 << 8) | 8, 2), (0x11, 3)]
    assert flags == [0, 0, NLM_F_ACK, 0]
    assert Batch("ip", "kube-proxy").payload() == b""


def test_intervals_are_merged_and_bounded_as_nft_sends_them() -> None:
    ip = lambda text: bytes(int(part) for part in text.split("."))  # noqa: E731
    assert intervals(("10.0.0.0/8", "192.168.0.2", "11.0.0.0/8"), 4) == [
        (ip("0.0.0.0"), True),
        (ip("10.0.0.0"), False),
        (ip("12.0.0.0"), True),  # adjacent prefixes merged
        (ip("192.168.0.2"), False),
        (ip("192.168.0.3"), True),
    ]
    assert intervals(("0.0.0.0/1", "255.255.255.255"), 4) == [
        (ip("0.0.0.0"), False),  # no leading end: the first range starts at 0
        (ip("128.0.0.0"), True),
        (ip("255.255.255.255"), False),  # no end past the last address
    ]


def test_full_syncs_and_anonymous_sets_are_encoded() -> None:
    tx = Transaction("ip")
    full_sync(tx, NftRenderer(NftRenderOptions()).static(), {}, TableObjects(), recreate_base=False)
    kinds = [struct.unpack_from("=H", message, 4)[0] & 0xFF for message in tx.batch().messages]
    assert kinds[:2] == [NEWTABLE, NEWCHAIN] and kinds.count(NEWSET) == 7
    tx = Transaction("ip")
    tx.rules("c", (rule(AddrNotInAnonymous("ip", "saddr", ("10.0.0.0/8", "10.1.0.1")), Verdict("drop")),))
    kinds = [struct.unpack_from("=H", message, 4)[0] & 0xFF for message in tx.batch().messages]
    assert kinds == [NEWSET, NEWSETELEM, NEWRULE]  # the anonymous set, its elements, the rule bound to it
    many = tuple(f"10.{i // 256}.{i % 256}.1" for i in range(300))  # 601 elements: three messages
    tx = Transaction("ip")
    tx.rules("c", (rule(AddrNotInAnonymous("ip", "saddr", many), Verdict("drop")),))
    assert [struct.unpack_from("=H", m, 4)[0] & 0xFF for m in tx.batch().messages] == [
        NEWSET,
        *[NEWSETELEM] * 3,
        NEWRULE,
    ]
    with pytest.raises(Unsupported):  # without a batch to create it in
        AddrNotInAnonymous("ip", "saddr", ("10.0.0.0/8", "10.1.0.1")).encode()
    tx = Transaction("ip")
    tx.add_set(SetSpec("set", "affinity-x", "ipv4_addr", timeout=10))
    assert len(tx.batch().messages) == 1


def test_maps_are_declared_as_nft_does() -> None:
    tx = Transaction("ip6")
    tx.add_set(SetSpec("map", "m", "ipv6_addr . inet_proto . inet_service : verdict", counter=True, comment="c"))
    (message,) = tx.batch().messages
    assert struct.pack(">I", (8 << 6 | 12) << 6 | 13) in message  # the concatenation's datatype
    assert struct.pack(">I", 16 + 4 + 4) in message  # its length: each part rounded up to 4 bytes
    assert struct.pack(">I", SET_MAP) in message and b"counter\0" in message and b"c\0" in message
    tx = Transaction("ip")
    tx.add_set(SetSpec("map", "m", "ipv4_addr : ipv4_addr"))
    with pytest.raises(Unsupported):
        tx.batch()


@pytest.mark.parametrize("size", range(1, 9))
def test_templates_encode_what_the_plain_builders_do(size: int) -> None:
    value = bytes(range(1, size + 1))
    assert cmp(CMP_NEQ, value) == expr("cmp", u32(1, 1), u32(2, CMP_NEQ), data_value(3, value))
    chain = "c" * size
    code = u32(VERDICT_CODE, VERDICTS["goto"])
    verdict = nested(2, nested(DATA_VERDICT, code, string(VERDICT_CHAIN, chain)))
    assert immediate_verdict("goto", chain) == expr("immediate", u32(1, 0), verdict)
    assert immediate(value, 2) == expr("immediate", u32(1, 2), data_value(2, value))


def test_rule_expressions_are_the_statements_encodings() -> None:
    stmts = (Addr("ip", "daddr", "10.0.0.1"), PortMatch("tcp", 80), Addr("ip", "saddr", "10.0.0.0/8", True))
    expected = b"".join(encoded for stmt in stmts for encoded in stmt.encode())
    batch = Batch("ip", "kube-proxy")
    jump = b"".join(Verdict("jump", "x").encode())
    assert rule(*stmts, Verdict("jump", "x")).expressions(batch) == expected + jump
    assert rule(*stmts).expressions(batch) == expected  # the second time from the bounded statements' cache
