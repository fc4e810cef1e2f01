"""Authentication: who is calling (client certificate + JWT), independent of the transport."""

# The issuer and audience `gateway token issue` writes and `gateway serve` accepts by default, so a token from one
# works with the other out of the box. Here, free of imports, because the CLI's parser needs them in any install.
DEFAULT_ISSUER = "https://gateway.local"
DEFAULT_AUDIENCE = "gateway"

# Algorithms, here rather than in keys.py for the same reason: settings validation (config.py) names them.
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
# RFC 7518 3.2: an HMAC key at least as long as the hash output.
HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_ALGORITHMS = frozenset(HMAC_KEY_BYTES)
# Algorithm families by key type: the only algorithms a key of that type may ever verify (RFC 7518 3.1).
ALGORITHM_FAMILIES: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}
SUPPORTED_ALGORITHMS = frozenset(alg for family in ALGORITHM_FAMILIES.values() for alg in family) | HMAC_ALGORITHMS
MAX_TOKEN_BYTES = 8192


def https_url_problem(url: str) -> str | None:
    """Why ``url`` is no place to fetch keys from (None: an absolute https URL with a host, no user info or
    fragment). Keys fetched over plain HTTP could be swapped by anyone on the path, and with them every token."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return "not a URL"
    if parts.scheme != "https":
        return "must be an https:// URL"
    if not parts.hostname or parts.username is not None or parts.fragment:
        return "must be https://HOST[:PORT]/PATH, without user info or fragment"
    return None
