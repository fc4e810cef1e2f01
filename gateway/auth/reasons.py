"""Why a caller was not authenticated: one fixed vocabulary of terms, spelt the same in the operational log, the
audit record, the metrics' labels, the status message the caller gets and its ``www-authenticate`` trailer.

A refusal's reason is a term, or a term, ``": "`` and a detail for the operator (``malformed claim: sub``). The
caller learns the term and what to do about it, never the detail: RFC 6750 3.1 lets a resource server tell a token
holder ``invalid_token`` and why, and nothing here is more than the holder sent (its token, its certificate). No
imports: the SDK, an SDK-only install and the REST binding read the same table.
"""

# ruff: noqa: S105 - the names say "token", the values are reasons, not secrets

from __future__ import annotations

from dataclasses import dataclass

# RFC 6750 3.1 error codes: a request the server cannot read a token from, or a token it does not accept.
INVALID_REQUEST = "invalid_request"
INVALID_TOKEN = "invalid_token"


@dataclass(frozen=True, slots=True)
class Term:
    """One refusal reason as the caller sees it: the term, the RFC 6750 error (None: the certificate, not the
    token, was refused), and what the caller can do."""

    term: str
    error: str | None
    hint: str


_NEW_TOKEN = "get a new token (gateway token issue, or your identity provider)"

# The authorization header.
NO_TOKEN = "missing token"
SEVERAL_HEADERS = "several authorization headers"
HEADER_TOO_LARGE = "authorization header too large"
NOT_BEARER = "authorization scheme is not Bearer"
MALFORMED_HEADER = "malformed authorization header"
# The token.
MALFORMED_TOKEN = "malformed token"
TOKEN_TOO_LARGE = "token too large"
ALGORITHM_NOT_ALLOWED = "algorithm not allowed"
UNSUPPORTED_HEADER = "unsupported token header"
NO_KEY_ID = "missing key id"
UNKNOWN_KEY_ID = "unknown key id"
BAD_SIGNATURE = "bad signature"
UNUSABLE_KEY = "unusable key"
EXPIRED = "token expired"
NOT_YET_VALID = "token not yet valid"
LIFETIME_TOO_LONG = "token lifetime over the maximum"
WRONG_ISSUER = "wrong issuer"
WRONG_AUDIENCE = "wrong audience"
MISSING_CLAIM = "missing claim"
MALFORMED_CLAIM = "malformed claim"
BOUND_TO_ANOTHER_CERTIFICATE = "token bound to another certificate"
UNSUPPORTED_CONFIRMATION = "unsupported confirmation method"
INVALID = "invalid token"
# The client certificate, re-checked on every call (the handshake refuses the rest before any call).
NO_CERTIFICATE = "no client certificate"
CERTIFICATE_EXPIRED = "client certificate expired"
CERTIFICATE_NOT_YET_VALID = "client certificate not yet valid"
CERTIFICATE_REVOKED = "client certificate revoked"
CA_REVOKED = "intermediate CA certificate revoked"
NO_CRL = "no CRL for the certificate chain"
CERTIFICATE_UNFIT = "client certificate unfit"
NO_IDENTITY = "client certificate has no usable identity"

TERMS: dict[str, Term] = {
    term.term: term
    for term in (
        Term(NO_TOKEN, INVALID_REQUEST, "send the header 'authorization: Bearer <token>'"),
        Term(SEVERAL_HEADERS, INVALID_REQUEST, "send exactly one authorization header"),
        Term(HEADER_TOO_LARGE, INVALID_REQUEST, "a token is at most 8192 bytes"),
        Term(NOT_BEARER, INVALID_REQUEST, "send 'authorization: Bearer <token>'"),
        Term(
            MALFORMED_HEADER,
            INVALID_REQUEST,
            "send 'Bearer', one space and the token, nothing after it (strip the newline of a token file)",
        ),
        Term(MALFORMED_TOKEN, INVALID_TOKEN, "send a signed JWT in compact form (header.claims.signature)"),
        Term(TOKEN_TOO_LARGE, INVALID_TOKEN, "a token is at most 8192 bytes"),
        Term(ALGORITHM_NOT_ALLOWED, INVALID_TOKEN, "sign with an algorithm the gateway accepts (auth.algorithms)"),
        Term(UNSUPPORTED_HEADER, INVALID_TOKEN, "leave out crit, and set typ to JWT or at+jwt, or leave it out"),
        Term(NO_KEY_ID, INVALID_TOKEN, "the token's header needs the kid of a key the gateway trusts"),
        Term(UNKNOWN_KEY_ID, INVALID_TOKEN, "sign with a key in the gateway's key set (auth.jwks, auth.jwks_url)"),
        Term(BAD_SIGNATURE, INVALID_TOKEN, "the token was altered, or signed by another key than its kid names"),
        Term(UNUSABLE_KEY, INVALID_TOKEN, "the gateway's key for this kid cannot verify it: tell its operator"),
        Term(EXPIRED, INVALID_TOKEN, _NEW_TOKEN),
        Term(NOT_YET_VALID, INVALID_TOKEN, "its nbf or iat is in the future: check the clocks"),
        Term(LIFETIME_TOO_LONG, INVALID_TOKEN, "ask for a shorter-lived token (auth.max_token_lifetime_s)"),
        Term(WRONG_ISSUER, INVALID_TOKEN, "its iss is not the issuer the gateway trusts (auth.issuer)"),
        Term(WRONG_AUDIENCE, INVALID_TOKEN, "its aud does not name this gateway (auth.audience)"),
        Term(MISSING_CLAIM, INVALID_TOKEN, "the token lacks a claim the gateway requires (auth.required_claims)"),
        Term(MALFORMED_CLAIM, INVALID_TOKEN, "a claim has the wrong type or shape"),
        Term(
            BOUND_TO_ANOTHER_CERTIFICATE,
            INVALID_TOKEN,
            "call with the certificate the token was issued for, or get a token bound to this one",
        ),
        Term(UNSUPPORTED_CONFIRMATION, INVALID_TOKEN, "bind the token with cnf x5t#S256 (RFC 8705), or not at all"),
        Term(INVALID, INVALID_TOKEN, _NEW_TOKEN),
        Term(NO_CERTIFICATE, None, "connect with a client certificate"),
        Term(CERTIFICATE_EXPIRED, None, "renew the client certificate"),
        Term(CERTIFICATE_NOT_YET_VALID, None, "its notBefore is in the future: check the clocks"),
        Term(CERTIFICATE_REVOKED, None, "get a new client certificate"),
        Term(CA_REVOKED, None, "get a certificate from a CA that is not revoked"),
        Term(NO_CRL, None, "the gateway has no revocation list for its issuer: tell its operator (tls.crl)"),
        Term(CERTIFICATE_UNFIT, None, "use a certificate made for TLS clients (gen_certs.sh --client NAME)"),
        Term(NO_IDENTITY, None, "one SPIFFE URI, one DNS name or one CN identifies a client"),
    )
}


def detailed(term: str, detail: str) -> str:
    """A reason for the operator: the term, then what exactly (a claim's name, an algorithm)."""
    return f"{term}: {detail}"


def term_of(reason: str) -> str:
    """The term a reason begins with; INVALID for anything outside the vocabulary."""
    term = reason.partition(": ")[0]
    return term if term in TERMS else INVALID


def client_message(reason: str) -> str:
    """What the caller is told: the term and what to do, never the detail."""
    term = TERMS[term_of(reason)]
    return f"{term.term}: {term.hint}"


def www_authenticate(reason: str, *, realm: str = "gateway") -> str | None:
    """The RFC 6750 3 challenge for a refused token; None when the certificate was refused."""
    term = TERMS[term_of(reason)]
    if term.error is None:
        return None
    return f'Bearer realm="{realm}", error="{term.error}", error_description="{term.term}"'


def reason_of_message(message: str) -> str | None:
    """The term a status message from the gateway begins with (the SDK's reading), or None."""
    term = message.partition(": ")[0]
    return term if term in TERMS else None
