"""An RFC 9162 (Certificate Transparency v2) Merkle tree: roots, inclusion and consistency proofs.

Hashing is RFC 9162 §2.1.1 with sha256: the root of the empty tree is ``sha256(b"")``, a leaf
hashes as ``sha256(0x00 || leaf)``, an inner node as ``sha256(0x01 || left || right)``, and a
tree of n leaves splits at k, the largest power of two smaller than n. Proofs are the
``inclusion_path`` (§2.1.3) and ``consistency_path`` (§2.1.4) arrays, bottom-up; verification
follows the algorithms of §2.1.3.2 and §2.1.4.2 literally.

:class:`MerkleTree` keeps every complete, aligned subtree hash (2n hashes in all, 32 bytes
each, in flat ``bytearray`` levels), so appending costs O(log n) hashes and a root or proof for
any size costs O(log n) hashes and look-ups: no rehashing of the leaves.

Example::

    tree = MerkleTree()
    for event in events:
        tree.append(event)
    proof = tree.inclusion_proof(3)
    verify_inclusion(leaf_hash(events[3]), 3, tree.size, proof, tree.root())
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from protocol.errors import InvalidArgument, VerificationFailed

__all__ = [
    "HASH_SIZE",
    "MerkleTree",
    "empty_root",
    "leaf_hash",
    "node_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32


def leaf_hash(leaf: bytes) -> bytes:
    """``sha256(0x00 || leaf)``."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``sha256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def empty_root() -> bytes:
    """The root of the empty tree: ``sha256(b"")``."""
    return hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only RFC 9162 tree over leaf hashes, with a cache of complete subtrees.

    ``levels[h]`` holds, back to back, the hashes of the complete subtrees of 2**h leaves
    aligned at multiples of 2**h; ``levels[0]`` holds the leaf hashes.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        """Builds a tree from leaf hashes (``leaf_hash(leaf)``), e.g. as a store kept them."""
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        for digest in leaf_hashes:
            self.append_leaf_hash(digest)

    @property
    def size(self) -> int:
        """The number of leaves."""
        return self._size

    def append(self, leaf: bytes) -> bytes:
        """Appends a leaf (raw bytes) and returns its leaf hash; its index is ``size - 1``."""
        digest = leaf_hash(leaf)
        self.append_leaf_hash(digest)
        return digest

    def append_leaf_hash(self, digest: bytes) -> None:
        """Appends a leaf given by its leaf hash."""
        if len(digest) != HASH_SIZE:
            raise InvalidArgument(f"leaf hash: expected {HASH_SIZE} bytes, got {len(digest)}")
        self._levels[0] += digest
        self._size += 1
        index, height = self._size - 1, 0
        # Each completed pair of siblings completes a subtree one level up.
        while index & 1:
            level = self._levels[height]
            left = bytes(level[(index - 1) * HASH_SIZE : index * HASH_SIZE])
            right = bytes(level[index * HASH_SIZE : (index + 1) * HASH_SIZE])
            height += 1
            if height == len(self._levels):
                self._levels.append(bytearray())
            self._levels[height] += node_hash(left, right)
            index >>= 1

    def leaf_hash(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        self._check_index(index, self._size)
        return bytes(self._levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for ``start`` aligned to the largest power of two <= its width."""
        width = end - start
        if width & (width - 1) == 0 and start % width == 0:
            height = width.bit_length() - 1
            index = start >> height
            return bytes(self._levels[height][index * HASH_SIZE : (index + 1) * HASH_SIZE])
        k = _split(width)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (default all): the signed tree head's root hash."""
        size = self._check_size(size)
        return empty_root() if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, bottom-up."""
        size = self._check_size(size)
        self._check_index(index, size)
        path: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                path.append(self._subtree(start + k, end))
                end = start + k
            else:
                path.append(self._subtree(start, start + k))
                start += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[0:size]) of RFC 9162 §2.1.4.1, bottom-up.

        Empty when ``old_size`` is 0 or equals ``size`` (nothing to prove).
        """
        size = self._check_size(size)
        if not 0 <= old_size <= size:
            raise InvalidArgument(f"consistency proof: old size {old_size} is not in 0..{size}")
        if old_size in (0, size):
            return []
        path: list[bytes] = []
        start, end, complete = 0, size, True
        m = old_size
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                path.append(self._subtree(start + k, end))
                end = start + k
            else:
                path.append(self._subtree(start, start + k))
                start += k
                m -= k
                complete = False
        if not complete:
            path.append(self._subtree(start, end))
        path.reverse()
        return path

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise InvalidArgument(f"tree size {size} is not in 0..{self._size}")
        return size

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if not 0 <= index < size:
            raise InvalidArgument(f"leaf index {index} is not in 0..{size - 1} (tree size {size})")


def verify_inclusion(
    leaf_digest: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Checks that ``leaf_digest`` is leaf ``index`` of the tree of ``size`` with ``root``.

    RFC 9162 §2.1.3.2.

    Raises:
        VerificationFailed: The proof does not prove inclusion (says which check failed).
    """
    if not 0 <= index < size:
        raise VerificationFailed(f"inclusion proof: leaf index {index} is not below size {size}")
    fn, sn, r = index, size - 1, leaf_digest
    for p in proof:
        if sn == 0:
            raise VerificationFailed(
                f"inclusion proof: {len(proof)} hashes is too long for leaf {index} of {size}"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationFailed(
            f"inclusion proof: {len(proof)} hashes is too short for leaf {index} of {size}"
        )
    if r != root:
        raise VerificationFailed(
            f"inclusion proof: leaf {index} of {size} leads to root {r.hex()[:16]}.., "
            f"expected {root.hex()[:16]}.."
        )


def verify_consistency(
    old_size: int, size: int, old_root: bytes, root: bytes, proof: Sequence[bytes]
) -> None:
    """Checks that the tree of ``size`` with ``root`` extends the one of ``old_size``/``old_root``.

    RFC 9162 §2.1.4.2, plus the trivial cases: any tree extends the empty one (empty proof),
    and a tree is consistent with itself (empty proof, equal roots).

    Raises:
        VerificationFailed: The trees are not shown consistent (says which check failed).
    """
    if not 0 <= old_size <= size:
        raise VerificationFailed(f"consistency proof: old size {old_size} exceeds size {size}")
    if old_size == 0 or old_size == size:
        if proof:
            raise VerificationFailed(
                f"consistency proof: expected no hashes between sizes {old_size} and {size}, "
                f"got {len(proof)}"
            )
        if old_size == size and old_root != root:
            raise VerificationFailed(
                f"consistency proof: two different roots for size {size}: "
                f"{old_root.hex()[:16]}.. and {root.hex()[:16]}.."
            )
        return
    if not proof:
        raise VerificationFailed(
            f"consistency proof: empty, but sizes {old_size} and {size} need one"
        )
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationFailed(
                f"consistency proof: {len(proof)} hashes is too long for sizes {old_size}, {size}"
            )
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationFailed(
            f"consistency proof: {len(proof)} hashes is too short for sizes {old_size}, {size}"
        )
    if fr != old_root:
        raise VerificationFailed(
            f"consistency proof: old tree of {old_size} leads to root {fr.hex()[:16]}.., "
            f"expected {old_root.hex()[:16]}.."
        )
    if sr != root:
        raise VerificationFailed(
            f"consistency proof: new tree of {size} leads to root {sr.hex()[:16]}.., "
            f"expected {root.hex()[:16]}.."
        )
