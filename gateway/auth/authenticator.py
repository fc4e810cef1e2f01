"""Authentication without grpc: the peer's certificate and the ``authorization`` values in, a Principal out.

The certificate is checked before the token: a token is only worth verifying on a connection whose certificate
is still acceptable, and binding (RFC 8705) compares the token with that very certificate.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.auth import reasons
from gateway.auth.certs import CrlSet, CrlStore, PeerCertificate, check_validity, inspect_peer
from gateway.auth.principal import Principal
from gateway.auth.verifier import MAX_TOKEN_BYTES, TokenVerifier
from gateway.errors import AuthenticationError

# RFC 6750 2.1: credentials = "Bearer" 1*SP b64token. The gateway takes exactly one space and nothing after the
# token, the one spelling clients send: anything else is refused, never repaired.
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# Callers authenticated lately, by (certificate's SHA-256, digest of the authorization header): in practice one per
# connection and token. Cleared when full; an entry holds a Principal and a few numbers.
_ADMITTED_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A caller authenticated once, and what its verdict depended on that can change without the bytes changing."""

    principal: Principal
    not_before: float  # the certificate's validity, as Unix time
    not_after: float
    expires_at: float  # the token's exp
    crl: CrlSet | None  # the revocation lists it was checked against
    keys_version: int  # the key set its signature was checked against


def bearer_token(values: Sequence[str]) -> str:
    """The token from exactly one ``authorization: Bearer <jwt>`` header (RFC 6750 section 2.1)."""
    if not values:
        raise AuthenticationError(reason=reasons.NO_TOKEN)
    if len(values) > 1:
        raise AuthenticationError(reason=reasons.SEVERAL_HEADERS)
    value = values[0]
    if len(value) > MAX_TOKEN_BYTES:
        raise AuthenticationError(reason=reasons.HEADER_TOO_LARGE)
    scheme, _, token = value.partition(" ")
    # RFC 9110 11.1: the scheme is a case-insensitive token.
    if scheme.lower() != "bearer":
        raise AuthenticationError(reason=reasons.NOT_BEARER)
    if not _B64TOKEN.fullmatch(token):
        raise AuthenticationError(reason=reasons.MALFORMED_HEADER)
    return token


class Authenticator:
    """Proves who is calling twice: the client certificate (re-checked per call) and a Bearer JWT bound to it."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        crl: CrlStore | None,
        require_certificate: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._crl = crl
        self._require_certificate = require_certificate
        self._clock = clock
        self._admitted: dict[tuple[str, bytes], _Admitted] = {}

    def refresh_keys(self) -> Future[None] | None:
        """After an UnknownKidError, the key refresh to wait for before authenticating once more (or None)."""
        return self._verifier.refresh_keys()

    @staticmethod
    def inspect(peer_pem: bytes | None) -> PeerCertificate | None:
        """The client certificate's identity and thumbprints (None without one); AuthenticationError if unfit."""
        return inspect_peer(peer_pem) if peer_pem else None

    def authenticate(self, peer: PeerCertificate | None, authorization: Sequence[str]) -> Principal:
        """The caller, or AuthenticationError.

        Answered from the verdict of an earlier call with the same certificate and the same authorization header
        while nothing it rests on has changed: the certificate's validity and the token's exp (against the clock),
        the revocation lists (by identity: a reload swaps the set whole) and the key set (by version). Everything else
        the checks read is in the bytes compared, so the certificate and token checks run once per connection and
        token instead of once per call. Refusals are never remembered."""
        if peer is None or len(authorization) != 1:
            return self._authenticate(peer, authorization)[0]
        remembered = self.remembered(peer, authorization)
        if remembered is not None:
            return remembered
        key = _verdict_key(peer, authorization[0])
        # Read before the checks, so that an entry never claims a newer list or key set than it was checked with.
        crl = self._crl.current if self._crl is not None else None
        keys_version = self._verifier.keys_version
        principal, expires_at = self._authenticate(peer, authorization)
        if len(self._admitted) >= _ADMITTED_SIZE:
            self._admitted.clear()
        self._admitted[key] = _Admitted(
            principal=principal,
            not_before=peer.not_before.timestamp(),
            not_after=peer.not_after.timestamp(),
            expires_at=expires_at,
            crl=crl,
            keys_version=keys_version,
        )
        return principal

    def remembered(self, peer: PeerCertificate | None, authorization: Sequence[str]) -> Principal | None:
        """The principal of an earlier call's verdict for this certificate and header that still holds, or None:
        a dictionary lookup and four comparisons, no verification."""
        if peer is None or len(authorization) != 1:
            return None
        admitted = self._admitted.get(_verdict_key(peer, authorization[0]))
        now = self._clock()
        if (
            admitted is not None
            and admitted.not_before <= now <= admitted.not_after
            and now < admitted.expires_at
            and (self._crl is None or self._crl.current is admitted.crl)
            and self._verifier.keys_version == admitted.keys_version
        ):
            return admitted.principal
        return None

    def _authenticate(self, peer: PeerCertificate | None, authorization: Sequence[str]) -> tuple[Principal, float]:
        """The caller and its token's exp, or AuthenticationError: every check, in order."""
        if peer is not None:
            # Connections outlive certificates (RFC 5280 validity is checked at the handshake only): re-check.
            check_validity(peer, datetime.fromtimestamp(self._clock(), UTC))
            if self._crl is not None:
                self._crl.check(peer)
        elif self._require_certificate:
            raise AuthenticationError(reason=reasons.NO_CERTIFICATE)
        token = self._verifier.verify(bearer_token(authorization), cert_x5t=peer.x5t_s256 if peer else None)
        principal = Principal(
            cert_identity=peer.identity if peer else "",
            cert_sha256=peer.sha256_hex if peer else "",
            subject=token.subject,
            issuer=token.issuer,
            token_id=token.token_id,
            groups=token.groups,
            scopes=token.scopes,
            token_bound=token.bound,
        )
        return principal, token.expires_at


def _verdict_key(peer: PeerCertificate, authorization: str) -> tuple[str, bytes]:
    # A digest, not the header: the token itself is never kept (as in the verifier's cache).
    return peer.sha256_hex, hashlib.sha256(authorization.encode()).digest()
