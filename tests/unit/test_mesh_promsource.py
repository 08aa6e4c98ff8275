"""`control.metrics_source: prometheus`: its config, the way back from a
Prometheus's series to a proxy's samples, and which target is which proxy
(`mesh/control/promsource.py`). Prometheus's answers are built from pages
`exposition.render` wrote, as a Prometheus that scraped them holds them."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from meshgate.config.loader import ConfigError
from meshgate.engine.load import load_mesh_text
from meshgate.mesh.control.promsource import PrometheusSource, Target, assign, targets_of
from meshgate.mesh.control.push import ProxyStream
from meshgate.mesh.control.telemetry import Telemetry
from meshgate.observability.deltas import index
from meshgate.observability.exposition import REPORT_FAMILIES, from_scrape, render
from meshgate.observability.requests import NB
from meshgate.observability.scrape import parse

TD = "mesh.test"


def sid(service: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{service}"


def stream(proxy_id: str, service: str, *, instance: bool = True) -> ProxyStream:
    s = ProxyStream(cast(Any, None), sid(service), service, proxy_id)
    s.instance_id = proxy_id if instance else None
    return s


def page(
    proxy_ids: list[str], service: str, caller: str, n: int, *, denied: int = 0
) -> dict[str, Any]:
    """A sidecar's samples: `n` inbound requests from `caller` (and
    `denied` refused by authz), and its workers' `meshgate_proxy_info`."""
    me, src = sid(service), sid(caller)
    samples: dict[str, Any] = {
        "meshgate_proxy_info": [[(pid,), 1] for pid in proxy_ids],
        "meshgate_identity_cert_expiration_timestamp_seconds": [[(me,), 1.9e9]],
    }
    if n:
        samples["meshgate_requests_total"] = [
            [("inbound", "inbound", "app", src, me, "GET", "200", "2xx", "true", ""), n]
        ]
        labels = ("inbound", "inbound", "app", src, me, "GET", "2xx", "true")
        buckets = [n] + [0] * (NB - 1)
        samples["meshgate_request_duration_seconds"] = [[labels, buckets, 0.001 * n, n]]
    if denied:
        samples.setdefault("meshgate_requests_total", []).append(
            [("inbound", "inbound", "", src, me, "POST", "403", "4xx", "true", "authz"), denied]
        )
    return samples


def answer(pages: dict[tuple[str, str], dict[str, Any]], at: float) -> dict[str, Any]:
    """What `/api/v1/query` answers for these pages scraped at `at`: every
    series with its target's labels, empty labels dropped (as Prometheus
    drops them), values as strings."""
    result = []
    for (job, instance), samples in pages.items():
        for fam in parse(render(samples)).families.values():
            for s in fam.samples:
                metric = {"__name__": s.name, "job": job, "instance": instance}
                metric.update({k: v for k, v in s.labels if v != ""})
                result.append({"metric": metric, "value": [at, repr(s.value)]})
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


# -- config ------------------------------------------------------------------------------


def _mesh(source: str) -> Any:
    return load_mesh_text(f"control:\n  metrics_source: {source}\nservices: {{}}\n", "mesh.yaml")


def test_the_source_is_reports_or_a_prometheus_url() -> None:
    assert _mesh("reports").control.metrics_source is None
    cfg = _mesh("{prometheus: 'http://127.0.0.1:9090/', interval: 2s}").control.metrics_source
    assert cfg.prometheus == "http://127.0.0.1:9090" and cfg.interval == 2.0
    assert cfg.query_timeout == 2.0
    for text, field, words in [
        ("prometheus", "control.metrics_source", "needs its URL"),
        ("{prometheus: ftp://x}", "control.metrics_source.prometheus", "http:// or https://"),
        ("{interval: 5s}", "control.metrics_source.prometheus", "missing"),
        ("{prometheus: 'http://x', interval: 10ms}", "control.metrics_source.interval", "200ms"),
        ("{prometheus: 'http://x', interval: 1s, timeout: 2s}", "control.metrics_source", "longer"),
        ("kiali", "control.metrics_source", "expected reports or {prometheus"),
    ]:
        with pytest.raises(ConfigError) as err:
            _mesh(text)
        message = str(err.value)
        assert f"field '{field}'" in message and words in message, message


# -- from series back to samples ---------------------------------------------------------------


def test_a_page_parsed_back_is_the_samples_it_was_rendered_from() -> None:
    samples = page(["p1"], "customers", "orders", 7, denied=1)
    back = from_scrape(parse(render(samples)))
    assert index(back) == index(samples)


def test_a_prometheus_answer_is_each_targets_samples() -> None:
    doc = answer(
        {
            ("customers", "127.0.0.1:1"): page(["p1"], "customers", "orders", 7, denied=1),
            ("gateway", "127.0.0.1:2"): page(["g0", "g1"], "gateway", "orders", 0),
        },
        1000.5,
    )
    targets = targets_of(doc)
    cust = targets[("customers", "127.0.0.1:1")]
    assert cust.proxy_ids == {"p1"} and cust.at == 1000.5
    want = page(["p1"], "customers", "orders", 7, denied=1)
    assert index(cust.samples(), families=REPORT_FAMILIES) == index(want, families=REPORT_FAMILIES)
    assert targets[("gateway", "127.0.0.1:2")].proxy_ids == {"g0", "g1"}


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"status": "error", "error": "bad query"},
        {"status": "success", "data": {"resultType": "matrix", "result": []}},
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": 1}]}},
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [{"metric": {"__name__": "x"}, "value": [1, "lots"]}],
            },
        },
    ],
)
def test_an_answer_that_is_not_an_instant_vector_is_refused(doc: Any) -> None:
    from meshgate.mesh.control.promsource import SourceError

    with pytest.raises(SourceError):
        targets_of(doc)


# -- which target is which proxy ---------------------------------------------------------------


def _targets(*claims: tuple[str, list[str]]) -> dict[tuple[str, str], Target]:
    out = {}
    for name, ids in claims:
        t = Target(name, "127.0.0.1:1", at=1.0, proxy_ids=set(ids))
        out[t.key] = t
    return out


def test_a_target_is_the_proxy_whose_stream_has_its_proxy_id() -> None:
    streams = [stream("p1", "customers"), stream("p2", "orders")]
    got, ignored = assign(_targets(("a", ["p1"]), ("b", ["p2"]), ("c", [])), streams)
    assert [(a.target.job, a.proxy_id, a.streams[0].identity) for a in got] == [
        ("a", "p1", sid("customers")),
        ("b", "p2", sid("orders")),
    ]
    assert ignored == {}  # `c` has no proxy id: not a proxy (the control plane's own page)


def test_a_proxy_id_without_an_authenticated_stream_is_ignored() -> None:
    got, ignored = assign(_targets(("spoof", ["nobody"])), [stream("p1", "customers")])
    assert got == [] and "no stream" in ignored["spoof/127.0.0.1:1"]


def test_two_targets_claiming_one_proxy_id_are_both_ignored() -> None:
    streams = [stream("p1", "customers"), stream("p2", "orders")]
    got, ignored = assign(_targets(("real", ["p1"]), ("copy", ["p1"]), ("b", ["p2"])), streams)
    assert [a.target.job for a in got] == ["b"]
    assert set(ignored) == {"real/127.0.0.1:1", "copy/127.0.0.1:1"}
    assert all("several targets" in why for why in ignored.values())


def test_a_multi_worker_target_is_one_proxy_of_one_identity() -> None:
    workers = [stream("w1", "payments", instance=False), stream("w0", "payments")]
    [got], ignored = assign(_targets(("pay", ["w0", "w1"])), workers)
    assert ignored == {} and got.proxy_id == "w0" and got.instance  # worker 0 registered
    gateway = [stream("g1", "gateway", instance=False), stream("g0", "gateway", instance=False)]
    [got], _ = assign(_targets(("gw", ["g0", "g1"])), gateway)
    assert got.proxy_id == "g0" and not got.instance
    # Proxy ids of two identities: one page cannot be both.
    mixed = [stream("p1", "customers"), stream("p2", "orders")]
    got_mixed, ignored = assign(_targets(("m", ["p1", "p2"])), mixed)
    assert got_mixed == [] and "several identities" in ignored["m/127.0.0.1:1"]


# -- what is kept --------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _source(streams: list[ProxyStream], url: str = "http://127.0.0.1:9") -> PrometheusSource:
    mesh = _mesh(f"{{prometheus: '{url}', interval: 1s}}")
    clock = _Clock()
    return PrometheusSource(
        mesh.control.metrics_source, Telemetry(clock), lambda: streams, wall=lambda: clock.t + 1e6
    )


def test_each_scrape_is_kept_once_and_windows_are_the_raw_differences() -> None:
    src = _source([stream("p1", "customers")])
    tel = src.telemetry
    clock = cast(_Clock, tel.clock)
    key = ("customers", "127.0.0.1:1")
    assert src.take(targets_of(answer({key: page(["p1"], "customers", "orders", 0)}, 1e6 + 99)))
    clock.t += 5
    assert src.take(targets_of(answer({key: page(["p1"], "customers", "orders", 7)}, 1e6 + 104)))
    # The same scrape at the next poll is not a new snapshot.
    assert not src.take(
        targets_of(answer({key: page(["p1"], "customers", "orders", 7)}, 1e6 + 104))
    )
    assert src.targets == 1
    [w] = tel.window(60)
    assert w.proxy_id == "p1" and w.service == "customers" and w.instance
    [(labels, n)] = w.delta["meshgate_requests_total"].items()
    assert n == 7.0 and labels[3] == sid("orders")
    assert w.span == 5.0  # between the two scrapes, by their own timestamps


def test_a_page_that_speaks_for_another_proxy_is_ignored() -> None:
    src = _source([stream("p1", "customers")])
    # p1 is customers' proxy, but its page counts requests to orders.
    lying = page(["p1"], "orders", "payments", 3)
    assert not src.take(targets_of(answer({("x", "127.0.0.1:1"): lying}, 1e6 + 99)))
    assert src.telemetry.proxies == {} and src.targets == 0
    assert "another proxy" in src.ignored["x/127.0.0.1:1"]


def test_an_unreachable_or_garbled_prometheus_is_an_error_state() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        src = _source([], f"http://127.0.0.1:{closed}")
        await src.poll()
        assert src.healthy is False and src.errors == 1
        assert "unreachable" in (src.last_error or "")

        async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!")
            await w.drain()
            w.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        try:
            src = _source([], f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            await src.poll()
            await src.poll()
            doc = src.doc()
            assert doc["healthy"] is False and doc["errors"] == 2
            assert doc["last_error"] == "the answer is not JSON"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_credentials_in_the_url_go_in_a_header_and_never_in_the_state() -> None:
    src = _source([], "http://scraper:s%40cret@127.0.0.1:9090/prom")
    assert src.url.startswith("http://127.0.0.1:9090/prom/api/v1/query?query=")
    assert src.headers == {"Authorization": "Basic c2NyYXBlcjpzQGNyZXQ="}  # scraper:s@cret
    assert src.doc()["url"] == "http://<redacted>@127.0.0.1:9090/prom"
