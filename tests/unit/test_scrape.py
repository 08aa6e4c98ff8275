"""Reading /metrics (`observability.scrape`) and what `stats` and `top` make
of it (`observability.stats`): the text-format parser, PromQL's
histogram_quantile, and counter increases across a reset."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshgate.observability.exposition import render
from meshgate.observability.requests import BUCKETS
from meshgate.observability.scrape import (
    ScrapeError,
    bucket_increase,
    histogram_quantile,
    increase,
    metrics_url,
    parse,
)
from meshgate.observability.stats import render_stats, render_top, stats_doc, top_doc, traffic

INF = math.inf

# -- the parser ----------------------------------------------------------------------


def test_escapes_in_label_values() -> None:
    text = 'x{path="C:\\\\dir\\\\",quote="say \\"hi\\"",nl="a\\nb",plain="{},= #"} 1\n'
    (s,) = parse(text).families["x"].samples
    assert dict(s.labels) == {
        "path": "C:\\dir\\",
        "quote": 'say "hi"',
        "nl": "a\nb",
        "plain": "{},= #",
    }
    assert s.value == 1.0


def test_special_values_and_infinite_bounds() -> None:
    text = (
        "# TYPE h histogram\n"
        'h_bucket{le="0.5"} 1\n'
        'h_bucket{le="+Inf"} 3\n'
        "h_sum 2.5e-1\n"
        "h_count 3\n"
        "g_pos +Inf\n"
        "g_neg -Inf\n"
        "g_nan NaN\n"
    )
    scrape = parse(text)
    h = scrape.families["h"]
    assert h.type == "histogram"
    assert [(s.name, s.label("le"), s.value) for s in h.samples] == [
        ("h_bucket", "0.5", 1.0),
        ("h_bucket", "+Inf", 3.0),
        ("h_sum", "", 0.25),
        ("h_count", "", 3.0),
    ]
    assert scrape.value("g_pos") == INF
    assert scrape.value("g_neg") == -INF
    assert math.isnan(scrape.value("g_nan") or 0.0)


def test_comments_help_and_samples_without_labels() -> None:
    text = (
        "# a comment that is neither HELP nor TYPE\n"
        "#\n"
        "\n"
        "# HELP up Whether it is up: a \\\\ backslash\\nand a newline.\n"
        "# TYPE up gauge\n"
        "up 1\n"
        "empty{} 2\n"
        "stamped 3 1700000000000\n"
        'trailing{a="1",} 4\n'
        '  spaced  {  a = "1" , b="2"  }   5  \n'
    )
    scrape = parse(text)
    up = scrape.families["up"]
    assert (up.type, up.help) == ("gauge", "Whether it is up: a \\ backslash\nand a newline.")
    assert up.samples[0].labels == () and up.samples[0].value == 1.0
    assert scrape.value("empty") == 2.0
    assert scrape.value("stamped") == 3.0
    assert scrape.value("trailing", a="1") == 4.0
    assert scrape.value("spaced", a="1", b="2") == 5.0
    assert scrape.value("missing") is None


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('x{a="1} 1', "unterminated"),
        ('x{a="\\t"} 1', "bad escape"),
        ("x{a=1} 1", "quoted value"),
        ('x{a="1",a="2"} 1', "twice"),
        ('x{a="1" b="2"} 1', "expected , or }"),
        ("x", "expected a value"),
        ("x one", "bad value"),
        ("x 1 2 3", "expected a value"),
        ("x 1 soon", "bad timestamp"),
        ("1x 1", "no metric name"),
        ("# TYPE x lines", "unknown type"),
    ],
)
def test_what_the_parser_refuses(line: str, problem: str) -> None:
    with pytest.raises(ScrapeError, match=problem) as info:
        parse("ok 1\n" + line + "\n")
    assert str(info.value).startswith("line 2: ")


def test_a_type_after_its_samples_is_refused() -> None:
    with pytest.raises(ScrapeError, match="after its samples"):
        parse("x 1\n# TYPE x gauge\n")


def _rendered() -> str:
    """A page from the gateway's own renderer, with every kind of family."""
    nb = len(BUCKETS) + 1
    buckets = [0] * nb
    buckets[3], buckets[7], buckets[-1] = 4, 2, 1
    req = ("inbound", "orders", "order-service", "", "", "GET")
    samples: dict[str, list[list[Any]]] = {
        "meshgate_requests_total": [
            [(*req, "200", "2xx", "false", ""), 6],
            [(*req, "503", "5xx", "false", "upstream_unavailable"), 1],
            [("inbound", 'we"ird\\\n', "", "", "", "GET", "429", "4xx", "false", "x"), 2],
        ],
        "meshgate_request_duration_seconds": [[(*req, "2xx", "false"), buckets, 0.25, 7]],
        "meshgate_config_generation": [[(), 4]],
        "meshgate_endpoint_ewma_seconds": [[("order-service", "10.0.0.1:80"), 0.0125]],
        "meshgate_identity_cert_expiration_timestamp_seconds": [[("spiffe://td/a",), 2e9]],
    }
    return render(samples)


def test_the_parser_reads_what_prometheus_client_reads() -> None:
    text = _rendered()
    theirs = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    scrape = parse(text)
    ours = sorted(
        (s.name, tuple(sorted(s.labels)), s.value)
        for family in scrape.families.values()
        for s in family.samples
    )
    assert ours == theirs
    assert len(ours) > 20
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert scrape.families["meshgate_request_duration_seconds"].type == "histogram"
    assert types["meshgate_request_duration_seconds"] == "histogram"
    assert scrape.families["meshgate_requests_total"].type == types["meshgate_requests"]


# -- histogram_quantile --------------------------------------------------------------

# 50 observations: 10 up to 0.1 s, 20 more up to 0.5 s, 10 more up to 1 s,
# and 10 above.
HIST = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (INF, 50.0)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.0, 0.0),
        (0.1, 0.05),  # rank 5 of the first bucket's 10, from 0
        (0.2, 0.1),  # rank 10: the first bucket's top
        (0.5, 0.4),  # rank 25: 15 of 20 into (0.1, 0.5]: 0.1 + 0.4 * 0.75
        (0.7, 0.75),  # rank 35: 5 of 10 into (0.5, 1]: 0.5 + 0.5 * 0.5
        (0.8, 1.0),  # rank 40: the third bucket's top
        (0.9, 1.0),  # rank 45 falls in +Inf's bucket: the largest finite bound
        (1.0, 1.0),
    ],
)
def test_histogram_quantile_interpolates_as_promql(q: float, expected: float) -> None:
    assert histogram_quantile(q, HIST) == pytest.approx(expected)
    assert histogram_quantile(q, list(reversed(HIST))) == pytest.approx(expected)


def test_histogram_quantile_edges() -> None:
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]))  # no observations
    assert math.isnan(histogram_quantile(0.5, [(0.1, 3.0), (1.0, 4.0)]))  # no +Inf bucket
    assert math.isnan(histogram_quantile(0.5, [(INF, 4.0)]))  # +Inf alone
    assert math.isnan(histogram_quantile(math.nan, HIST))
    assert histogram_quantile(-0.1, HIST) == -INF
    assert histogram_quantile(1.1, HIST) == INF
    # A count lower than the bucket below it (a scrape mid-update) is raised to it.
    assert histogram_quantile(0.5, [(0.1, 10.0), (0.5, 8.0), (INF, 20.0)]) == pytest.approx(0.1)
    # The same bound twice adds up.
    assert histogram_quantile(0.25, [(1.0, 1.0), (1.0, 1.0), (INF, 4.0)]) == pytest.approx(0.5)


# -- increases -----------------------------------------------------------------------


def test_increase_counts_a_reset_from_zero() -> None:
    assert increase(3.0, 7.0) == 4.0
    assert increase(None, 3.0) == 3.0  # a series first seen now
    assert increase(10.0, 4.0) == 4.0  # the process restarted: 4 since then
    assert increase(5.0, 5.0) == 0.0
    assert bucket_increase({1.0: 2.0, INF: 3.0}, {1.0: 5.0, INF: 8.0}) == {1.0: 3.0, INF: 5.0}
    assert bucket_increase({1.0: 9.0, INF: 9.0}, {1.0: 1.0, INF: 2.0}) == {1.0: 1.0, INF: 2.0}


def _page(ok: int, failed: int, le_fast: int, generation: int = 1) -> str:
    lab = 'direction="inbound",route="orders",upstream="up",method="GET"'
    return (
        "# TYPE meshgate_requests_total counter\n"
        f'meshgate_requests_total{{{lab},code="200",code_class="2xx",reason=""}} {ok}\n'
        f'meshgate_requests_total{{{lab},code="503",code_class="5xx",reason="timeout"}} {failed}\n'
        "# TYPE meshgate_request_duration_seconds histogram\n"
        f'meshgate_request_duration_seconds_bucket{{{lab},code_class="2xx",le="0.01"}} {le_fast}\n'
        f'meshgate_request_duration_seconds_bucket{{{lab},code_class="2xx",le="0.1"}} {ok}\n'
        f'meshgate_request_duration_seconds_bucket{{{lab},code_class="2xx",le="+Inf"}} {ok}\n'
        f"meshgate_config_generation {generation}\n"
        'meshgate_requests_in_flight{direction="inbound",tls="false"} 2\n'
        'meshgate_endpoint_active_requests{upstream="up",endpoint="127.0.0.1:1"} 2\n'
    )


def test_traffic_between_two_scrapes_across_a_reset() -> None:
    before = parse(_page(ok=100, failed=10, le_fast=50), at=10.0)
    # Restarted: the 2xx counter went down to 30, the 5xx one grew from 0 to 5
    # (which looks like an increase from 10 only if resets are not handled).
    now = parse(_page(ok=30, failed=5, le_fast=30), at=12.0)
    (t,) = traffic(now, "route", before)
    assert (t.direction, t.name) == ("inbound", "orders")
    assert t.requests == 35  # 30 (reset: from 0) + 5 (5 < 10: a reset too)
    assert t.failures == 5
    assert t.success_rate == pytest.approx(30 / 35)
    assert t.buckets == {0.01: 30.0, 0.1: 30.0, INF: 30.0}
    doc = top_doc(before, now, "http://x/metrics", "route")
    (row,) = doc["rows"]
    assert row["rps"] == pytest.approx(17.5)
    assert row["in_flight"] == 2  # its upstream serves no other row
    assert row["reasons"] == {"timeout": 5}
    text = render_top(doc)
    assert "orders" in text and "17.5" in text and "85.71%" in text


def test_traffic_grows_normally_and_stats_since_start() -> None:
    before = parse(_page(ok=100, failed=10, le_fast=50), at=10.0)
    now = parse(_page(ok=140, failed=10, le_fast=90), at=14.0)
    (t,) = traffic(now, "route", before)
    assert (t.requests, t.failures) == (40, 0)
    assert t.buckets == {0.01: 40.0, 0.1: 40.0, INF: 40.0}
    assert t.latency()[0] == pytest.approx(0.005)  # p50 halfway into (0, 0.01]
    doc = stats_doc(now, "http://x/metrics")
    (route,) = doc["routes"]
    assert (route["requests"], route["failures"]) == (150, 10)
    assert route["success_rate"] == pytest.approx(140 / 150, abs=1e-6)
    assert doc["process"]["config_generation"] == 1
    text = render_stats(doc)
    assert "orders" in text and "93.33%" in text and "reasons: timeout 10" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_metrics_url() -> None:
    assert metrics_url("http://127.0.0.1:9901") == "http://127.0.0.1:9901/metrics"
    assert metrics_url("127.0.0.1:15000") == "http://127.0.0.1:15000/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("https://h:1/other/metrics") == "https://h:1/other/metrics"
    with pytest.raises(ScrapeError):
        metrics_url("ftp://h/")


def test_identities_in_tables_drop_this_proxys_trust_domain() -> None:
    me, them = "spiffe://td.example/ns/shop/sa/orders", "spiffe://td.example/ns/shop/sa/customers"
    other = "spiffe://elsewhere.example/ns/a-long-namespace-name/sa/payments"

    def page(n: int) -> str:
        lab = f'direction="outbound",route="r",upstream="u",source_identity="{me}"'
        return (
            f'meshgate_identity_cert_expiration_timestamp_seconds{{identity="{me}"}} 2e9\n'
            f'meshgate_requests_total{{{lab},destination_identity="{them}",code="200",'
            f'code_class="2xx"}} {n}\n'
            f'meshgate_requests_total{{{lab},destination_identity="{other}",code="200",'
            f'code_class="2xx"}} {2 * n}\n'
        )

    doc = top_doc(parse(page(1), at=0.0), parse(page(5), at=2.0), "http://x/metrics", "destination")
    assert [(r["name"], r["rps"]) for r in doc["rows"]] == [(other, 4.0), (them, 2.0)]
    lines = render_top(doc).splitlines()
    assert lines[1].endswith("(identities: spiffe://td.example/...)")
    # Another trust domain's identity, too long: its end, 30 characters.
    assert lines[4].split()[:4] == ["~ng-namespace-name/sa/payments", "out", "4.0", "100.00%"]
    assert lines[5].split()[:4] == ["ns/shop/sa/customers", "out", "2.0", "100.00%"]
