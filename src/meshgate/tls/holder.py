"""The TLS contexts of a proxy's mesh identity, replaced when it renews.

A listener is created once with `server` (whose `sni_callback` switches each
new handshake to the current context), and the upstream pool asks for
`client` at each new connection: a renewal, or a new trust bundle, reaches
new connections at once, and connections already open keep the session they
have (a rotation drops nothing).
"""

from __future__ import annotations

import ssl

from cryptography import x509

from meshgate.tls.context import client_context, server_context

__all__ = ["IdentityContexts"]


class IdentityContexts:
    """The current server and client contexts of one identity."""

    __slots__ = (
        "_client",
        "_server",
        "bundle_pem",
        "chain_pem",
        "client_cert",
        "identity",
        "listener_context",
        "not_after",
        "serial",
    )

    def __init__(self, identity: str, *, client_cert: str = "required") -> None:
        self.identity = identity
        self.client_cert = client_cert
        """What inbound handshakes ask of the client: `required` (strict
        mTLS) or `optional` (permissive)."""
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self.listener_context: ssl.SSLContext | None = None
        """The context listeners are created with (the first one made)."""
        self.not_after = 0.0
        """When the current certificate expires (Unix time; 0: none yet)."""
        self.serial = ""
        self.chain_pem = b""
        """The current certificate and its chain (public: no key)."""
        self.bundle_pem = b""
        """The trust bundle the contexts verify peers with."""

    @property
    def ready(self) -> bool:
        return self._client is not None

    def update(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        """Use a new certificate (leaf first, then its chain) or bundle."""
        server = server_context(chain_pem, key_pem, bundle_pem, client_cert=self.client_cert)
        client = client_context(bundle_pem, chain_pem, key_pem)
        server.sni_callback = self._pick
        leaf = x509.load_pem_x509_certificate(chain_pem)
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self.serial = format(leaf.serial_number, "x")
        self.chain_pem = chain_pem
        self.bundle_pem = bundle_pem
        self._server = server
        self._client = client
        if self.listener_context is None:
            self.listener_context = server

    def _pick(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        current = self._server
        if current is not None and sslobj.context is not current:
            sslobj.context = current

    def server(self) -> ssl.SSLContext:
        """The context a listener is created with."""
        if self.listener_context is None:
            raise RuntimeError(f"no certificate yet for {self.identity}")
        return self.listener_context

    def client(self) -> ssl.SSLContext:
        """The current context for a new upstream connection."""
        if self._client is None:
            raise RuntimeError(f"no certificate yet for {self.identity}")
        return self._client
