"""Fixtures for the dashboard's browser tests: one headless Chromium per
test module (Debian's `chromium`, driven by Playwright), a page per test.

Per module, not per session: Playwright's sync API runs an event loop in
the main thread while it is open, and every asyncio test collected after
these ones would find that loop running."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from support.browser import launch_args, require_browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=launch_args())
        try:
            yield b
        finally:
            b.close()
