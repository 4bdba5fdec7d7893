"""Canonical JSON (RFC 8785): the byte form that Atoll hashes and signs."""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 (JCS) serialisation of ``value``: sorted keys, no spaces, UTF-8."""
    return rfc8785.dumps(value)


def canonical_digest(value: Any) -> str:
    """Hex sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
