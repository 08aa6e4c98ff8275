"""SPIFFE IDs: the one name a workload has in the mesh.

An ID is `spiffe://<trust domain>/ns/<namespace>/sa/<service>`, the shape
the control plane issues and the only one it accepts back. `SpiffeId.parse`
is strict on purpose: it reads what peers present, so anything beyond that
shape (a port, userinfo, a query, `.` segments, other paths) is refused with
the reason rather than normalized into something that might compare equal
to a real identity. The trust domain syntax is the one mesh.yaml accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_ID_LENGTH", "SEGMENT_RE", "TRUST_DOMAIN_RE", "SpiffeId"]

# The same syntax as mesh.yaml's `trust_domain:` (config/mesh.py), so every
# mesh's own IDs parse: lowercase letters, digits, '.', '-', '_'.
TRUST_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID_LENGTH = 2048
_SCHEME = "spiffe://"


def _check_trust_domain(td: str) -> None:
    if not td:
        raise ValueError("the trust domain is empty")
    if "@" in td:
        raise ValueError("a SPIFFE ID carries no userinfo ('@')")
    if ":" in td:
        raise ValueError("a SPIFFE ID carries no port (':')")
    if not TRUST_DOMAIN_RE.fullmatch(td):
        raise ValueError(
            f"{td!r} is not a trust domain (lowercase letters, digits, '.', '-', '_'; "
            "a letter or digit first and last; at most 255)"
        )


def _check_segment(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"the {what} segment is empty")
    if value in (".", ".."):
        raise ValueError(f"the {what} segment is {value!r}: relative segments are refused")
    if not SEGMENT_RE.fullmatch(value):
        raise ValueError(f"the {what} {value!r} has a character outside [A-Za-z0-9._-]")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """`spiffe://<trust_domain>/ns/<namespace>/sa/<service>`; checked on
    construction, so an instance is always a valid ID."""

    trust_domain: str
    namespace: str
    service: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service", self.service)
        if len(self.uri) > MAX_ID_LENGTH:
            raise ValueError(f"a SPIFFE ID is at most {MAX_ID_LENGTH} characters")

    @property
    def uri(self) -> str:
        return f"{_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The ID `uri` names, or ValueError saying what is wrong with it."""
        if len(uri) > MAX_ID_LENGTH:
            raise ValueError(f"a SPIFFE ID is at most {MAX_ID_LENGTH} characters")
        if not uri.startswith(_SCHEME):
            raise ValueError(f"{uri[:64]!r} is not a SPIFFE ID: the scheme must be spiffe://")
        if "?" in uri:
            raise ValueError("a SPIFFE ID carries no query ('?')")
        if "#" in uri:
            raise ValueError("a SPIFFE ID carries no fragment ('#')")
        td, slash, path = uri[len(_SCHEME) :].partition("/")
        _check_trust_domain(td)
        if not slash:
            raise ValueError(
                f"{uri!r} names a trust domain, not a workload (/ns/<namespace>/sa/<service>)"
            )
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(f"the path of {uri!r} is not /ns/<namespace>/sa/<service>")
        return cls(td, parts[1], parts[3])

    def matches(self, pattern: str) -> bool:
        """`pattern` is this ID, or ends in `*` and this ID starts with what
        precedes it (`spiffe://td/ns/prod/*`). A `*` anywhere else is a plain
        character, which no valid ID contains."""
        if pattern.endswith("*"):
            return self.uri.startswith(pattern[:-1])
        return self.uri == pattern
