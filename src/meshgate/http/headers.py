"""Header tables built once at import, as uvicorn does.

Header names on the hot path are lowercase `bytes`; llhttp has already
refused malformed names, so a name is compared with plain `in` on a frozenset.
"""

from __future__ import annotations

import itertools
from http import HTTPStatus

# RFC 9110 section 7.6.1: hop-by-hop fields a proxy must not forward, plus the
# de-facto ones (Keep-Alive, Proxy-Connection) every proxy also strips.
# Transfer-Encoding is hop-by-hop too: meshgate frames each side itself.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request headers that meshgate writes itself instead of copying through:
# the framing (Content-Length or chunked, for the body it forwards), Host and
# the forwarding headers.
REQUEST_WRITTEN = HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"via",
    b"x-meshgate-deadline",
    b"grpc-timeout",
}
# Forwarding headers a client could forge and that upstream frameworks believe
# (a URL's scheme, port and prefix, the client's address or certificate):
# never copied from a client. A route's own transform may still set them.
CLIENT_FORGEABLE = frozenset(
    {
        b"forwarded",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-uri",
        b"x-forwarded-method",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-forwarded-client-cert",
        b"x-real-ip",
        # httpoxy (CVE-2016-5385 and kin): CGI-style servers read `Proxy` as
        # HTTP_PROXY, which their HTTP clients take as the proxy to use.
        b"proxy",
    }
)


def _underscore_spellings(names: frozenset[bytes]) -> frozenset[bytes]:
    """Each of `names` with some or all of its dashes written as underscores."""
    out: set[bytes] = set()
    for name in names:
        parts = name.split(b"-")
        for seps in itertools.product((b"-", b"_"), repeat=len(parts) - 1):
            spelled = parts[0] + b"".join(
                sep + part for sep, part in zip(seps, parts[1:], strict=True)
            )
            if spelled != name:
                out.add(spelled)
    return frozenset(out)


# What is never copied from the client's own header lines: those, and their
# underscore spellings, which CGI-style servers (WSGI, PHP, Rack) read as the
# same header (`X_Forwarded_For` and `X-Forwarded-For` are both
# HTTP_X_FORWARDED_FOR), so that a client could forge what meshgate writes.
REQUEST_OWN = (
    REQUEST_WRITTEN | CLIENT_FORGEABLE | _underscore_spellings(REQUEST_WRITTEN | CLIENT_FORGEABLE)
)


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


STATUS_LINES: tuple[bytes, ...] = tuple(_status_line(code) for code in range(600))


def status_line(code: int) -> bytes:
    """The HTTP/1.1 status line for `code`, CRLF included."""
    if 0 <= code < 600:
        return STATUS_LINES[code]
    return _status_line(code)


_COMMON_TOKENS = {
    b"keep-alive": frozenset({b"keep-alive"}),
    b"Keep-Alive": frozenset({b"keep-alive"}),
    b"close": frozenset({b"close"}),
    b"Close": frozenset({b"close"}),
}


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lowercase option names listed in a Connection header value."""
    known = _COMMON_TOKENS.get(value)
    if known is not None:
        return known
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


# Names that a Connection header may list but that never remove anything
# (RFC 9110 7.6.1 lets a sender name its hop-by-hop fields; these frame the
# message or are written by meshgate itself). A peer naming them is ignored,
# as nginx ignores them: the framing meshgate sends is always its own.
CONNECTION_IGNORED: frozenset[bytes] = frozenset(
    {
        b"close",
        b"keep-alive",
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"authorization",
    }
)


def connection_drop(value: bytes) -> frozenset[bytes]:
    """The header names a Connection value asks to remove, without the ones
    meshgate frames the message with or relies on (`CONNECTION_IGNORED`)."""
    if value in _COMMON_TOKENS:
        return frozenset()
    return connection_tokens(value) - CONNECTION_IGNORED


def phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


# Methods a retry may repeat (RFC 9110 9.2.2).
IDEMPOTENT: frozenset[bytes] = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
