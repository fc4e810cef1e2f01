"""The authenticated caller: the client certificate's identity joined with the verified token's claims."""

from __future__ import annotations

from dataclasses import dataclass

# A certificate identity is spelled with its type, so that no name can pass for one of another kind (a subject CN
# reading "spiffe://..." must never match a rule for that URI SAN): the SPIFFE URI SAN as itself, a DNS SAN as
# "dns:NAME", the subject CN as "cn:NAME". The three prefixes never overlap.
URI_IDENTITY_PREFIX = "spiffe://"
DNS_IDENTITY_PREFIX = "dns:"
CN_IDENTITY_PREFIX = "cn:"
_IDENTITY_PREFIXES = (URI_IDENTITY_PREFIX, DNS_IDENTITY_PREFIX, CN_IDENTITY_PREFIX)


def identity_spelling_problem(text: str) -> str | None:
    """Why ``text``, a certificate identity or a policy pattern for one, is not spelled with its type; else None."""
    prefix = next((prefix for prefix in _IDENTITY_PREFIXES if text.startswith(prefix)), None)
    if prefix is None:
        return "must start with spiffe:// (the URI SAN), dns: (a DNS SAN) or cn: (the subject CN)"
    if text == prefix:
        return f"names nothing after {prefix!r}"
    if prefix == DNS_IDENTITY_PREFIX and text != text.lower():
        return "a DNS name is compared in lowercase (RFC 4343)"
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Hashable, so that policy decisions can be cached per principal."""

    cert_identity: str  # spelled with its type (see above); empty without a client certificate
    cert_sha256: str  # hex SHA-256 of the leaf certificate's DER
    subject: str
    issuer: str
    token_id: str | None = None  # jti
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    token_bound: bool = False  # token carried cnf["x5t#S256"] equal to this connection's certificate (RFC 8705)
