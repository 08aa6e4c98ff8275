"""The verified-token cache of one `JwtVerifier`: token -> claims, so that a
client reusing its token pays the signature check (an RSA verify, say)
once rather than on every request.

The contract, which `JwtVerifier._verify` keeps:

* Only a token that verified goes in: signature, `iss`, `aud`, and the time
  window (`exp`, `nbf`, `iat` with the leeway) at the time it verified; a
  token that is not valid yet is refused before it gets here, so it is never
  cached as valid.
* An entry lives until the token expires (`exp` plus the leeway) or
  `max_age` after it verified, whichever comes first (a token without `exp`
  is verified again at least that often). The verifier still checks the
  window on every hit, which costs three comparisons.
* The key is the whole token: two tokens that differ in one byte of their
  signature are two entries, and the second one is verified on its own.
* Bounded: at `size` entries the least recently used one goes, so a burst of
  one-off tokens cannot push out the tokens clients keep reusing for long.
* `clear()` drops everything: the verifier calls it when its key set
  changes (a key withdrawn from the JWKS must stop admitting its tokens at
  once, cached or not), and `FilterServices` on a config reload.
* What depends on the route (its `scopes`, `required_claims`) is not part of
  an entry: the filter checks it on every request, on the cached claims.

`hits` and `misses` count lookups (`meshgate_jwt_cache_lookups_total`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

__all__ = ["DEFAULT_MAX_AGE", "DEFAULT_SIZE", "CachedToken", "TokenCache"]

DEFAULT_SIZE = 10_000
"""Entries per verifier (per worker) unless the config says otherwise."""
DEFAULT_MAX_AGE = 300.0
"""Seconds a verification is reused at most, whatever the token's `exp`."""


class CachedToken(NamedTuple):
    claims: dict[str, Any]
    exp: float | None
    nbf: float | None
    iat: float | None
    until: float
    """Wall-clock time from which the entry is gone."""


class TokenCache:
    """An LRU map of verified tokens; see the module doc for the contract."""

    __slots__ = ("_entries", "hits", "max_age", "misses", "size")

    def __init__(self, *, size: int = DEFAULT_SIZE, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.size = size
        self.max_age = max_age
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, CachedToken] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        return token in self._entries

    def get(self, token: str, now: float) -> CachedToken | None:
        """The entry for `token` if it is there and has not expired at `now`."""
        entries = self._entries
        entry = entries.get(token)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry.until:
            del entries[token]
            self.misses += 1
            return None
        entries.move_to_end(token)
        self.hits += 1
        return entry

    def put(
        self,
        token: str,
        claims: dict[str, Any],
        *,
        exp: float | None,
        nbf: float | None,
        iat: float | None,
        leeway: float,
        now: float,
    ) -> None:
        """Remember a token that verified at `now`."""
        if self.size <= 0:
            return
        until = now + self.max_age
        if exp is not None:
            until = min(until, exp + leeway)
        if until <= now:
            return
        entries = self._entries
        entries[token] = CachedToken(claims, exp, nbf, iat, until)
        entries.move_to_end(token)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def discard(self, token: str) -> None:
        self._entries.pop(token, None)

    def clear(self) -> None:
        self._entries.clear()
