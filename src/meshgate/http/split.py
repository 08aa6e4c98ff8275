"""A route's weighted backends (`split:`), compiled at config load.

`Splitter.pick` chooses the backend of one request, in this order:

1. `canary:` matches, in config order: a header with an exact value (or just
   present), or a cookie with an exact value (or just present). The first
   that matches sends the request to its upstream, whatever the weights say.
2. `sticky:`: a key (the consumer, the client IP, a header or a cookie value)
   is hashed onto the weights, so the same key always lands on the same
   backend while the weights stay. A request without the key (no such
   header, an anonymous request) falls through to 3. `consumer` falls back
   to the token's subject, then to the client IP: a route without `auth:`
   is effectively sticky by IP.
3. Otherwise, weighted random: one `random()` against cumulative fractions.

Sticky assignment is weighted rendezvous hashing (highest random weight):
each backend scores a key with `ln(u) / weight`, where `u` in (0, 1) is a
uniform value derived from the key's blake2b hash and the backend's *name*,
and the highest score wins. A backend wins a key with probability
`weight / total`, and a key's score on a backend depends on that backend
alone, so:

- raising one backend's weight (v2 from 10 to 20) only raises its own
  scores: clients move to it, never away from it and never between the
  others; lowering a weight moves clients away from that backend only;
- more generally, a client only ever moves to a backend whose weight went up
  (or that was added), whatever the number of backends;
- the order of `split:` entries does not matter, and adding a backend takes
  clients only for itself.

Cumulative buckets (hash -> [0, total) -> bucket by cumulative weight) hold
the first property only for two backends: with three, raising the last
one's weight shifts the middle bucket, moving clients from the first to the
second. Rendezvous hashing holds it for any number, and costs a hash and a
`log` per backend; a bounded memo of recent keys makes a repeated key one
dict lookup.

The splitter counts the requests each backend got (per worker process,
reset when a reload builds a new one); `stats()` is what the admin
listener's `/routes` shows.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from hashlib import blake2b
from random import random as _random
from typing import Any, Generic, TypeVar

from meshgate.config.schema import RouteConfig

__all__ = ["Splitter", "cookie_value", "sticky_hash"]

T = TypeVar("T")

_M64 = (1 << 64) - 1
_2_POW_M53 = 2.0**-53
# Sticky keys remembered per splitter, cleared when full; longer keys are
# hashed every time.
MEMO_SIZE = 4096
MEMO_MAX_KEY = 256
_OWS = b" \t"


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's `Cookie` header(s), or None.

    Each header is `name=value; name2=value2` (RFC 6265, section 4.2.1),
    parsed as browsers send it and servers read it: pairs split on `;`,
    whitespace around names and values dropped, a value in double quotes
    unquoted, a pair without `=` ignored. Names are case-sensitive. The
    first pair with that name wins (user agents send the most specific
    cookie first). Header names in `headers` are lower-case.
    """
    for n, v in headers:
        if n == b"cookie" and name in v:
            found = _find_cookie(v, name)
            if found is not None:
                return found
    return None


def _find_cookie(header: bytes, name: bytes) -> bytes | None:
    for pair in header.split(b";"):
        key, eq, value = pair.partition(b"=")
        if eq and key.strip(_OWS) == name:
            value = value.strip(_OWS)
            if len(value) >= 2 and value[0] == 0x22 and value[-1] == 0x22:  # "..."
                value = value[1:-1]
            return value
    return None


def _header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def sticky_hash(key: bytes) -> int:
    """A key's stable 64-bit hash (the same in every process and release)."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "little")


def _name_salt(name: str) -> int:
    return int.from_bytes(blake2b(name.encode(), digest_size=8, person=b"mg-split").digest(), "big")


# What a canary match looks at.
_HEADER = 0
_COOKIE = 1


class Splitter(Generic[T]):
    """The compiled `split:`, `sticky:` and `canary:` of one route.

    `T` is what a backend is: a `Cluster` in the gateway, anything in tests.
    """

    __slots__ = (
        "_canaries",
        "_cum",
        "_hrw",
        "_memo",
        "_sticky_kind",
        "_sticky_name",
        "_weighted",
        "canary_counts",
        "canary_docs",
        "counts",
        "label",
        "names",
        "sticky",
        "targets",
        "weights",
    )

    def __init__(self, route: RouteConfig, targets: Mapping[str, T], label: str = "") -> None:
        if route.split is None:
            raise ValueError("a Splitter needs a route with split:")
        self.label = label
        # Every upstream the route may send to: split backends first (a name
        # listed twice has its weights added), then canary-only upstreams.
        weights: dict[str, int] = {}
        for b in route.split:
            weights[b.upstream] = weights.get(b.upstream, 0) + b.weight
        self.names: tuple[str, ...] = tuple(route.upstream_names())
        self.weights: tuple[int | None, ...] = tuple(weights.get(n) for n in self.names)
        self.targets: tuple[T, ...] = tuple(targets[n] for n in self.names)
        self.counts = [0] * len(self.names)
        """Requests sent to each of `names`, for whatever reason."""

        # Weighted random: cumulative fractions over the backends with a
        # weight above 0 (one `random()` and a bisect per request).
        positive = [i for i, w in enumerate(self.weights) if w]
        total = sum(self.weights[i] or 0 for i in positive)
        cum: list[float] = []
        running = 0
        for i in positive:
            running += self.weights[i] or 0
            cum.append(running / total)
        cum[-1] = 1.0  # random() < 1.0 always lands in a bucket
        self._cum = tuple(cum)
        self._weighted = tuple(positive)

        # Sticky: rendezvous hashing over the same backends, each with a salt
        # from its name and 1/weight.
        self._hrw = tuple(
            (_name_salt(self.names[i]), 1.0 / (self.weights[i] or 1)) for i in positive
        )
        self._memo: dict[bytes, int] = {}
        self.sticky = route.sticky
        kind, _, source = (route.sticky or "").partition(":")
        self._sticky_kind = kind
        self._sticky_name = source.lower().encode() if kind == "header" else source.encode()

        index = {n: i for i, n in enumerate(self.names)}
        canaries: list[tuple[int, bytes, bytes | None, int, int]] = []
        docs: list[dict[str, Any]] = []
        for j, c in enumerate(route.canary or ()):
            want = c.value.encode() if c.value is not None else None
            if c.header is not None:
                canaries.append((_HEADER, c.header.lower().encode(), want, index[c.upstream], j))
                docs.append({"header": c.header.lower(), "value": c.value, "upstream": c.upstream})
            else:
                assert c.cookie is not None
                canaries.append((_COOKIE, c.cookie.encode(), want, index[c.upstream], j))
                docs.append({"cookie": c.cookie, "value": c.value, "upstream": c.upstream})
        self._canaries = tuple(canaries)
        self.canary_docs = tuple(docs)
        self.canary_counts = [0] * len(canaries)

    # -- per request -----------------------------------------------------------

    def pick(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        client: bytes,
        consumer: str | None = None,
        subject: str | None = None,
    ) -> T:
        """The backend for one request. `headers` are the client's header
        lines (lower-case names); `client` its address; `consumer` and
        `subject` what authentication found, when the route has `auth:`."""
        if self._canaries:
            i = self._canary(headers)
            if i >= 0:
                self.counts[i] += 1
                return self.targets[i]
        kind = self._sticky_kind
        if kind:
            key: bytes | None
            if kind == "consumer":
                if consumer is not None:
                    key = consumer.encode()
                elif subject is not None:
                    key = subject.encode()
                else:
                    key = client or None
            elif kind == "ip":
                key = client or None
            elif kind == "header":
                key = _header_value(headers, self._sticky_name) or None
            else:
                key = cookie_value(headers, self._sticky_name) or None
            if key is not None:
                i = self._memo.get(key, -1)
                if i < 0:
                    i = self.assign(key)
                    if len(key) <= MEMO_MAX_KEY:
                        memo = self._memo
                        if len(memo) >= MEMO_SIZE:
                            memo.clear()
                        memo[key] = i
                self.counts[i] += 1
                return self.targets[i]
        i = self._weighted[bisect_right(self._cum, _random())]
        self.counts[i] += 1
        return self.targets[i]

    def _canary(self, headers: Sequence[tuple[bytes, bytes]]) -> int:
        """The index of the first matching canary's upstream, or -1."""
        for kind, name, want, i, j in self._canaries:
            if kind == _HEADER:
                for n, v in headers:
                    if n == name and (want is None or v == want):
                        self.canary_counts[j] += 1
                        return i
            else:
                got = cookie_value(headers, name)
                if got is not None and (want is None or got == want):
                    self.canary_counts[j] += 1
                    return i
        return -1

    def assign(self, key: bytes) -> int:
        """The index (into `names`) a sticky key is assigned to."""
        weighted = self._weighted
        if len(weighted) == 1:
            return weighted[0]
        h = sticky_hash(key)
        log = math.log
        best = 0
        best_score = -math.inf
        for k, (salt, inv_weight) in enumerate(self._hrw):
            # splitmix64's finalizer (a bijection with full avalanche) of the
            # key's hash and the backend's salt: u in (0, 1), uniform, and
            # independent from one backend to the next.
            z = h ^ salt
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            u = (((z ^ (z >> 31)) >> 11) + 0.5) * _2_POW_M53
            score = log(u) * inv_weight
            if score > best_score:
                best_score = score
                best = k
        return weighted[best]

    # -- reporting -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Weights and request counts, for the admin listener."""
        total = sum(w or 0 for w in self.weights)
        return {
            "sticky": self.sticky,
            "requests": sum(self.counts),
            "backends": [
                {
                    "upstream": name,
                    "weight": weight,
                    "share": round((weight or 0) / total, 4),
                    "requests": count,
                }
                for name, weight, count in zip(self.names, self.weights, self.counts, strict=True)
            ],
            "canary": [
                {**doc, "requests": n}
                for doc, n in zip(self.canary_docs, self.canary_counts, strict=True)
            ],
        }
