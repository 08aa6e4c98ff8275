"""Read the YAML config file into a `Config`, with errors that name file, line and field.

The YAML is composed into a node tree (safe loader) and turned into plain
Python values here rather than by PyYAML's constructor, so that every value's
position in the file is known: a pydantic error's `loc` is mapped back to the
line it came from. Only plain data is accepted: mappings with string keys,
sequences, and the core scalar types (null, bool, int, float, str). Merge keys
(`<<: *defaults`) and aliases work; duplicate keys, custom tags and recursive
aliases are errors.

String values may refer to the environment: `${VAR}`, `${VAR:-default}` (the
default is used when VAR is unset or empty), and `$$` for a literal `$`. An
unquoted value that is exactly one reference is read again as a YAML scalar
after substitution, so `workers: ${WORKERS}` gives an int. Keys are not
interpolated.

This is the config layer: it imports nothing of the engine. Checks that need
the engine's own code (the route table, transform templates, JSON body maps,
aggregate plans) run after validation in `meshgate.engine.load`, which is
what loads a gateway config or a mesh.yaml; a problem they find is named by
file, line and field through the `SourceMap` returned here.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from meshgate.config.schema import CrossReferenceError

_M = TypeVar("_M", bound=BaseModel)

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "SourceMap",
    "format_path",
    "load_model_text",
    "read_config_file",
]

Path = tuple[str | int, ...]

_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TAG_SEQ = "tag:yaml.org,2002:seq"
_TAG_MAP = "tag:yaml.org,2002:map"
_TAG_MERGE = "tag:yaml.org,2002:merge"

_TYPE_NAMES = {
    _TAG_NULL: "null",
    _TAG_BOOL: "boolean",
    _TAG_INT: "integer",
    _TAG_FLOAT: "float",
    _TAG_STR: "string",
    _TAG_TIMESTAMP: "date",
}

# Plain scalars YAML 1.1 resolves to booleans although YAML 1.2 does not.
_YAML11_BOOL_WORDS = frozenset({"on", "off", "yes", "no", "y", "n"})

# Values built from the document, counting every alias expansion: a guard
# against "billion laughs" documents. A real config has a few hundred.
_MAX_VALUES = 100_000

_REF_RE = re.compile(r"\$(?:(\$)|\{([^}]*)\}|(\{))")
_WHOLE_REF_RE = re.compile(r"\$\{[^}]*\}")
_VAR_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

# Names pydantic puts in an error's loc for union members and validators.
_PYDANTIC_TAG_NAMES = {"str", "int", "float", "bool", "bytes", "list", "dict", "none", "nullable"}

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 4
_short.maxdict = 4
_short.maxlevel = 2


class ConfigProblem(NamedTuple):
    """One thing wrong with a config file, with where it is (1-based line and column)."""

    file: str
    line: int | None
    column: int | None
    field: str
    """The field's path, as in `routes[1].upstream`; empty for the file as a whole."""
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        what = f"field '{self.field}': {self.message}" if self.field else self.message
        return f"{where}: {what}"


class ConfigError(Exception):
    """The config file cannot be used; `problems` says why, each with its line."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        super().__init__(list(problems))
        self.problems: list[ConfigProblem] = list(problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def read_config_file(filename: str) -> str:
    """The text of a config file; `ConfigError` naming the file when it cannot be read."""
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _file_error(filename, "no such file") from None
    except IsADirectoryError:
        raise _file_error(filename, "is a directory, not a config file") from None
    except OSError as exc:
        raise _file_error(filename, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = ConfigProblem(
            filename, line, column, "", "the file is not valid UTF-8 text (a config is YAML text)"
        )
        raise ConfigError([problem]) from None


def load_model_text(
    text: str,
    filename: str,
    model: type[_M],
    *,
    env: Mapping[str, str] | None = None,
    keys: str,
) -> tuple[_M, SourceMap]:
    """YAML text validated into `model`, every problem named by file, line and
    field (`ConfigError`); `keys` names the top-level keys an empty file lacks.
    The `SourceMap` is for the checks that run after validation."""
    env = os.environ if env is None else env
    try:
        root = _compose(text, filename)
        if root is None or (
            isinstance(root, ScalarNode) and root.tag == _TAG_NULL and not root.value.strip()
        ):
            raise _file_error(
                filename, f"the file is empty; expected a mapping with keys such as {keys}"
            )
        builder = _Builder(filename, env)
        data = builder.build_document(root)
        if builder.problems:
            # An aliased value is built once per use: report each fault once.
            unique = {(p.line, p.column, p.message): p for p in reversed(builder.problems)}
            raise ConfigError(sorted(unique.values(), key=lambda p: (p.line or 0, p.column or 0)))
        if not isinstance(data, dict):
            line, column = _position(root.start_mark)
            raise ConfigError(
                [
                    ConfigProblem(
                        filename,
                        line,
                        column,
                        "",
                        f"expected a mapping at the top level, with keys such as {keys} "
                        f"(found: {_describe_value(data)})",
                    )
                ]
            )
        try:
            value = model.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_Explainer(filename, data, builder, model).explain(exc)) from None
        return value, SourceMap(filename, data, builder, model)
    except RecursionError:
        raise _file_error(filename, "the document is nested too deeply") from None


class SourceMap:
    """Where each field of a validated file is, for the checks that run after
    validation: what they find is named by file, line and field as a
    validation error is."""

    def __init__(
        self, filename: str, data: dict[str, Any], builder: _Builder, model: type[BaseModel]
    ) -> None:
        self.filename = filename
        self._explainer = _Explainer(filename, data, builder, model)

    def has(self, path: Sequence[str | int]) -> bool:
        """Whether the file has a mark for the field at `path`."""
        return tuple(path) in self._explainer.marks

    def at(self, path: Sequence[str | int], message: str) -> ConfigProblem:
        """`message` at the field's own line, or at none if the file has no
        mark for it."""
        line, column = _position(self._explainer.marks.get(tuple(path)))
        return ConfigProblem(self.filename, line, column, format_path(path), message)

    def invalid(self, path: Sequence[str | int], message: str) -> ConfigProblem:
        """`message` as a validator's refusal of the value at `path` reads:
        at the closest line the file has for it, with what was found there."""
        where = self._explainer._locate(path)
        return self._explainer._problem("value_error", path, where, message, where.value)


def _file_error(filename: str, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(filename, None, None, "", message)])


def _position(mark: Mark | None) -> tuple[int | None, int | None]:
    if mark is None:
        return None, None
    return mark.line + 1, mark.column + 1


def _compose(text: str, filename: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = _position(mark)
        message = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:
            message += f" ({exc.context}"
            if exc.context_mark is not None and exc.context_mark.line != getattr(mark, "line", -1):
                message += f" at line {exc.context_mark.line + 1}"
            message += ")"
        problem = ConfigProblem(filename, line, column, "", f"invalid YAML: {message}")
        raise ConfigError([problem]) from None
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or " ")
        problem = ConfigProblem(
            filename, line, column, "", f"invalid YAML: the character U+{char:04X} is not allowed"
        )
        raise ConfigError([problem]) from None
    except yaml.YAMLError as exc:
        raise _file_error(filename, f"invalid YAML: {exc}") from None


def format_path(path: Iterable[str | int]) -> str:
    """`("routes", 1, "upstream")` -> `routes[1].upstream`."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        elif _PLAIN_KEY_RE.fullmatch(key):
            out += f".{key}" if out else key
        else:
            out += f"[{key!r}]"
    return out


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _short.repr(value)


class _Abort(Exception):
    """Stop building: the document is too large to be a config."""


@dataclass
class _Builder:
    """Turns the node tree into plain values, remembering where each came from."""

    filename: str
    env: Mapping[str, str]
    problems: list[ConfigProblem] = field(default_factory=list)
    marks: dict[Path, Mark] = field(default_factory=dict)
    """Where each value is: the value itself for a scalar, its key for a collection."""
    key_marks: dict[Path, Mark] = field(default_factory=dict)
    _constructor: SafeConstructor = field(default_factory=SafeConstructor)
    _resolver: Resolver = field(default_factory=Resolver)
    _active: set[int] = field(default_factory=set)
    _count: int = 0

    def build_document(self, root: Node) -> Any:
        self.marks[()] = root.start_mark
        try:
            return self._build(root, ())
        except _Abort:
            line, column = _position(root.start_mark)
            self.problems = [
                ConfigProblem(
                    self.filename,
                    line,
                    column,
                    "",
                    f"the document is too large: more than {_MAX_VALUES} values "
                    "once aliases are expanded",
                )
            ]
            return None

    def _problem(self, node: Node, path: Path, message: str) -> None:
        line, column = _position(node.start_mark)
        self.problems.append(ConfigProblem(self.filename, line, column, format_path(path), message))

    def _build(self, node: Node, path: Path) -> Any:
        self._count += 1
        if self._count > _MAX_VALUES:
            raise _Abort
        if id(node) in self._active:
            self._problem(node, path, "an alias refers to a value that contains it (recursion)")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, ScalarNode):
                return self._scalar(node, path)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            raise AssertionError(f"unexpected YAML node {node!r}")  # pragma: no cover
        finally:
            self._active.discard(id(node))

    def _unsupported_tag(self, node: Node, path: Path) -> None:
        self._problem(
            node,
            path,
            f"unsupported YAML tag {node.tag!r}: a config holds only mappings, lists, "
            "strings, numbers, booleans and null",
        )

    def _sequence(self, node: SequenceNode, path: Path) -> list[Any] | None:
        if node.tag != _TAG_SEQ:
            self._unsupported_tag(node, path)
            return None
        out = []
        for i, item in enumerate(node.value):
            self.marks[(*path, i)] = item.start_mark
            out.append(self._build(item, (*path, i)))
        return out

    def _key(self, key_node: Node, path: Path) -> str | None:
        if isinstance(key_node, ScalarNode) and key_node.tag in (_TAG_STR, _TAG_TIMESTAMP):
            return str(key_node.value)
        if (
            isinstance(key_node, ScalarNode)
            and key_node.tag == _TAG_BOOL
            and key_node.style is None
            and key_node.value.lower() in _YAML11_BOOL_WORDS
        ):
            # YAML 1.1 reads a plain `on:` (`yes:`, `off:` ...) as a boolean; as
            # a key it is always the word (YAML 1.2 agrees): `retry: {on: [...]}`.
            return str(key_node.value)
        if (
            isinstance(key_node, ScalarNode)
            and key_node.tag == _TAG_INT
            and path[-1:] == ("status",)
            and key_node.value.isdigit()
        ):
            # A status map (`transform.response.status: {404: 410}`): its
            # keys are status codes, naturally written as numbers.
            return str(key_node.value)
        if isinstance(key_node, ScalarNode) and key_node.tag in _TYPE_NAMES:
            kind = _TYPE_NAMES[key_node.tag]
            self._problem(
                key_node,
                path,
                f"a key must be a string, found the {kind} {key_node.value!r}; "
                f"quote it: '{key_node.value}'",
            )
        else:
            self._problem(key_node, path, "a key must be a string, found a list, mapping or tag")
        return None

    def _mapping(self, node: MappingNode, path: Path) -> dict[str, Any] | None:
        if node.tag != _TAG_MAP:
            self._unsupported_tag(node, path)
            return None
        out: dict[str, Any] = {}
        first_seen: dict[str, Mark] = {}
        merges: list[tuple[Node, Node]] = []
        explicit: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG_MERGE:
                merges.append((key_node, value_node))
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in first_seen:
                first = first_seen[key].line + 1
                self._problem(
                    key_node,
                    (*path, key),
                    f"duplicate key {key!r} (first defined at line {first}); "
                    "each key may appear only once in a mapping",
                )
                continue
            first_seen[key] = key_node.start_mark
            explicit.append((key, key_node, value_node))
        # Merged keys first, explicit keys override them (a merge is shallow).
        # Whichever value wins was built last, so the marks recorded are its own.
        for key_node, value_node in merges:
            out.update(self._merged(key_node, value_node, path))
        for key, key_node, value_node in explicit:
            child = (*path, key)
            self.key_marks[child] = key_node.start_mark
            self.marks[child] = (
                value_node.start_mark
                if isinstance(value_node, ScalarNode) and value_node.value != ""
                else key_node.start_mark
            )
            out[key] = self._build(value_node, child)
        return out

    def _merged(self, key_node: Node, value_node: Node, path: Path) -> dict[str, Any]:
        """The keys a `<<` entry brings in; earlier mappings in a list win."""
        sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
        out: dict[str, Any] = {}
        for source in reversed(sources):
            if not isinstance(source, MappingNode):
                self._problem(
                    key_node, path, "a merge key '<<' takes a mapping or a list of mappings"
                )
                continue
            merged = self._build(source, path)
            if isinstance(merged, dict):
                out.update(merged)
        return out

    def _scalar(self, node: ScalarNode, path: Path) -> Any:
        if node.tag == _TAG_STR and "$" in node.value:
            value = self._interpolate(node, path)
            if value is None:
                return None
            if node.style is None and _WHOLE_REF_RE.fullmatch(node.value):
                tag: str = self._resolver.resolve(  # type: ignore[no-untyped-call]
                    ScalarNode, value, (True, False)
                )
                return self._construct(ScalarNode(tag, value, node.start_mark, node.end_mark), path)
            return value
        return self._construct(node, path)

    def _construct(self, node: ScalarNode, path: Path) -> Any:
        c = self._constructor
        try:
            if node.tag == _TAG_STR:
                return c.construct_scalar(node)
            if node.tag == _TAG_TIMESTAMP:  # a date stays the text it was written as
                return str(node.value)
            if node.tag == _TAG_NULL:
                return c.construct_yaml_null(node)
            if node.tag == _TAG_BOOL:
                return c.construct_yaml_bool(node)
            if node.tag == _TAG_INT:
                return c.construct_yaml_int(node)
            if node.tag == _TAG_FLOAT:
                return c.construct_yaml_float(node)
        except (ValueError, KeyError, IndexError):
            kind = _TYPE_NAMES[node.tag]
            self._problem(node, path, f"{node.value!r} is not a valid {kind}")
            return None
        self._unsupported_tag(node, path)
        return None

    def _interpolate(self, node: ScalarNode, path: Path) -> str | None:
        ok = True

        def substitute(m: re.Match[str]) -> str:
            nonlocal ok
            if m.group(1) is not None:
                return "$"
            if m.group(3) is not None:
                ok = False
                self._problem(
                    node, path, "unterminated '${': write ${NAME} or ${NAME:-default}, or $$ for $"
                )
                return ""
            body = m.group(2)
            ref = _VAR_RE.fullmatch(body)
            if ref is None:
                ok = False
                self._problem(
                    node,
                    path,
                    f"invalid reference '${{{body}}}': write ${{NAME}} or ${{NAME:-default}} "
                    "(NAME is letters, digits and _), or $$ for a literal $",
                )
                return ""
            name, default = ref.group(1), ref.group(2)
            value = self.env.get(name)
            if default is not None and not value:
                return default
            if value is None:
                ok = False
                self._problem(
                    node,
                    path,
                    f"environment variable {name!r} is not set "
                    f"(set it, or give a default: ${{{name}:-...}})",
                )
                return ""
            return value

        result = _REF_RE.sub(substitute, node.value)
        return result if ok else None


@dataclass
class _Located:
    path: Path
    """The loc's elements that exist in the data (plus a missing field's name)."""
    inner: list[str]
    """Field names below `path` that exist only after a validator rewrote the value."""
    union_path: Path | None
    """Where the loc went through a union member's tag, if it did."""
    value: Any


_MISSING = object()


def _is_pydantic_tag(elem: str) -> bool:
    """`str`, `list[str]`, `function-before[...]`, `RateLimitShort`: not field names."""
    return "[" in elem or "-" in elem or elem in _PYDANTIC_TAG_NAMES or elem[:1].isupper()


def _has_child(data: Any, elem: str | int) -> bool:
    if isinstance(data, dict):
        return isinstance(elem, str) and elem in data
    if isinstance(data, list):
        return isinstance(elem, int) and not isinstance(elem, bool) and 0 <= elem < len(data)
    return False


class _Explainer:
    def __init__(
        self, filename: str, data: dict[str, Any], builder: _Builder, model: type[BaseModel]
    ) -> None:
        self.filename = filename
        self.model = model
        """The file's top-level model: where the fields allowed at a path are looked up."""
        self.data = data
        self.marks = builder.marks
        self.key_marks = builder.key_marks

    def _mark_for(self, path: Path, *, key: bool = False) -> tuple[int | None, int | None]:
        if key and path in self.key_marks:
            return _position(self.key_marks[path])
        for n in range(len(path), -1, -1):
            if path[:n] in self.marks:
                return _position(self.marks[path[:n]])
        return None, None

    def _locate(self, loc: Sequence[str | int], *, missing: bool = False) -> _Located:
        data: Any = self.data
        path: list[str | int] = []
        inner: list[str] = []
        union_path: Path | None = None
        for i, elem in enumerate(loc):
            if inner:
                if isinstance(elem, str) and not _is_pydantic_tag(elem):
                    inner.append(elem)
            elif _has_child(data, elem):
                path.append(elem)
                data = data[elem]
            elif missing and i == len(loc) - 1 and isinstance(data, dict) and isinstance(elem, str):
                path.append(elem)
                data = _MISSING
            elif isinstance(elem, str) and _is_pydantic_tag(elem):
                if union_path is None:
                    union_path = tuple(path)
            elif isinstance(elem, str):
                inner.append(elem)
        return _Located(tuple(path), inner, union_path, data)

    def explain(self, exc: ValidationError) -> list[ConfigProblem]:
        problems: list[tuple[int, ConfigProblem]] = []
        unions: dict[Path, list[tuple[int, str, Sequence[str | int], _Located, str, Any]]] = {}
        for order, err in enumerate(exc.errors(include_url=False)):
            ctx = err.get("ctx") or {}
            cause = ctx.get("error")
            if isinstance(cause, CrossReferenceError):
                for ref_loc, message in cause.errors:
                    where = self._locate(ref_loc)
                    line, column = self._mark_for(where.path)
                    problem = ConfigProblem(
                        self.filename, line, column, format_path(where.path), message
                    )
                    problems.append((order, problem))
                continue
            kind, loc = err["type"], err["loc"]
            where = self._locate(loc, missing=kind == "missing")
            message = _FRIENDLIER.get(kind) or _clean(err["msg"])
            entry = (order, kind, loc, where, message, err["input"])
            if where.union_path is not None:
                unions.setdefault(where.union_path, []).append(entry)
            else:
                problems.append((order, self._problem(*entry[1:])))
        for union_path, entries in unions.items():
            # A union reports one error per member. If the value got past some member's
            # type check (it is a list, say), that member's errors are the useful ones;
            # otherwise say that it is none of the members.
            deeper = [e for e in entries if len(e[3].path) > len(union_path) or e[3].inner]
            if deeper:
                problems.extend((e[0], self._problem(*e[1:])) for e in deeper)
                continue
            first = entries[0]
            message = _join_alternatives([e[4] for e in entries])
            problem = self._problem("union", first[2], first[3], message, first[3].value)
            problems.append((first[0], problem))
        problems.sort(key=lambda p: (p[1].line or 0, p[1].column or 0, p[0]))
        return [p for _, p in problems]

    def _problem(
        self, kind: str, loc: Sequence[str | int], where: _Located, message: str, found: Any
    ) -> ConfigProblem:
        path = where.path
        field_name = format_path(path)
        if kind == "missing":
            if where.inner:
                line, column = self._mark_for(path)
                name = ".".join(where.inner)
            else:
                line, column = self._mark_for(path[:-1])
                name = str(path[-1]) if path else "?"
            message = f"required field {name!r} is missing"
            return ConfigProblem(self.filename, line, column, field_name, message)
        if kind == "extra_forbidden":
            line, column = self._mark_for(path, key=True)
            name = str(path[-1]) if path else "?"
            message = f"unknown field {name!r}"
            allowed = _allowed_fields(self.model, loc[:-1])
            if allowed:
                close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                message += f" (allowed here: {', '.join(allowed)})"
            return ConfigProblem(self.filename, line, column, field_name, message)
        line, column = self._mark_for(path)
        if where.inner:
            message = f"{'.'.join(where.inner)}: {message}"
            found = where.value  # the value as written, before a validator rewrote it
        shown = _describe_found(found)
        if shown not in message and "found " not in message:
            message += f" (found: {shown})"
        return ConfigProblem(self.filename, line, column, field_name, message)


# pydantic's wording where it names Python rather than YAML types.
_FRIENDLIER = {
    "model_type": "Input should be a mapping",
    "model_attributes_type": "Input should be a mapping",
    "dict_type": "Input should be a mapping",
}


def _describe_found(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        # Never echo a mapping's values: they may hold a secret.
        return "a mapping with " + (", ".join(map(str, value)) or "no fields")
    return _short.repr(value)


def _clean(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _join_alternatives(messages: list[str]) -> str:
    unique = list(dict.fromkeys(messages))
    lead = "Input should be "
    if all(m.startswith(lead) for m in unique):
        return lead + " or ".join(m[len(lead) :] for m in unique)
    return "; or ".join(unique)


def _unwrap(types_: Iterable[Any]) -> list[Any]:
    """Annotated and union types -> their plain member types."""
    out: list[Any] = []
    stack = list(types_)
    while stack:
        t = stack.pop(0)
        origin = get_origin(t)
        if origin is Annotated:
            stack.insert(0, get_args(t)[0])
        elif origin is Union or origin is types.UnionType:
            stack[0:0] = list(get_args(t))
        elif t is not type(None):
            out.append(t)
    return out


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _allowed_fields(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The field names of the model at `loc` in `root` (skipping pydantic's
    tags), if one is there."""
    candidates: list[Any] = [root]
    for elem in loc:
        following: list[Any] = []
        for t in _unwrap(candidates):
            if _is_model(t):
                fields = t.model_fields
                if isinstance(elem, str) and elem in fields:
                    following.append(fields[elem].annotation)
            elif get_origin(t) is list and isinstance(elem, int):
                following.append(get_args(t)[0])
            elif get_origin(t) is dict and isinstance(elem, str):
                following.append(get_args(t)[1])
        if following:
            candidates = following
    models = [t for t in _unwrap(candidates) if _is_model(t)]
    if len(models) != 1:
        return []
    return list(models[0].model_fields)
