"""Reading a /metrics page: fetch it (`fetch`), parse the Prometheus text
format 0.0.4 (`parse`), and compute what PromQL would from it: quantiles
from histogram buckets (`histogram_quantile`) and the increase of a
counter between two scrapes (`increase`, a reset counting from 0).

The parser is strict: a line it cannot read is a `ScrapeError` naming the
line, never a sample silently dropped. It knows the families that `# TYPE`
declares, so `x_bucket`, `x_sum` and `x_count` belong to the histogram `x`.
Nothing here imports the engine: the CLI's `stats` and `top` read a
gateway's or a sidecar's admin listener over HTTP like any other client.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Family",
    "Sample",
    "Scrape",
    "ScrapeError",
    "bucket_increase",
    "fetch",
    "histogram_quantile",
    "increase",
    "metrics_url",
    "parse",
    "quantiles",
]

Labels = tuple[tuple[str, str], ...]


class ScrapeError(Exception):
    """The page could not be fetched, or is not the text format."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # as written: `x_bucket`, `x_total`...
    labels: Labels  # in the page's order
    value: float

    def label(self, name: str) -> str:
        for k, v in self.labels:
            if k == name:
                return v
        return ""


@dataclass(slots=True)
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[Sample] = field(default_factory=list)


@dataclass(slots=True)
class Scrape:
    """One page's families, by name, and when it was read (monotonic seconds)."""

    families: dict[str, Family]
    at: float = 0.0

    def samples(self, name: str, suffix: str = "") -> Iterator[Sample]:
        """The samples of family `name` whose name is `name + suffix`."""
        family = self.families.get(name)
        if family is None:
            return
        for s in family.samples:
            if s.name == name + suffix:
                yield s

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample of `name` with these labels (others ignored), or None."""
        for s in self.samples(name):
            if all(s.label(k) == v for k, v in labels.items()):
                return s.value
        return None


# -- fetching ----------------------------------------------------------------------


def metrics_url(admin: str) -> str:
    """`http://host:port/metrics` for an admin address given as a URL (with or
    without its path) or as `host:port`."""
    url = admin.strip()
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https"):
        raise ScrapeError(f"{admin}: not an http:// or https:// address")
    host, slash, path = rest.partition("/")
    if not host:
        raise ScrapeError(f"{admin}: no host")
    if not slash or not path:
        path = "metrics"
    return f"{scheme}://{host}/{path}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch(url: str, *, timeout: float = 5.0, token: str | None = None) -> str:
    """The page at `url` (a `ScrapeError` saying why when there is none).

    No proxy from the environment is used (the admin listener is local or
    on the mesh), and redirects are not followed (with a token, they would
    carry it elsewhere)."""
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    try:
        with opener.open(request, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        hint = " (a token is needed: --token-file)" if exc.code in (401, 403) else ""
        raise ScrapeError(f"{url}: the admin answered {exc.code} {exc.reason}{hint}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise ScrapeError(f"cannot reach the admin at {url}: {text}") from None
    except (TimeoutError, OSError) as exc:
        raise ScrapeError(f"cannot reach the admin at {url}: {exc or 'timed out'}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ScrapeError(f"{url}: the page is not UTF-8 text") from None


# -- parsing -----------------------------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "counter": ("_total",),
}
_SPECIAL = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan, "Inf": math.inf}
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def parse(text: str, at: float = 0.0) -> Scrape:
    """The families of a page in the text format 0.0.4."""
    families: dict[str, Family] = {}
    owner: dict[str, str] = {}  # a sample name -> its family's
    for number, line in enumerate(text.split("\n"), 1):
        try:
            _line(line, families, owner)
        except ScrapeError as exc:
            raise ScrapeError(f"line {number}: {exc}: {line[:120]!r}") from None
    return Scrape(families, at)


def _line(line: str, families: dict[str, Family], owner: dict[str, str]) -> None:
    stripped = line.strip(" \t")
    if not stripped:
        return
    if stripped.startswith("#"):
        words = stripped[1:].lstrip(" \t").split(None, 2)
        if len(words) < 2 or words[0] not in ("HELP", "TYPE"):
            return  # a comment
        name = words[1]
        if not _NAME.fullmatch(name):
            raise ScrapeError(f"bad metric name {name!r}")
        family = families.setdefault(name, Family(name))
        rest = words[2] if len(words) > 2 else ""
        if words[0] == "HELP":
            family.help = _unescape(rest)
            return
        kind = rest.strip()
        if kind not in _TYPES:
            raise ScrapeError(f"unknown type {kind!r}")
        if family.samples:
            raise ScrapeError(f"# TYPE of {name} after its samples")
        family.type = kind
        owner.setdefault(name, name)
        for suffix in _SUFFIXES.get(kind, ()):
            owner[name + suffix] = name
        return
    sample = _sample(stripped)
    family_name = owner.get(sample.name, sample.name)
    family = families.setdefault(family_name, Family(family_name))
    family.samples.append(sample)


def _sample(line: str) -> Sample:
    m = _NAME.match(line)
    if m is None:
        raise ScrapeError("no metric name")
    name = m.group()
    pos = m.end()
    labels: Labels = ()
    brace = _skip(line, pos)
    if brace < len(line) and line[brace] == "{":
        labels, pos = _labels(line, brace + 1)
    rest = line[pos:].split()
    if not rest or len(rest) > 2 or (pos < len(line) and line[pos] not in " \t"):
        raise ScrapeError("expected a value (and maybe a timestamp) after the name")
    value = _number(rest[0])
    if len(rest) == 2 and not re.fullmatch(r"-?[0-9]+", rest[1]):
        raise ScrapeError(f"bad timestamp {rest[1]!r}")
    return Sample(name, labels, value)


def _labels(line: str, pos: int) -> tuple[Labels, int]:
    """The labels from `pos` (after `{`), and the position after `}`."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while True:
        pos = _skip(line, pos)
        if pos < len(line) and line[pos] == "}":
            return tuple(out), pos + 1
        m = _LABEL.match(line, pos)
        if m is None:
            raise ScrapeError("bad label name")
        key = m.group()
        if key in seen:
            raise ScrapeError(f"label {key!r} twice")
        seen.add(key)
        pos = _skip(line, m.end())
        if line[pos : pos + 1] != "=":
            raise ScrapeError(f"expected = after label {key!r}")
        pos = _skip(line, pos + 1)
        if line[pos : pos + 1] != '"':
            raise ScrapeError(f"expected a quoted value for label {key!r}")
        value, pos = _quoted(line, pos + 1)
        out.append((key, value))
        pos = _skip(line, pos)
        if line[pos : pos + 1] == ",":
            pos += 1
        elif line[pos : pos + 1] != "}":
            raise ScrapeError("expected , or } after a label")


def _skip(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _quoted(line: str, pos: int) -> tuple[str, int]:
    """A label value from `pos` (after its opening quote), and the position
    after its closing one."""
    out: list[str] = []
    while pos < len(line):
        c = line[pos]
        if c == '"':
            return "".join(out), pos + 1
        if c == "\\":
            nxt = line[pos + 1 : pos + 2]
            if nxt not in _ESCAPES:
                raise ScrapeError(f"bad escape \\{nxt} in a label value")
            out.append(_ESCAPES[nxt])
            pos += 2
            continue
        out.append(c)
        pos += 1
    raise ScrapeError("unterminated label value")


def _unescape(text: str) -> str:
    """A HELP text's escapes (`\\\\` and `\\n`; anything else is kept as is)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in ("\\", "n"):
            out.append("\n" if text[i + 1] == "n" else "\\")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _number(text: str) -> float:
    if text in _SPECIAL:
        return _SPECIAL[text]
    try:
        return float(text)
    except ValueError:
        raise ScrapeError(f"bad value {text!r}") from None


# -- what PromQL computes ------------------------------------------------------------


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The `q` quantile of a histogram's cumulative `(upper bound, count)`
    buckets, as PromQL's `histogram_quantile` computes it: the bucket where
    the rank falls, and a linear interpolation within it (from 0 for the
    first bucket); the largest finite bound when the rank falls in +Inf's
    bucket; NaN without observations or without a +Inf bucket."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return math.nan
    # Counts are cumulative: one that went down (a scrape mid-update) is raised.
    fixed: list[tuple[float, float]] = []
    top = 0.0
    for bound, count in ordered:
        top = max(top, count)
        fixed.append((bound, top))
    if len(fixed) < 2:
        return math.nan
    observations = fixed[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(fixed) - 1) if fixed[i][1] >= rank), len(fixed) - 1)
    if b == len(fixed) - 1:
        return fixed[-2][0]
    if b == 0 and fixed[0][0] <= 0:
        return fixed[0][0]
    start, end, count = 0.0, fixed[b][0], fixed[b][1]
    if b > 0:
        start = fixed[b - 1][0]
        count -= fixed[b - 1][1]
        rank -= fixed[b - 1][1]
    if count == 0:
        return math.nan
    return start + (end - start) * (rank / count)


def increase(before: float | None, now: float) -> float:
    """How much a counter grew between two scrapes: a value that went down
    (the process restarted) counts from 0, and so does one first seen now."""
    if before is None or now < before:
        return now
    return now - before


def bucket_increase(
    before: Mapping[float, float] | None, now: Mapping[float, float]
) -> dict[float, float]:
    """The buckets' increase between two scrapes of one histogram series; a
    reset (its +Inf count went down) counts the whole of `now`."""
    inf = math.inf
    if before is None or now.get(inf, 0.0) < before.get(inf, 0.0):
        return dict(now)
    return {le: increase(before.get(le), n) for le, n in now.items()}


def quantiles(buckets: Mapping[float, float], qs: Sequence[float]) -> list[float]:
    """`histogram_quantile` for each of `qs`."""
    pairs = list(buckets.items())
    return [histogram_quantile(q, pairs) for q in qs]
