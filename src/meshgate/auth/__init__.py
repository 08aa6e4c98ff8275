"""Credential verification used by the auth filter: `jwt` (JWT verification,
JWKS fetch and refresh) and `jwtcache` (the tokens it verified)."""
