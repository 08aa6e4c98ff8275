"""One request's tries at a cluster: what every upstream caller shares.

Two callers send requests upstream: the streamed proxy (`stream.proxy`,
driven by protocol callbacks, no task on the common path) and the buffered
client (`upstream.client.send`, one coroutine per call). They differ in how
they wait and what they do with an answer, but a try is the same for both,
and it is written once, here, as `UpstreamAttempt`, the base class of both:

- admission: the circuit breaker's `max_requests`, the deadline, the retry
  budget and the first endpoint (`_begin`);
- a connection: an idle pooled one, else a new one, waiting for room in a
  full pool within `max_pending` and `acquire_timeout` (`_open`);
  reachability is told of connects that fail and succeed;
- binding the connection (it reports to the attempt, its `ResponseSink`)
  and the milliseconds of deadline left for `x-meshgate-deadline` (`_bind`);
- the retry decision: policy, budget, backoff, `max_retries`, and the free
  retry of a connect that failed to an untried endpoint (`_retry_delay`),
  and the endpoint of the next try (`_next_try`);
- the response head as the cluster sees it: outlier detection, 429/503
  shunning with `Retry-After`, and a retriable status (`_judge_head`);
- a try that broke: a response that cannot be parsed (`_broken`), a stale
  pooled connection retried at once (`_stale`), a reset (`_reset_retry`);
- endings: the endpoint's load and latency (`_end_try`,
  `_release_endpoint`), outlier failures (`_gateway_failure`), the breaker's
  refusals (`_overloaded`), and the cluster's counters (`_leave_cluster`).

The state lives on the subclass (annotated below: the stream keeps its
defaults on the class, the client in `__slots__`). Subclasses
implement the `ResponseSink` callbacks and may refine `_retry_delay` (the
stream checks its body can be replayed first).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, ClassVar

from meshgate.upstream import reachability
from meshgate.upstream.balancer import shun
from meshgate.upstream.pool import PoolTimeout, UpstreamConnection

if TYPE_CHECKING:
    from meshgate.upstream.balancer import Endpoint
    from meshgate.upstream.cluster import Cluster
    from meshgate.upstream.retry import RetryPolicy

__all__ = ["UpstreamAttempt", "UpstreamFailure", "response_header"]


class UpstreamFailure(Exception):
    """The call got no usable answer: what a gateway would answer instead
    (502, 503 or 504), its problem type slug (`kind`) and why (`detail`)."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.detail = detail


def response_header(
    conn: UpstreamConnection, name: bytes, drop: frozenset[bytes] | None = None
) -> bytes | None:
    """The first value of a response header the connection collected (not
    one that `drop` names)."""
    parts = conn.parts
    if drop is not None and name in drop:
        return None
    for i in range(1, len(parts) - 2, 4):
        if parts[i] == name:
            return parts[i + 2]
    return None


def _retry_after(conn: UpstreamConnection, drop: frozenset[bytes] | None) -> float | None:
    """An upstream's `Retry-After` in seconds (delta form only), or None."""
    value = response_header(conn, b"retry-after", drop)
    if value is not None:
        value = value.strip()
        if value.isdigit():
            return float(int(value))
    return None


def _count_failure(cluster: Cluster, cause: str, retried: bool) -> None:
    key = (cause, retried)
    failures = cluster.try_failures
    failures[key] = failures.get(key, 0) + 1


class UpstreamAttempt:
    """The tries of one request at its cluster (see the module's docstring)."""

    logger: ClassVar[logging.Logger]  # where breakers and failures are logged
    # The subclass's state: what the methods below read and write.
    loop: asyncio.AbstractEventLoop
    cluster: Cluster | None
    method: bytes
    target: bytes
    policy: RetryPolicy | None  # the retry policy in force
    conn: UpstreamConnection | None  # the connection the current try is on
    endpoint: Endpoint | None  # its endpoint (loaded while bound)
    last_ep: Endpoint | None  # the endpoint of the latest try (kept after it ends)
    attempt: int  # the current try, from 1
    tried: tuple[Endpoint, ...]  # endpoints whose try failed, in order
    retry_counted: bool  # counted in the cluster's retries in flight
    in_cluster: bool  # counted in the cluster's requests in flight
    refused: bool  # by a circuit breaker (logged once a second, not per request)
    stale_retried: bool  # retried at once after a stale pooled connection
    deadline: float  # the whole exchange's, retries included
    try_deadline: float  # the current try's (0: none)
    try_started: float
    last_activity: float

    # -- the ResponseSink callbacks, which the subclass implements -------------------

    def on_upstream_head(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def on_upstream_body(self, data: bytes) -> None:
        raise NotImplementedError

    def flush_out(self) -> None:
        raise NotImplementedError

    def on_upstream_end(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def on_upstream_error(self, conn: UpstreamConnection, reason: str) -> None:
        raise NotImplementedError

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def on_upstream_pause_writing(self) -> None:
        raise NotImplementedError

    def on_upstream_resume_writing(self) -> None:
        raise NotImplementedError

    # -- admission ---------------------------------------------------------------------

    def _begin(self, now: float, total: float) -> Endpoint:
        """Admission by the circuit breaker's `max_requests` (the refusal is
        raised: a `try` costs nothing until it is); then this request is
        counted in the cluster's requests in flight, its clock starts
        (`total` seconds for every try), the retry budget counts it, and the
        first try's endpoint is returned."""
        cluster = self.cluster
        assert cluster is not None
        limit = cluster.max_requests
        if limit is not None and cluster.active >= limit:
            raise self._overloaded(f"{limit} requests are in flight (circuit_breaker.max_requests)")
        cluster.active += 1
        self.in_cluster = True
        self.deadline = now + total
        policy = self.policy
        if policy is not None:
            cluster.budget.request(now)
            if policy.per_try_timeout is not None:
                self.try_deadline = now + policy.per_try_timeout
        return cluster.balancer.pick()

    # -- a connection --------------------------------------------------------------------

    async def _open(self, ep: Endpoint) -> UpstreamConnection | UpstreamFailure | float:
        """A new connection to `ep`, or a pooled one freed while waiting for
        room in its full pool; else the failure to answer with, or the
        backoff before a retry that `_retry_delay` allowed (and counted)."""
        cluster = self.cluster
        assert cluster is not None
        loop = self.loop
        pool = ep.pool
        try:
            if not pool.has_capacity():
                limit = cluster.max_pending
                if limit is not None and cluster.pending >= limit:
                    return self._overloaded(
                        f"{limit} requests already wait for a connection "
                        "(circuit_breaker.max_pending)"
                    )
                cluster.pending += 1
                try:
                    wait_until = loop.time() + cluster.acquire_timeout
                    while not pool.has_capacity():
                        remaining = wait_until - loop.time()
                        if remaining <= 0:
                            raise PoolTimeout
                        await pool.wait_for_capacity(remaining)
                        conn = pool.take_idle()
                        if conn is not None:
                            return conn
                finally:
                    cluster.pending -= 1
            conn = await pool.connect()
        except PoolTimeout:
            return UpstreamFailure(
                503, "upstream-overloaded", f"no connection to {pool.address} became free in time"
            )
        except (TimeoutError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            reason = "timed out" if timed_out else exc.strerror or exc.__class__.__name__
            reachability.connect_failed(ep, reason)
            if cluster.outlier is not None:
                cluster.outlier.failure(ep, gateway=True)
            delay = self._retry_delay("connect-failure", ep, sent=False)
            if delay is not None:
                return delay
            return UpstreamFailure(
                *reachability.connect_failure_answer(
                    cluster.balancer, pool.address, reason, timed_out=timed_out
                )
            )
        if ep.unreachable:
            reachability.connected(ep)
        return conn

    def _bind(self, ep: Endpoint, conn: UpstreamConnection, now: float) -> int:
        """Put this try on `conn` (it reports to this attempt now, and `ep`
        carries its load); the milliseconds left of the deadline at `now`,
        for the next hop (a budget, not a time: hops need no common clock)."""
        self.endpoint = self.last_ep = ep
        ep.active += 1
        self.conn = conn
        # `conn.bind(self, ...)`, inlined: this is the hot path.
        conn.sink = self
        conn.no_body = self.method == b"HEAD"
        conn.close_delimited = False
        conn.bytes_in = 0
        conn.parts = [b""]
        conn.has_length = conn.chunked = conn.in_body = False
        conn.drop = None
        conn.head_size = 0
        end = self.deadline
        if self.try_deadline and self.try_deadline < end:
            end = self.try_deadline
        left = int((end - now) * 1000)
        return left if left >= 1 else 1

    # -- retries ---------------------------------------------------------------------------

    def _retry_delay(
        self,
        cause: str,
        failed: Endpoint | None,
        *,
        sent: bool,
        retry_after: float | None = None,
    ) -> float | None:
        """The backoff before a retry, when the policy, the method, the budget,
        the breaker and the deadline all allow one (it is then counted); None
        when the try's failure is the answer."""
        policy = self.policy
        cluster = self.cluster
        if cluster is None:
            return None
        if policy is None:
            _count_failure(cluster, cause, False)
            return None
        if failed is not None:
            self.tried = (*self.tried, failed)
        delay = policy.next_delay(
            cluster,
            cause,
            self.attempt,
            method=self.method,
            sent=sent,
            now=self.loop.time(),
            deadline=self.deadline,
            retry_after=retry_after,
            free=reachability.free_retry(cluster.balancer, self.tried, cause, sent=sent),
        )
        _count_failure(cluster, cause, delay is not None)
        if delay is None:
            return None
        self.attempt += 1
        if not self.retry_counted:
            self.retry_counted = True
            cluster.retries_active += 1
        self.try_deadline = 0.0
        return delay

    def _next_try(self) -> Endpoint:
        """After the backoff: the next try's clock, and its endpoint (one this
        request has not tried yet, where there is one)."""
        cluster = self.cluster
        assert cluster is not None
        policy = self.policy
        now = self.last_activity = self.loop.time()
        if policy is not None and policy.per_try_timeout is not None:
            self.try_deadline = now + policy.per_try_timeout
        return reachability.retry_endpoint(cluster.balancer, self.tried)[0]

    def _per_try_detail(self) -> str:
        policy = self.policy
        per_try = policy.per_try_timeout if policy is not None else None
        return f"the try took longer than {per_try or 0.0:g}s"

    # -- the response head ---------------------------------------------------------------

    def _judge_head(self, conn: UpstreamConnection, drop: frozenset[bytes] | None) -> float | None:
        """A response head as the cluster sees it: outlier detection, a busy
        endpoint (429, 503) shunned for its `Retry-After`, and a retriable
        status. The backoff when this answer is to be dropped for a retry."""
        status = conn.status
        cluster = self.cluster
        assert cluster is not None
        ep = self.endpoint
        outlier = cluster.outlier
        if outlier is not None and ep is not None:
            if status >= 500:
                outlier.failure(ep, gateway=status in (502, 503, 504))
            else:
                outlier.success(ep)
        policy = self.policy
        busy = status == 503 or status == 429
        retriable = policy is not None and status in policy.statuses
        if not busy and not retriable:
            return None
        retry_after = _retry_after(conn, drop)
        if busy and ep is not None:
            shun(ep, retry_after)
        if retriable and not (
            status == 503 and response_header(conn, b"x-meshgate-overloaded", drop) is not None
        ):
            return self._retry_delay(str(status), ep, sent=True, retry_after=retry_after)
        return None

    # -- a try that broke ----------------------------------------------------------------

    def _broken(self, conn: UpstreamConnection) -> Endpoint | None:
        """The try's connection sent what cannot be parsed: its endpoint is
        blamed (outlier detection) and released, the connection reset. The
        endpoint it was on."""
        self.conn = None
        self._gateway_failure()
        failed = self.endpoint
        self._release_endpoint()
        conn.abort()
        return failed

    def _replayable(self) -> bool:
        """The request can go again as it went (the subclass says)."""
        raise NotImplementedError

    def _stale(self, conn: UpstreamConnection) -> Endpoint | None:
        """A pooled connection the upstream had closed while it sat idle:
        nothing came back on it, this request was not retried so yet, and
        it can go again (`_replayable`). The pool's other idle connections
        are likely stale as well, and are closed; the endpoint to retry on
        at once, on a fresh connection. None for any other loss."""
        if conn.reused and conn.bytes_in == 0 and not self.stale_retried and self._replayable():
            self.stale_retried = True
            conn.pool.close_idle()
            cluster = self.cluster
            assert cluster is not None
            return cluster.balancer.pick()
        return None

    def _reset_retry(self, ep: Endpoint | None) -> float | None:
        """The connection closed before an answer: `ep` is blamed; the
        backoff before a retry (`_retry_delay`), or None."""
        cluster = self.cluster
        if cluster is not None and cluster.outlier is not None and ep is not None:
            cluster.outlier.failure(ep, gateway=True)
        return self._retry_delay("reset", ep, sent=True)

    # -- endings -------------------------------------------------------------------------

    def _end_try(self) -> None:
        """The try answered: its endpoint's load is released and its latency
        observed (this try's only: earlier tries and backoff are not its)."""
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            ep.active -= 1
            balancer = ep.balancer
            if balancer.needs_latency:
                now = self.loop.time()
                balancer.observe(ep, now - self.try_started, now)

    def _release_endpoint(self) -> None:
        """The request no longer loads its endpoint (failures are not timed)."""
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            ep.active -= 1

    def _gateway_failure(self) -> None:
        """The bound endpoint failed as a gateway sees it (reset, timeout, a
        response that cannot be parsed): tell outlier detection."""
        cluster = self.cluster
        if cluster is not None and cluster.outlier is not None and self.endpoint is not None:
            cluster.outlier.failure(self.endpoint, gateway=True)

    def _overloaded(self, detail: str) -> UpstreamFailure:
        """A circuit breaker limit is reached: counted, logged at most once a
        second, and answered 503."""
        cluster = self.cluster
        assert cluster is not None
        self.refused = True
        cluster.overloaded += 1
        now = self.loop.time()
        if now - cluster.overload_logged >= 1.0:
            cluster.overload_logged = now
            self.logger.warning(
                "upstream %s: circuit breaker open: %s (%d refused so far)",
                cluster.name,
                detail,
                cluster.overloaded,
            )
        return UpstreamFailure(503, "upstream-overloaded", f"upstream {cluster.name}: {detail}")

    def _leave_cluster(self) -> None:
        """No longer counted in the cluster's requests (or retries) in flight."""
        if self.in_cluster:
            self.in_cluster = False
            cluster = self.cluster
            assert cluster is not None
            cluster.active -= 1
            if self.retry_counted:
                self.retry_counted = False
                cluster.retries_active -= 1

    def _log_failure(self, status: int, detail: str) -> None:
        cluster = self.cluster
        self.logger.warning(
            "%s %s -> %s: %d %s",
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            cluster.name if cluster is not None else "-",
            status,
            detail,
        )
