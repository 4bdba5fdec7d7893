"""Certificate lifetimes and renewal.

Site and reader certificates live ``lifetime_days`` (recorded in the federation's store by
`coordinator init --cert-days`, default 30): a stolen certificate stops working by itself, and
a site that is gone stops being trusted without anyone remembering to revoke it. An agent
renews over mutual TLS (the RenewCertificate RPC) when a third of its lifetime is left; the
renewal keeps the site's key, so an expert signed before the renewal still verifies against
the site's certificate, and it is recorded in the audit log (``renewed``). A revoked site
cannot renew, and an expired certificate cannot even connect: that site needs a new invitation.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.audit import site_details
from coordinator.ca import CertificateAuthority
from coordinator.store import SiteRecord, Store
from protocol.audit_log import AuditEvent
from protocol.errors import InvalidArgument, PermissionDenied
from protocol.x509 import load_certificate, serial_hex

DEFAULT_LIFETIME_DAYS = 30
LIFETIME_META = "certificate_lifetime_days"

__all__ = [
    "DEFAULT_LIFETIME_DAYS",
    "expires_at",
    "file_expires_at",
    "lifetime",
    "lifetime_days",
    "renew",
    "renewed_event",
    "set_lifetime_days",
]


def set_lifetime_days(store: Store, days: int) -> None:
    if not 1 <= days <= 3650:
        raise InvalidArgument(f"--cert-days {days}: expected 1 to 3650 days")
    store.set_meta(LIFETIME_META, str(days))


def lifetime_days(store: Store) -> int:
    """The federation's site and reader certificate lifetime, in days."""
    return int(store.get_meta(LIFETIME_META) or DEFAULT_LIFETIME_DAYS)


def lifetime(store: Store) -> dt.timedelta:
    return dt.timedelta(days=lifetime_days(store))


def expires_at(cert_pem: str | bytes) -> float:
    """The certificate's notAfter, POSIX seconds."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return load_certificate(data, "certificate").not_valid_after_utc.timestamp()


def file_expires_at(path: Path) -> float | None:
    """The notAfter of the PEM certificate at ``path``, or None when there is none yet."""
    return expires_at(path.read_bytes()) if path.exists() else None


def renewed_event(site: SiteRecord) -> AuditEvent:
    return AuditEvent.new(
        "renewed",
        {**site_details(site), "expires_at": expires_at(site.cert_pem)},
    )


def renew(
    store: Store,
    ca: CertificateAuthority,
    caller: SiteRecord,
    role: str,
    csr_pem: bytes,
) -> SiteRecord:
    """Issues ``caller`` (the site or reader whose current certificate made the call) a new
    certificate for the same key and identity, and records it (audit event ``renewed``)."""
    if caller.revoked_at is not None:
        raise PermissionDenied(f"{caller.name!r} is revoked; its certificate cannot be renewed")
    current = load_certificate(caller.cert_pem.encode(), "current certificate")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as error:
        raise InvalidArgument(
            f"RenewCertificateRequest.csr_pem: not a PEM CSR ({error})"
        ) from error
    if _spki(csr.public_key()) != _spki(current.public_key()):
        raise InvalidArgument(
            "RenewCertificateRequest.csr_pem: the CSR's key is not the key of the current "
            "certificate (renewal keeps the site's key; a new key needs a new invitation)"
        )
    name = caller.spiffe_id.rsplit("/", 1)[-1]  # readers are stored under reader/<name>
    cert = ca.issue_site_certificate(name, csr_pem, role=role, validity=lifetime(store))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return store.renew_certificate(
        caller.name,
        caller.cert_serial,
        SiteRecord(
            name=caller.name,
            spiffe_id=caller.spiffe_id,
            cert_serial=serial_hex(cert),
            cert_pem=pem,
            enrolled_at=caller.enrolled_at,
        ),
        audit=renewed_event,
    )


def seconds_left(cert_pem: bytes, now: float | None = None) -> float:
    return expires_at(cert_pem) - (time.time() if now is None else now)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
