"""The peer's identity, read once per connection from its TLS session."""

from __future__ import annotations

import asyncio

__all__ = ["peer_spiffe_id"]


def peer_spiffe_id(transport: asyncio.BaseTransport) -> str | None:
    """The SPIFFE ID of the certificate the handshake verified: its one URI
    SAN, or None (no TLS, no certificate, or not exactly one spiffe:// URI)."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    cert = sslobj.getpeercert()
    if not cert:
        return None
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1 or not str(uris[0]).startswith("spiffe://"):
        return None
    return str(uris[0])
