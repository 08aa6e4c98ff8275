"""Credential verification used by the auth filter: `jwt` (JWT verification),
`jwtkeys` (its keys and their algorithms), `jwks` (the JWKS key set, its fetch
and refresh) and `jwtcache` (the tokens it verified)."""
