"""Proxied routes whose JSON bodies are mapped (`transform:` with `body:`).

The request body is read whole (up to `max_body`, else 413), mapped, and sent
with its new Content-Length; the response is read whole (up to `max_body`,
else 502), mapped, and sent with its new Content-Length. This is how one v2
service answers a v1 API: the request mapping turns v1 shapes into v2, the
response mapping turns v2 back into v1.

What is mapped, and what is left alone:

- a request body is mapped when it is JSON (`application/json` or
  `*+json`, or no Content-Type at all); any other body goes as it came. A
  JSON body that does not parse is a 400. A compressed request body
  (`Content-Encoding`) is refused with 415: the gateway would have to
  decode it to map it, and re-encode it;
- a route that maps only request bodies reads responses whole too, up to
  8 MiB (or `max_body` when larger), and passes them unchanged;
- a response body is mapped when its status is 2xx and it is JSON. Errors
  (a problem body from the upstream) pass unchanged, so a mapping written
  for success shapes never mangles them. The upstream is asked for
  `Accept-Encoding: gzip` at most; gzip and deflate answers are decoded
  (the client gets identity), anything else is a 502 naming the coding.

Status and header edits of `transform.response` apply to what the upstream
answered, as on streamed routes; the gateway's own problems (413, 502, 504)
keep their status.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import TYPE_CHECKING, Any

from meshgate.handlers import BufferedRequest, HandlerResponse, is_json, problem
from meshgate.transform.jsonmap import JsonMap, NotJson
from meshgate.upstream.client import UpstreamFailure, send

if TYPE_CHECKING:
    from meshgate.config.schema import TransformConfig
    from meshgate.upstream.retry import RetryPolicy

# The most a route that maps only request bodies reads of a response (it
# is buffered too, but never mapped): `max_body` when that is larger.
UNMAPPED_RESPONSE_LIMIT = 8 * 1024 * 1024
# Response headers that describe the bytes, no longer true once they change.
_REPRESENTATION = frozenset({b"content-encoding", b"content-md5", b"digest", b"etag"})
_ACCEPT_GZIP = (b"accept-encoding", b"gzip")
_ACCEPT_IDENTITY = (b"accept-encoding", b"identity")


def _accepts_gzip(values: list[bytes]) -> bool:
    """Whether the client's Accept-Encoding lines take gzip (RFC 9110
    section 12.5.3): no line at all takes any coding; else gzip (or `*`)
    must be listed with a q above 0."""
    if not values:
        return True
    star = False
    for item in b",".join(values).lower().split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip()
        q = 1.0
        for param in params.split(b";"):
            key, _, value = param.partition(b"=")
            if key.strip() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding in (b"gzip", b"x-gzip"):
            return q > 0
        if coding == b"*":
            star = q > 0
    return star


class _TooLarge(Exception):
    """A coded body that decodes past the limit."""


def apply_edits(resp: HandlerResponse, edits: Any) -> HandlerResponse:
    """The route's status and header edits (`ResponseEdits`), on a whole
    response from upstream (not on the gateway's own problems)."""
    if edits is not None and not resp.local:
        resp.status = edits.status(resp.status)
        resp.headers = edits.apply_pairs(resp.headers)
    return resp


class BodyTransformer:
    """A proxied route with JSON body mappings; a `Handler`."""

    def __init__(
        self,
        cfg: TransformConfig,
        where: str,
        *,
        timeout: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.max_body = cfg.max_body
        self.timeout = timeout
        """The route's total timeout; 0.0 = the upstream's."""
        self.retry = retry
        req, resp = cfg.request, cfg.response
        self.request_map = (
            JsonMap(req.body, f"{where}.transform.request.body")
            if req is not None and req.body is not None
            else None
        )
        self.response_map = (
            JsonMap(resp.body, f"{where}.transform.response.body")
            if resp is not None and resp.body is not None
            else None
        )

    async def handle(self, req: BufferedRequest, deadline: float) -> HandlerResponse:
        return apply_edits(await self._exchange(req, deadline), req.response_edits)

    async def _exchange(self, req: BufferedRequest, deadline: float) -> HandlerResponse:
        body = req.body
        headers = req.headers
        if self.request_map is not None and body:
            if req.header(b"content-encoding") not in (None, b"identity"):
                return problem(
                    415,
                    "compressed-body",
                    "this route maps JSON request bodies and does not take a "
                    "Content-Encoding; send the body uncompressed",
                    req.request_id,
                )
            ctype = req.header(b"content-type")
            if ctype is None or is_json(ctype):
                try:
                    body = self.request_map.map_bytes(body)
                except NotJson as exc:
                    return problem(
                        400, "bad-json", f"the request body is not JSON: {exc}", req.request_id
                    )
        cluster = req.cluster
        loop = asyncio.get_running_loop()
        timeout = min(self.timeout or cluster.total_timeout, deadline - loop.time())
        if self.response_map is not None:
            # gzip, which the gateway can decode to map, only when the client
            # takes it too: answers left unmapped reach the client as they came.
            accepted = [v for n, v in headers if n == b"accept-encoding"]
            headers = [h for h in headers if h[0] != b"accept-encoding"]
            headers.append(_ACCEPT_GZIP if _accepts_gzip(accepted) else _ACCEPT_IDENTITY)
        try:
            resp = await send(
                cluster,
                req.method,
                req.target,
                headers + req.forward,
                body,
                host=req.host,
                timeout=max(timeout, 0.001),
                retry=self.retry,
                max_body=self.max_body
                if self.response_map is not None
                else max(self.max_body, UNMAPPED_RESPONSE_LIMIT),
            )
        except UpstreamFailure as exc:
            return problem(exc.status, exc.kind, exc.detail, req.request_id)
        except ValueError as exc:  # a header or target the client made unsendable
            return problem(400, "bad-request", str(exc), req.request_id)
        out = HandlerResponse(resp.status, resp.headers, resp.body)
        mapping = self.response_map
        if mapping is None or not 200 <= resp.status < 300 or not resp.body:
            return out
        if not is_json(resp.header(b"content-type")):
            return out
        raw = resp.body
        coding = resp.header(b"content-encoding")
        if coding is not None and coding.strip().lower() not in (b"", b"identity"):
            try:
                decoded = _decode(raw, coding.strip().lower(), self.max_body)
            except _TooLarge:
                return problem(
                    502,
                    "upstream-body-too-large",
                    f"the response of {cluster.name} is larger than {self.max_body} "
                    "bytes once decoded",
                    req.request_id,
                )
            if decoded is None:
                return problem(
                    502,
                    "upstream-encoding-unsupported",
                    f"{cluster.name} answered with Content-Encoding "
                    f"{coding.decode('latin-1')!r}, which this route cannot map "
                    "(gzip and deflate can be)",
                    req.request_id,
                )
            raw = decoded
        try:
            out.body = mapping.map_bytes(raw)
        except NotJson:
            return problem(
                502,
                "upstream-bad-json",
                f"{cluster.name} sent a JSON Content-Type with a body that is not JSON",
                req.request_id,
            )
        out.headers = [h for h in out.headers if h[0] not in _REPRESENTATION]
        return out


def _decode(raw: bytes, coding: bytes, limit: int) -> bytes | None:
    """gzip or deflate, at most `limit` bytes out; None for other codings or
    a body that does not decode; _TooLarge past the limit."""
    if coding in (b"gzip", b"x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif coding == b"deflate":
        wbits = zlib.MAX_WBITS
    else:
        return None
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(raw, limit + 1)
    except zlib.error:
        if coding != b"deflate":
            return None
        try:  # raw deflate, as some servers send it
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            out = d.decompress(raw, limit + 1)
        except zlib.error:
            return None
    if len(out) > limit or d.unconsumed_tail:
        raise _TooLarge
    return out
