"""`meshgate demo` (what `make demo` runs) prints both halves of the seed and
no error: the gateway's requests, then the mesh hop by hop, with the
identities each app saw and a call refused by policy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from support.client import free_port
from support.proxy import meshgate_cmd

pytestmark = [pytest.mark.engine, pytest.mark.mesh]

TD = "spiffe://demo.mesh/ns"


def test_demo_shows_the_gateway_and_the_mesh_without_an_error(tmp_path: Path) -> None:
    out_path = tmp_path / "demo.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            meshgate_cmd("demo", "--port", str(free_port())),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            text = out_path.read_text(errors="replace")
            if "Ctrl-C stops everything." in text or proc.poll() is not None:
                break
            time.sleep(0.25)
        assert "Ctrl-C stops everything." in text, text[-3000:]
        # The dashboard it prints shows the gateway and every service.
        found = re.search(r"the mesh dashboard: (http://127\.0\.0\.1:\d+)/ui", text)
        assert found, text[-3000:]
        with urllib.request.urlopen(found.group(1) + "/ui/api/state", timeout=10) as r:
            state = json.loads(r.read())
        ids = {n["id"] for n in state["nodes"]}
        assert {"gateway", "order-service", "order-service-v2", "customer-service"} <= ids
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = out_path.read_text(errors="replace")
    assert "Traceback" not in text
    assert " ERROR " not in text
    assert (
        f"order-service saw            By={TD}/default/sa/order-service;URI={TD}/edge/sa/gateway"
        in text
    )
    assert (
        f"customer-service saw         By={TD}/default/sa/customer-service;"
        f"URI={TD}/default/sa/order-service" in text
    )
    assert "403: authorization policy 'inbound/customer-service' denies this request" in text
