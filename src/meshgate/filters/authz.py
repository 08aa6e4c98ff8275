"""A route's `authz:` (the mesh's inbound policy) as a filter, and the one
decision engine that both the filter and `meshgate mesh explain` run.

Compiled at load (`AuthzPolicy`): each rule's identities as an exact set
and a prefix tuple, its methods as a set of bytes, its paths as literal
strings and router patterns, its headers as the router's header checks. A
request costs one pass over the deny rules, then the allow rules, and no
allocation: every decision the policy can reach is a `Decision` made at
load.

The decision, as Istio's: any matching deny rule denies; else any matching
allow rule allows; else the policy's `default`. In `mode: audit` a denial is
logged as "would deny", counted as `audit_deny`, and let through (Kuma's
shadow deny). A denial is a 403 problem+json whose detail names the policy
and the rule (or the default), with `policy`, `rule`, `decision` and
`source` as extension members.

The last denials (`DENIALS_KEPT`) are kept in a ring (`DenialRing`, one per
proxy, shared by its authz filters across snapshots and reloads), for the
proxy's report to the control plane: who was refused what, by which
policy and rule. Only the deny path writes to it.

The source is `FilterRequest.peer`, the SPIFFE ID of the caller's verified
client certificate; a request without one (`peer` None) is matched by no
`from:` but one listing `plaintext`. Paths are matched against the path
the request is forwarded with (`FilterRequest.target` without its query:
the normalized request path, on a route without strip_prefix or rewrite).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from meshgate.config.authz import PLAINTEXT, AuthzConfig, AuthzRule
from meshgate.filters import FilterRequest, LocalReply
from meshgate.filters.sources import SourceCounts, source_label
from meshgate.http.conditions import HeaderCheck, header_ok, parse_header_checks
from meshgate.http.paths import PathPattern, normalize_path
from meshgate.http.problem import ProblemDetail

__all__ = [
    "DENIALS_KEPT",
    "NO_RULE",
    "AuthzFilter",
    "AuthzPolicy",
    "Decision",
    "DenialRing",
    "RuleTrace",
    "explain",
]

log = logging.getLogger("meshgate.authz")

DENIALS_KEPT = 50
NO_RULE = "no rule allowed it"
"""A default deny's reason, in a denial's record."""
_PATH_KEPT = 512
"""Characters of a denied request's path kept (the client chose them)."""
_METHOD_KEPT = 16

DecisionKind = Literal["allow", "deny", "audit_deny"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a policy decides about one request."""

    decision: DecisionKind
    """`allow`, `deny`, or `audit_deny` (denied by the policy, let through
    because it is in audit mode)."""
    policy: str
    """The policy's name: the route's label (a sidecar's, its service)."""
    rule: str | None
    """The rule that decided, or None when the default did."""
    reason: str
    """In plain words."""

    @property
    def allowed(self) -> bool:
        """Whether the request goes through (`audit_deny` does)."""
        return self.decision != "deny"


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One rule as `AuthzPolicy.trace` evaluated it."""

    name: str
    action: Literal["allow", "deny"]
    matched: bool
    why: str
    """`matches`, or the first field that does not."""


def _join(items: Sequence[str]) -> str:
    return ", ".join(items)


class _Rule:
    """One compiled rule; a field left out is None (matches anything)."""

    __slots__ = (
        "action",
        "config",
        "exact_paths",
        "headers",
        "ids",
        "methods",
        "name",
        "patterns",
        "plaintext",
        "prefixes",
    )

    def __init__(self, rule: AuthzRule, where: str) -> None:
        self.config = rule
        self.name = rule.name
        self.action = rule.action
        self.ids: frozenset[str] | None = None
        self.prefixes: tuple[str, ...] = ()
        self.plaintext = False
        if rule.from_ is not None:
            self.ids = frozenset(s for s in rule.from_ if s != PLAINTEXT and not s.endswith("/*"))
            # `spiffe://td/ns/prod/*` -> `spiffe://td/ns/prod/`: one more segment at least.
            self.prefixes = tuple(s[:-1] for s in rule.from_ if s.endswith("/*"))
            self.plaintext = PLAINTEXT in rule.from_
        self.methods = (
            frozenset(m.encode("ascii") for m in rule.methods) if rule.methods is not None else None
        )
        self.exact_paths: frozenset[str] | None = None
        self.patterns: tuple[PathPattern, ...] = ()
        if rule.paths is not None:
            compiled = [PathPattern(p, f"{where}.paths") for p in rule.paths]
            self.exact_paths = frozenset(p.text for p in compiled if p.static)
            self.patterns = tuple(p for p in compiled if not p.static)
        self.headers: tuple[HeaderCheck, ...] = parse_header_checks(rule.headers, where)

    def source_ok(self, peer: str | None) -> bool:
        ids = self.ids
        if ids is None:
            return True
        if peer is None:
            return self.plaintext
        return peer in ids or peer.startswith(self.prefixes)

    def path_ok(self, path: str, segs: list[str] | None) -> bool:
        exact = self.exact_paths
        if exact is None or path in exact:
            return True
        if segs is None:
            segs = path[1:].split("/")
        for p in self.patterns:  # noqa: SIM110 - no generator on the request path
            if p.match_segments(segs):
                return True
        return False

    def headers_ok(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        for name, want in self.headers:  # noqa: SIM110 - no generator on the request path
            if not header_ok(headers, name, want):
                return False
        return True

    def matches(
        self,
        peer: str | None,
        method: bytes,
        path: str,
        segs: list[str] | None,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> bool:
        methods = self.methods
        return (
            self.source_ok(peer)
            and (methods is None or method in methods)
            and self.path_ok(path, segs)
            and (not self.headers or self.headers_ok(headers))
        )

    def mismatch(
        self, peer: str | None, method: bytes, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> str | None:
        """Why the rule does not match, by the same checks as `matches`; None if it does."""
        cfg = self.config
        if not self.source_ok(peer):
            if peer is None:
                return f"the caller has no client certificate; from: lists {_join(cfg.from_ or [])}"
            return f"source {peer} is not in from: [{_join(cfg.from_ or [])}]"
        if self.methods is not None and method not in self.methods:
            return f"method {method.decode('latin-1')} is not in [{_join(cfg.methods or [])}]"
        if not self.path_ok(path, None):
            return f"path {path} matches none of [{_join(cfg.paths or [])}]"
        for name, want in self.headers:
            if not header_ok(headers, name, want):
                shown = name.decode("ascii")
                if want is True:
                    return f"header {shown} is missing (must be present)"
                if want is False:
                    return f"header {shown} is present (must be absent)"
                return f"header {shown} is not {want.decode('utf-8', 'replace')!r}"
        return None


class AuthzPolicy:
    """An `AuthzConfig` compiled: `decide` for requests, `trace` for people."""

    __slots__ = (
        "allow",
        "config",
        "decisions",
        "default_index",
        "deny",
        "needs_segments",
        "policy",
        "replies",
    )

    def __init__(self, cfg: AuthzConfig, policy: str) -> None:
        self.config = cfg
        self.policy = policy
        where = f"authz {policy}" if policy else "authz"
        rules = [_Rule(r, f"{where}: rule {r.name!r}") for r in cfg.rules]
        self.deny = tuple(r for r in rules if r.action == "deny")
        self.allow = tuple(r for r in rules if r.action == "allow")
        self.needs_segments = any(r.patterns for r in rules)
        denied: DecisionKind = "audit_deny" if cfg.mode == "audit" else "deny"
        audit = " (audit mode: logged, and let through)" if cfg.mode == "audit" else ""
        # Every decision the policy can reach, made once: deny rules, allow
        # rules, then the default. `_decide` returns an index into this.
        decisions = [
            Decision(denied, policy, r.name, f"rule {r.name!r} (deny) matches{audit}")
            for r in self.deny
        ]
        decisions += [
            Decision("allow", policy, r.name, f"rule {r.name!r} (allow) matches, no deny rule does")
            for r in self.allow
        ]
        if cfg.default == "allow":
            decisions.append(
                Decision("allow", policy, None, "no rule matches, and the default is allow")
            )
        else:
            decisions.append(
                Decision(
                    denied,
                    policy,
                    None,
                    "no rule allows it, and the default is deny" + audit,
                )
            )
        self.decisions = tuple(decisions)
        self.default_index = len(decisions) - 1
        # The 403 of each denying decision: its text and members, but for the source.
        self.replies: dict[int, tuple[str, dict[str, object]]] = {}
        for i, d in enumerate(self.decisions):
            if d.decision == "deny":
                why = f"rule {d.rule!r} (deny) matches" if d.rule else d.reason
                self.replies[i] = (
                    f"authorization policy {policy!r} denies this request: {why}",
                    {"policy": policy, "rule": d.rule, "decision": "deny"},
                )

    def _decide(
        self,
        peer: str | None,
        method: bytes,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> int:
        segs = path[1:].split("/") if self.needs_segments else None
        for i, rule in enumerate(self.deny):
            if rule.matches(peer, method, path, segs, headers):
                return i
        base = len(self.deny)
        for i, rule in enumerate(self.allow):
            if rule.matches(peer, method, path, segs, headers):
                return base + i
        return self.default_index

    def decide(
        self,
        peer: str | None,
        method: bytes,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> Decision:
        """The decision for a request: `path` normalized, without its query;
        header names lower-case."""
        return self.decisions[self._decide(peer, method, path, headers)]

    def trace(
        self,
        peer: str | None,
        method: bytes,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> list[RuleTrace]:
        """Every rule in evaluation order (deny rules, then allow rules), and
        whether it matches this request, with why not."""
        out = []
        for rule in (*self.deny, *self.allow):
            why = rule.mismatch(peer, method, path, headers)
            out.append(RuleTrace(rule.name, rule.action, why is None, why or "matches"))
        return out


def request_path(path: str) -> str:
    """A path as the gateway matches it (normalized, no query); ValueError if
    the gateway would refuse it with a 400."""
    normalized = normalize_path(path.partition("?")[0])
    if normalized is None:
        raise ValueError(f"{path!r} is not a valid request path")
    return normalized


def explain(
    cfg: AuthzConfig,
    peer: str | None,
    method: str,
    path: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    policy: str = "",
) -> Decision:
    """What `cfg` decides for a request from `peer` (a SPIFFE ID, or None for a
    caller without a client certificate): the filter's own engine, so that an
    explanation never disagrees with what is enforced. `path` is normalized as
    the gateway does; header names are matched case-insensitively."""
    lowered = [(n.lower(), v) for n, v in headers]
    return AuthzPolicy(cfg, policy).decide(
        peer, method.upper().encode("latin-1"), request_path(path), lowered
    )


class DenialRing:
    """A proxy's last denials, oldest first, each numbered (`seq`) so that
    a reader takes only those after the last one it took (`since`)."""

    __slots__ = ("entries", "seq")

    def __init__(self, size: int = DENIALS_KEPT) -> None:
        self.entries: deque[tuple[int, float, str, str, str, str | None, str, str]] = deque(
            maxlen=size
        )
        """(seq, at, source, destination, policy, rule, method, path)."""
        self.seq = 0

    def add(
        self,
        source: str,
        destination: str,
        policy: str,
        rule: str | None,
        method: str,
        path: str,
    ) -> None:
        self.seq += 1
        self.entries.append(
            (
                self.seq,
                time.time(),
                source,
                destination,
                policy,
                rule,
                method[:_METHOD_KEPT],
                path[:_PATH_KEPT],
            )
        )

    def since(self, seq: int) -> tuple[list[dict[str, Any]], int]:
        """The denials numbered after `seq` (those the ring still holds),
        and the number to ask after next time."""
        out = []
        for n, at, source, destination, policy, rule, method, path in self.entries:
            if n > seq:
                out.append(
                    {
                        "at": at,
                        "source": source,
                        "destination": destination,
                        "policy": policy,
                        "rule": rule,
                        "reason": f"rule {rule!r} (deny) matched" if rule else NO_RULE,
                        "method": method,
                        "path": path,
                    }
                )
        return out, self.seq


def _destination(policy: str) -> str:
    """The service a policy guards: a sidecar's is `inbound/<service>`; a
    gateway route's names none ('': the proxy's own service)."""
    return policy[len("inbound/") :] if policy.startswith("inbound/") else ""


class AuthzFilter:
    """A route's `authz:`; counts decisions by rule and source for /metrics,
    and keeps the denials in `denials`."""

    def __init__(self, cfg: AuthzConfig, policy: str, denials: DenialRing | None = None) -> None:
        self.engine = AuthzPolicy(cfg, policy)
        self.policy = policy
        self.destination = _destination(policy)
        self.denials = DenialRing() if denials is None else denials
        self.counts = SourceCounts(len(self.engine.decisions))
        """Per source label, one counter per decision of `engine.decisions`."""
        self.audit = frozenset(
            i for i, d in enumerate(self.engine.decisions) if d.decision == "audit_deny"
        )

    def __call__(self, req: FilterRequest) -> LocalReply | None:
        target = req.target
        q = target.find(b"?")
        path = (target if q < 0 else target[:q]).decode("latin-1")
        engine = self.engine
        peer = req.peer
        i = engine._decide(peer, req.method, path, req.headers)
        self.counts.row(peer)[i] += 1
        if i in engine.replies:
            return self._deny(req, path, i)
        if i in self.audit:
            self._log(logging.WARNING, "would deny", req, path, i)
        return None

    def _log(self, level: int, what: str, req: FilterRequest, path: str, i: int) -> None:
        d = self.engine.decisions[i]
        log.log(
            level,
            "authz %s: %s %s %s from %s (rule %s): %s",
            self.policy,
            what,
            req.method.decode("latin-1"),
            path,
            source_label(req.peer),
            d.rule or "-",
            d.reason,
        )

    def _deny(self, req: FilterRequest, path: str, i: int) -> LocalReply:
        self._log(logging.INFO, "denied", req, path, i)
        source = source_label(req.peer)
        self.denials.add(
            source,
            self.destination,
            self.policy,
            self.engine.decisions[i].rule,
            req.method.decode("latin-1"),
            path,
        )
        text, members = self.engine.replies[i]
        return LocalReply(403, "authz-denied", ProblemDetail(text, {**members, "source": source}))

    def metric_rows(self) -> list[tuple[str, Decision, int]]:
        """(source, decision, count) for every counter that is not zero."""
        decisions = self.engine.decisions
        out = []
        for source, row in self.counts.rows.items():
            for d, n in zip(decisions, row, strict=True):
                if n:
                    out.append((source, d, n))
        return out
