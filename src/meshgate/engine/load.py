"""Load a config file the way the engine runs it: validated, then compiled.

`meshgate.config.loader` reads the YAML and validates it against the
schema; it is the config layer and imports nothing of the engine. What only
the engine's own code can check runs here, once, after validation: the JSON
body maps (`transform.*.body`) and aggregate plans (`aggregate:`) of every
route, then, for a gateway config, the route table and the transform
templates. A refusal is a `ConfigError` naming file, line and field, like
any validation error. `meshgate check`, `meshgate run`, a reload and the
control plane's mesh.yaml (on file and through `PUT /config`) all load
through here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from meshgate.config.authz import AuthzConfig
from meshgate.config.loader import (
    ConfigError,
    ConfigProblem,
    SourceMap,
    load_model_text,
    read_config_file,
)
from meshgate.config.mesh import MeshConfig
from meshgate.config.schema import Config, RouteConfig
from meshgate.filters.transform import compile_transform
from meshgate.handlers.aggregate import check_plan
from meshgate.http.conditions import parse_header_checks
from meshgate.http.paths import PathPattern, route_params
from meshgate.http.router import Router
from meshgate.transform.jsonmap import JsonMap

__all__ = ["check_config", "load_config", "load_config_text", "load_mesh", "load_mesh_text"]

Path = tuple[str | int, ...]

CONFIG_KEYS = "'listen', 'upstreams' and 'routes'"
MESH_KEYS = "'trust_domain', 'control' and 'services'"


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate, validate and compile-check the config file at `path`.

    `env` defaults to `os.environ`. Raises `ConfigError` for every failure:
    missing or unreadable file, bad encoding, YAML syntax, unknown or invalid
    fields, and what the engine refuses to compile.
    """
    filename = os.fspath(path)
    return load_config_text(read_config_file(filename), filename, env=env)


def load_config_text(
    text: str, filename: str = "<string>", *, env: Mapping[str, str] | None = None
) -> Config:
    """Like `load_config`, for text already read; `filename` is only used in messages."""
    config, source = load_model_text(text, filename, Config, env=env, keys=CONFIG_KEYS)
    check_config(config, source)
    return config


def load_mesh(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> MeshConfig:
    """Read, validate and compile-check mesh.yaml, every problem named by file,
    line and field."""
    filename = os.fspath(path)
    return load_mesh_text(read_config_file(filename), filename, env=env)


def load_mesh_text(
    text: str,
    filename: str,
    *,
    env: Mapping[str, str] | None = None,
    keys: str = MESH_KEYS,
) -> MeshConfig:
    """Like `load_mesh`, for text already read (a `PUT /config` body, a
    generation from the store); `keys` names what an empty text lacks."""
    mesh, source = load_model_text(text, filename, MeshConfig, env=env, keys=keys)
    problems: list[ConfigProblem] = []
    for name, service in mesh.services.items():
        problems += _route_problems(service.routes, ("services", name, "routes"), source)
        problems += _authz_problems(service.authz, ("services", name, "authz"), source)
    _raise(problems)
    return mesh


def check_config(config: Config, source: SourceMap) -> None:
    """The compile step after validation: `ConfigError` for what the engine
    would refuse to build, at the line of the field that causes it."""
    _raise(_route_problems(config.routes, ("routes",), source))
    _check_routes(config, source)
    _check_transforms(config, source)


def _raise(problems: list[ConfigProblem]) -> None:
    if problems:
        order = {id(p): i for i, p in enumerate(problems)}
        raise ConfigError(
            sorted(problems, key=lambda p: (p.line or 0, p.column or 0, order[id(p)]))
        )


def _route_problems(
    routes: Sequence[RouteConfig], base: Path, source: SourceMap
) -> list[ConfigProblem]:
    """Every route's JSON body maps, then its aggregate plan (skipped on a
    route whose map is refused): what the schema's validators checked when
    they could compile them, reported as they reported it."""
    problems: list[ConfigProblem] = []
    for i, route in enumerate(routes):
        at: Path = (*base, i)
        mapped = True
        transform = route.transform
        for side, edits in (
            ("request", transform.request if transform is not None else None),
            ("response", transform.response if transform is not None else None),
        ):
            if edits is None or edits.body is None:
                continue
            try:
                JsonMap(edits.body, "body")
            except ValueError as exc:
                problems.append(source.invalid((*at, "transform", side, "body"), str(exc)))
                mapped = False
        if mapped and route.aggregate is not None:
            try:
                check_plan(route.aggregate, route.path)
            except ValueError as exc:
                problems.append(source.invalid(at, str(exc)))
        if route.authz is not None:
            problems += _authz_problems(route.authz, (*at, "authz"), source)
    return problems


def _authz_problems(authz: AuthzConfig, base: Path, source: SourceMap) -> list[ConfigProblem]:
    """Each rule's path patterns and header checks, compiled by the router's
    own parsers (a rule's path means what a route's does)."""
    problems: list[ConfigProblem] = []
    for j, rule in enumerate(authz.rules):
        at: Path = (*base, "rules", j)
        for k, pattern in enumerate(rule.paths or ()):
            try:
                PathPattern(pattern, "")
            except ValueError as exc:
                problems.append(source.invalid((*at, "paths", k), str(exc).removeprefix(": ")))
        if rule.headers:
            try:
                parse_header_checks(rule.headers, "")
            except ValueError as exc:
                problems.append(
                    source.invalid((*at, "headers"), str(exc).removeprefix(": headers: "))
                )
    return problems


_ROUTE_REF = re.compile(r"routes\[(\d+)\]")
_ROUTE_FIELDS = ("path", "rewrite", "strip_prefix", "host", "methods", "headers", "name")


def _check_routes(config: Config, source: SourceMap) -> None:
    """Compile the route table once, so that a pattern the router refuses
    (a `**` that is not last, a rewrite naming an unknown segment...) is a
    config error with its line, like any other."""
    try:
        Router([(route, None) for route in config.routes])
    except ValueError as exc:
        message = str(exc)
        m = _ROUTE_REF.search(message)
        path: Path = ()
        if m is not None:
            path = ("routes", int(m.group(1)))
            for name in _ROUTE_FIELDS:
                if f"'{name}'" in message or f"{name}:" in message or f"{name} " in message:
                    if source.has((*path, name)):
                        path = (*path, name)
                    break
        raise ConfigError([source.at(path, message)]) from None


def _check_transforms(config: Config, source: SourceMap) -> None:
    """Compile each route's `transform:` header, query and path edits (their
    templates) here, so that a refusal points at its line like any other."""
    for i, route in enumerate(config.routes):
        if route.transform is None:
            continue
        try:
            compile_transform(route.transform, f"routes[{i}]", params=route_params(route.path))
        except ValueError as exc:
            message = str(exc)
            # `routes[0].transform.request.headers.set.x-a: ...`: the deepest
            # part of that dotted field the file has a mark for.
            path: Path = ("routes", i)
            for part in message.partition(": ")[0].split(".")[1:]:
                if not source.has((*path, part)):
                    break
                path = (*path, part)
            field, _, why = message.partition(": ")
            raise ConfigError([source.at(path, why or field)]) from None
