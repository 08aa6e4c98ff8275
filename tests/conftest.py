"""Fixtures for the real-process integration tests (see tests/support/).

Tests marked `engine` run the real gateway (`meshgate run`); they are skipped
with a reason until the engine's CLI exists, and never after that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.proxy import ProxyProcess, Stack, engine_available
from support.upstream import UpstreamServer


def _absolute_pythonpath() -> None:
    """The processes the tests start run in their own temporary directories:
    a relative PYTHONPATH (`PYTHONPATH=src`) would quietly point them at
    another tree (the venv's installed one) than the tests'."""
    value = os.environ.get("PYTHONPATH")
    if value:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) if p else p for p in value.split(os.pathsep)
        )


_absolute_pythonpath()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "engine: runs the real gateway process (`meshgate run` and its CLI)"
    )
    config.addinivalue_line(
        "markers",
        "mesh: runs the mesh's real processes (control plane, agents); `pytest -m mesh` "
        "runs them alone, `-m 'not mesh'` skips them",
    )
    config.addinivalue_line(
        "markers",
        "slow: a long mesh test (certificate rotation under load, ten services, namespaces); "
        "`pytest -m slow` runs them alone, `-m 'not slow'` skips them",
    )
    config.addinivalue_line(
        "markers",
        "browser: drives the dashboard in a real Chromium (Playwright); `pytest -m browser` "
        "runs them alone, `-m 'not browser'` skips them",
    )
    config.addinivalue_line(
        "markers",
        "adversarial: raw-socket attacks on the real gateway (tests/adversarial/, issue 16); "
        "`pytest -m adversarial` runs them alone, `-m 'not adversarial'` skips them",
    )
    config.addinivalue_line(
        "markers",
        "chaos: the real gateway under load while workers, upstreams and Redis fail "
        "(tests/chaos/, issue 16); `pytest -m chaos` runs them alone, `-m 'not chaos'` "
        "skips them",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if engine_available():
        return
    skip = pytest.mark.skip(reason="the proxy engine (src/meshgate/cli.py) has not landed yet")
    for item in items:
        if item.get_closest_marker("engine"):
            item.add_marker(skip)


def _close(stack: Stack) -> None:
    problems = stack.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Upstreams and proxies for one test; all stopped at teardown, which fails
    if a proxy died on its own or logged a traceback."""
    s = Stack(tmp_path)
    yield s
    _close(s)


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Like `stack`, shared by a module's tests (for a proxy they all use)."""
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    _close(s)


@pytest.fixture
def upstream(stack: Stack) -> UpstreamServer:
    """A recording test upstream on 127.0.0.1:0."""
    return stack.upstream("up")


@pytest.fixture
def make_upstream(stack: Stack) -> Callable[..., UpstreamServer]:
    return stack.upstream


@pytest.fixture
def make_proxy(stack: Stack) -> Callable[..., ProxyProcess]:
    """`make_proxy(config, workers=None)`: a started, ready `meshgate run`."""

    def make(config: dict[str, Any] | str, **kwargs: Any) -> ProxyProcess:
        return stack.proxy(config, **kwargs)

    return make


# A real redis-server per test or per module (fails under CI=true when it is
# not installed, skips with the reason elsewhere).
from support.redis_fixtures import module_redis, redis_server  # noqa: E402, F401
