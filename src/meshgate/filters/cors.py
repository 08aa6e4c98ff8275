"""A route's `cors:` as a filter: preflights answered at the gateway.

The filter runs first in a route's chain, before auth: a browser's preflight
carries no credentials, so it must be answered before anything asks for them.

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
  never goes upstream. An allowed origin asking for an allowed method and
  allowed headers gets a 204 with the `Access-Control-Allow-*` fields; any
  other gets a 403 problem (`cors-refused`) without them.
- Any other request goes upstream. When its `Origin` is allowed, the response
  gets `Access-Control-Allow-Origin` (and `-Allow-Credentials`,
  `-Expose-Headers` when configured); a disallowed origin gets none of them
  (browsers enforce CORS, the gateway only tells them what is allowed).
- Every response of the route carries `Vary: Origin`, so that a shared cache
  does not hand one origin's answer to another.

With `credentials: true` the request's origin is echoed, never `*` (the
config refuses `*` with credentials). Everything that does not depend on the
request (the method list, the max age, the tails of the header blocks) is
built once, at config load.
"""

from __future__ import annotations

import re

from meshgate.config.schema import CorsConfig
from meshgate.filters import FilterRequest, FilterResult, LocalReply

__all__ = ["REFUSED_KIND", "UPSTREAM_DROPPED", "CorsFilter"]

# The response fields a route with CORS owns: an upstream's own are dropped,
# so that a browser sees the gateway's policy only (as with Kong's plugin).
UPSTREAM_DROPPED = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-max-age",
        b"access-control-allow-private-network",
    }
)

REFUSED_KIND = "cors-refused"

CRLF = b"\r\n"
_VARY_ACTUAL = b"vary: Origin\r\n"
_VARY_PREFLIGHT = (
    b"vary",
    b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
)
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LABEL = rb"[a-z0-9_-]+"


def _pattern(origin: str) -> bytes:
    """`https://*.example.com` -> a regex matching one label in place of `*`."""
    head, _, rest = origin.partition("*")
    return re.escape(head.encode("ascii")) + _LABEL + re.escape(rest.encode("ascii"))


class CorsFilter:
    """One route's CORS policy, compiled."""

    __slots__ = (
        "actual_any",
        "actual_tail",
        "any_headers",
        "any_origin",
        "credentials",
        "exact",
        "headers",
        "methods",
        "pattern",
        "preflight_tail",
    )

    def __init__(self, cfg: CorsConfig) -> None:
        self.credentials = cfg.credentials
        # The config refuses `*` with credentials; a literal `*` is only sent without.
        self.any_origin = "*" in cfg.origins
        self.exact = frozenset(o.encode("ascii") for o in cfg.origins if "*" not in o)
        patterns = [_pattern(o) for o in cfg.origins if "*" in o and o != "*"]
        self.pattern = re.compile(b"|".join(patterns)) if patterns else None
        self.methods = frozenset(m.encode("ascii") for m in cfg.methods)
        self.any_headers = "*" in cfg.headers
        self.headers = frozenset(h.encode("ascii") for h in cfg.headers if h != "*")

        preflight: list[tuple[bytes, bytes]] = []
        if cfg.credentials:
            preflight.append((b"access-control-allow-credentials", b"true"))
        preflight.append((b"access-control-allow-methods", ", ".join(cfg.methods).encode()))
        if cfg.max_age is not None:
            preflight.append((b"access-control-max-age", b"%d" % int(cfg.max_age)))
        preflight.append(_VARY_PREFLIGHT)
        self.preflight_tail = tuple(preflight)

        tail = b""
        if cfg.credentials:
            tail += b"access-control-allow-credentials: true\r\n"
        if cfg.expose_headers:
            tail += (
                b"access-control-expose-headers: "
                + ", ".join(cfg.expose_headers).encode("ascii")
                + CRLF
            )
        self.actual_tail = tail + _VARY_ACTUAL
        self.actual_any = b"access-control-allow-origin: *\r\n" + self.actual_tail

    def allows_origin(self, origin: bytes) -> bool:
        """Whether `origin` (as the `Origin` header sent it) may make requests."""
        if self.any_origin:
            return True
        origin = origin.lower()
        if origin in self.exact:
            return True
        return self.pattern is not None and self.pattern.fullmatch(origin) is not None

    def _allow_origin(self, origin: bytes) -> bytes:
        """The `Access-Control-Allow-Origin` value for an allowed origin."""
        return b"*" if self.any_origin and not self.credentials else origin

    def __call__(self, req: FilterRequest) -> FilterResult:
        origin = req.header(b"origin")
        if origin is not None and req.header_count(b"origin") != 1:
            origin = None  # two Origin lines: not a browser; no CORS for it
        if req.method == b"OPTIONS" and origin is not None:
            requested = req.header(b"access-control-request-method")
            if requested is not None:
                return self.preflight(req, origin, requested)
        if origin is not None and self.allows_origin(origin):
            if self.any_origin and not self.credentials:
                req.response_extra += self.actual_any
            else:
                req.response_extra += (
                    b"access-control-allow-origin: " + origin + CRLF + self.actual_tail
                )
        else:
            req.response_extra += _VARY_ACTUAL
        return None

    def preflight(self, req: FilterRequest, origin: bytes, method: bytes) -> LocalReply:
        """The gateway's answer to a preflight: 204 with the allowances, or 403."""
        if not self.allows_origin(origin):
            return _refused("this origin may not make cross-origin requests to this route")
        method = method.strip()
        if method not in self.methods:
            return _refused(
                f"method {method.decode('ascii')} is not allowed for cross-origin requests"
                if _TOKEN_RE.fullmatch(method)
                else "Access-Control-Request-Method is not a method"
            )
        asked: list[bytes] = []
        for name, value in req.headers:
            if name == b"access-control-request-headers":
                asked += [h.strip().lower() for h in value.split(b",") if h.strip()]
        asked = list(dict.fromkeys(asked))
        for h in asked:
            if _TOKEN_RE.fullmatch(h) is None or not (self.any_headers or h in self.headers):
                return _refused(
                    f"header {h.decode('ascii')} is not allowed for cross-origin requests"
                    if _TOKEN_RE.fullmatch(h)
                    else "Access-Control-Request-Headers is not a list of header names"
                )
        headers = [(b"access-control-allow-origin", self._allow_origin(origin))]
        if asked:
            headers.append((b"access-control-allow-headers", b", ".join(asked)))
        headers += self.preflight_tail
        return LocalReply(204, "", "", headers)


def _refused(detail: str) -> LocalReply:
    return LocalReply(403, REFUSED_KIND, detail, (_VARY_PREFLIGHT,))
