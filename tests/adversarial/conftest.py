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
from support.client import http_get, wait_until
from support.proxy import ProxyProcess, Stack
from support.upstream import UpstreamServer


@pytest.fixture(scope="module")
def up(module_stack: Stack) -> UpstreamServer:
    return module_stack.upstream("adv")


@pytest.fixture(scope="module")
def gateway(module_stack: Stack, up: UpstreamServer) -> ProxyProcess:
    return module_stack.proxy(gateway_config(up))


IN_FLIGHT = "meshgate_requests_in_flight"


def _idle(gateway: ProxyProcess) -> bool:
    """Whether the gateway has no request in flight (its own gauge)."""
    status, body = http_get(gateway.admin_port, "/metrics", timeout=2.0)
    if status != 200:
        return False
    gauge = [ln for ln in body.decode().splitlines() if ln.startswith(IN_FLIGHT)]
    return bool(gauge) and all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in gauge)


@pytest.fixture(autouse=True)
def _fresh(up: UpstreamServer, gateway: ProxyProcess) -> Iterator[None]:
    # What an earlier case sent may still be on its way to the upstream (its
    # client gone, the gateway still forwarding): wait until the gateway has
    # nothing in flight before the upstream's log starts afresh.
    wait_until(lambda: _idle(gateway), 10, what="the gateway to finish the earlier case")
    up.clear()
    yield
    assert gateway.alive, f"meshgate died; stderr:\n{gateway.stderr_text()}"
    assert "Traceback" not in gateway.stderr_text(), gateway.stderr_text()[-3000:]
