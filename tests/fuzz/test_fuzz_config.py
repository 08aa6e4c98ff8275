"""Fuzzing the config loader (`config/loader.py` and `engine/load.py`): any
file either loads into a config, or is refused with `ConfigError` whose
every problem names the file, and the line of any field it names; never
another exception.

Each input is written to a file and read as `meshgate check` reads it
(`load_config`, or `load_mesh` for a `*.mesh.yaml`), with an empty
environment.

1. Every file of corpus/config/ (the seed config, the demo mesh's files,
   the README's tour, and YAML edge cases: billion laughs, recursive
   aliases, python tags, BOMs, deep nesting, bad UTF-8...).
2. Mutations of the corpus documents: values replaced by awkward ones,
   fields deleted, added, duplicated, wrapped in lists, then dumped again.
3. Mutations of the corpus text: lines deleted, duplicated, swapped,
   re-indented, bytes inserted, the file cut short.
4. Arbitrary YAML documents made of the config's own vocabulary.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from meshgate.config.loader import ConfigError
from meshgate.engine.load import load_config, load_mesh
from support.fuzz import corpus, fuzz_settings

CORPUS = corpus("config")
_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meshgate-fuzz-config-") as tmp:
        yield Path(tmp)


def check_file(workdir: Path, data: bytes, *, mesh: bool = False) -> None:
    """The rule for one file's bytes."""
    path = workdir / f"f{next(_counter)}{'.mesh' if mesh else ''}.yaml"
    path.write_bytes(data)
    try:
        (load_mesh if mesh else load_config)(path, env={})
    except ConfigError as exc:
        assert exc.problems, "a ConfigError with no problem"
        for problem in exc.problems:
            assert problem.file == str(path), problem
            assert problem.message, problem
            assert problem.line is not None or not problem.field, problem
        str(exc)
    finally:
        path.unlink()


@pytest.mark.parametrize(("name", "data"), CORPUS, ids=[n for n, _ in CORPUS])
def test_corpus_loads_or_is_refused(workdir: Path, name: str, data: bytes) -> None:
    check_file(workdir, data, mesh=name.endswith(".mesh.yaml"))


def _document(data: bytes) -> Any:
    try:
        return yaml.safe_load(data.decode("utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError):
        return None


# The documents of the corpus that are mappings, to mutate: (name, document);
# not the ones whose point is their size or depth.
DOCUMENTS = [
    (n, doc)
    for n, d in CORPUS
    if not n.startswith(("billion-laughs", "nested-deep", "recursive-alias"))
    and isinstance(doc := _document(d), dict)
]

WEIRD: list[Any] = [
    None,
    "",
    -1,
    0,
    1,
    2**70,
    1e308,
    float("nan"),
    float("inf"),
    [],
    {},
    "x" * 300,
    "${V}",
    "${V:-3}",
    "$$",
    "${",
    "1s",
    "0s",
    "-1s",
    "1e9s",
    "10%",
    "100/min",
    "0/min",
    True,
    "*",
    "/**",
    "/{a}/{a}",
    "127.0.0.1:0",
    "::1",
    "[::1]:80",
    "a:b:c",
    "http://x",
    "~",
    "1KiB",
    "99999999999GiB",
    "/a/b",
    {"a": 1},
    [1, "x"],
    "\x00",
    "é",
    "2026-06-30",
    "jwt",
    "keys",
    "order-service",
    "spiffe://demo.mesh/ns/default/sa/x",
]
NEW_KEYS = ["x", "path", "upstream", "timeout", "auth", "name", "endpoints", "split", "<<"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[bytes, bool]:
    name, doc = draw(st.sampled_from(DOCUMENTS))
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(list(_paths(doc))[1:] or [()]))
        if not where:
            break
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        last = where[-1]
        kind = draw(st.sampled_from(["replace", "delete", "add", "dup", "wrap", "text"]))
        value = copy.deepcopy(draw(st.sampled_from(WEIRD)))
        if kind == "replace":
            parent[last] = value
        elif kind == "text":
            parent[last] = draw(st.text(max_size=8) | st.integers())
        elif kind == "delete":
            del parent[last]
        elif kind == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.sampled_from(NEW_KEYS))] = value
        elif kind == "dup" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        elif kind == "wrap":
            parent[last] = [parent[last]]
    flow = draw(st.sampled_from([False, None, True]))
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=flow)
    return text.encode(), name.endswith(".mesh.yaml")


@fuzz_settings(ci_examples=150)
@given(case=mutated_documents())
def test_mutated_documents_load_or_are_refused(workdir: Path, case: tuple[bytes, bool]) -> None:
    check_file(workdir, case[0], mesh=case[1])


# The texts to mutate: not the ones whose point is their size or depth.
TEXTS = [(n, d) for n, d in CORPUS if not n.startswith(("billion-laughs", "nested-deep"))]
SNIPPETS = [
    b"\n",
    b" ",
    b"  ",
    b"\t",
    b":",
    b"- ",
    b"&a ",
    b"*a",
    b"!!str ",
    b"{",
    b"[",
    b"'",
    b'"',
]
SNIPPETS += [b"<<: *a\n", b"? ", b"#", b"---\n", b"${X}", b"\xff", b"\x00", b"\xef\xbb\xbf"]


@st.composite
def mutated_texts(draw: st.DrawFn) -> tuple[bytes, bool]:
    name, data = draw(st.sampled_from(TEXTS))
    lines = data.split(b"\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "dup", "swap", "indent", "dedent", "insert", "cut"]))
        if kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent":
            lines[i] = b"  " + lines[i]
        elif kind == "dedent":
            lines[i] = lines[i].lstrip()
        elif kind == "insert":
            at = draw(st.integers(0, len(lines[i])))
            snippet = draw(st.sampled_from(SNIPPETS) | st.binary(min_size=1, max_size=3))
            lines[i] = lines[i][:at] + snippet + lines[i][at:]
        elif kind == "cut":
            del lines[i + 1 :]
    return b"\n".join(lines), name.endswith(".mesh.yaml")


@fuzz_settings(ci_examples=150)
@given(case=mutated_texts())
def test_mutated_texts_load_or_are_refused(workdir: Path, case: tuple[bytes, bool]) -> None:
    check_file(workdir, case[0], mesh=case[1])


KEYS = ["listen", "upstreams", "routes", "path", "upstream", "endpoints", "auth", "admin"]
KEYS += ["limits", "timeouts", "split", "weight", "transform", "services", "control", "u"]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(WEIRD[:20])
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner),
    max_leaves=15,
)


@fuzz_settings(ci_examples=80)
@given(doc=st.dictionaries(st.sampled_from(KEYS), values), mesh=st.booleans())
def test_arbitrary_documents_load_or_are_refused(
    workdir: Path, doc: dict[str, Any], mesh: bool
) -> None:
    check_file(workdir, yaml.safe_dump(doc).encode(), mesh=mesh)
