"""The filters' response phase: hooks registered on the request run on the
response in reverse order of registration, as Envoy's encoder filters do."""

from __future__ import annotations

from meshgate.filters import FilterRequest, ResponsePhase
from meshgate.filters.transform import ResponseEdits


class _Tag:
    """A hook that records its turn and appends one header."""

    def __init__(self, name: bytes, seen: list[bytes]) -> None:
        self.name = name
        self.seen = seen

    def status(self, status: int) -> int:
        self.seen.append(self.name)
        return status + 1

    def apply_parts(self, parts: list[bytes]) -> list[bytes]:
        return [*parts, b"x-order", b": ", self.name, b"\r\n"]

    def apply_pairs(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [*headers, (b"x-order", self.name)]


def _req() -> FilterRequest:
    return FilterRequest(b"GET", b"/", [], b"127.0.0.1")


def test_no_hook_means_no_response_phase() -> None:
    assert _req().response_edits is None


def test_one_hook_is_the_phase_itself() -> None:
    req = _req()
    edits = ResponseEdits(status_map={404: 410})
    req.on_response(edits)
    assert req.response_edits is edits
    assert req.response_edits.status(404) == 410


def test_hooks_run_in_reverse_order() -> None:
    seen: list[bytes] = []
    req = _req()
    for name in (b"a", b"b", b"c"):
        req.on_response(_Tag(name, seen))
    phase = req.response_edits
    assert isinstance(phase, ResponsePhase)
    assert phase.status(200) == 203
    assert seen == [b"c", b"b", b"a"]
    assert phase.apply_pairs([]) == [(b"x-order", b"c"), (b"x-order", b"b"), (b"x-order", b"a")]
    parts = phase.apply_parts([b"HTTP/1.1 200 OK\r\n"])
    assert parts[3::4] == [b"c", b"b", b"a"]
