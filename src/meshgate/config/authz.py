"""Authorization policies, as pure data: who may call a service or a route.

One model for both places a policy is written: a mesh service's `authz:`
in mesh.yaml (its sidecar's inbound route carries it) and a gateway route's
`authz:`. `filters/authz.py` compiles it; this module only says what a
valid policy is (the path patterns are the router's, checked by its parser).

```yaml
authz:
  default: deny                  # what a request no rule decides gets (allow|deny)
  mode: enforce                  # or audit: log "would deny", let it through
  rules:
  - name: no-legacy              # deny rules first, whatever their order here
    action: deny
    from: ["spiffe://mesh.local/ns/legacy/*"]
  - name: orders-charge
    action: allow
    from: ["spiffe://mesh.local/ns/default/sa/orders"]
    methods: [GET, POST]
    paths: [/charge, /charge/**]
  - name: probes
    action: allow
    from: [plaintext]            # a caller with no verified client certificate
    methods: [GET]
    paths: [/healthz]
    headers: {x-probe: true}     # exact value, or true (present) / false (absent)
```

The decision, as Istio's: a matching `deny` rule denies; else a matching
`allow` rule allows; else `default` decides. A rule matches when every field
it gives matches (an absent field matches anything). `from:` lists SPIFFE IDs,
exact or a prefix ending in `/*`; it never matches a request that came
without a verified client certificate, unless it lists `plaintext`.
`headers:` are what the caller sent: they narrow a rule, never prove who
the caller is.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
)

__all__ = ["PLAINTEXT", "AuthzConfig", "AuthzRule"]

PLAINTEXT = "plaintext"
"""In `from:`, a caller without a verified client certificate; also the
source label of such requests in logs and metrics."""

_ID_PATTERN = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*(/\*)?$")
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_METHOD = re.compile(r"^[A-Za-z]+$")


class _Model(BaseModel):
    # As `config.schema`'s: this module is a leaf that schema imports.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _source(value: str) -> str:
    if value != PLAINTEXT and not _ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a SPIFFE ID, a prefix such as spiffe://mesh.local/ns/prod/*, "
            f"or {PLAINTEXT} (a caller without a client certificate)"
        )
    return value


def _method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise ValueError(f"expected an HTTP method such as GET, found {value!r}")
    return value.upper()


def _path(value: str) -> str:
    # The pattern itself is compiled by the router's parser in the compile
    # step (`engine.load`), so that a rule's path means what a route's does.
    if not value.startswith("/"):
        raise ValueError(f"a path pattern starts with '/', found {value!r}")
    return value


def _header_value(value: Any) -> Any:
    # YAML reads `x-canary: 1` as a number; a matcher means the text "1".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _headers(value: dict[str, str | bool]) -> dict[str, str | bool]:
    # Names and values are compiled with the router's header checks in the
    # compile step (`engine.load`).
    return value


Source = Annotated[str, AfterValidator(_source)]
Method = Annotated[str, AfterValidator(_method)]
PathPatternText = Annotated[str, AfterValidator(_path)]
HeaderValue = Annotated[StrictBool | str, BeforeValidator(_header_value)]


class AuthzRule(_Model):
    """One rule: every field given must match (absent = any)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True
    )

    name: str
    """Names the rule in denials, logs and metrics (unique in its policy)."""
    action: Literal["allow", "deny"]
    from_: list[Source] | None = Field(default=None, alias="from", min_length=1)
    """Source SPIFFE IDs: exact, a prefix ending in `/*`, or `plaintext`."""
    methods: list[Method] | None = Field(default=None, min_length=1)
    """Exact methods (`GET` does not imply `HEAD`)."""
    paths: list[PathPatternText] | None = Field(default=None, min_length=1)
    """Route-style patterns: literal, `*` or `{name}` (one segment), `**`
    (any depth, last), matched against the path the request is forwarded
    with (the request path, normalized, on a route without strip_prefix or
    rewrite)."""
    headers: Annotated[dict[str, HeaderValue], AfterValidator(_headers)] | None = Field(
        default=None, min_length=1
    )
    """Header name -> exact value, or `true` (present) / `false` (absent)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _RULE_NAME.fullmatch(v):
            raise ValueError(
                f"a rule name is 1-63 letters, digits or _.:- (starting with a letter or "
                f"digit), found {v!r}"
            )
        return v


class AuthzConfig(_Model):
    """Who may call a service (its sidecar's inbound) or a route."""

    default: Literal["allow", "deny"] = "allow"
    """The decision when no rule matches."""
    mode: Literal["enforce", "audit"] = "enforce"
    """`audit`: a request the policy denies is logged ("would deny") and
    counted, and goes through (a shadow deny, to try a policy first)."""
    rules: list[AuthzRule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[AuthzRule]) -> list[AuthzRule]:
        seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            first = seen.setdefault(rule.name, i)
            if first != i:
                raise ValueError(
                    f"rule name {rule.name!r} is used twice (rules[{first}] and rules[{i}]): "
                    "names identify rules"
                )
        return rules
