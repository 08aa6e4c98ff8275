"""`policy: local`: exact limits across the worker processes of one gateway.

The table lives in an anonymous shared mapping created by the parent before
it forks its workers, so every worker reads and writes the same memory. A
lock (an `fcntl` record lock, see `_ProcessLock`) makes each decision's
probe-and-update atomic across the processes. Time is `CLOCK_MONOTONIC`,
which is system-wide: every process reads the same clock.

Layout: `slots` slots of 32 bytes, open addressing with linear probing over
at most `PROBES` slots from `digest % slots`:

    digest   u64  8 bytes of blake2b(key), 0 = never used (a 0 digest is 1)
    expiry   i64  when the state is no longer needed (monotonic us):
                  gcra: the TAT itself; sliding_window: window_start + 2 * period
    a, b     i64  sliding_window: prev and cur (gcra: unused, 0)

A slot whose expiry has passed holds a key that is back to its full quota,
so it may be given to another key. When all probed slots are live, the one
closest to expiry is evicted: a full table forgets the key closest to being
refilled, which then gets a full quota again (the table errs on the side of
allowing). Size the table well above the number of keys live at once.

A slot's digest is keyed by the algorithm too (blake2b `person`), so a
reload that changes a limit's algorithm never reads the other one's state.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
import threading
import time
from hashlib import blake2b
from types import TracebackType

from meshgate.ratelimit import Decision, LimitSpec, gcra, sliding_window

__all__ = ["PROBES", "SLOT_SIZE", "SharedTable"]

PROBES = 16
_SLOT = struct.Struct("<Qqqq")
SLOT_SIZE = _SLOT.size  # 32
_PERSON = {"gcra": b"mg-gcra", "sliding_window": b"mg-sliding"}
_NEVER = 1 << 63


class _ProcessLock:
    """A lock that excludes other processes (a POSIX record lock on an
    unlinked temporary file, inherited through fork) and other threads of
    this process (a `threading.Lock`; record locks belong to a process).

    Unlike a semaphore, the kernel drops a record lock when its holder dies:
    a worker killed in the middle of a decision cannot wedge the others.
    """

    __slots__ = ("_fd", "_thread")

    def __init__(self) -> None:
        self._fd, path = tempfile.mkstemp(prefix="meshgate-rl-")
        os.unlink(path)
        self._thread = threading.Lock()

    def __enter__(self) -> None:
        self._thread.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _NoLock:
    """For a table only one process uses: its event loop is the only writer."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None


class SharedTable:
    """Rate limit state shared by the processes forked after its creation.

    `shared=False` is for a single process (one worker): decisions then run
    without the cross-process lock, each one whole within one callback of
    the event loop.
    """

    __slots__ = ("_lock", "_map", "slots")

    def __init__(self, slots: int, *, shared: bool = True) -> None:
        if slots < 1:
            raise ValueError("a rate limit table needs at least one slot")
        self.slots = slots
        # Anonymous mappings are MAP_SHARED by default in Python; say so.
        self._map = mmap.mmap(
            -1, slots * SLOT_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._lock: _ProcessLock | _NoLock = _ProcessLock() if shared else _NoLock()

    def decide(self, key: bytes, spec: LimitSpec, now_us: int | None = None) -> Decision:
        """Decide one request for `key` (which names the limit as well as the
        client) under `spec`; allowed requests are counted. The clock is read
        under the lock: a worker that waited for it must not decide with a
        `now` older than the state another worker just stored."""
        algorithm = spec.algorithm
        digest = (
            int.from_bytes(
                blake2b(key, digest_size=8, person=_PERSON[algorithm]).digest(), "little"
            )
            or 1
        )
        m = self._map
        n = self.slots
        first = digest % n
        unpack_from = _SLOT.unpack_from
        with self._lock:
            if now_us is None:
                now_us = time.monotonic_ns() // 1000
            pos = -1
            found = False
            free = -1
            victim = -1
            victim_expiry = _NEVER
            for i in range(min(PROBES, n)):
                at = (first + i) % n * SLOT_SIZE
                d, expiry, a, b = unpack_from(m, at)
                if d == digest:
                    pos = at
                    found = True
                    break
                if d == 0:
                    # Nothing was ever stored past a never-used slot.
                    if free < 0:
                        free = at
                    break
                if expiry <= now_us:
                    if free < 0:
                        free = at
                elif expiry < victim_expiry:
                    victim = at
                    victim_expiry = expiry
            if not found:
                pos = free if free >= 0 else victim
                expiry = a = b = 0
            if algorithm == "gcra":
                decision, tat = gcra(now_us, expiry, spec)
                if tat is not None:
                    _SLOT.pack_into(m, pos, digest, tat, 0, 0)
                return decision
            span = 2 * spec.period_ticks * spec.tick_us
            window_start = expiry - span if found else 0
            decision, state = sliding_window(now_us, window_start, a, b, spec)
            if state is not None:
                _SLOT.pack_into(m, pos, digest, state[0] + span, state[1], state[2])
            return decision

    def close(self) -> None:
        """Release this process's mapping and lock file (the other processes
        keep theirs)."""
        self._map.close()
        self._lock.close()
