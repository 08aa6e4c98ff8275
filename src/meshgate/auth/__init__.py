"""Credential verification used by the auth filter (see `meshgate.auth.jwt`)."""
