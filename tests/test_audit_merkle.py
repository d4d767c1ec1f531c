"""The decision log's Merkle tree is RFC 9162 §2.1, checked against a naive recursive ``MTH``.

Every tree size 1..70, every leaf index and every old size: the incremental frontier, subtree hashes,
inclusion and consistency proofs equal the RFC's recursive definitions, verify, and stop verifying
when any part of them is altered. The functions under test may only read perfect subtrees that are
complete inside the tree size they are asked about (what storage can answer).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

import pytest

from bastion.audit import merkle

MAX_SIZE = 70


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 ``MTH(D[n])``, written straight from the definition."""
    n = len(leaves)
    if n == 0:
        return _sha(b"")
    if n == 1:
        return _sha(b"\x00" + leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _sha(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 ``PATH(m, D[n])``."""
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """RFC 9162 §2.1.4.1 ``SUBPROOF(m, D[n], b)``."""
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


DATA = [b"leaf-%d" % i + bytes([i]) * (i % 5) for i in range(MAX_SIZE)]


def storage(size: int) -> Callable[[int, int], bytes]:
    """``perfect(level, index)`` as storage answers it for a tree of ``size`` leaves: complete subtrees only."""

    def perfect(level: int, index: int) -> bytes:
        first, end = index << level, (index + 1) << level
        assert level >= 0 and index >= 0 and end <= size, f"asked for ({level}, {index}) in a tree of {size}"
        return _stored(first, end)

    return perfect


@functools.cache
def _stored(first: int, end: int) -> bytes:
    return mth(DATA[first:end])


def _flip(value: bytes, at: int = 0) -> bytes:
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1 :]


# Roots of the RFC 6962 test leaves (the inputs transparency-dev/merkle's testonly package uses).
RFC6962_LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657"]] + [
    bytes.fromhex("606162636465666768696a6b6c6d6e6f")
]
RFC6962_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_hashes_match_the_published_rfc6962_roots() -> None:
    """Leaf 0x00, node 0x01, empty tree SHA-256(""): the roots of the public test vectors, sizes 0..8."""
    frontier = merkle.Frontier()
    assert frontier.root().hex() == RFC6962_ROOTS[0] == merkle.EMPTY_ROOT.hex()
    for size, data in enumerate(RFC6962_LEAVES, 1):
        frontier.append(merkle.leaf_hash(data))
        assert frontier.root().hex() == RFC6962_ROOTS[size]


def test_the_frontier_grows_the_rfc_tree_and_reports_each_completed_subtree() -> None:
    frontier = merkle.Frontier()
    for size in range(1, MAX_SIZE + 1):
        done = frontier.append(merkle.leaf_hash(DATA[size - 1]))
        assert frontier.size == size
        assert frontier.root() == mth(DATA[:size])
        # The subtrees that end at this leaf: level 0 (the leaf), then one per trailing 1-bit.
        index = size - 1
        expected = [(0, index, mth(DATA[index:size]))]
        level = 0
        while index & 1:
            index >>= 1
            level += 1
            expected.append((level, index, mth(DATA[index << level : size])))
        assert done == expected
        rebuilt = merkle.Frontier.from_perfect(size, storage(size))
        assert rebuilt.nodes == frontier.nodes
        assert rebuilt.root() == frontier.root()


def test_push_is_append_without_the_report() -> None:
    a, b = merkle.Frontier(), merkle.Frontier()
    for data in DATA:
        a.append(merkle.leaf_hash(data))
        b.push(merkle.leaf_hash(data))
        assert a.nodes == b.nodes


def test_a_frontier_must_have_one_node_per_set_bit_of_its_size() -> None:
    with pytest.raises(ValueError, match="3 nodes"):
        merkle.Frontier(7, [b"\x00" * 32] * 2)
    with pytest.raises(ValueError, match="32-byte"):
        merkle.Frontier(1, [b"\x00" * 31])
    with pytest.raises(ValueError):
        merkle.Frontier(-1, [])
    with pytest.raises(ValueError):
        merkle.Frontier().append(b"short")


def test_subtree_hash_is_mth_of_any_range() -> None:
    for end in range(1, MAX_SIZE + 1):
        perfect = storage(end)
        for start in range(end):
            assert merkle.subtree_hash(start, end, perfect) == mth(DATA[start:end]), (start, end)
    with pytest.raises(ValueError):
        merkle.subtree_hash(3, 3, storage(3))
    assert merkle.root_hash(0, storage(0)) == merkle.EMPTY_ROOT


def test_inclusion_proofs_are_rfc_paths_and_verify() -> None:
    for size in range(1, MAX_SIZE + 1):
        perfect = storage(size)
        root = mth(DATA[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, perfect)
            assert proof == path(index, DATA[:size]), (index, size)
            leaf = merkle.leaf_hash(DATA[index])
            assert merkle.verify_inclusion(leaf, index, size, proof, root)


def test_altered_inclusion_proofs_fail() -> None:
    for size in range(1, MAX_SIZE + 1):
        perfect = storage(size)
        root = mth(DATA[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, perfect)
            leaf = merkle.leaf_hash(DATA[index])
            for i in range(len(proof)):
                altered = [*proof[:i], _flip(proof[i], i % 32), *proof[i + 1 :]]
                assert not merkle.verify_inclusion(leaf, index, size, altered, root)
            if proof:
                assert not merkle.verify_inclusion(leaf, index, size, proof[:-1], root)
            assert not merkle.verify_inclusion(leaf, index, size, [*proof, root], root)
            assert not merkle.verify_inclusion(_flip(leaf), index, size, proof, root)
            assert not merkle.verify_inclusion(leaf, index, size, proof, _flip(root, 31))
            for other in {index - 1, index + 1} & set(range(size)):
                assert not merkle.verify_inclusion(leaf, other, size, proof, root)
            assert not merkle.verify_inclusion(leaf, size, size, proof, root)  # index out of the tree
            assert not merkle.verify_inclusion(leaf[:31], index, size, proof, root)  # not a hash


def test_consistency_proofs_are_rfc_subproofs_and_verify() -> None:
    for new in range(1, MAX_SIZE + 1):
        perfect = storage(new)
        new_root = mth(DATA[:new])
        for old in range(0, new + 1):
            proof = merkle.consistency_proof(old, new, perfect)
            expected = [] if old in (0, new) else subproof(old, DATA[:new], True)
            assert proof == expected, (old, new)
            assert merkle.verify_consistency(old, new, mth(DATA[:old]), new_root, proof), (old, new)


def test_altered_consistency_proofs_fail() -> None:
    for new in range(2, MAX_SIZE + 1):
        perfect = storage(new)
        new_root = mth(DATA[:new])
        for old in range(1, new):
            old_root = mth(DATA[:old])
            proof = merkle.consistency_proof(old, new, perfect)
            for i in range(len(proof)):
                altered = [*proof[:i], _flip(proof[i], i % 32), *proof[i + 1 :]]
                assert not merkle.verify_consistency(old, new, old_root, new_root, altered), (old, new, i)
            assert not merkle.verify_consistency(old, new, old_root, new_root, proof[:-1])
            assert not merkle.verify_consistency(old, new, old_root, new_root, [*proof, new_root])
            assert not merkle.verify_consistency(old, new, _flip(old_root), new_root, proof)
            assert not merkle.verify_consistency(old, new, old_root, _flip(new_root), proof)
            assert not merkle.verify_consistency(old, new, old_root, new_root, [])
            assert not merkle.verify_consistency(old, new, new_root, old_root, proof)  # roots exchanged


def test_trivial_consistency_needs_an_empty_proof_and_matching_roots() -> None:
    root = mth(DATA[:5])
    assert merkle.verify_consistency(5, 5, root, root, [])
    assert not merkle.verify_consistency(5, 5, root, _flip(root), [])
    assert not merkle.verify_consistency(5, 5, root, root, [root])
    assert merkle.verify_consistency(0, 5, merkle.EMPTY_ROOT, root, [])
    assert not merkle.verify_consistency(0, 5, root, root, [])
    assert not merkle.verify_consistency(6, 5, root, root, [])
    with pytest.raises(ValueError):
        merkle.consistency_proof(6, 5, storage(5))
    with pytest.raises(ValueError):
        merkle.inclusion_proof(5, 5, storage(5))
