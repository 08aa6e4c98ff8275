"""pytest fixtures for a real `redis-server` (see support.redis).

Without `redis-server` on PATH the tests that use them are skipped, or fail
when the environment says CI=true (CI must run them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.redis import RedisServer, redis_server_path

__all__ = ["module_redis", "redis_server", "require_redis_server"]


def require_redis_server() -> None:
    """Skip (or fail, under CI=true) when redis-server is not installed."""
    if redis_server_path() is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("redis-server is not installed, and CI=true requires the Redis tests to run")
    pytest.skip(
        "redis-server is not installed (apt-get install redis-server); CI=true makes this a failure"
    )


def _serve(directory: Path) -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server of the test's own, stopped at teardown."""
    yield from _serve(tmp_path / "redis")


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started redis-server shared by a module's tests (use distinct keys)."""
    yield from _serve(tmp_path_factory.mktemp("redis"))
