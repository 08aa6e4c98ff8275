"""What a gateway's dashboard samples: snapshots thinned to 16 minutes and
their windows (`observability.history`), and the workers' samples asked for
some families only, and their named extras (`observability.peers`), over
real Unix sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meshgate.observability import peers
from meshgate.observability.history import KEEP, Snapshots
from meshgate.observability.hub import MetricsHub

REQ = "meshgate_requests_total"
LABELS = ("inbound", "r", "up", "", "", "GET", "200", "2xx", "false", "")


def _snap(n: float) -> dict[str, dict[tuple[str, ...], float]]:
    return {REQ: {LABELS: n}}


def test_windows_are_the_change_between_the_newest_and_the_oldest_inside() -> None:
    s = Snapshots()
    assert s.window(60, 0.0) is None
    for i in range(0, 1200, 2):  # 20 minutes, one every 2 s, one request per second
        s.add(float(i), _snap(float(i)))
    now = 1198.0
    w1 = s.window(60, now)
    assert w1 is not None and w1.delta[REQ][LABELS] == w1.span and 58 <= w1.span <= 60
    w15 = s.window(900, now)
    assert w15 is not None and 885 <= w15.span <= 900 and w15.delta[REQ][LABELS] == w15.span
    # Bounded: every one of the last 70 s, one per 15 s before, none past KEEP.
    assert len(s.recent) <= 36 and len(s.older) <= KEEP / 15 + 1
    assert s.older[0][0] >= now - KEEP
    # Silent for longer than the window: nothing to say.
    assert s.window(60, now + 61) is None


def test_a_counter_that_went_down_counts_from_zero() -> None:
    s = Snapshots()
    s.add(0.0, _snap(100.0))
    s.add(2.0, _snap(5.0))  # a restart
    w = s.window(60, 2.0)
    assert w is not None and w.delta[REQ][LABELS] == 5.0


def test_peers_answer_some_families_and_their_extras(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = MetricsHub(), MetricsHub()
        for hub, n in ((a, 1), (b, 2)):
            hub.register("x", lambda n=n: {"meshgate_split_requests_total": [[("r", "u"), n]]})
        b.extras["denials"] = lambda: [{"policy": "p", "n": 2}]
        path = str(tmp_path / "b.sock")
        server = await peers.serve(path, b)
        a.peers = [path, str(tmp_path / "gone.sock")]
        try:
            got = await peers.gather(a, ["meshgate_split_requests_total"])
            assert set(got) == {"meshgate_split_requests_total"}
            assert [row[1] for row in got["meshgate_split_requests_total"]] == [3]
            # One worker gone: its share is missing, as workers_scraped says.
            full = await peers.gather(a)
            assert sum(r[1] for r in full["meshgate_workers_scraped"]) == 2
            assert await peers.gather_extra(a, "denials") == [[{"policy": "p", "n": 2}]]
            a.extras["denials"] = lambda: []
            assert await peers.gather_extra(a, "denials") == [[], [{"policy": "p", "n": 2}]]
            assert await peers.gather_extra(a, "nothing") == []
        finally:
            server.close()

    asyncio.run(main())


class _Stuck:
    """A transport whose client stopped reading: more than 1 MiB waits."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return (1 << 20) + 1

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed() -> None:
    from meshgate.admin.gateway_ui import EventStream, GatewayDashboard

    async def main() -> None:
        board = GatewayDashboard(MetricsHub(), bound="127.0.0.1")
        stream = board.events(None)  # type: ignore[arg-type]
        assert isinstance(stream, EventStream) and board.clients == 1
        transport = _Stuck()
        await asyncio.wait_for(stream.run(transport, asyncio.Event()), 1)  # type: ignore[arg-type]
        assert transport.written == []
        stream.release()
        stream.release()
        assert board.clients == 0 and not board.streams
        # Full: 503, and draining: 503 too.
        board.clients = 32
        assert not isinstance(board.events(None), EventStream)  # type: ignore[arg-type]
        board.clients = 0
        board.stop()
        assert not isinstance(board.events(None), EventStream)  # type: ignore[arg-type]

    asyncio.run(main())
