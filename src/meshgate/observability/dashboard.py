"""What the dashboard's HTTP side shares between the control plane's admin
listener and a gateway's: the page's files, their headers, who may read
them, and the Server-Sent Events framing.

- Files: a fixed allow-list out of the package's `ui/` directory
  (`index.html`, `app.js`, `app.css`) and the plain file names directly in
  `ui/vendor/` with a known extension; nothing else is ever opened (no
  path from the request reaches the file system: a name is looked up, not
  joined).
- Headers: `Cache-Control: no-cache`, `X-Content-Type-Options: nosniff`,
  no referrer, no framing, and a Content-Security-Policy of `'self'` only
  (no inline script; inline styles are allowed, which a graph library
  sets on its elements).
- Access (`refusal`): read-only (GET; anything else is 405); a request with
  an `Origin:` other than the page's own is refused (a web page elsewhere,
  or a DNS rebinding); without a token the listener answers loopback names
  only (`Host:`), and on a non-loopback bind a token is required.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from pathlib import Path

import orjson

from meshgate.config.schema import is_loopback

__all__ = [
    "HEADERS",
    "MAX_SSE_CLIENTS",
    "SSE_INTERVAL",
    "StaticFile",
    "event",
    "loopback_host",
    "refusal",
    "static_file",
]

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
SSE_INTERVAL = 2.0
MAX_SSE_CLIENTS = 32
MAX_SSE_BUFFER = 1 << 20
"""Bytes an SSE client may leave unread before it is dropped."""

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
HEADERS: tuple[tuple[str, str], ...] = (
    ("cache-control", "no-cache"),
    ("x-content-type-options", "nosniff"),
    ("content-security-policy", CSP),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-resource-policy", "same-origin"),
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
_PAGES = {
    "/ui": "index.html",
    "/ui/": "index.html",
    "/ui/index.html": "index.html",
    "/ui/app.js": "app.js",
    "/ui/app.css": "app.css",
}
_VENDOR = re.compile(r"/ui/vendor/([A-Za-z0-9][A-Za-z0-9._-]{0,100})")
MAX_FILE = 8 << 20


class StaticFile:
    __slots__ = ("body", "content_type")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type


def static_file(path: str, base: Path = UI_DIR) -> StaticFile | None:
    """The page's file that `path` (the request's, decoded) names, or None."""
    name = _PAGES.get(path)
    if name is not None:
        file = base / name
    else:
        m = _VENDOR.fullmatch(path)
        if m is None or ".." in m.group(1):
            return None
        vendor = base / "vendor"
        try:
            names = {p.name for p in vendor.iterdir() if p.is_file()}
        except OSError:
            return None
        if m.group(1) not in names:
            return None
        file = vendor / m.group(1)
    ctype = _TYPES.get(file.suffix)
    if ctype is None or file.is_symlink():
        return None
    try:
        if file.stat().st_size > MAX_FILE:
            return None
        return StaticFile(file.read_bytes(), ctype)
    except OSError:
        return None


def loopback_host(value: str) -> bool:
    """Whether a `Host:` names this machine (127.0.0.0/8, [::1], localhost)."""
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback(host)


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    want = hashlib.sha256(token.encode()).digest()
    got = hashlib.sha256(given.strip().encode()).digest()
    return hmac.compare_digest(want, got) and scheme.lower() == "bearer" and bool(token)


def refusal(
    method: str,
    headers: dict[str, str],
    *,
    bound_loopback: bool,
    token: str | None,
    matches: Callable[[str | None, str], bool] = token_matches,
) -> tuple[int, str] | None:
    """Why a request for `/ui...` is refused (status, reason), or None.
    `headers` by lower-case name; `token` is the admin token (None: none),
    which `matches(authorization header, token)` checks (a gateway's is
    configured as its digest)."""
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None and origin != f"http://{host}":
        return 403, "the dashboard does not answer other web pages (Origin)"
    if token is not None and (not bound_loopback or "authorization" in headers):
        if not matches(headers.get("authorization"), token):
            return 401, "the dashboard needs the admin token (Authorization: Bearer)"
    elif not bound_loopback:
        return 403, "the dashboard on a non-loopback address needs control.admin_token_file"
    elif host and not loopback_host(host):
        return 403, "the dashboard without a token answers only loopback names (Host)"
    if method != "GET":
        return 405, "the dashboard is read-only: GET only"
    return None


def event(doc: object, name: str = "state") -> bytes:
    """One Server-Sent Event: `event: <name>` and the document as its data."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"
