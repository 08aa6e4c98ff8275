"""The adversarial suite (issue 16): raw-socket attacks on the real gateway.

Each module runs one gateway process (`meshgate run`) for all its cases, with
a recording upstream behind it; the cases and verdicts are in
`support.adversarial`. Every module is marked `adversarial` (and `engine`):
`pytest -m adversarial` runs the suite alone, `-m 'not adversarial'` skips it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.adversarial import gateway_config
from support.proxy import ProxyProcess, Stack
from support.upstream import UpstreamServer


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("adv")


@pytest.fixture(scope="module")
def gateway(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(gateway_config(up))


@pytest.fixture(autouse=True)
def _fresh(up: UpstreamServer, gateway: ProxyProcess) -> Iterator[None]:
    up.clear()
    yield
    assert gateway.alive, f"meshgate died; stderr:\n{gateway.stderr_text()}"
    assert "Traceback" not in gateway.stderr_text(), gateway.stderr_text()[-3000:]
