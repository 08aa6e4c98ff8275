"""The chaos suite (issue 16): the real gateway under steady load while
something breaks — a worker killed, an upstream resetting mid-response, a
hundred reloads, Redis killed and restarted — and a soak that watches the
worker's memory and file descriptors.

Every module is marked `chaos` (and `engine`); the suite runs in the
default `make test` (about two minutes, the soak's minute included).
`pytest -m chaos` runs it alone, `-m 'not chaos'` skips it. The load is
`support.load.SteadyLoad`: bounded in count and time, every error counted.
"""
