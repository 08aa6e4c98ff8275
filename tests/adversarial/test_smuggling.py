"""Request smuggling at the gateway: CL.TE, TE.CL, TE.TE with obfuscated
Transfer-Encoding, malformed Content-Length, chunk sizes and extensions, and
trailers. Every body carries a second request (`SMUGGLED`) that a parser out
of step with the gateway's would take for one of its own: it must never reach
the upstream, whether the request is refused or served."""

from __future__ import annotations

import pytest

from support.adversarial import (
    SMUGGLED,
    Case,
    Refuse,
    Serve,
    assert_clean_head,
    params,
    run_case,
    send,
)
from support.client import RawConnection
from support.proxy import ProxyProcess
from support.upstream import UpstreamServer

pytestmark = [pytest.mark.engine, pytest.mark.adversarial]

HEAD = b"POST /s HTTP/1.1\r\nHost: gw.test\r\n"
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"


def post(lines: bytes, body: bytes) -> bytes:
    return HEAD + lines + b"\r\n" + body


def chunked(size_line: bytes, data: bytes = b"hello", tail: bytes = b"0\r\n\r\n") -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", size_line + b"\r\n" + data + b"\r\n" + tail)


# Transfer-Encoding values a front end and the gateway could read differently.
OBFUSCATED_TE = {
    "te-xchunked": b"xchunked",
    "te-chunked-x": b"chunkedx",
    "te-chunked-identity": b"chunked, identity",
    "te-identity-chunked": b"identity, chunked",
    "te-gzip-chunked": b"gzip, chunked",
    "te-chunked-chunked": b"chunked, chunked",
    "te-chunked-comma": b"chunked,",
    "te-comma-chunked": b", chunked",
    "te-quoted": b'"chunked"',
    "te-vtab-before": b"\x0bchunked",
    "te-vtab-after": b"chunked\x0b",
    "te-formfeed-before": b"\x0cchunked",
    "te-formfeed-after": b"chunked\x0c",
    "te-nul-after": b"chunked\x00",
    "te-space-inside": b"chun ked",
    "te-semicolon": b"chunked;q=1",
    "te-identity": b"identity",
    "te-empty": b"",
}

CASES = [
    # -- CL.TE and TE.CL: both headers, in either order, is a 400 -----------------
    Case(
        "cl-te",
        post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "te-cl",
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"5c\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-zero-length",
        post(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", CHUNKED_BODY + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-case",
        post(b"content-length: 6\r\nTRANSFER-ENCODING: CHUNKED\r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-tab",
        post(b"Content-Length: 6\r\nTransfer-Encoding:\tchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-spaces",
        post(b"Content-Length: 6\r\nTransfer-Encoding:   chunked  \r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-space-before-colon",
        post(b"Content-Length: 6\r\nTransfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-folded",
        post(b"Content-Length: 6\r\nTransfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-te-leading-space-name",
        post(b"Content-Length: 6\r\n Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    # -- TE.TE: two Transfer-Encoding lines ----------------------------------------
    Case(
        "te-te-second-bogus",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", CHUNKED_BODY + SMUGGLED),
        Refuse(),
    ),
    Case(
        "te-te-first-bogus",
        post(b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n", CHUNKED_BODY + SMUGGLED),
        Refuse(),
    ),
    Case(
        "te-te-both-chunked",
        # Two lines are one list, `chunked, chunked`: chunked applied twice
        # (RFC 9112 6.1 forbids it), as refused as when sent on one line.
        post(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            CHUNKED_BODY + SMUGGLED,
        ),
        Refuse(),
    ),
    Case(
        "te-te-identity-then-chunked-cl",
        post(
            b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            CHUNKED_BODY + SMUGGLED,
        ),
        Refuse(),
    ),
    # Case and whitespace are not obfuscation: these are valid, and served.
    Case(
        "te-case-served",
        post(b"Transfer-Encoding: ChUnKeD\r\n", CHUNKED_BODY),
        Serve((("/s", b"hello"),)),
    ),
    Case(
        "te-ows-served",
        post(b"Transfer-Encoding: \t chunked \t\r\n", CHUNKED_BODY),
        Serve((("/s", b"hello"),), or_refuse=(400,)),
    ),
    # -- Content-Length ----------------------------------------------------------------
    Case("cl-plus", post(b"Content-Length: +5\r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-minus", post(b"Content-Length: -5\r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-space-inside", post(b"Content-Length: 5 5\r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-decimal", post(b"Content-Length: 5.0\r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-empty", post(b"Content-Length: \r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-vtab", post(b"Content-Length:\x0b5\r\n", b"hello" + SMUGGLED), Refuse()),
    Case("cl-formfeed", post(b"Content-Length: 5\x0c\r\n", b"hello" + SMUGGLED), Refuse()),
    Case(
        "cl-overflow",
        post(b"Content-Length: 18446744073709551621\r\n", b"hello" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-two-differing",
        post(b"Content-Length: 5\r\nContent-Length: 45\r\n", b"hello" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-list-differing",
        post(b"Content-Length: 5, 45\r\n", b"hello" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "cl-two-same",
        # RFC 9110 8.6 lets a recipient take identical values as one; the
        # gateway may as well refuse them. Either way, one body of 5 bytes.
        post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        Serve((("/s", b"hello"),), or_refuse=(400,)),
    ),
    Case(
        "cl-leading-zeros-served",
        post(b"Content-Length: 0005\r\n", b"hello"),
        Serve((("/s", b"hello"),)),
    ),
    Case(
        "cl-ows-served",
        post(b"Content-Length: \t5 \r\n", b"hello"),
        Serve((("/s", b"hello"),)),
    ),
    Case(
        "cl-covers-smuggled",
        # The smuggled request is this body's bytes: forwarded as a body.
        post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
        Serve((("/s", SMUGGLED),)),
    ),
    # -- chunk sizes ----------------------------------------------------------------------
    Case("chunk-size-plus", chunked(b"+5"), Refuse()),
    Case("chunk-size-minus", chunked(b"-5"), Refuse()),
    Case("chunk-size-0x", chunked(b"0x5"), Refuse()),
    Case("chunk-size-empty", chunked(b""), Refuse()),
    Case("chunk-size-leading-space", chunked(b" 5"), Refuse()),
    Case("chunk-size-trailing-space", chunked(b"5 "), Refuse()),
    Case("chunk-size-tab", chunked(b"5\t"), Refuse()),
    Case("chunk-size-overflow", chunked(b"10000000000000000005"), Refuse()),
    Case("chunk-size-not-hex", chunked(b"5g"), Refuse()),
    Case(
        "chunk-size-bare-lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
        Refuse(),
    ),
    Case(
        "chunk-size-bare-cr",
        post(b"Transfer-Encoding: chunked\r\n", b"5\rhello\r\n0\r\n\r\n"),
        Refuse(),
    ),
    Case(
        "chunk-data-too-long",
        post(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "chunk-data-bare-lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\n0\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "chunk-last-bare-lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\n\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "chunk-smuggled-after-zero-size-with-data",
        post(b"Transfer-Encoding: chunked\r\n", b"0\r\nX\r\n\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case(
        "chunk-leading-zeros-served",
        chunked(b"0005"),
        Serve((("/s", b"hello"),)),
    ),
    Case(
        "chunk-uppercase-hex-served",
        post(b"Transfer-Encoding: chunked\r\n", b"A\r\nhelloworld\r\n0\r\n\r\n"),
        Serve((("/s", b"helloworld"),)),
    ),
    # -- chunk extensions ---------------------------------------------------------------
    Case("chunk-ext-served", chunked(b"5;name=value"), Serve((("/s", b"hello"),))),
    Case("chunk-ext-quoted-served", chunked(b'5;name="v;a=l"'), Serve((("/s", b"hello"),))),
    Case("chunk-ext-bare-lf", chunked(b"5;name\nvalue"), Refuse()),
    Case("chunk-ext-bare-cr", chunked(b"5;name\rvalue"), Refuse()),
    Case("chunk-ext-nul", chunked(b"5;na\x00me"), Refuse()),
    Case("chunk-ext-unterminated-quote", chunked(b'5;a="b'), Refuse()),
    Case("chunk-ext-space-in-name", chunked(b"5;na me=v"), Refuse()),
    Case(
        "chunk-ext-no-name",
        # Not a valid extension; harmless here (extensions are never forwarded).
        chunked(b"5;=v"),
        Serve((("/s", b"hello"),), or_refuse=(400,)),
    ),
    Case(
        "chunk-ext-hides-size",
        # `5;` + a request: a parser that stops at the first CR or LF of the
        # extension would start reading a request here.
        chunked(b"5;\n" + SMUGGLED.rstrip(b"\r\n")),
        Refuse(),
    ),
    Case(
        "chunk-ext-huge",
        # 64 KiB of extension: bounded like a head (or served), never a hang.
        chunked(b"5;" + b"a" * 65536),
        Serve((("/s", b"hello"),), or_refuse=(400, 413, 431)),
    ),
    # -- trailers --------------------------------------------------------------------------
    Case(
        "trailer-framing-served",
        # Trailers are dropped (bodies are re-framed): a Content-Length or a
        # Transfer-Encoding among them decides nothing.
        chunked(
            b"5", tail=b"0\r\nContent-Length: 999\r\nTransfer-Encoding: chunked\r\nX-T: 1\r\n\r\n"
        ),
        Serve((("/s", b"hello"),), or_refuse=(400,)),
    ),
    Case(
        "trailer-host-served",
        chunked(b"5", tail=b"0\r\nHost: evil.test\r\n\r\n"),
        Serve((("/s", b"hello"),)),
    ),
    Case(
        "trailer-request-line",
        # A request line where a trailer field belongs is not a field.
        chunked(b"5", tail=b"0\r\n" + SMUGGLED),
        Refuse(),
    ),
    Case("trailer-obs-fold", chunked(b"5", tail=b"0\r\nX-T: a\r\n b\r\n\r\n"), Refuse()),
    Case("trailer-nul", chunked(b"5", tail=b"0\r\nX-T: a\x00b\r\n\r\n"), Refuse()),
    Case("trailer-bare-lf", chunked(b"5", tail=b"0\r\nX-T: a\n\r\n"), Refuse()),
    Case("trailer-no-colon", chunked(b"5", tail=b"0\r\nX-T\r\n\r\n"), Refuse()),
    Case(
        "trailer-too-large",
        chunked(
            b"5",
            tail=b"0\r\n"
            + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(100))
            + b"\r\n",
        ),
        Refuse((400, 431)),
    ),
    # -- HTTP/1.0 ---------------------------------------------------------------------
    Case(
        "http10-te-cl",
        b"POST /s HTTP/1.0\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\nhello" + SMUGGLED,
        Refuse(),
    ),
]
CASES += [
    Case(
        f"{name}-alone",
        post(b"Transfer-Encoding: " + value + b"\r\n", CHUNKED_BODY + SMUGGLED),
        Refuse((400, 501)),
    )
    for name, value in OBFUSCATED_TE.items()
]
CASES += [
    Case(
        f"{name}-with-cl",
        post(
            b"Content-Length: %d\r\nTransfer-Encoding: " % len(CHUNKED_BODY) + value + b"\r\n",
            CHUNKED_BODY + SMUGGLED,
        ),
        Refuse((400, 501)),
    )
    for name, value in OBFUSCATED_TE.items()
]


@pytest.mark.parametrize("case", params(CASES))
def test_smuggling(gateway: ProxyProcess, up: UpstreamServer, case: Case) -> None:
    run_case(gateway, up, case)


BYTEWISE = {"cl-te", "te-cl", "te-te-second-bogus", "chunk-ext-hides-size", "chunk-ext-served"}


@pytest.mark.parametrize("case", params([c for c in CASES if c.id in BYTEWISE]))
def test_smuggling_one_byte_at_a_time(
    gateway: ProxyProcess, up: UpstreamServer, case: Case
) -> None:
    """The same verdict when every byte arrives in a read of its own."""
    run_case(gateway, up, case, bytewise=True)


def test_endless_chunk_is_a_body_never_a_request(gateway: ProxyProcess, up: UpstreamServer) -> None:
    """A chunk of 2**64-1 bytes is well formed (RFC 9112 7.1 sets no bound):
    everything after its size line is body, streamed, never complete, and
    what looks like a request in it stays body."""
    with RawConnection(gateway.port) as conn:
        send(conn, chunked(b"ffffffffffffffff") + SMUGGLED)
        up.wait_for(
            lambda s: any(SMUGGLED in r.body for r in s.requests), what="the body to stream"
        )
    (rec,) = up.wait_finished()
    assert rec.target == "/s" and not rec.body_complete, rec
    assert rec.error in ("eof", "reset"), rec
    assert_clean_head(rec)
