"""Names, SPIFFE identities and enrolment tokens.

A site's identity is the URI SAN of its certificate, ``spiffe://<federation>/site/<name>``; the
coordinator's server certificate carries ``spiffe://<federation>/coordinator`` and the DNS name
``coordinator.<federation>.atoll``, which sites use as the TLS target name whatever address
they dial (the CA pin, not DNS, is what authenticates the coordinator).

An enrolment token is one line a coordinator operator hands to a site:
``atoll1.<site>.<token id>.<secret>.<ca sha256>``. The last field pins the federation CA on
first contact, as ``kubeadm join --discovery-token-ca-cert-hash`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.digests import check_sha256_hex
from protocol.errors import InvalidArgument

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{12}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{32}$")
TOKEN_PREFIX = "atoll1"


def check_name(value: str, what: str) -> str:
    """A federation or site name: a DNS label (lowercase letters, digits, inner hyphens)."""
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{what} {value!r}: expected 1-63 lowercase letters, digits or inner hyphens"
        )
    return value


def site_spiffe_id(federation: str, site: str) -> str:
    return f"spiffe://{federation}/site/{site}"


def reader_spiffe_id(federation: str, reader: str) -> str:
    """A reader's identity: it may fetch the published ensemble, nothing else."""
    return f"spiffe://{federation}/reader/{reader}"


def reader_record_name(reader: str) -> str:
    """The store keeps readers beside sites under this name (``/`` never occurs in a site's
    name, so the two cannot collide)."""
    return f"reader/{reader}"


def parse_spiffe_id(uri: str, federation: str) -> tuple[str, str]:
    """``(role, name)`` of a site or reader id of ``federation`` (role ``site``/``reader``)."""
    for role in ("site", "reader"):
        prefix = f"spiffe://{federation}/{role}/"
        if uri.startswith(prefix):
            return role, check_name(uri[len(prefix) :], f"{role} name in certificate")
    raise InvalidArgument(f"identity {uri!r} is not a site or reader of federation {federation!r}")


def coordinator_spiffe_id(federation: str) -> str:
    return f"spiffe://{federation}/coordinator"


def coordinator_dns_name(federation: str) -> str:
    return f"coordinator.{federation}.atoll"


def parse_site_spiffe_id(uri: str, federation: str) -> str:
    """The site name in ``uri``, which must be a site id of ``federation``."""
    prefix = f"spiffe://{federation}/site/"
    if not uri.startswith(prefix):
        raise InvalidArgument(f"identity {uri!r} is not a site of federation {federation!r}")
    return check_name(uri[len(prefix) :], "site name in certificate")


@dataclass(frozen=True)
class EnrolmentToken:
    site: str
    token_id: str
    secret: str
    ca_sha256: str

    def __str__(self) -> str:
        return ".".join((TOKEN_PREFIX, self.site, self.token_id, self.secret, self.ca_sha256))

    @property
    def credential(self) -> str:
        """What travels in EnrollRequest.token (the CA pin stays on the site)."""
        return f"{self.token_id}.{self.secret}"

    @classmethod
    def parse(cls, text: str) -> EnrolmentToken:
        fields = text.strip().split(".")
        if len(fields) != 5 or fields[0] != TOKEN_PREFIX:
            raise InvalidArgument(
                "malformed enrolment token: expected "
                f"'{TOKEN_PREFIX}.<site>.<token id>.<secret>.<ca sha256>' "
                f"(5 dot-separated fields), got {len(fields)} field(s)"
            )
        _, site, token_id, secret, ca_sha256 = fields
        check_name(site, "site name in token")
        if not _TOKEN_ID.match(token_id):
            raise InvalidArgument(f"malformed enrolment token: token id {token_id!r} is not 12 hex")
        if not _SECRET.match(secret):
            raise InvalidArgument("malformed enrolment token: the secret is not 32 url-safe chars")
        check_sha256_hex(ca_sha256, "CA pin in enrolment token")
        return cls(site, token_id, secret, ca_sha256)


def parse_credential(credential: str) -> tuple[str, str]:
    """Splits EnrollRequest.token into (token id, secret), validating both."""
    token_id, _, secret = credential.partition(".")
    if not _TOKEN_ID.match(token_id) or not _SECRET.match(secret):
        raise InvalidArgument("malformed enrolment credential: expected '<12 hex>.<32 chars>'")
    return token_id, secret
