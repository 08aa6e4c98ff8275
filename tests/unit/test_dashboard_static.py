"""The dashboard's files: a fixed allow-list out of one directory, with their
content types; nothing a request names reaches the file system otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgate.observability.dashboard import refusal, static_file


@pytest.fixture
def ui(tmp_path: Path) -> Path:
    base = tmp_path / "ui"
    (base / "vendor").mkdir(parents=True)
    (base / "index.html").write_text("<!doctype html>")
    (base / "app.js").write_text("1")
    (base / "app.css").write_text("a{}")
    (base / "vendor" / "cytoscape.min.js").write_text("2")
    (base / "vendor" / "LICENSE.txt").write_text("MIT")
    (base / "vendor" / "tool.py").write_text("import os")
    (base / "secret.js").write_text("no")
    (tmp_path / "outside.js").write_text("no")
    (base / "vendor" / "link.js").symlink_to(tmp_path / "outside.js")
    return base


def test_the_allow_list_and_content_types(ui: Path) -> None:
    for path, ctype in (
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/vendor/cytoscape.min.js", "text/javascript"),
        ("/ui/vendor/LICENSE.txt", "text/plain"),
    ):
        found = static_file(path, ui)
        assert found is not None, path
        assert found.content_type.startswith(ctype)
    for path in (
        "/ui/secret.js",
        "/ui/vendor/tool.py",
        "/ui/vendor/link.js",
        "/ui/vendor/../secret.js",
        "/ui/vendor/..",
        "/ui/vendor/%2e%2e",
        "/ui/../outside.js",
        "/ui/vendor/",
        "/ui/vendor/nope.js",
        "/ui/vendor/a/b.js",
    ):
        assert static_file(path, ui) is None, path
    assert static_file("/ui", ui / "missing") is None


def _status(method: str, headers: dict[str, str], loopback: bool, token: str | None) -> int:
    got = refusal(method, headers, bound_loopback=loopback, token=token)
    return 200 if got is None else got[0]


def test_who_may_read() -> None:
    local = {"host": "127.0.0.1:9"}
    assert _status("GET", local, True, None) == 200
    assert _status("POST", local, True, None) == 405
    assert _status("GET", {"host": "evil.example"}, True, None) == 403  # DNS rebinding
    assert _status("GET", {**local, "origin": "http://127.0.0.1:9"}, True, None) == 200
    assert _status("GET", {**local, "origin": "http://127.0.0.1:10"}, True, None) == 403
    assert _status("GET", {**local, "origin": "null"}, True, None) == 403
    assert _status("GET", local, False, None) == 403  # no token on a non-loopback bind
    assert _status("GET", local, False, "t") == 401
    assert _status("GET", {"host": "dash.example", "authorization": "Bearer t"}, False, "t") == 200
    assert _status("GET", {**local, "authorization": "Bearer x"}, True, "t") == 401
    assert _status("GET", {**local, "authorization": "Basic t"}, False, "t") == 401
