"""`meshgate stats` and `meshgate top`: a gateway's or a sidecar's admin
/metrics, read over HTTP and summed up in the terminal.

Exit codes: 0 success (and Ctrl-C in `top`), 2 bad arguments or an admin
that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, TextIO

from meshgate.observability.scrape import Scrape, ScrapeError, fetch, metrics_url, parse
from meshgate.observability.stats import BY, render_stats, render_top, stats_doc, top_doc

__all__ = ["register"]

DEFAULT_ADMIN = "http://127.0.0.1:9901"
_CLEAR = "\x1b[H\x1b[2J"


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ScrapeError(f"--token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ScrapeError(f"--token-file {path}: the file is empty")
    return token


class _Reader:
    """Scrapes of one admin's /metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url = metrics_url(args.admin)
        self.token = _token(args.token_file)
        self.timeout: float = args.timeout

    def scrape(self) -> Scrape:
        text = fetch(self.url, timeout=self.timeout, token=self.token)
        at = time.monotonic()
        try:
            return parse(text, at)
        except ScrapeError as exc:
            raise ScrapeError(f"{self.url}: not a metrics page ({exc})") from None


def _fail(command: str, exc: ScrapeError) -> int:
    print(f"meshgate {command}: {exc}", file=sys.stderr)
    return 2


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        return _stats(args)
    except BrokenPipeError:
        return _closed(sys.stdout)


def _closed(out: TextIO) -> int:
    """The reader of a pipe (`| head`) went away: nothing more to say, and
    nothing to flush at exit either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


def _stats(args: argparse.Namespace) -> int:
    try:
        reader = _Reader(args)
        scrape = reader.scrape()
    except ScrapeError as exc:
        return _fail("stats", exc)
    doc = stats_doc(scrape, reader.url)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(render_stats(doc))
    return 0


def _show(out: TextIO, text: str, tty: bool) -> None:
    if tty:
        out.write(_CLEAR + text)
    else:
        out.write(text + "\n")
    out.flush()


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("meshgate top: --interval must be more than 0", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print("meshgate top: --count must be at least 1", file=sys.stderr)
        return 2
    out = sys.stdout
    try:
        return _top(args, out)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _closed(out)


def _top(args: argparse.Namespace, out: TextIO) -> int:
    try:
        reader = _Reader(args)
        before = reader.scrape()
    except ScrapeError as exc:
        return _fail("top", exc)
    tty = out.isatty() and not args.json
    shown = 0
    while args.count is None or shown < args.count:
        time.sleep(max(0.0, before.at + args.interval - time.monotonic()))
        shown += 1
        try:
            now = reader.scrape()
        except ScrapeError as exc:
            # The admin went away for now: say so, and keep the baseline.
            _show(out, f"meshgate top: {exc}\n", tty)
            continue
        doc: dict[str, Any] = top_doc(before, now, reader.url, args.by)
        before = now
        if args.json:
            out.write(json.dumps(doc) + "\n")
            out.flush()
            continue
        rows = shutil.get_terminal_size().lines - 5 if tty else None
        _show(out, render_top(doc, max_rows=max(rows, 1) if rows is not None else None), tty)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        help=f"the admin listener: a URL or host:port (default {DEFAULT_ADMIN})",
    )
    p.add_argument("--token-file", default=None, help="a file holding the admin's bearer token")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per scrape (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `stats` and `top` to the `meshgate` parser."""
    p = sub.add_parser(
        "stats",
        help="summarise a gateway's or sidecar's metrics since it started",
        description="One scrape of the admin's /metrics: the process, each route's requests,"
        " success rate (not 5xx) and latency quantiles, each upstream's endpoints.",
    )
    _common(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "top",
        help="live rps, success rate and latency per route, destination or source",
        description="Scrapes the admin's /metrics every --interval seconds and shows the"
        " traffic of the last interval. Ctrl-C stops it.",
    )
    _common(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    p.add_argument("--by", choices=sorted(BY), default="route", help="what a row is")
    p.set_defaults(func=cmd_top)
