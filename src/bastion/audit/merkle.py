"""RFC 9162 Merkle tree hashing: leaves, an incremental frontier, inclusion and consistency proofs.

The tree over leaves ``D[0:n]`` is RFC 9162 §2.1's ``MTH``: the empty tree hashes to
``SHA-256()``, a leaf to ``SHA-256(0x00 || data)``, and a larger tree splits at ``k``, the largest
power of two below ``n``: ``SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))``.

A *perfect* subtree ``(level, index)`` covers the ``2**level`` leaves
``[index * 2**level, (index + 1) * 2**level)``; level 0 is a leaf hash. Storage keeps every perfect
subtree once it is complete (they never change), so any hash a proof needs is a few primary-key
lookups: the functions here take ``perfect(level, index) -> bytes`` and never see the leaves.
They read only perfect subtrees inside the tree size they are asked about.

Proofs are lists of 32-byte hashes in RFC order (the one nearest the leaf first); verification
follows RFC 9162 §2.1.3.2 and §2.1.4.2 step by step and never raises on a bad proof: it answers False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

Perfect = Callable[[int, int], bytes]
"""``perfect(level, index)``: the stored hash of a complete perfect subtree."""

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf (RFC 9162 §2.1.1)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The right edge of a growing tree: one perfect-subtree hash per set bit of ``size``.

    ``nodes`` run from the largest (leftmost) subtree to the smallest, so ``nodes[0]`` covers
    ``[0, 2**k)`` for the highest bit ``k`` of ``size``. Appending is amortised one node hash;
    ``root()`` is ``O(log size)``. The frontier is all a writer or a verifier has to keep.
    """

    __slots__ = ("_nodes", "_size")

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise ValueError("a tree size is never negative")
        if len(nodes) != size.bit_count():
            raise ValueError(f"a frontier of {size} leaves has {size.bit_count()} nodes, not {len(nodes)}")
        if any(len(node) != HASH_SIZE for node in nodes):
            raise ValueError(f"frontier nodes are {HASH_SIZE}-byte hashes")
        self._size = size
        self._nodes = list(nodes)

    @property
    def size(self) -> int:
        """How many leaves the tree holds."""
        return self._size

    @property
    def nodes(self) -> list[bytes]:
        """A copy of the perfect-subtree hashes, leftmost (largest) first."""
        return list(self._nodes)

    @classmethod
    def from_perfect(cls, size: int, perfect: Perfect) -> Frontier:
        """The frontier of a tree of ``size`` leaves, read from stored perfect subtrees."""
        if size < 0:
            raise ValueError("a tree size is never negative")
        nodes: list[bytes] = []
        offset = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                nodes.append(perfect(level, offset >> level))
                offset += 1 << level
        return cls(size, nodes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; the perfect subtrees this completes, as ``(level, index, hash)``.

        The first is always ``(0, position, leaf)``, then one per level the merge climbs: exactly
        what storage must keep so that ``perfect`` answers for the new size."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes")
        index = self._size
        done = [(0, index, leaf)]
        nodes = self._nodes
        level = 0
        node = leaf
        while index & 1:
            node = node_hash(nodes.pop(), node)
            index >>= 1
            level += 1
            done.append((level, index, node))
        nodes.append(node)
        self._size += 1
        return done

    def push(self, leaf: bytes) -> None:
        """``append`` without reporting the completed subtrees (and without checks): the verifier's loop."""
        nodes = self._nodes
        index = self._size
        node = leaf
        while index & 1:
            node = _sha256(b"\x01" + nodes.pop() + node).digest()
            index >>= 1
        nodes.append(node)
        self._size += 1

    def root(self) -> bytes:
        """``MTH`` of the leaves so far (``EMPTY_ROOT`` for none)."""
        if not self._nodes:
            return EMPTY_ROOT
        nodes = self._nodes
        root = nodes[-1]
        for node in reversed(nodes[:-1]):
            root = node_hash(node, root)
        return root


def subtree_hash(start: int, end: int, perfect: Perfect) -> bytes:
    """``MTH(D[start:end])`` for any ``0 <= start < end``, from perfect subtrees inside the range.

    A range the RFC proofs name (``start`` a multiple of a power of two at least ``end - start``)
    costs ``O(log(end - start))`` lookups; an unaligned one is still right, at up to one lookup a leaf."""
    if not 0 <= start < end:
        raise ValueError(f"[{start}, {end}) is not a non-empty range of leaves")
    n = end - start
    if n & (n - 1) == 0 and start % n == 0:  # a perfect subtree: stored as one node
        return perfect(n.bit_length() - 1, start // n)
    if start % _split(n) == 0:
        # The left part is perfect and stored; the right part is the smaller perfect subtrees of
        # the binary decomposition of its size, folded from the right (exactly MTH's recursion).
        k = _split(n)
        left = perfect(k.bit_length() - 1, start // k)
        return node_hash(left, _aligned_tail(start + k, end, perfect))
    k = _split(n)
    return node_hash(subtree_hash(start, start + k, perfect), subtree_hash(start + k, end, perfect))


def _aligned_tail(start: int, end: int, perfect: Perfect) -> bytes:
    """``MTH(D[start:end])`` where ``start`` is a multiple of a power of two above ``end - start``."""
    parts: list[bytes] = []
    offset = start
    size = end - start
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            parts.append(perfect(level, offset >> level))
            offset += 1 << level
    root = parts[-1]
    for node in reversed(parts[:-1]):
        root = node_hash(node, root)
    return root


def root_hash(size: int, perfect: Perfect) -> bytes:
    """``MTH`` of the first ``size`` leaves."""
    return EMPTY_ROOT if size == 0 else subtree_hash(0, size, perfect)


def inclusion_proof(index: int, size: int, perfect: Perfect) -> list[bytes]:
    """RFC 9162 §2.1.3.1 ``PATH(index, D[0:size])``: the audit path of one leaf, nearest first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree_hash(start + k, end, perfect))
            end = start + k
        else:
            path.append(subtree_hash(start, start + k, perfect))
            start += k
    path.reverse()
    return path


def consistency_proof(old: int, new: int, perfect: Perfect) -> list[bytes]:
    """RFC 9162 §2.1.4.1 ``PROOF(old, D[0:new])``; empty when ``old`` is 0 or equals ``new``."""
    if not 0 <= old <= new:
        raise ValueError(f"no consistency proof from {old} leaves to {new}")
    if old in (0, new):
        return []
    proof: list[bytes] = []
    start, end, m = 0, new, old
    whole = True  # SUBPROOF's flag: is D[start:start+m] the entire old tree?
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            proof.append(subtree_hash(start + k, end, perfect))
            end = start + k
        else:
            proof.append(subtree_hash(start, start + k, perfect))
            start += k
            m -= k
            whole = False
    if not whole:
        proof.append(subtree_hash(start, end, perfect))
    proof.reverse()
    return proof


def _valid(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` in the tree ``root`` of ``size``?"""
    if not 0 <= index < size or not _valid(leaf, root, *proof):
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree ``new_root`` of ``new_size`` an append-only extension of ``old_root``?

    Sizes 0 and equal sizes take an empty proof (the empty tree precedes every tree; a tree
    extends itself only when the roots are equal)."""
    if not 0 <= old_size <= new_size or not _valid(old_root, new_root, *proof):
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is itself a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
