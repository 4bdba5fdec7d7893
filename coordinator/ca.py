"""The federation's certificate authority: a P-256 CA that issues site and server certificates.

Site certificates carry exactly one identity, the URI SAN ``spiffe://<federation>/site/<name>``,
taken from the invitation, never from the CSR's subject.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import InvalidArgument
from protocol.identity import (
    coordinator_dns_name,
    coordinator_spiffe_id,
    reader_spiffe_id,
    site_spiffe_id,
)
from protocol.x509 import load_certificate

CA_VALIDITY = dt.timedelta(days=3650)
# The default of callers that do not read the federation's lifetime (coordinator.certificates).
SITE_VALIDITY = dt.timedelta(days=30)
SERVER_VALIDITY = dt.timedelta(days=365)
SIGNING_VALIDITY = dt.timedelta(days=3650)
# Tolerates clocks a little behind the coordinator's.
CLOCK_SKEW = dt.timedelta(minutes=5)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only; the CA's key also signs certificates (and CRLs)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class CertificateAuthority:
    federation: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, federation: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Atoll federation"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(federation, key, cert)

    def _leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        validity: dt.timedelta,
    ) -> x509.Certificate:
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_site_certificate(
        self,
        site: str,
        csr_pem: bytes,
        role: str = "site",
        validity: dt.timedelta = SITE_VALIDITY,
    ) -> x509.Certificate:
        """Signs the CSR's P-256 key into a client certificate for ``site`` (with ``role``
        ``reader``: SAN ``spiffe://<federation>/reader/<name>``), valid for ``validity``."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as error:
            raise InvalidArgument(f"EnrollRequest.csr_pem: not a PEM CSR ({error})") from error
        if not csr.is_signature_valid:
            raise InvalidArgument("EnrollRequest.csr_pem: the CSR's self-signature is invalid")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise InvalidArgument("EnrollRequest.csr_pem: expected an EC P-256 public key")
        spiffe = (
            reader_spiffe_id(self.federation, site)
            if role == "reader"
            else site_spiffe_id(self.federation, site)
        )
        return self._leaf(
            public_key,
            site,
            [x509.UniformResourceIdentifier(spiffe)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            validity,
        )

    def issue_server_certificate(
        self, public_key: ec.EllipticCurvePublicKey, extra_dns: list[str]
    ) -> x509.Certificate:
        """The coordinator's serving certificate (DNS name sites dial as TLS target)."""
        names: list[x509.GeneralName] = [
            x509.DNSName(coordinator_dns_name(self.federation)),
            x509.UniformResourceIdentifier(coordinator_spiffe_id(self.federation)),
        ]
        names += [x509.DNSName(name) for name in extra_dns]
        return self._leaf(
            public_key,
            coordinator_dns_name(self.federation),
            names,
            ExtendedKeyUsageOID.SERVER_AUTH,
            SERVER_VALIDITY,
        )

    def issue_signing_certificate(self, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        """The coordinator's code-signing certificate (SAN ``spiffe://<federation>/coordinator``)
        for its signing key: what signs a published ensemble's ``model.sig``."""
        return self._leaf(
            public_key,
            f"{self.federation} coordinator signing",
            [x509.UniformResourceIdentifier(coordinator_spiffe_id(self.federation))],
            ExtendedKeyUsageOID.CODE_SIGNING,
            SIGNING_VALIDITY,
        )


def load_ca(
    federation: str, key: ec.EllipticCurvePrivateKey, cert_pem: bytes
) -> CertificateAuthority:
    return CertificateAuthority(federation, key, load_certificate(cert_pem, "federation CA"))
