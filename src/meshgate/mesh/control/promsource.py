"""`control.metrics_source: {prometheus: URL}`: the dashboard's numbers as a
Prometheus that scrapes the proxies holds them, as Kiali reads them.

Every `interval`, one instant query (`GET <URL>/api/v1/query`) asks for the
raw cumulative series of the report families (`exposition.REPORT_FAMILIES`:
counters as they are, histograms as their `_bucket`, `_sum` and `_count`)
and `meshgate_proxy_info`. Never `increase()` or `rate()`: those
extrapolate to the window's edges, and the dashboard's numbers must be the
ones the proxies' `/metrics` shows. The windows are computed here, from the
raw values, with the same `deltas.delta` as the reports' (`telemetry`).

The series are grouped by target (`job`, `instance`), and each target is
turned back into the samples its page was rendered from
(`exposition.from_scrape`). Which proxy a target is comes from its
`meshgate_proxy_info{proxy_id}` series (one per worker: a gateway's or a
sidecar's `--workers` page is already the sum of its workers, one target),
mapped to the authenticated push streams of those proxy ids (`assign`):

- every proxy id a target claims must have a stream on this control plane,
  all of one identity; otherwise the target is ignored (a page may say
  anything of itself, but not be a proxy that never proved it is one);
- two targets claiming one proxy id are both ignored, and logged: which
  one is the proxy cannot be told;
- the target's samples are then checked as a report of that stream is
  (`reports.clean`, with the stream's certificate identity and service): a
  page that speaks for another proxy is ignored.

What is kept is one snapshot per scrape (the series' own timestamp, in the
control plane's clock): a scrape seen at two polls is kept once. The
reports' samples are then not kept (their denials still are: Prometheus
holds no denials).

Prometheus down, or answering what is not a vector: the poll fails, the
histories keep what they have (the windows age as they would), the failure
is logged when the state changes (healthy to failing, a new error, back),
counted (`meshgate_control_metrics_source_errors_total`) and shown in the
state (`metrics_source`). Nothing here stops the control plane.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from meshgate.config.base import redact_url
from meshgate.config.mesh import PrometheusSourceConfig
from meshgate.mesh.control.push import ProxyStream
from meshgate.mesh.control.reports import Malformed, clean
from meshgate.mesh.control.telemetry import Telemetry
from meshgate.observability.exposition import REPORT_FAMILIES, SPECS, NotSamples, from_scrape
from meshgate.observability.scrape import Family, Sample, Scrape

__all__ = [
    "INFO",
    "Assigned",
    "PrometheusSource",
    "SourceError",
    "Target",
    "assign",
    "query",
    "targets_of",
]

log = logging.getLogger("meshgate.control")

INFO = "meshgate_proxy_info"
MAX_ANSWER = 64 << 20
"""Bytes of one answer, at most."""
MAX_WORKERS = 64
"""Proxy ids one target may claim (one per worker)."""
MAX_IGNORED = 100
"""Ignored targets listed in the state."""

TargetKey = tuple[str, str]
"""(job, instance)."""


class SourceError(Exception):
    """Prometheus did not answer, or not with an instant vector."""


def _names() -> dict[str, str]:
    """Each series name asked for -> its family."""
    out = {INFO: INFO}
    for family in REPORT_FAMILIES:
        if SPECS[family].type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[family + suffix] = family
        else:
            out[family] = family
    return out


NAMES = _names()


def query() -> str:
    """The one PromQL selector of every series the dashboard reads."""
    return '{__name__=~"' + "|".join(NAMES) + '"}'


@dataclass(slots=True)
class Target:
    """One Prometheus target's series: what its page said at its last scrape."""

    job: str
    instance: str
    at: float = 0.0
    """The newest sample's time (Unix seconds): its last scrape."""
    proxy_ids: set[str] = field(default_factory=set)
    families: dict[str, Family] = field(default_factory=dict)

    @property
    def key(self) -> TargetKey:
        return (self.job, self.instance)

    @property
    def name(self) -> str:
        return f"{self.job}/{self.instance}"

    def samples(self) -> dict[str, list[list[Any]]]:
        """Its series as the samples its page was rendered from, labels as
        lists (as a report's JSON carries them, for `reports.clean`)."""
        samples = from_scrape(Scrape(self.families), REPORT_FAMILIES)
        return {name: [[list(r[0]), *r[1:]] for r in rows] for name, rows in samples.items()}


def _value(v: Any) -> tuple[float, float]:
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], str):
        raise SourceError('a sample is not [time, "value"]')
    ts = v[0]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise SourceError("a sample's time is not a number")
    try:
        return float(ts), float(v[1])
    except ValueError:
        raise SourceError(f"a sample's value is not a number: {v[1][:40]!r}") from None


def targets_of(answer: Any) -> dict[TargetKey, Target]:
    """An instant query's answer (the JSON document) by target; a
    `SourceError` when it is not a successful instant vector."""
    if not isinstance(answer, dict):
        raise SourceError("the answer is not a JSON object")
    if answer.get("status") != "success":
        error = answer.get("error")
        raise SourceError(
            f"the query failed: {str(error)[:200] if error else answer.get('status')}"
        )
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        raise SourceError("the answer is not an instant vector")
    result = data.get("result")
    if not isinstance(result, list):
        raise SourceError("the answer's result is not a list")
    out: dict[TargetKey, Target] = {}
    for row in result:
        if not isinstance(row, dict) or not isinstance(row.get("metric"), dict):
            raise SourceError("a series has no labels")
        labels: dict[str, Any] = row["metric"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise SourceError("a series' labels are not strings")
        ts, value = _value(row.get("value"))
        name = labels.get("__name__", "")
        family = NAMES.get(name)
        if family is None:
            continue  # not asked for
        key = (labels.get("job", ""), labels.get("instance", ""))
        target = out.get(key)
        if target is None:
            target = out[key] = Target(*key)
        target.at = max(target.at, ts)
        if name == INFO:
            if value == 1 and labels.get("proxy_id"):
                target.proxy_ids.add(labels["proxy_id"])
            continue
        fam = target.families.get(family)
        if fam is None:
            fam = target.families[family] = Family(family, SPECS[family].type)
        pairs = tuple((k, v) for k, v in labels.items() if k != "__name__")
        fam.samples.append(Sample(name, pairs, value))
    return out


# -- which proxy a target is ------------------------------------------------------------


@dataclass(slots=True)
class Assigned:
    """A target taken as the word of these streams' proxy."""

    target: Target
    streams: list[ProxyStream]

    @property
    def proxy_id(self) -> str:
        """The history it is kept under: the worker that registered the
        instance, else the first proxy id."""
        for s in self.streams:
            if s.instance_id is not None:
                return s.proxy_id
        return min(s.proxy_id for s in self.streams)

    @property
    def instance(self) -> bool:
        return any(s.instance_id is not None for s in self.streams)


def assign(
    targets: Mapping[TargetKey, Target], streams: Iterable[ProxyStream]
) -> tuple[list[Assigned], dict[str, str]]:
    """Which targets are which proxies (see the module), and why each other
    one is ignored (by `job/instance`; a target without proxy ids is not a
    proxy's, and is not listed)."""
    by_id = {s.proxy_id: s for s in streams}
    claims: dict[str, list[Target]] = {}
    for target in targets.values():
        for pid in target.proxy_ids:
            claims.setdefault(pid, []).append(target)
    ignored: dict[str, str] = {}
    for pid, claimants in claims.items():
        if len(claimants) > 1:
            names = ", ".join(sorted(t.name for t in claimants))
            for t in claimants:
                ignored[t.name] = f"proxy id {pid} is claimed by several targets ({names})"
    out: list[Assigned] = []
    for target in sorted(targets.values(), key=lambda t: t.key):
        if not target.proxy_ids or target.name in ignored:
            continue
        if len(target.proxy_ids) > MAX_WORKERS:
            ignored[target.name] = f"more than {MAX_WORKERS} proxy ids"
            continue
        unknown = sorted(p for p in target.proxy_ids if p not in by_id)
        if unknown:
            ignored[target.name] = f"proxy id {unknown[0]} has no stream to this control plane"
            continue
        mine = [by_id[p] for p in sorted(target.proxy_ids)]
        identities = sorted({s.identity for s in mine})
        if len(identities) > 1:
            ignored[target.name] = (
                f"its proxy ids are of several identities ({', '.join(identities)})"
            )
            continue
        out.append(Assigned(target, mine))
    return out, ignored


# -- the poller --------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`url` without its `user:password@`, and the Basic header they make."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url, {}
    userinfo, _, host = authority.rpartition("@")
    token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
    return f"{scheme}://{host}{slash}{path}", {"Authorization": f"Basic {token}"}


def _get(url: str, headers: Mapping[str, str], timeout: float) -> bytes:
    """The body at `url` (no proxy from the environment, no redirect)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            doc = orjson.loads(exc.read(4096))
            detail = f": {str(doc.get('error'))[:200]}" if isinstance(doc, dict) else ""
        except (orjson.JSONDecodeError, OSError):
            pass
        raise SourceError(f"answered {exc.code} {exc.reason}{detail}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise SourceError(f"unreachable: {text}") from None
    except (TimeoutError, OSError) as exc:
        raise SourceError(f"unreachable: {exc or 'timed out'}") from None
    if len(body) > MAX_ANSWER:
        raise SourceError(f"the answer is larger than {MAX_ANSWER >> 20} MiB")
    return body


class PrometheusSource:
    """The poller (see the module): `start`, `close`, and its state (`doc`)."""

    def __init__(
        self,
        cfg: PrometheusSourceConfig,
        telemetry: Telemetry,
        streams: Callable[[], Iterable[ProxyStream]],
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.telemetry = telemetry
        self.streams = streams
        self.wall = wall
        base, self.headers = _split_credentials(cfg.prometheus)
        self.url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query()})
        self.task: asyncio.Task[None] | None = None
        self.healthy: bool | None = None
        """None before the first answer (or failure)."""
        self.last_error: str | None = None
        self.last_ok = 0.0
        """When Prometheus last answered (Unix time; 0: never)."""
        self.errors = 0
        self.polls = 0
        self.targets = 0
        """Targets taken at the last answer."""
        self.ignored: dict[str, str] = {}
        """Targets ignored at the last answer, and why."""
        self.scraped: dict[str, float] = {}
        """Per history (proxy id), the scrape time last kept."""
        self.refused: dict[str, str] = {}
        """Per target, why its samples were refused (logged once per reason)."""

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())
        log.info("metrics source: Prometheus at %s every %gs", self.shown_url, self.cfg.interval)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    @property
    def shown_url(self) -> str:
        return redact_url(self.cfg.prometheus)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll()
            except Exception:
                log.exception("metrics source: a poll of Prometheus failed")
            await asyncio.sleep(max(0.0, self.cfg.interval - (time.monotonic() - started)))

    async def poll(self) -> None:
        """Ask once, and keep what the answer holds."""
        self.polls += 1
        timeout = self.cfg.query_timeout
        try:
            body = await asyncio.wait_for(
                asyncio.to_thread(_get, self.url, self.headers, timeout), timeout + 1
            )
            try:
                answer = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise SourceError("the answer is not JSON") from None
            targets = targets_of(answer)
        except (SourceError, TimeoutError) as exc:
            self._failed(str(exc) or "timed out")
            return
        self._answered()
        self.take(targets)

    def take(self, targets: Mapping[TargetKey, Target]) -> int:
        """Keep the targets' new scrapes in the histories; how many were kept."""
        assigned, ignored = assign(targets, self.streams())
        for name, why in ignored.items():
            if self.ignored.get(name) != why:
                log.warning("metrics source: target %s ignored: %s", name, why)
        self.ignored = ignored
        kept = taken = 0
        clock = self.telemetry.clock
        for a in assigned:
            target, stream, pid = a.target, a.streams[0], a.proxy_id
            if target.at <= self.scraped.get(pid, 0.0) and target.name not in self.refused:
                taken += 1
                continue  # the scrape kept at a previous poll
            try:
                report = clean(
                    {"at": target.at, "samples": target.samples(), "denials": []},
                    stream.identity,
                    stream.service,
                )
            except (Malformed, NotSamples) as exc:
                why = str(exc)
                if self.refused.get(target.name) != why:
                    log.warning(
                        "metrics source: target %s (proxy %s, %s) ignored: %s",
                        target.name,
                        pid,
                        stream.identity,
                        why,
                    )
                self.refused[target.name] = why
                self.ignored[target.name] = why
                continue
            self.refused.pop(target.name, None)
            taken += 1
            # The scrape's time in the histories' clock (never ahead of it).
            at = clock() - max(0.0, self.wall() - target.at)
            if self.telemetry.add_samples(
                pid, stream.service, stream.identity, report["samples"], instance=a.instance, at=at
            ):
                kept += 1
            self.scraped[pid] = target.at
        self.targets = taken
        present = {t.name for t in targets.values()}
        self.refused = {name: why for name, why in self.refused.items() if name in present}
        live = {s.proxy_id for s in self.streams()}
        for pid in [p for p in self.scraped if p not in live]:
            del self.scraped[pid]
        return kept

    def _answered(self) -> None:
        if self.healthy is False:
            log.info("metrics source: Prometheus at %s answers again", self.shown_url)
        self.healthy = True
        self.last_error = None
        self.last_ok = self.wall()

    def _failed(self, why: str) -> None:
        self.errors += 1
        if self.healthy is not False or why != self.last_error:
            log.warning(
                "metrics source: Prometheus at %s: %s (the dashboard keeps its last numbers)",
                self.shown_url,
                why,
            )
        self.healthy = False
        self.last_error = why

    def doc(self) -> dict[str, Any]:
        """The state's `metrics_source`."""
        return {
            "kind": "prometheus",
            "url": self.shown_url,
            "interval": self.cfg.interval,
            "healthy": self.healthy,
            "last_error": self.last_error,
            "last_ok": self.last_ok or None,
            "errors": self.errors,
            "targets": self.targets,
            "ignored": [
                {"target": t, "reason": r} for t, r in sorted(self.ignored.items())[:MAX_IGNORED]
            ],
        }
