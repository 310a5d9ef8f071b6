"""Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table in which removing one of N backends
moves only about 1/N of the table's slots, so flows hashed to the others keep their backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

TABLE_SIZE = 1021  # prime; Maglev wants it well above the backend count (≈100x) for even shares


def _hash(name: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, salt=salt).digest(), "little")


def maglev_table(backends: Sequence[str], size: int = TABLE_SIZE) -> list[int]:
    """For each of size slots, the index into backends that serves it (backends must be non-empty)."""
    names = sorted(set(backends))
    if not names:
        raise ValueError("a Maglev table needs at least one backend")
    index = {name: backends.index(name) for name in names}
    offsets = [_hash(n, b"offset") % size for n in names]
    skips = [_hash(n, b"skip") % (size - 1) + 1 for n in names]
    nexts = [0] * len(names)
    table = [-1] * size
    filled = 0
    while True:
        for i, name in enumerate(names):
            slot = (offsets[i] + nexts[i] * skips[i]) % size
            while table[slot] >= 0:
                nexts[i] += 1
                slot = (offsets[i] + nexts[i] * skips[i]) % size
            table[slot] = index[name]
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table
