"""The authenticated caller: the client certificate's identity joined with the verified token's claims."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The verifier's own claim readers (private to tokens.py for now), so that `gateway policy check` and the server
# cannot disagree on a claim's shape.
from gateway.auth.tokens import _scope_values, _string_list


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


def principal_claims(
    claims: Mapping[str, Any], *, groups_claim: str = "groups", scopes_claim: str = "scope"
) -> tuple[frozenset[str], frozenset[str]]:
    """The groups and scopes in a token's claims, read as TokenVerifier reads them; AuthenticationError if malformed.

    The scopes come from ``scopes_claim``, else ``scope``, else ``scp``: the first one present.
    """
    groups = _string_list(claims.get(groups_claim), groups_claim)
    names = (scopes_claim, *(name for name in ("scope", "scp") if name != scopes_claim))
    scope_claim = next((name for name in names if name in claims), scopes_claim)
    return groups, _scope_values(claims.get(scope_claim), scope_claim)
