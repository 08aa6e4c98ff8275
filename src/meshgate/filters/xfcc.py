"""X-Forwarded-Client-Cert: who called, as the sidecar tells its app.

The app behind a sidecar sees plain HTTP. It learns the caller's identity
from this header, in Envoy's format: `By=<this proxy's SPIFFE ID>;URI=<the
caller's SPIFFE ID>`. It is set only when the TLS handshake verified a
client certificate; a client's own X-Forwarded-Client-Cert is never
forwarded (the protocol layer drops it as a forgeable header), so an app
may trust the header's presence and value.
"""

from __future__ import annotations

from meshgate.filters import FilterRequest, LocalReply

__all__ = ["XFCC", "XfccFilter"]

XFCC = b"x-forwarded-client-cert"


class XfccFilter:
    __slots__ = ("by",)

    def __init__(self, by: str) -> None:
        self.by = b"By=" + by.encode("ascii") + b";URI="

    def __call__(self, req: FilterRequest) -> LocalReply | None:
        peer = req.peer
        if peer is not None:
            req.add.append((XFCC, self.by + peer.encode("ascii")))
        return None
