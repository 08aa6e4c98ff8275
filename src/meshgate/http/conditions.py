"""A route's `host` and `headers` conditions: host entries and header
matchers, parsed at load and checked per request (filters use the header
matchers too). What they mean is in the router's "Hosts and headers"."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["HeaderCheck", "header_ok", "headers_match", "parse_header_checks"]

# Host entry kinds, in precedence order.
_HOST_EXACT = 0
_HOST_WILD = 1
_HOST_ANY = 2

_HOST_PORT_RE = re.compile(r"[^:\[\]]+:\d+")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# A host entry: (kind, value). value is the host for _HOST_EXACT, the suffix
# with its leading dot for _HOST_WILD ('.example.com'), '' for _HOST_ANY.
_HostEntry = tuple[int, str]
# A compiled header matcher: (lowercase name, exact value | True | False).
HeaderCheck = tuple[bytes, bytes | bool]


def _parse_hosts(host: str | list[str] | None, where: str) -> tuple[_HostEntry, ...]:
    if host is None:
        return ((_HOST_ANY, ""),)
    items = [host] if isinstance(host, str) else host
    if not items:
        raise ValueError(f"{where}: host is an empty list (omit host to match every host)")
    entries: list[_HostEntry] = []
    for item in items:
        h = item.strip().lower()
        if not h:
            raise ValueError(f"{where}: host {item!r} is empty")
        if h.startswith("*."):
            suffix = h[1:]
            if "*" in suffix or len(suffix) < 2:
                raise ValueError(
                    f"{where}: host {item!r}: a wildcard host is '*.' followed by a domain"
                )
            entry: _HostEntry = (_HOST_WILD, suffix)
        elif "*" in h:
            raise ValueError(
                f"{where}: host {item!r}: '*' is only allowed as the first label ('*.example.com');"
                " omit host to match every host"
            )
        elif _HOST_PORT_RE.fullmatch(h) is not None:
            raise ValueError(f"{where}: host {item!r}: hosts are matched without the port")
        else:
            entry = (_HOST_EXACT, h)
        if entry not in entries:
            entries.append(entry)
    return tuple(entries)


def _host_rank(entry: _HostEntry) -> tuple[int, int]:
    kind, value = entry
    return (kind, -len(value) if kind == _HOST_WILD else 0)


def _host_matches(entry: _HostEntry, host: str) -> bool:
    kind, value = entry
    if kind == _HOST_EXACT:
        return host == value
    if kind == _HOST_WILD:
        return host.endswith(value) and len(host) > len(value)
    return True


def _host_text(entry: _HostEntry) -> str:
    kind, value = entry
    return value if kind == _HOST_EXACT else "*" + value if kind == _HOST_WILD else "*"


def parse_header_checks(
    headers: dict[str, str | bool] | None, where: str
) -> tuple[HeaderCheck, ...]:
    """`{X-Fault: "1", X-Debug: true}` -> ((b"x-fault", b"1"), (b"x-debug", True)):
    exact value, `true` present, `false` absent. Routes and filters share it."""
    if not headers:
        return ()
    checks: list[HeaderCheck] = []
    seen: set[bytes] = set()
    for name, want in headers.items():
        if _TOKEN_RE.fullmatch(name) is None:
            raise ValueError(f"{where}: headers: {name!r} is not a valid header name")
        key = name.lower().encode("ascii")
        if key in seen:
            raise ValueError(f"{where}: headers: {name!r} is given twice (names ignore case)")
        seen.add(key)
        checks.append((key, want if isinstance(want, bool) else want.encode("utf-8")))
    return tuple(checks)


def header_ok(headers: Sequence[tuple[bytes, bytes]], name: bytes, want: bytes | bool) -> bool:
    ln = len(name)
    if isinstance(want, bool):
        for n, _ in headers:
            if len(n) == ln and (n == name or n.lower() == name):
                return want
        return not want
    for n, v in headers:  # noqa: SIM110 - a plain loop, no generator, on the hot path
        if v == want and len(n) == ln and (n == name or n.lower() == name):
            return True
    return False


def headers_match(checks: tuple[HeaderCheck, ...], headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Every check holds (no checks: True)."""
    for name, want in checks:  # noqa: SIM110 - hot path, no generator
        if not header_ok(headers, name, want):
            return False
    return True


def _headers_text(checks: Iterable[HeaderCheck]) -> str:
    parts = []
    for name, want in checks:
        shown = name.decode("ascii")
        if want is True:
            parts.append(f"{shown} present")
        elif want is False:
            parts.append(f"{shown} absent")
        else:
            parts.append(f"{shown}={want.decode('utf-8', 'replace')}")
    return ",".join(parts)
