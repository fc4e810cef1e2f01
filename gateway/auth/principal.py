"""The authenticated caller: the client certificate's identity joined with the verified token's claims."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Hashable, so that policy decisions can be cached per principal."""

    cert_identity: str
    cert_sha256: str  # hex SHA-256 of the leaf certificate's DER
    subject: str
    issuer: str
    token_id: str | None = None  # jti
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    token_bound: bool = False  # token carried cnf["x5t#S256"] equal to this connection's certificate (RFC 8705)
