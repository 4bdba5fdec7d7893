"""RFC 9162 Merkle tree against pymerkle (sha256, with the 0x00/0x01 prefixes RFC 9162 uses).

pymerkle's inclusion proof is ``[leaf hash] + RFC 9162 inclusion_path``, so those compare
directly. Its consistency proof has another layout (when the old size is the width of a left
subtree it descends the right one to a leaf), so consistency proofs are compared against the
RFC 9162 §2.1.4.1 recursion written out below over subtree roots that pymerkle computes.
"""

from __future__ import annotations

import hashlib
from functools import cache

import pytest
from pymerkle import InmemoryTree

from protocol.errors import InvalidArgument, VerificationFailed
from protocol.merkle import (
    MerkleTree,
    empty_root,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

N = 64
LEAVES = [f"event {i}".encode() * (i % 5 + 1) for i in range(N)]


@pytest.fixture(scope="module")
def ours() -> MerkleTree:
    tree = MerkleTree()
    for leaf in LEAVES:
        tree.append(leaf)
    return tree


@pytest.fixture(scope="module")
def theirs() -> InmemoryTree:
    tree = InmemoryTree(algorithm="sha256")  # security prefixes on: RFC 9162 hashing
    for leaf in LEAVES:
        tree.append_entry(leaf)
    return tree


@cache
def pymerkle_root(start: int, end: int) -> bytes:
    """MTH(D[start:end]) as pymerkle computes it (a fresh tree over that range)."""
    tree = InmemoryTree(algorithm="sha256")
    for leaf in LEAVES[start:end]:
        tree.append_entry(leaf)
    return bytes(tree.get_root())


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_subproof(m: int, start: int, end: int, complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[start:end], b) of RFC 9162 §2.1.4.1, literally."""
    n = end - start
    if m == n:
        return [] if complete else [pymerkle_root(start, end)]
    k = _split(n)
    if m <= k:
        return [*rfc_subproof(m, start, start + k, complete), pymerkle_root(start + k, end)]
    return [*rfc_subproof(m - k, start + k, end, False), pymerkle_root(start, start + k)]


def test_hashing_conventions() -> None:
    assert empty_root() == hashlib.sha256(b"").digest()
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"l", b"r") == hashlib.sha256(b"\x01lr").digest()
    assert MerkleTree().root() == empty_root()


def test_roots_agree_for_every_size(ours: MerkleTree, theirs: InmemoryTree) -> None:
    for size in range(0, N + 1):
        assert ours.root(size) == theirs.get_root(size), size
        # Built incrementally or from stored leaf hashes: the same tree.
        restored = MerkleTree(ours.leaf_hash(i) for i in range(size))
        assert restored.root() == ours.root(size)


def test_inclusion_proofs_agree_for_every_leaf_and_size(
    ours: MerkleTree, theirs: InmemoryTree
) -> None:
    for size in range(1, N + 1):
        root = ours.root(size)
        for index in range(size):
            proof = ours.inclusion_proof(index, size)
            expected = theirs.prove_inclusion(index + 1, size)
            assert [leaf_hash(LEAVES[index]), *proof] == expected.path, (index, size)
            expected.verify(leaf_hash(LEAVES[index]), root, index=index + 1, size=size)
            verify_inclusion(leaf_hash(LEAVES[index]), index, size, proof, root)


def test_consistency_proofs_agree_for_every_pair_of_sizes(
    ours: MerkleTree, theirs: InmemoryTree
) -> None:
    for size in range(1, N + 1):
        for old_size in range(1, size + 1):
            proof = ours.consistency_proof(old_size, size)
            assert proof == rfc_subproof(old_size, 0, size, True), (old_size, size)
            verify_consistency(
                old_size, size, theirs.get_root(old_size), theirs.get_root(size), proof
            )
            # pymerkle's own proof between the same states holds for the same roots.
            theirs.prove_consistency(old_size, size).verify(
                theirs.get_root(old_size), theirs.get_root(size)
            )


def test_tampered_inclusion_proofs_are_refused(ours: MerkleTree) -> None:
    for size in (1, 2, 7, 8, 33, 64):
        root = ours.root(size)
        for index in range(size):
            proof = ours.inclusion_proof(index, size)
            digest = leaf_hash(LEAVES[index])
            for position in range(len(proof)):
                bad = list(proof)
                bad[position] = bytes([proof[position][0] ^ 1]) + proof[position][1:]
                with pytest.raises(VerificationFailed):
                    verify_inclusion(digest, index, size, bad, root)
            with pytest.raises(VerificationFailed):
                verify_inclusion(leaf_hash(b"another"), index, size, proof, root)
            if size > 1:
                with pytest.raises(VerificationFailed):
                    verify_inclusion(digest, (index + 1) % size, size, proof, root)
                with pytest.raises(VerificationFailed):
                    verify_inclusion(digest, index, size, [*proof, root], root)
                with pytest.raises(VerificationFailed):
                    verify_inclusion(digest, index, size, proof[:-1], root)
    with pytest.raises(VerificationFailed, match="not below size"):
        verify_inclusion(leaf_hash(LEAVES[0]), 5, 5, [], ours.root(5))


def test_tampered_consistency_proofs_are_refused(ours: MerkleTree) -> None:
    for size in (2, 3, 8, 13, 64):
        for old_size in range(1, size):
            old_root, root = ours.root(old_size), ours.root(size)
            proof = ours.consistency_proof(old_size, size)
            for position in range(len(proof)):
                bad = list(proof)
                bad[position] = bytes([proof[position][0] ^ 1]) + proof[position][1:]
                with pytest.raises(VerificationFailed):
                    verify_consistency(old_size, size, old_root, root, bad)
            with pytest.raises(VerificationFailed):
                verify_consistency(old_size, size, ours.root(old_size - 1), root, proof)
            with pytest.raises(VerificationFailed):
                verify_consistency(old_size, size, old_root, ours.root(size - 1), proof)
            with pytest.raises(VerificationFailed):
                verify_consistency(old_size, size, old_root, root, proof[:-1])
    # Trivial cases: from empty, and equal sizes.
    verify_consistency(0, 5, empty_root(), ours.root(5), [])
    verify_consistency(5, 5, ours.root(5), ours.root(5), [])
    with pytest.raises(VerificationFailed, match="two different roots"):
        verify_consistency(5, 5, ours.root(5), ours.root(6), [])
    with pytest.raises(VerificationFailed, match="exceeds"):
        verify_consistency(6, 5, ours.root(6), ours.root(5), [])


def test_bad_arguments(ours: MerkleTree) -> None:
    with pytest.raises(InvalidArgument, match="leaf index 64"):
        ours.inclusion_proof(64)
    with pytest.raises(InvalidArgument, match="tree size 65"):
        ours.root(65)
    with pytest.raises(InvalidArgument, match="old size 9"):
        ours.consistency_proof(9, 8)
    with pytest.raises(InvalidArgument, match="32 bytes"):
        MerkleTree([b"short"])


def test_large_tree_proofs_without_rehashing() -> None:
    size = 100_000
    tree = MerkleTree(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size))
    root = tree.root()
    for index in (0, 1, 4_095, 65_536, size - 1):
        verify_inclusion(tree.leaf_hash(index), index, size, tree.inclusion_proof(index), root)
    for old_size in (1, 1_000, 65_536, 99_999):
        verify_consistency(
            old_size, size, tree.root(old_size), root, tree.consistency_proof(old_size)
        )


def test_certificate_transparency_reference_roots() -> None:
    """The 8-leaf vectors of the Certificate Transparency reference tests (RFC 6962 hashing)."""
    leaves = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657"]
    leaves.append("606162636465666768696a6b6c6d6e6f")
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    tree = MerkleTree()
    for leaf in leaves:
        tree.append(bytes.fromhex(leaf))
    assert [tree.root(n).hex() for n in range(1, 9)] == roots
