"""SSL contexts, built with Python's `ssl` (OpenSSL does every check).

Keys are handed to OpenSSL through an anonymous in-memory file
(`memfd_create`): the `ssl` module loads keys from paths only, and a key this
process made must not touch the disk to be loaded (a proxy's state directory
keeps its own copy, mode 0600, on purpose; the control plane's serving key is
never written). Between meshgate processes TLS is 1.3 only.
"""

from __future__ import annotations

import contextlib
import os
import ssl

__all__ = ["client_context", "load_cert_chain", "server_context"]


def load_cert_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate chain (leaf first) and its key into `ctx`."""
    fds = []
    try:
        for data in (chain_pem, key_pem):
            fd = os.memfd_create("meshgate-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def server_context(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, *, client_cert: str = "required"
) -> ssl.SSLContext:
    """A TLS 1.3 server context; `client_cert` is `required`, `optional` or `none`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = {
        "required": ssl.CERT_REQUIRED,
        "optional": ssl.CERT_OPTIONAL,
        "none": ssl.CERT_NONE,
    }[client_cert]
    if client_cert != "none":
        ctx.load_verify_locations(cadata=bundle_pem.decode())
    load_cert_chain(ctx, chain_pem, key_pem)
    return ctx


def client_context(
    bundle_pem: bytes, chain_pem: bytes | None = None, key_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS 1.3 client context that verifies the server against the bundle.
    Host names are not checked: the caller checks the server's SPIFFE ID."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    if chain_pem is not None and key_pem is not None:
        load_cert_chain(ctx, chain_pem, key_pem)
    return ctx
