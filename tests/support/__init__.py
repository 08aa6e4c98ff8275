"""Test harness for real-process integration tests.

- `upstream`: a real HTTP/1.1 upstream (plain asyncio streams, no meshgate code)
  that records every request and every byte it receives.
- `proxy`: `ProxyProcess`, which runs `meshgate run -c FILE` as a subprocess.
- `client`: real clients: `curl`, raw sockets, a tiny HTTP/1.1 response parser.
"""
