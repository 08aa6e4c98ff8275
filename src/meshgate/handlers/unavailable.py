"""The answer of a route whose upstream has no endpoint at all.

A mesh service can have no live instance (none registered yet, or every
lease lapsed). Its routes are compiled to this handler, so the hot path
never asks a balancer with nothing in it: 503 `no-endpoints`, at once.
"""

from __future__ import annotations

from meshgate.handlers import BufferedRequest, HandlerResponse, problem

__all__ = ["NoEndpoints"]


class NoEndpoints:
    """Answers every request with 503, naming the service."""

    __slots__ = ("detail", "max_body")

    def __init__(self, upstream: str, service: str | None) -> None:
        self.max_body = 1 << 20
        what = f"mesh service {service!r}" if service else f"upstream {upstream!r}"
        self.detail = f"{what} has no live instance"

    async def handle(self, req: BufferedRequest, deadline: float) -> HandlerResponse:
        return problem(
            503,
            "no-endpoints",
            self.detail,
            req.request_id,
        )
