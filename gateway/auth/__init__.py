"""Authentication: who is calling (client certificate + JWT), independent of the transport."""

# The issuer and audience `gateway token issue` writes and `gateway serve` accepts by default, so a token from one
# works with the other out of the box. Here, free of imports, because the CLI's parser needs them in any install.
DEFAULT_ISSUER = "https://gateway.local"
DEFAULT_AUDIENCE = "gateway"
