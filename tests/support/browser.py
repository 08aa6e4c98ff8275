"""A real Chromium for the dashboard's tests (Playwright, Debian's `chromium`),
axe-core's accessibility check, and a small server that plays the control
plane's UI API from a JSON state (docs/dashboard-api.md, section 2).

Without Playwright or a Chromium the browser tests are skipped, or fail
when CI=true (CI installs both).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "src" / "meshgate" / "ui"
BROWSER_DIR = ROOT / "tests" / "browser"
AXE_JS = BROWSER_DIR / "vendor" / "axe.min.js"
ARTIFACTS = BROWSER_DIR / "artifacts"
FIXTURE_STATE = BROWSER_DIR / "fixtures" / "state.json"
# The control plane's policy (observability.dashboard.CSP) without its
# 'unsafe-inline' styles: the page needs none.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
VIEWPORTS = {"desktop": (1366, 768), "tablet": (768, 1024)}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def chromium_path() -> str | None:
    for candidate in (os.environ.get("MESHGATE_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> str:
    """Chromium's path; skip (or fail under CI=true) without it or Playwright."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright (pip install playwright)")
    path = chromium_path()
    if path is None:
        missing.append("Chromium (apt-get install chromium)")
    if missing:
        why = " and ".join(missing) + " not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}, and CI=true requires the browser tests to run")
        pytest.skip(f"{why}; CI=true makes this a failure")
    assert path is not None
    return path


def launch_args() -> list[str]:
    args = ["--disable-gpu", "--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")
    return args


class PageErrors:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page: Any) -> None:
        self.messages: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.messages.append(f"pageerror: {exc}"))

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.messages.append(f"console.{msg.type}: {msg.text}")

    def check(self) -> None:
        assert not self.messages, "\n".join(self.messages)


def open_dashboard(
    browser: Any, url: str, viewport: str = "desktop", scheme: str = "light"
) -> tuple[Any, PageErrors]:
    """A new page on the dashboard, its first state drawn."""
    width, height = VIEWPORTS[viewport]
    context = browser.new_context(
        viewport={"width": width, "height": height}, color_scheme=scheme, reduced_motion="reduce"
    )
    # Added through the DevTools protocol, so the page's CSP does not apply.
    context.add_init_script(path=str(AXE_JS))
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(url)
    wait_updates(page, 1)
    return page, errors


def wait_updates(page: Any, count: int, timeout: float = 15_000) -> None:
    page.wait_for_function(
        "n => Number(document.body.dataset.updates || 0) >= n", arg=count, timeout=timeout
    )


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's violations of impact serious or critical."""
    result = page.evaluate(
        """async () => {
            const r = await axe.run(document, {resultTypes: ['violations']});
            return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.slice(0, 5).map(n => n.target.join(' '))}));
        }"""
    )
    return [v for v in result if v["impact"] in ("serious", "critical")]


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def graph(page: Any) -> dict[str, Any]:
    """What Cytoscape holds: nodes and edges with their data, positions, styles."""
    return dict(
        page.evaluate(
            """() => {
            const cy = window.meshgateGraph;
            return {
              nodes: cy.nodes().map(n => ({...n.data(), x: n.position('x'), y: n.position('y'),
                  color: n.style('background-color')})),
              edges: cy.edges().map(e => ({...e.data(), mid: e.midpoint(),
                  lineStyle: e.style('line-style'),
                  lineColor: e.style('line-color'), widthPx: parseFloat(e.style('width'))})),
            };
        }"""
        )
    )


def css_color(page: Any, var: str) -> str:
    """A palette colour as the browser computes it, as Cytoscape writes it (rgb(r,g,b))."""
    return str(
        page.evaluate(
            """v => { const d = document.createElement('div'); d.style.color = `var(${v})`;
                document.body.append(d); const c = getComputedStyle(d).color; d.remove();
                return c; }""",
            var,
        )
    ).replace(" ", "")


def edge_rows(page: Any) -> list[dict[str, Any]]:
    """The "Graph as a table" edges, in the order shown."""
    return list(
        page.evaluate(
            """() => [...document.querySelectorAll('#edges-table tbody tr[data-edge-id]')].map(
                tr => ({id: tr.dataset.edgeId, source: tr.dataset.source, target: tr.dataset.target,
                    rps: Number(tr.dataset.rps), mtls: tr.dataset.mtls === 'true',
                    denied: tr.dataset.denied === 'true',
                    lock: !!tr.querySelector('td.mtls svg.lock'),
                    warn: !!tr.querySelector('td.mtls svg.warn'),
                    why: tr.querySelector('td.why').textContent}))"""
        )
    )


def graph_marks(page: Any) -> dict[str, str]:
    """The icons drawn on the graph's edges that are inside its box: edge id -> lock | warn."""
    return dict(
        page.evaluate(
            """() => {
            const box = document.getElementById('graph').getBoundingClientRect();
            const out = {};
            for (const m of document.querySelectorAll('#graph-marks .mark')) {
                const r = m.getBoundingClientRect();
                const inside = r.width > 0 && r.left >= box.left - 1 && r.right <= box.right + 1
                    && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
                if (inside && m.querySelector('svg.' + m.dataset.kind)) {
                    out[m.dataset.edgeId] = m.dataset.kind;
                }
            }
            return out;
        }"""
        )
    )


class FixtureApi:
    """Serves `src/meshgate/ui/` under /ui and a canned state, pushed over SSE."""

    def __init__(self, state: dict[str, Any], token: str | None = None) -> None:
        self.token = token
        """With a token, the API (not the page's files) needs `Authorization: Bearer`."""
        self.state = copy.deepcopy(state)
        self.version = 0
        self.cond = threading.Condition()
        self.streams = 0
        self.epoch = 0
        self.explains: list[dict[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/ui"

    def push(self, state: dict[str, Any]) -> None:
        """Sends `state` to every open event stream (and to later reads)."""
        with self.cond:
            self.state = copy.deepcopy(state)
            self.version += 1
            self.cond.notify_all()

    def drop_streams(self) -> None:
        """Closes every open event stream (the page must reconnect)."""
        with self.cond:
            self.epoch += 1
            self.cond.notify_all()

    def wait_streams(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.streams < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{self.streams} event streams, not {count}"
                self.cond.wait(left)

    def explain(self, q: dict[str, str]) -> dict[str, Any]:
        self.explains.append(q)
        if q.get("destination") == "customer-service" and "order-service" not in q.get(
            "source", ""
        ):
            return {
                "decision": "deny",
                "policy": "inbound/customer-service",
                "rule": None,
                "reason": "no rule allowed it",
                "trace": [
                    {
                        "name": "orders-only",
                        "action": "allow",
                        "matches": False,
                        "why": "from: the caller is not spiffe://demo.mesh/ns/default/sa/order-service",
                    }
                ],
                "notes": [],
            }
        return {
            "decision": "allow",
            "policy": f"inbound/{q.get('destination')}",
            "rule": "orders-only",
            "reason": "rule orders-only allows it",
            "trace": [{"name": "orders-only", "action": "allow", "matches": True, "why": ""}],
            "notes": [],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Security-Policy", CSP)
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, doc: Any, status: int = 200) -> None:
                self._send(status, json.dumps(doc).encode(), "application/json")

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path
                q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                if path in ("/ui", "/ui/"):
                    path = "/ui/index.html"
                api_path = path.startswith("/ui/api/") or path == "/ui/events"
                given = self.headers.get("Authorization")
                if api_path and api.token is not None and given != f"Bearer {api.token}":
                    self._json({"error": "the dashboard needs the admin token"}, 401)
                    return
                if path == "/ui/api/state":
                    with api.cond:
                        self._json(api.state)
                elif path == "/ui/events":
                    self._events()
                elif path == "/ui/api/explain":
                    self._json(api.explain(q))
                elif path == "/ui/api/config/diff":
                    self._json(
                        {
                            "from": int(q.get("from", 0)),
                            "to": int(q.get("to", 0)),
                            "diff": "--- generation {f}\n+++ generation {t}\n@@ -1,2 +1,2 @@\n"
                            " trust_domain: demo.mesh\n-mtls: permissive\n+mtls: strict\n".format(
                                f=q.get("from"), t=q.get("to")
                            ),
                        }
                    )
                elif path.startswith("/ui/"):
                    file = (UI_DIR / path.removeprefix("/ui/")).resolve()
                    if UI_DIR.resolve() in file.parents and file.is_file():
                        ctype = _TYPES.get(file.suffix, "application/octet-stream")
                        self._send(200, file.read_bytes(), ctype)
                    else:
                        self._json({"detail": "not found"}, 404)
                else:
                    self._json({"detail": "not found"}, 404)

            def _events(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                with api.cond:
                    epoch, seen, state = api.epoch, api.version, api.state
                    api.streams += 1
                    api.cond.notify_all()
                try:
                    self.wfile.write(b"retry: 300\n\n")
                    self._event(state)
                    while True:
                        with api.cond:
                            api.cond.wait_for(
                                lambda s=seen: api.version != s or api.epoch != epoch, timeout=1.0
                            )
                            if api.epoch != epoch:
                                break
                            changed = api.version != seen
                            seen, state = api.version, api.state
                        if changed:
                            self._event(state)
                        else:
                            self.wfile.write(b": keep-alive\n\n")
                            self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with api.cond:
                        api.streams -= 1
                    self.close_connection = True

            def _event(self, state: dict[str, Any]) -> None:
                self.wfile.write(b"event: state\ndata: " + json.dumps(state).encode() + b"\n\n")
                self.wfile.flush()

        return Handler

    def start(self) -> FixtureApi:
        self.thread.start()
        return self

    def close(self) -> None:
        self.drop_streams()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextmanager
def fixture_api(state: dict[str, Any], token: str | None = None) -> Iterator[FixtureApi]:
    api = FixtureApi(state, token).start()
    try:
        yield api
    finally:
        api.close()


_TIMES = ("generated_at", "at", "loaded_at", "not_before", "not_after")


def _shift(doc: Any, by: float) -> None:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in _TIMES and isinstance(v, int | float):
                doc[k] = round(v + by, 1)
            else:
                _shift(v, by)
    elif isinstance(doc, list):
        for v in doc:
            _shift(v, by)


def load_fixture() -> dict[str, Any]:
    """fixtures/state.json, its times moved so that it was generated now."""
    doc = dict(json.loads(FIXTURE_STATE.read_text()))
    _shift(doc, time.time() - float(doc["generated_at"]))
    return doc


def eventually(check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Calls `check` until it returns a true value, or fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout} s: {what} (last: {last!r})", pytrace=False)
        time.sleep(every)
