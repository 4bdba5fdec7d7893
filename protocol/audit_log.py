"""The federation's audit log: canonical-JSON events in an RFC 9162 Merkle tree, signed checkpoints.

Every transition the coordinator makes (invited, enrolled, recipe set, plan set, assigned,
upload begun, accepted, rejected, revoked, renewed, assembled, published) is an :class:`AuditEvent`; its RFC 8785 canonical JSON is a leaf
of a :class:`protocol.merkle.MerkleTree`. The coordinator signs :class:`Checkpoint` s (log id,
tree size, root hash, time) with its P-256 key; an acceptance returns a :class:`Receipt` (event
+ index + inclusion proof + checkpoint) that anyone holding the coordinator's public key checks
offline with :func:`verify_receipt`; :func:`verify_consistency_proof` shows that a later
checkpoint extends an earlier one; :func:`protocol.audit_export.verify_log_file` checks an
exported log.

This module is pure: no I/O. Persistence belongs to the
coordinator's store. **What a store must keep** (append-only, in the same transaction as the
state change an event records):

* for every index 0..n-1, dense and never rewritten, the event's canonical bytes
  (:meth:`AuditEvent.canonical`), which are the leaf; the leaf hash
  (:meth:`AppendedEvent.leaf_hash`) may be kept beside it so that a restart rebuilds the
  tree from 32-byte hashes (``AuditLog(log_id, leaf_hashes=...)``) without re-encoding;
* every checkpoint it signed, so that after a restart it checks the rebuilt root against the
  latest one (:meth:`AuditLog.check_checkpoint`) and can prove consistency from any of them.

Receipts and proofs need not be stored: they are derived from the leaves on demand.

Example::

    log = AuditLog("spiffe://fed/coordinator")
    appended = log.append(AuditEvent.new("accepted", {"expert": 2, "site": "a"}))
    store.save(appended.index, appended.canonical, appended.leaf_hash)
    checkpoint = log.checkpoint(coordinator_key)
    receipt = log.receipt(appended.index, checkpoint)
    verify_receipt(receipt, coordinator_public_key)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.canonical import canonical_json
from protocol.dsse import ecdsa_sign, ecdsa_verify, public_key_id
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion

__all__ = [
    "CHECKPOINT_TYPE",
    "EVENT_KINDS",
    "AppendedEvent",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "Receipt",
    "checkpoint_time",
    "verify_checkpoint",
    "verify_consistency_proof",
    "verify_receipt",
]

EVENT_KINDS = frozenset(
    {
        "invited",
        "enrolled",
        "recipe_set",
        "plan_set",
        "assigned",
        "upload_begun",
        "accepted",
        "rejected",
        "revoked",
        "renewed",
        "assembled",
        "published",
    }
)
CHECKPOINT_TYPE = "atoll.audit.checkpoint.v1"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def checkpoint_time(checkpoint: Checkpoint) -> datetime:
    """When ``checkpoint`` was signed (VerificationFailed unless RFC 3339 with a timezone)."""
    try:
        moment = datetime.fromisoformat(checkpoint.timestamp)
    except (TypeError, ValueError) as error:
        raise VerificationFailed(
            f"checkpoint at size {checkpoint.tree_size}: timestamp "
            f"{checkpoint.timestamp!r} is not RFC 3339"
        ) from error
    if moment.tzinfo is None:
        raise VerificationFailed(
            f"checkpoint at size {checkpoint.tree_size}: timestamp {checkpoint.timestamp!r} "
            "has no timezone"
        )
    return moment


def _b64decode(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (TypeError, ValueError, binascii.Error) as error:
        raise VerificationFailed(f"{what}: not base64 ({error})") from error


def _hex32(text: Any, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except (TypeError, ValueError) as error:
        raise VerificationFailed(f"{what}: not hex ({error})") from error
    if len(value) != 32:
        raise VerificationFailed(f"{what}: expected 32 bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class AuditEvent:
    """One audit-log entry.

    Attributes:
        kind: One of :data:`EVENT_KINDS`.
        at: RFC 3339 UTC time the coordinator recorded it.
        details: JSON object describing it (site, expert, digests, reason...).
    """

    kind: str
    at: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise InvalidArgument(
                f"audit event kind {self.kind!r}: expected one of {', '.join(sorted(EVENT_KINDS))}"
            )
        canonical_json(self.to_json())  # rejects what JSON cannot carry (NaN, bytes...)

    @classmethod
    def new(cls, kind: str, details: Mapping[str, Any] | None = None) -> AuditEvent:
        """An event of ``kind`` stamped now."""
        return cls(kind=kind, at=_now(), details=dict(details or {}))

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object."""
        return {"kind": self.kind, "at": self.at, "details": dict(self.details)}

    @classmethod
    def from_json(cls, value: Any) -> AuditEvent:
        """Parses :meth:`to_json`'s form (raises InvalidArgument naming what is wrong)."""
        if not isinstance(value, dict) or set(value) != {"kind", "at", "details"}:
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise InvalidArgument(f"audit event: expected keys at, details, kind; got {keys}")
        if not isinstance(value["at"], str) or not isinstance(value["details"], dict):
            raise InvalidArgument("audit event: 'at' must be a string, 'details' an object")
        return cls(kind=value["kind"], at=value["at"], details=value["details"])

    def canonical(self) -> bytes:
        """The leaf bytes: RFC 8785 canonical JSON of :meth:`to_json`."""
        return canonical_json(self.to_json())


@dataclass(frozen=True)
class AppendedEvent:
    """What :meth:`AuditLog.append` returns: everything a store must persist for the event."""

    index: int
    event: AuditEvent
    canonical: bytes
    leaf_hash: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head.

    Attributes:
        log_id: Which log (the coordinator's SPIFFE id).
        tree_size: Number of events covered.
        root_hash: Hex RFC 9162 root of the first ``tree_size`` events.
        timestamp: RFC 3339 UTC signing time.
        key_id: Hex sha256 of the signer's DER public key.
        signature: Base64 DER ECDSA-sha256 over :meth:`signed_bytes`.
    """

    log_id: str
    tree_size: int
    root_hash: str
    timestamp: str
    key_id: str
    signature: str

    def signed_bytes(self) -> bytes:
        """What the signature covers: canonical JSON of the head, typed to this use."""
        return canonical_json(
            {
                "type": CHECKPOINT_TYPE,
                "log_id": self.log_id,
                "tree_size": self.tree_size,
                "root_hash": self.root_hash,
                "timestamp": self.timestamp,
            }
        )

    def to_json(self) -> dict[str, Any]:
        """The checkpoint as a JSON object."""
        return {
            "log_id": self.log_id,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "timestamp": self.timestamp,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, value: Any) -> Checkpoint:
        """Parses :meth:`to_json`'s form (raises VerificationFailed naming what is wrong)."""
        try:
            checkpoint = cls(**value)
        except TypeError as error:
            raise VerificationFailed(f"checkpoint: malformed ({error})") from error
        if not isinstance(checkpoint.tree_size, int) or checkpoint.tree_size < 0:
            raise VerificationFailed(f"checkpoint: tree_size {checkpoint.tree_size!r}")
        _hex32(checkpoint.root_hash, "checkpoint root_hash")
        return checkpoint


@dataclass(frozen=True)
class Receipt:
    """Proof that an event is in the log: the event, its index, and a path to a checkpoint."""

    event: AuditEvent
    index: int
    inclusion_proof: tuple[str, ...]
    checkpoint: Checkpoint

    def to_json(self) -> dict[str, Any]:
        """The receipt as a JSON object (what CommitUpload returns)."""
        return {
            "event": self.event.to_json(),
            "index": self.index,
            "inclusion_proof": list(self.inclusion_proof),
            "checkpoint": self.checkpoint.to_json(),
        }

    @classmethod
    def from_json(cls, value: Any) -> Receipt:
        """Parses :meth:`to_json`'s form."""
        try:
            return cls(
                event=AuditEvent.from_json(value["event"]),
                index=int(value["index"]),
                inclusion_proof=tuple(value["inclusion_proof"]),
                checkpoint=Checkpoint.from_json(value["checkpoint"]),
            )
        except (KeyError, TypeError, ValueError, InvalidArgument) as error:
            raise VerificationFailed(f"receipt: malformed ({error})") from error


def _sign_head(
    log_id: str, tree_size: int, root: bytes, private_key: ec.EllipticCurvePrivateKey, at: str
) -> Checkpoint:
    unsigned = Checkpoint(
        log_id=log_id,
        tree_size=tree_size,
        root_hash=root.hex(),
        timestamp=at,
        key_id=public_key_id(private_key.public_key()),
        signature="",
    )
    signature = ecdsa_sign(private_key, unsigned.signed_bytes())
    return Checkpoint(**{**unsigned.to_json(), "signature": base64.b64encode(signature).decode()})


def verify_checkpoint(
    checkpoint: Checkpoint, public_key: ec.EllipticCurvePublicKey, log_id: str | None = None
) -> None:
    """Checks a checkpoint's signature (and log id, when given).

    Raises:
        VerificationFailed: Wrong key, bad signature, or another log.
    """
    if log_id is not None and checkpoint.log_id != log_id:
        raise VerificationFailed(
            f"checkpoint: log id check: expected {log_id}, got {checkpoint.log_id}"
        )
    key_id = public_key_id(public_key)
    if checkpoint.key_id != key_id:
        raise VerificationFailed(
            f"checkpoint at size {checkpoint.tree_size}: signed by keyid "
            f"{checkpoint.key_id[:16]}.., expected the coordinator key {key_id[:16]}.."
        )
    signature = _b64decode(checkpoint.signature, "checkpoint signature")
    if not ecdsa_verify(public_key, signature, checkpoint.signed_bytes()):
        raise VerificationFailed(
            f"checkpoint at size {checkpoint.tree_size}: signature check failed "
            f"(keyid {key_id[:16]}..)"
        )


def verify_receipt(receipt: Receipt, public_key: ec.EllipticCurvePublicKey) -> None:
    """Checks a receipt offline: the checkpoint's signature and the event's inclusion in it.

    Raises:
        VerificationFailed: Naming the check that failed.
    """
    verify_checkpoint(receipt.checkpoint, public_key)
    proof = [_hex32(h, "receipt inclusion proof") for h in receipt.inclusion_proof]
    root = _hex32(receipt.checkpoint.root_hash, "checkpoint root_hash")
    try:
        verify_inclusion(
            leaf_hash(receipt.event.canonical()),
            receipt.index,
            receipt.checkpoint.tree_size,
            proof,
            root,
        )
    except VerificationFailed as error:
        raise VerificationFailed(
            f"receipt for {receipt.event.kind} event {receipt.index}: {error}"
        ) from error


def verify_consistency_proof(
    old: Checkpoint,
    new: Checkpoint,
    proof: Sequence[str],
    public_key: ec.EllipticCurvePublicKey,
) -> None:
    """Checks that checkpoint ``new`` extends ``old``: both signed, same log, RFC 9162 proof.

    Raises:
        VerificationFailed: Naming the check that failed.
    """
    verify_checkpoint(old, public_key)
    verify_checkpoint(new, public_key, log_id=old.log_id)
    if new.tree_size < old.tree_size:
        raise VerificationFailed(
            f"consistency: the later checkpoint has {new.tree_size} events, fewer than the "
            f"earlier one's {old.tree_size}: the log was truncated"
        )
    verify_consistency(
        old.tree_size,
        new.tree_size,
        _hex32(old.root_hash, "old root_hash"),
        _hex32(new.root_hash, "new root_hash"),
        [_hex32(h, "consistency proof") for h in proof],
    )


def _check_tree(tree: MerkleTree, checkpoint: Checkpoint, where: str) -> None:
    """Checks that the leaves of ``tree`` give ``checkpoint``'s root at its size."""
    if checkpoint.tree_size > tree.size:
        raise VerificationFailed(
            f"{where}: checkpoint signed at size {checkpoint.tree_size}, but the log holds "
            f"{tree.size} events: the log is truncated (events {tree.size}.."
            f"{checkpoint.tree_size - 1} missing)"
        )
    actual = tree.root(checkpoint.tree_size).hex()
    if actual != checkpoint.root_hash:
        raise VerificationFailed(
            f"{where}: the first {checkpoint.tree_size} events hash to root {actual[:16]}.., "
            f"the checkpoint signed {checkpoint.root_hash[:16]}..: events were altered, "
            "removed or reordered"
        )


class AuditLog:
    """The coordinator's in-memory view of the log; a store persists what it returns."""

    def __init__(self, log_id: str, leaf_hashes: Iterable[bytes] = ()) -> None:
        """Restores a log from the leaf hashes a store kept (in index order)."""
        self.log_id = log_id
        self._tree = MerkleTree(leaf_hashes)

    @property
    def size(self) -> int:
        """Number of events."""
        return self._tree.size

    def root(self, size: int | None = None) -> bytes:
        """RFC 9162 root of the first ``size`` events (default all)."""
        return self._tree.root(size)

    def append(self, event: AuditEvent) -> AppendedEvent:
        """Adds ``event`` as the next leaf; persist the returned canonical bytes and hash."""
        canonical = event.canonical()
        digest = self._tree.append(canonical)
        return AppendedEvent(
            index=self._tree.size - 1, event=event, canonical=canonical, leaf_hash=digest
        )

    def checkpoint(
        self, private_key: ec.EllipticCurvePrivateKey, at: str | None = None
    ) -> Checkpoint:
        """Signs the current tree head."""
        return _sign_head(self.log_id, self.size, self.root(), private_key, at or _now())

    def check_checkpoint(self, checkpoint: Checkpoint, where: str = "audit log") -> None:
        """Checks a checkpoint against the leaves (e.g. one this log signed, after a restart);
        ``where`` starts the error message.

        Raises:
            VerificationFailed: The leaves no longer give the checkpoint's root.
        """
        _check_tree(self._tree, checkpoint, where)

    def receipt(self, event: AuditEvent, index: int, checkpoint: Checkpoint) -> Receipt:
        """A receipt for ``event`` at ``index`` under ``checkpoint`` (which must cover it)."""
        if self._tree.leaf_hash(index) != leaf_hash(event.canonical()):
            raise InvalidArgument(f"receipt: event index {index} holds another event")
        if index >= checkpoint.tree_size:
            raise InvalidArgument(
                f"receipt: checkpoint of size {checkpoint.tree_size} does not cover index {index}"
            )
        proof = self._tree.inclusion_proof(index, checkpoint.tree_size)
        return Receipt(
            event=event,
            index=index,
            inclusion_proof=tuple(h.hex() for h in proof),
            checkpoint=checkpoint,
        )

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[str]:
        """Hex RFC 9162 consistency proof from ``old_size`` to ``size`` (default current)."""
        return [h.hex() for h in self._tree.consistency_proof(old_size, size)]
