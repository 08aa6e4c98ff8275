"""Fuzzing the request parser (`protocol/h1.py`), in memory: parse, or refuse
with a protocol error (a 4xx and, for a framing fault, a closed connection);
never raise, never log an ERROR, never write a malformed response.

1. Every file of corpus/h1/ (smuggling attempts, odd targets and hosts, a
   TLS hello, an h2 preface...) is fed whole, one byte per read (up to 4 KiB),
   one line per read, and at seeded random cuts, then the client half-closes.
2. Mutations of the corpus, pipelined, in random reads.
3. A stateful test: one connection, driven by a sequence of sends (corpus
   requests, pieces of them, mutated ones, raw bytes) and maybe an EOF, the
   rule checked after every step.

A crash found goes into corpus/h1/ (see docs/fuzzing.md), fixed in src/.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from support.fuzz import corpus, fuzz_settings
from support.h1mem import (
    HARNESS,
    WATCHED_LOGGERS,
    Harness,
    check_client_side,
    cut_points,
    in_memory_pools,
    mutated_requests,
    run_fuzz,
)

CORPUS = corpus("h1")
BY_NAME = dict(CORPUS)
# The seeds mutated: the corpus but its few huge inputs (kept whole above).
SEEDS = [data for _, data in CORPUS if len(data) <= 2048]
NAMES = [name for name, data in CORPUS if len(data) <= 2048]


@pytest.fixture(scope="module", autouse=True)
def _in_memory_proxy() -> Iterator[None]:
    with in_memory_pools():
        yield


def _splits(name: str, data: bytes) -> list[list[int]]:
    lines = [i + 1 for i in range(len(data)) if data[i : i + 1] == b"\n"]
    rng = random.Random(name)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 8))) if len(data) > 1 else []
    splits = [[], lines, cuts]
    if len(data) <= 4096:
        splits.append(list(range(1, len(data))))
    return splits


@pytest.mark.parametrize(("name", "data"), CORPUS, ids=[n for n, _ in CORPUS])
def test_corpus_is_parsed_or_refused(
    name: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    for cuts in _splits(name, data):
        run_fuzz(data, cuts, caplog)


@fuzz_settings(ci_examples=60)
@given(case=mutated_requests(SEEDS).flatmap(lambda d: st.tuples(st.just(d), cut_points(d))))
def test_mutated_corpus_is_parsed_or_refused(
    case: tuple[bytes, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    run_fuzz(case[0], case[1], caplog)


# -- 3. one connection, step by step ------------------------------------------------------------


class _Errors(logging.Handler):
    """The ERROR records of meshgate's and asyncio's loggers (the state machine
    has no caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in WATCHED_LOGGERS:
            self.records.append(f"{record.name}: {record.getMessage()}")


class ConnectionMachine(RuleBasedStateMachine):
    """A client connection: each rule sends something in random reads, or
    half-closes; after each, everything the client got is well-formed and
    nothing failed inside the proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = uvloop.new_event_loop()
        self.errors = _Errors()
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(self.errors)
        self.h = Harness(self.loop)

    def _send(self, data: bytes, cuts: list[int]) -> None:
        self.h.feed_pieces(data, cuts)

    @precondition(lambda self: not self.h.client.closing)
    @rule(name=st.sampled_from(NAMES), cuts=st.lists(st.integers(1, 200), max_size=4))
    def send_request(self, name: str, cuts: list[int]) -> None:
        self._send(BY_NAME[name], cuts)

    @precondition(lambda self: not self.h.client.closing)
    @rule(name=st.sampled_from(NAMES), at=st.integers(0, 400), size=st.integers(1, 64))
    def send_piece(self, name: str, at: int, size: int) -> None:
        """A piece of a request: what a desynchronised client would send."""
        self._send(BY_NAME[name][at : at + size], [])

    @precondition(lambda self: not self.h.client.closing)
    @rule(data=mutated_requests(SEEDS), cuts=st.lists(st.integers(1, 400), max_size=6))
    def send_mutated(self, data: bytes, cuts: list[int]) -> None:
        self._send(data, cuts)

    @precondition(lambda self: not self.h.client.closing)
    @rule(data=st.binary(min_size=1, max_size=48))
    def send_bytes(self, data: bytes) -> None:
        self._send(data, [])

    @precondition(lambda self: not self.h.client.closing)
    @rule()
    def half_close(self) -> None:
        self.h.client_eof()

    @rule()
    def settle(self) -> None:
        """Let the loop and the upstream run (also once the client has gone)."""
        self.h.settle()

    @invariant()
    def parsed_or_refused(self) -> None:
        check_client_side(self.h)
        assert not self.errors.records, self.errors.records
        assert not self.h.loop_errors, self.h.loop_errors

    def teardown(self) -> None:
        try:
            self.h.client_eof()
            check_client_side(self.h)
            assert not self.errors.records, self.errors.records
        finally:
            for name in WATCHED_LOGGERS:
                logging.getLogger(name).removeHandler(self.errors)
            HARNESS.clear()
            self.loop.close()


ConnectionMachine.TestCase.settings = fuzz_settings(ci_examples=25)
test_connection_is_parsed_or_refused = ConnectionMachine.TestCase
