"""The nf_tables netlink encoder: element keys, nft's encoding choices, batch framing, what it leaves to nft."""

from __future__ import annotations

import struct

import pytest

from kproxyd.backends.nftables.netlink import NLM_F_ACK, Batch, Unsupported, element_key, element_verdict
from kproxyd.backends.nftables.render import NftRenderer, NftRenderOptions, SetSpec
from kproxyd.backends.nftables.rules import Addr, Vmap, _concat_register, rule
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


def test_full_syncs_and_maps_are_left_to_nft() -> None:
    tx = Transaction("ip")
    full_sync(tx, NftRenderer(NftRenderOptions()).static(), {}, TableObjects(), recreate_base=False)
    with pytest.raises(Unsupported):
        tx.batch()
    tx = Transaction("ip")
    tx.add_set(SetSpec("map", "m", "inet_proto . inet_service : verdict"))
    with pytest.raises(Unsupported):
        tx.batch()
    tx = Transaction("ip")
    tx.add_set(SetSpec("set", "affinity-x", "ipv4_addr", timeout=10))
    assert len(tx.batch().messages) == 1
