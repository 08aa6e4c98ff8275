"""`tracing:`: spans over OTLP/HTTP (off when the section is absent)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from meshgate.config.base import Duration, _Model, redact_url

__all__ = ["TracingBatch", "TracingConfig"]

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.:/@-]{1,128}$")


class TracingBatch(_Model):
    """How spans are batched on their way to the collector (the OpenTelemetry
    SDK's BatchSpanProcessor)."""

    schedule_delay: Duration = 5.0
    """The longest a finished span waits before its batch is sent."""
    max_queue: int = Field(default=2048, ge=1, le=1_000_000)
    """Spans held while the exporter is busy; past it the oldest are dropped
    (and counted in meshgate_trace_spans_total{outcome="dropped"})."""
    max_batch: int = Field(default=512, ge=1, le=100_000)
    """Spans in one export request."""

    @model_validator(mode="after")
    def _batch_fits(self) -> TracingBatch:
        if self.max_batch > self.max_queue:
            raise ValueError("max_batch must not be larger than max_queue")
        return self


class TracingConfig(_Model):
    """Distributed tracing: a server span per request and a client span per
    upstream try, sent to an OTLP/HTTP collector. Sampling is parent-based: a
    caller's decision (the sampled flag of its `traceparent` or B3 headers)
    is followed; a request without one is sampled with `sample_ratio`."""

    endpoint: str
    """The collector's OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    """The share of new traces that are sampled (1.0: all of them, as the
    OpenTelemetry SDK's default; lower it on a busy gateway)."""
    service_name: str = "meshgate"
    """The spans' `service.name`."""
    compression: Literal["none", "gzip"] = "none"
    export_timeout: Duration = 10.0
    """One export request, its retries included."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Sent with every export request (a collector's API key)."""
    batch: TracingBatch = TracingBatch()

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+", v):
            raise ValueError(
                f"endpoint must be an http:// or https:// URL, found {redact_url(v)!r}"
            )
        return v

    @field_validator("service_name")
    @classmethod
    def _check_service(cls, v: str) -> str:
        if not _SERVICE.match(v):
            raise ValueError("service_name is 1-128 letters, digits, or _.:/@-")
        return v

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if "\r" in value or "\n" in value:
                raise ValueError(f"the value of {name} must be one line")
        return v
