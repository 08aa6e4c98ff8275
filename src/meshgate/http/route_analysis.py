"""The route table's load-time analysis, behind `Router.warnings()`: routes
no request reaches, host entries that never reach their route, routes only
config order separates, and repeated route names.

It reads a route and a host group through the protocols below, so that it
does not import the router that runs it (a type-only import would still be
an import circle to tests/unit/test_import_layers.py)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

from meshgate.config.schema import RouteConfig
from meshgate.http.conditions import HeaderCheck, _host_text, _HostEntry
from meshgate.http.paths import _Pattern


class _RouteView(Protocol):
    """What the analysis reads of a `Route`."""

    @property
    def index(self) -> int: ...

    @property
    def config(self) -> RouteConfig: ...

    @property
    def _hosts(self) -> tuple[_HostEntry, ...]: ...

    @property
    def _pattern(self) -> _Pattern: ...

    @property
    def _catch_all(self) -> bool: ...

    @property
    def _methods(self) -> frozenset[str] | None: ...

    @property
    def _header_checks(self) -> tuple[HeaderCheck, ...]: ...

    @property
    def _order(self) -> tuple[int, int, int]: ...

    def describe(self) -> str: ...


class _GroupView(Protocol):
    """What the analysis reads of the router's group of one host entry."""

    @property
    def members(self) -> Sequence[_RouteView]: ...


# Rules 3-5 of the precedence (`Route._order`): the router's trie lists and the
# analysis below are sorted by it.
def _order_key(route: _RouteView) -> tuple[int, int, int]:
    return route._order


_OTHER = object()  # a method or header value no route mentions
_ABSENT = object()  # a header not sent
_MAX_CASES = 4096


def _covering(b: _RouteView, before: list[_RouteView]) -> list[_RouteView] | None:
    """Routes of `before` (same group and path shape as `b`, preceding it)
    that together take every request `b` matches; None if some escape."""
    if not before:
        return None
    # Abstract every request into one method and one state per header name,
    # drawn from the values the routes mention plus "other" / "absent".
    methods: list[object]
    if b._methods is not None:
        methods = [*sorted(b._methods)]
    else:
        mentioned = {m for a in before if a._methods is not None for m in a._methods}
        methods = [*sorted(mentioned), _OTHER]
    values: dict[bytes, set[bytes]] = {}
    for r in (b, *before):
        for name, want in r._header_checks:
            bucket = values.setdefault(name, set())
            if not isinstance(want, bool):
                bucket.add(want)
    own = dict(b._header_checks)
    names = sorted(values)
    domains: list[list[object]] = []
    for name in names:
        mine = own.get(name)
        full: list[object] = [*sorted(values[name]), _OTHER]
        if mine is None:
            domains.append([*full, _ABSENT])
        elif mine is True:
            domains.append(full)
        elif mine is False:
            domains.append([_ABSENT])
        else:
            domains.append([mine])
    size = len(methods)
    for d in domains:
        size *= len(d)
    if size > _MAX_CASES:
        # Too many combinations: settle for one route covering b on its own.
        for a in before:
            if _alone_covers(a, b):
                return [a]
        return None
    takers: dict[int, _RouteView] = {}
    for method in methods:
        for states in itertools.product(*domains):
            state = dict(zip(names, states, strict=True))
            for a in before:
                if _abstract_accepts(a, method, state):
                    takers[a.index] = a
                    break
            else:
                return None
    return sorted(takers.values(), key=_order_key)


def _abstract_accepts(a: _RouteView, method: object, state: dict[bytes, object]) -> bool:
    if a._methods is not None and method not in a._methods:
        return False
    for name, want in a._header_checks:
        got = state[name]
        if want is True:
            if got is _ABSENT:
                return False
        elif want is False:
            if got is not _ABSENT:
                return False
        elif got != want:
            return False
    return True


def _alone_covers(a: _RouteView, b: _RouteView) -> bool:
    if a._methods is not None and (b._methods is None or not b._methods <= a._methods):
        return False
    own = dict(b._header_checks)
    for name, want in a._header_checks:
        have = own.get(name)
        if have is None:
            return False
        if want is True:
            if have is False:
                return False
        elif have != want:
            return False
    return True


def _overlap(a: _RouteView, b: _RouteView) -> bool:
    """Whether some request (one value per header) satisfies both routes'
    methods and headers."""
    if a._methods is not None and b._methods is not None and not a._methods & b._methods:
        return False
    other = dict(b._header_checks)
    for name, want in a._header_checks:
        have = other.get(name)
        if have is None or have == want:
            continue
        if want is False or have is False:
            return False
        if want is not True and have is not True:
            return False
    return True


def _same_conditions(a: _RouteView, b: _RouteView) -> bool:
    return (
        set(a._hosts) == set(b._hosts)
        and a._pattern.shape == b._pattern.shape
        and a._catch_all == b._catch_all
        and a._methods == b._methods
        and dict(a._header_checks) == dict(b._header_checks)
    )


def _label(route: _RouteView) -> str:
    return f"routes[{route.index}] ({route.describe()})"


def _analyze(
    routes: Sequence[_RouteView], groups: Sequence[tuple[_HostEntry, _GroupView]]
) -> list[str]:
    dead: dict[int, dict[_HostEntry, list[_RouteView]]] = {}
    ties: dict[tuple[int, int], None] = {}
    for entry, group in groups:
        by_shape: dict[tuple[object, ...], list[_RouteView]] = {}
        for route in group.members:
            shape = (route._pattern.shape, route._catch_all)
            by_shape.setdefault(shape, []).append(route)
        for same in by_shape.values():
            same.sort(key=_order_key)
            for j, b in enumerate(same):
                before = same[:j]
                takers = _covering(b, before)
                if takers is not None:
                    dead.setdefault(b.index, {})[entry] = takers
                    continue
                for a in before:
                    if a._order[:2] == b._order[:2] and _overlap(a, b):
                        ties[(b.index, a.index)] = None
    out: list[str] = []
    for route in routes:
        lost = dead.get(route.index)
        if not lost:
            continue
        takers = sorted({a.index: a for ts in lost.values() for a in ts}.values(), key=_order_key)
        if len(lost) == len(route._hosts):
            text = ", ".join(_label(a) for a in takers)
            msg = f"{_label(route)} is unreachable: every request it matches is taken by {text}"
            dups = [a for a in takers if _same_conditions(a, route)]
            if dups:
                msg += f" (it duplicates routes[{dups[0].index}])"
            out.append(msg)
        else:
            for entry, ts in lost.items():
                text = ", ".join(_label(a) for a in ts)
                out.append(
                    f"{_label(route)}: its host {_host_text(entry)!r} never reaches it, "
                    f"every such request is taken by {text}"
                )
    for b_index, a_index in ties:
        if b_index in dead and len(dead[b_index]) == len(routes[b_index]._hosts):
            continue
        a, b = routes[a_index], routes[b_index]
        out.append(
            f"{_label(b)} overlaps {_label(a)} with equal precedence: requests that match "
            f"both go to routes[{a.index}] only because it comes first in the config"
        )
    names: dict[str, _RouteView] = {}
    for route in routes:
        name = route.config.name
        if name is None:
            continue
        first = names.setdefault(name, route)
        if first is not route:
            out.append(f"routes[{route.index}] has the same name {name!r} as routes[{first.index}]")
    return out
