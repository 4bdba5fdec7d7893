"""Renewing the site's certificate before it expires (the RenewCertificate RPC).

The agent checks at every heartbeat; once less than a third of the certificate's lifetime is
left it sends a CSR over the same key (the key never changes, so an expert signed before the
renewal still verifies), checks the answer (issued by the pinned CA, same key, same SPIFFE
id) and replaces ``tls/site.pem`` atomically. Calls made with the old certificate are refused
from then on, so the caller switches to a new channel at once.
"""

from __future__ import annotations

import logging
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from protocol.client import FederationClient
from protocol.errors import VerificationFailed
from protocol.x509 import load_certificate, load_private_key, signed_by, uri_sans, write_public
from site_agent.workdir import Workdir

log = logging.getLogger("atoll.site")
# Renew once less than this share of the certificate's lifetime is left.
RENEW_WHEN_LEFT = 1 / 3


def due(cert_pem: bytes, now: float | None = None, share: float | None = None) -> bool:
    """True once less than ``share`` (default :data:`RENEW_WHEN_LEFT`) of the lifetime is left."""
    share = RENEW_WHEN_LEFT if share is None else share
    cert = load_certificate(cert_pem, "site certificate")
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    left = end - (time.time() if now is None else now)
    return left < (end - start) * share


def renew(workdir: Workdir, client: FederationClient) -> bytes:
    """Renews the workdir's certificate through ``client``; returns the new one (PEM)."""
    key = load_private_key(workdir.key)
    current = load_certificate(workdir.cert.read_bytes(), str(workdir.cert))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            current.subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site")])
        )
        .sign(key, hashes.SHA256())
    )
    pem = client.renew_certificate(csr.public_bytes(serialization.Encoding.PEM))
    cert = load_certificate(pem, "renewed certificate")
    ca = load_certificate(workdir.ca.read_bytes(), str(workdir.ca))
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if not signed_by(cert, ca):
        raise VerificationFailed(
            "RenewCertificate answered a certificate the pinned CA did not sign"
        )
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise VerificationFailed("RenewCertificate answered a certificate for another key")
    if uri_sans(cert) != uri_sans(current):
        raise VerificationFailed(
            f"RenewCertificate answered identity {uri_sans(cert)}, expected {uri_sans(current)}"
        )
    write_public(workdir.cert, pem)
    log.info(
        "[site] certificate renewed: serial %x, expires %s",
        cert.serial_number,
        cert.not_valid_after_utc.isoformat(),
    )
    return pem
