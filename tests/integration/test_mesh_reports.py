"""What proxies report to the control plane (docs/dashboard-api.md), for real:
a `meshgate control` process, sidecar processes with their apps, a proxy's
own agent in this process sending hostile reports over its authenticated
stream, and several proxies in one process (as the demo runs them), each
with metrics of its own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from meshgate.config.schema import Address
from meshgate.filters.authz import NO_RULE
from meshgate.mesh.agent import MeshAgent
from meshgate.mesh.sidecar.proxy import Sidecar, SidecarOptions
from meshgate.observability.exposition import SPECS, render
from meshgate.observability.hub import HUB
from meshgate.observability.peers import gather
from support.client import curl, fetch, free_port, wait_until
from support.mesh import TRUST_DOMAIN, ControlProcess
from support.sidecar import SidecarProcess
from support.upstream import UpstreamServer

pytestmark = pytest.mark.mesh


def sid(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}"


ALPHA, BETA, GAMMA, DELTA, MALLORY = map(sid, ("alpha", "beta", "gamma", "delta", "mallory"))
REQUESTS = "meshgate_requests_total"
N = 7

SERVICES: dict[str, Any] = {
    "alpha": {"calls": ["beta"]},
    "beta": {
        "authz": {
            "default": "deny",
            "rules": [
                {"name": "alpha-reads", "action": "allow", "from": [ALPHA], "methods": ["GET"]},
                {"name": "no-admin", "action": "deny", "paths": ["/admin/**"]},
            ],
        }
    },
    "gamma": {},
    "delta": {"calls": ["gamma"]},
    "mallory": {},
}


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.admin = free_port()
        self.cp = ControlProcess(tmp / "cp", services=SERVICES, admin=f"127.0.0.1:{self.admin}")
        self.apps = {name: UpstreamServer(name) for name in ("alpha", "beta")}
        self.sidecars: dict[str, SidecarProcess] = {}

    def start(self) -> Mesh:
        self.cp.start()
        for app in self.apps.values():
            app.start()
        self.sidecars["alpha"] = SidecarProcess(
            self.cp, "alpha", self.apps["alpha"].port, self.tmp / "alpha", upstreams=("beta",)
        ).start()
        self.sidecars["beta"] = SidecarProcess(
            self.cp,
            "beta",
            self.apps["beta"].port,
            self.tmp / "beta",
            admin=True,
            extra=("--version", "v7", "--zone", "eu-west-1a"),
        ).start()
        alpha = self.sidecars["alpha"]
        wait_until(
            lambda: fetch(alpha.url("/ping", "beta")).status == 200,
            timeout=15,
            what="alpha's sidecar reaches beta",
        )
        return self

    def status(self) -> dict[str, Any]:
        r = curl(f"http://127.0.0.1:{self.admin}/status?reports=1")
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def proxy(self, identity: str) -> dict[str, Any] | None:
        for p in self.status()["proxies"].values():
            if p["identity"] == identity:
                return p  # type: ignore[no-any-return]
        return None

    def stop(self) -> None:
        for sc in self.sidecars.values():
            sc.stop()
        for app in self.apps.values():
            app.stop()
        self.cp.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh-reports"))
    try:
        yield m.start()
    finally:
        m.stop()


def _rows(text: str, family: str) -> dict[tuple[str, ...], float]:
    """A family's samples in a /metrics text: labels in SPECS order -> value."""
    names = SPECS[family].labels
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family:
                out[tuple(s.labels[n] for n in names)] = s.value
    return out


def _counts(text: str, family: str) -> dict[tuple[str, ...], float]:
    """A histogram's `_count` samples in a /metrics text, by labels."""
    names = SPECS[family].labels
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family + "_count":
                out[tuple(s.labels[n] for n in names)] = s.value
    return out


def _reported(report: dict[str, Any], family: str) -> dict[tuple[str, ...], float]:
    return {tuple(row[0]): row[1] for row in report["samples"].get(family, [])}


# -- a sidecar's report, as the control plane keeps it --------------------------------------------


def test_a_sidecars_report_says_what_its_metrics_say_with_its_denials(mesh: Mesh) -> None:
    alpha, beta = mesh.sidecars["alpha"], mesh.sidecars["beta"]
    for i in range(N):
        assert fetch(alpha.url(f"/items/{i}?x=1", "beta")).status == 200
    denied = fetch(alpha.url("/orders?card=4111111111111111", "beta"), "-X", "POST", "-d", "{}")
    assert denied.status == 403
    assert fetch(alpha.url("/admin/panel?k=1", "beta")).status == 403
    done = time.time()
    # Each report carries the denials since the previous one: gather them
    # from every report the control plane keeps in turn.
    denials: dict[tuple[Any, ...], dict[str, Any]] = {}

    def newer_report() -> dict[str, Any] | None:
        p = mesh.proxy(BETA)
        report = p.get("report") if p else None
        if report is None:
            return None
        for d in report["denials"]:
            denials[(d["at"], d["path"])] = d
        return report if report["at"] > done + 0.1 else None

    report = wait_until(newer_report, timeout=15, interval=0.1, what="a report of beta's")
    assert report is not None
    # No traffic since: the report and beta's own /metrics say the same.
    assert beta.admin_port is not None
    text = fetch(f"http://127.0.0.1:{beta.admin_port}/metrics").body.decode()
    scraped = _rows(text, REQUESTS)
    sent = _reported(report, REQUESTS)
    assert sent == scraped
    from_alpha = {k: v for k, v in sent.items() if k[0] == "inbound" and k[3] == ALPHA}
    assert sum(v for k, v in from_alpha.items() if k[6] == "200") >= N
    assert sum(v for k, v in from_alpha.items() if k[9] == "authz") == 2
    assert all(k[4] == BETA for k in sent)  # beta speaks of itself only
    assert _reported(report, "meshgate_authz_decisions_total") == _rows(
        text, "meshgate_authz_decisions_total"
    )
    duration = "meshgate_request_duration_seconds"
    assert {tuple(r[0]): r[3] for r in report["samples"][duration]} == _counts(text, duration)
    # The denials, with the policy and why.
    by_path = {d["path"]: d for d in denials.values()}
    assert set(by_path) >= {"/orders", "/admin/panel"}, denials
    post = by_path["/orders"]
    assert (post["source"], post["destination"], post["policy"], post["method"]) == (
        ALPHA,
        "beta",
        "inbound/beta",
        "POST",
    )
    assert (post["rule"], post["reason"]) == (None, NO_RULE)
    admin = by_path["/admin/panel"]
    assert (admin["rule"], admin["policy"]) == ("no-admin", "inbound/beta")
    assert "4111" not in json.dumps(list(denials.values()))
    assert mesh.status()["reports"]["malformed"] == 0


def test_version_and_zone_are_registered(mesh: Mesh) -> None:
    r = mesh.cp.cli("mesh", "status", "--json")
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    (beta,) = services["beta"]["instances"]
    assert (beta["version"], beta["zone"]) == ("v7", "eu-west-1a")
    (alpha,) = services["alpha"]["instances"]
    assert (alpha["version"], alpha["zone"]) == ("", "local")


# -- hostile reports, over an authenticated stream ------------------------------------------------


def _hostile() -> list[dict[str, Any]]:
    """Reports a proxy (mallory) may send: none of them is taken."""
    nb = len(SPECS["meshgate_request_duration_seconds"].labels)
    inbound = ["inbound", "r", "app", ALPHA, BETA, "GET", "200", "2xx", "true", ""]
    outbound = ["outbound", "r", "beta", BETA, ALPHA, "GET", "200", "2xx", "true", ""]
    denial = {
        "at": 1.0,
        "source": ALPHA,
        "destination": "beta",
        "policy": "inbound/beta",
        "rule": None,
        "reason": NO_RULE,
        "method": "GET",
        "path": "/",
    }
    return [
        {"at": "now", "samples": {}, "denials": []},
        {"at": 1.0, "samples": [], "denials": []},
        # Requests of beta's, or for beta: mallory may not speak for it.
        {"at": 1.0, "samples": {REQUESTS: [[inbound, 1e6]]}, "denials": []},
        {"at": 1.0, "samples": {REQUESTS: [[outbound, 1e6]]}, "denials": []},
        {"at": 1.0, "samples": {}, "denials": [denial]},
        {
            "at": 1.0,
            "samples": {"meshgate_identity_cert_expiration_timestamp_seconds": [[[BETA], 1.0]]},
            "denials": [],
        },
        {
            "at": 1.0,
            "samples": {"meshgate_request_duration_seconds": [[["inbound"] * nb, [1], 1, 1]]},
            "denials": [],
        },
        {"at": 1.0, "samples": {}, "denials": [{**denial, "destination": "mallory"}] * 51},
        {"at": 1.0, "samples": {"meshgate_endpoint_state": [[["a", "b", "c"], -5]]}, "denials": []},
        {"at": 1.0, "samples": {"meshgate_endpoint_state": "lots"}, "denials": None},
    ]


def _good_report() -> dict[str, Any]:
    row = ["inbound", "r", "app", ALPHA, MALLORY, "GET", "200", "2xx", "true", ""]
    return {
        "at": time.time(),
        "samples": {REQUESTS: [[row, 3]], "meshgate_from_the_future_total": [[["x"], 1]]},
        "denials": [],
    }


def test_a_malformed_report_is_ignored_and_counted_and_the_stream_stays(
    mesh: Mesh, tmp_path: Path
) -> None:
    # On uvloop, as `meshgate` runs its proxies (so in the tests below).
    uvloop.run(_malformed_reports(mesh, tmp_path))


async def _malformed_reports(mesh: Mesh, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    queue = _hostile()
    bad = len(queue)
    before = (await loop.run_in_executor(None, mesh.status))["reports"]

    def reporter() -> dict[str, Any]:
        return queue.pop(0) if queue else _good_report()

    token = await loop.run_in_executor(None, mesh.cp.token, "mallory")
    agent = MeshAgent(
        identity=MALLORY,
        controls=[("127.0.0.1", mesh.cp.port)],
        state_dir=tmp_path / "mallory",
        token=token,
        bundle_pem=mesh.cp.bundle,
        reporter=reporter,
    )
    agent.report_interval = 0.6
    await agent.start()
    try:

        async def taken() -> dict[str, Any] | None:
            p = await loop.run_in_executor(None, mesh.proxy, MALLORY)
            return p if p is not None and p.get("report") else None

        deadline = time.monotonic() + 30
        while (p := await taken()) is None:
            assert time.monotonic() < deadline, "no report of mallory's was taken"
            await asyncio.sleep(0.2)
        assert not queue  # every hostile one was sent before the good one
        assert p["reports_malformed"] == bad
        report = p["report"]
        assert set(report["samples"]) == {REQUESTS}  # a family it does not know is left out
        assert report["samples"][REQUESTS][0][0][4] == MALLORY
        counts = (await loop.run_in_executor(None, mesh.status))["reports"]
        assert counts["malformed"] - before["malformed"] == bad
        metrics = await loop.run_in_executor(None, curl, f"http://127.0.0.1:{mesh.admin}/metrics")
        assert f'meshgate_control_reports_total{{outcome="malformed"}} {counts["malformed"]}' in (
            metrics.stdout.decode()
        )
        # The stream never dropped: the one it opened first still carries it.
        assert agent.connected.is_set() and agent.reports["sent"] >= bad + 1
        ignored = [ln for ln in mesh.cp.log_text().splitlines() if "report ignored" in ln]
        assert len(ignored) == bad  # each one logged (with why) ...
        assert sum(" WARNING " in ln for ln in ignored) == 1  # ... as a warning once per stream
        # Reports faster than the contract's are dropped unread, and counted.
        agent.report_interval = 0.05
        await asyncio.sleep(1.0)
        counts = (await loop.run_in_executor(None, mesh.status))["reports"]
        assert counts["too_often"] > before["too_often"]
        assert agent.connected.is_set()
        # Beta's numbers are beta's own: nothing mallory said reached them.
        beta = await loop.run_in_executor(None, mesh.proxy, BETA)
        assert beta is not None and beta["report"] is not None
        assert all(row[1] < 1e6 for row in beta["report"]["samples"][REQUESTS])
    finally:
        await agent.close()


# -- several proxies in one process ----------------------------------------------------------------


def _own_rows(text: str, me: str) -> Callable[[], tuple[int, int]]:
    """(inbound, outbound) requests in a /metrics text; each asserted to be
    `me`'s: the destination of its inbound ones, the source of its outbound."""

    def check() -> tuple[int, int]:
        inbound = outbound = 0
        for k, v in _rows(text, REQUESTS).items():
            if k[0] == "inbound":
                assert k[4] == me, (me, k)
                inbound += int(v)
            else:
                assert k[3] == me, (me, k)
                outbound += int(v)
        certs = _rows(text, "meshgate_identity_cert_expiration_timestamp_seconds")
        assert set(certs) == {(me,)}, certs
        return inbound, outbound

    return check


def test_two_sidecars_in_one_process_keep_their_own_series(mesh: Mesh, tmp_path: Path) -> None:
    uvloop.run(_two_sidecars(mesh, tmp_path))


async def _two_sidecars(mesh: Mesh, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    apps = {name: UpstreamServer(name) for name in ("gamma", "delta")}
    sidecars: dict[str, Sidecar] = {}
    for app in apps.values():
        app.start()
    try:
        for name in ("gamma", "delta"):
            token = await loop.run_in_executor(None, mesh.cp.token, name)
            sc = Sidecar(
                SidecarOptions(
                    service=name,
                    app=Address(host="127.0.0.1", port=apps[name].port),
                    controls=[("127.0.0.1", mesh.cp.port)],
                    state_dir=tmp_path / name,
                    trust_domain=TRUST_DOMAIN,
                    token=token,
                    bundle_pem=mesh.cp.bundle,
                    inbound=Address(host="127.0.0.1", port=0),
                    outbound=None,
                    upstream_ports={"gamma": Address(host="127.0.0.1", port=0)}
                    if name == "delta"
                    else {},
                    admin=Address(host="127.0.0.1", port=0),
                )
            )
            await sc.start()
            sidecars[name] = sc
        gamma, delta = sidecars["gamma"], sidecars["delta"]
        assert gamma.hub is not delta.hub and HUB not in (gamma.hub, delta.hub)
        url = f"http://127.0.0.1:{delta.ports['port:gamma']}/hello"

        async def get(u: str) -> Any:
            return await loop.run_in_executor(None, fetch, u)

        deadline = time.monotonic() + 15
        while (await get(url)).status != 200:
            assert time.monotonic() < deadline, "delta never reached gamma"
            await asyncio.sleep(0.1)
        for _ in range(N):
            assert (await get(url)).status == 200
        texts = {}
        for name, sc in sidecars.items():
            r = await get(f"http://127.0.0.1:{sc.ports['admin']}/metrics")
            assert r.status == 200
            texts[name] = r.body.decode()
        g_in, g_out = _own_rows(texts["gamma"], GAMMA)()
        d_in, d_out = _own_rows(texts["delta"], DELTA)()
        assert (g_out, d_in) == (0, 0)
        assert g_in == d_out >= N + 1
        # Each one's report is its own as well (the control plane took them).
        for name, me in (("gamma", GAMMA), ("delta", DELTA)):
            p = await loop.run_in_executor(None, mesh.proxy, me)
            deadline = time.monotonic() + 10
            while p is None or p.get("report") is None:
                assert time.monotonic() < deadline, f"no report of {name}'s"
                await asyncio.sleep(0.2)
                p = await loop.run_in_executor(None, mesh.proxy, me)
            assert p["reports_malformed"] == 0
    finally:
        for sc in sidecars.values():
            await sc.stop()
        for app in apps.values():
            app.stop()


def test_the_demos_proxies_each_have_their_own_metrics() -> None:
    """`MeshDemo` runs a control plane, a sidecar per service and a gateway in
    one process: each names only its own identity."""
    uvloop.run(_demo())


async def _demo() -> None:
    from meshgate.demo.mesh import TRUST_DOMAIN as DEMO_TD
    from meshgate.demo.mesh import MeshDemo

    apps = [UpstreamServer(n) for n in ("order-service", "customer-service")]
    for app in apps:
        app.start()
    demo = MeshDemo([("order-service", apps[0].port), ("customer-service", apps[1].port)], port=0)
    try:
        await demo.start()
        assert await demo._complete()  # the gateway -> orders -> customers hops answered
        gateway = demo.gateway
        assert gateway is not None
        proxies = [(sc.identity, sc.hub) for sc in demo.sidecars]
        proxies.append((f"spiffe://{DEMO_TD}/ns/edge/sa/gateway", gateway.hub))
        assert len({id(hub) for _, hub in proxies}) == 3 and HUB not in [h for _, h in proxies]
        for identity, hub in proxies:
            text = render(await gather(hub))
            inbound, _ = _own_rows(text, identity)()
            assert inbound > 0, identity  # each was called at least once
    finally:
        await demo.close()
        for app in apps:
            app.stop()
