"""Invitations (one-time, expiring tokens) and enrolment (token + CSR -> site certificate)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from cryptography.hazmat.primitives import serialization

from coordinator import audit, certificates
from coordinator.ca import CertificateAuthority
from coordinator.store import SiteRecord, Store, TokenRecord
from protocol.errors import InvalidArgument, PermissionDenied, Unauthenticated
from protocol.identity import (
    EnrolmentToken,
    check_name,
    parse_credential,
    reader_record_name,
    reader_spiffe_id,
    site_spiffe_id,
)
from protocol.messages import Enrolment
from protocol.x509 import certificate_sha256, serial_hex

ROLES = ("site", "reader")


def _secret_digest(secret: str) -> str:
    # Only a digest is stored: a copy of the database does not let anyone enrol.
    return hashlib.sha256(secret.encode()).hexdigest()


def invite(
    store: Store,
    ca: CertificateAuthority,
    site: str,
    ttl_seconds: float,
    role: str = "site",
    now: float | None = None,
) -> EnrolmentToken:
    """Creates a one-time token for ``site`` that expires after ``ttl_seconds``."""
    check_name(site, "site name")
    if role not in ROLES:
        raise InvalidArgument(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if ttl_seconds <= 0:
        raise InvalidArgument(f"--ttl {ttl_seconds}s: expected a positive duration")
    existing = store.get_site(reader_record_name(site) if role == "reader" else site)
    if existing is not None and existing.revoked_at is not None:
        raise PermissionDenied(f"{role} {site!r} is revoked; it cannot be invited again")
    created = time.time() if now is None else now
    token = EnrolmentToken(
        site=site,
        token_id=secrets.token_hex(6),
        secret=secrets.token_urlsafe(24),
        ca_sha256=certificate_sha256(ca.cert),
    )
    store.add_token(
        TokenRecord(
            token_id=token.token_id,
            site=site,
            secret_sha256=_secret_digest(token.secret),
            role=role,
            created_at=created,
            expires_at=created + ttl_seconds,
        ),
        audit=audit.invited_event,
    )
    return token


def enroll(
    store: Store,
    ca: CertificateAuthority,
    credential: str,
    site_name: str,
    csr_pem: bytes,
    now: float | None = None,
) -> Enrolment:
    """Checks the token and signs the CSR; the token is consumed only on success."""
    now = time.time() if now is None else now
    token_id, secret = parse_credential(credential)
    record = store.get_token(token_id)
    # The same answer for a wrong secret as for an unknown id: no oracle for token ids.
    if record is None or not hmac.compare_digest(record.secret_sha256, _secret_digest(secret)):
        raise Unauthenticated(f"unknown enrolment token {token_id}")
    if record.used_at is not None:
        raise Unauthenticated(
            f"enrolment token {token_id} was already used at {time.ctime(record.used_at)}; "
            "ask the coordinator operator for a new invitation"
        )
    if now > record.expires_at:
        raise Unauthenticated(
            f"enrolment token {token_id} expired at {time.ctime(record.expires_at)}; "
            "ask the coordinator operator for a new invitation"
        )
    if record.role not in ROLES:
        raise PermissionDenied(f"token {token_id} has unknown role {record.role!r}")
    if site_name != record.site:
        raise PermissionDenied(
            f"token {token_id} was issued for {record.role} {record.site!r}, not {site_name!r}"
        )
    # Readers are kept beside sites under a name no site can have (see reader_record_name).
    reader = record.role == "reader"
    stored_name = reader_record_name(site_name) if reader else site_name
    existing = store.get_site(stored_name)
    if existing is not None and existing.revoked_at is not None:
        raise PermissionDenied(f"{record.role} {site_name!r} is revoked")
    cert = ca.issue_site_certificate(
        site_name, csr_pem, role=record.role, validity=certificates.lifetime(store)
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    spiffe = (
        reader_spiffe_id(ca.federation, site_name)
        if reader
        else site_spiffe_id(ca.federation, site_name)
    )
    store.enroll_site(
        token_id,
        SiteRecord(
            name=stored_name,
            spiffe_id=spiffe,
            cert_serial=serial_hex(cert),
            cert_pem=cert_pem.decode(),
            enrolled_at=now,
        ),
        now,
        audit=audit.enrolled_event,
    )
    return Enrolment(
        certificate_pem=cert_pem,
        ca_certificate_pem=ca.cert.public_bytes(serialization.Encoding.PEM),
        federation=ca.federation,
        spiffe_id=spiffe,
    )
