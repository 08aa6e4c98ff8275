#!/usr/bin/env python3
"""The least a Python HTTP/1.1 proxy can do: uvloop, httptools, one keep-alive
upstream connection per client connection, bytes passed through as they are
(no header rewriting, no routing, no limits, one request at a time per
connection, as wrk sends them). A floor for what meshgate's plain path can
cost, not a proxy anyone should run.

Usage: .venv/bin/python bench/bare_passthrough.py LISTEN_PORT UPSTREAM_PORT
(then wrk -t1 -c64 -d8s http://127.0.0.1:LISTEN_PORT/x, interleaved with
nginx and meshgate in front of the same upstream: see BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

UP = ("127.0.0.1", int(sys.argv[2]))


class Upstream(asyncio.Protocol):
    def __init__(self, client):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, t):
        self.t = t

    def data_received(self, data):
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self):
        self.client.done()


class Client(asyncio.Protocol):
    def connection_made(self, t):
        self.transport = t
        self.parser = httptools.HttpRequestParser(self)
        self.up = None
        self.buf = []
        self.busy = False
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self):
        loop = asyncio.get_running_loop()
        _, self.up = await loop.create_connection(lambda: Upstream(self), *UP)
        self.flush()

    def data_received(self, data):
        self.buf.append(data)
        self.flush()

    def flush(self):
        if self.up is not None and self.buf and not self.busy:
            data = b"".join(self.buf)
            self.buf.clear()
            self.busy = True  # (wrk sends one request at a time per connection)
            self.up.t.write(data)

    def done(self):
        self.busy = False
        self.flush()


async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Client, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await srv.serve_forever()


uvloop.run(main())
