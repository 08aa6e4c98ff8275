"""Config generations: numbering, rollback as an undo, the kept window, and
the admin token that a rollback never brings back."""

from __future__ import annotations

from meshgate.config.generations import Generation, Generations
from meshgate.config.schema import Config


def _config(n: int, token: str | None = None) -> Config:
    return Config.model_validate(
        {
            "upstreams": {"u": {"endpoints": [f"127.0.0.1:{1000 + n}"]}},
            "routes": [{"path": "/x", "upstream": "u"}],
            "admin_token": token,
        }
    )


def test_rollback_walks_back_like_an_undo() -> None:
    gens = Generations()
    for n in (1, 2, 3):
        gens.loaded(_config(n), f"text {n}", "f.yaml")
    target = gens.rollback_target()
    assert isinstance(target, Generation) and target.number == 2
    four = gens.rolled_back(target)
    assert (four.number, four.restores, four.previous, four.after) == (4, 2, 1, 3)
    assert four.digest == target.digest and four.config is target.config
    target = gens.rollback_target()
    assert isinstance(target, Generation) and target.number == 1
    gens.rolled_back(target)
    assert "nothing to roll back to" in str(gens.rollback_target())
    six = gens.loaded(_config(6), "text 6", "f.yaml")
    assert six.previous == 5  # an edit after rollbacks undoes to what was served
    assert [g["generation"] for g in gens.describe()] == [6, 5, 4, 3, 2, 1]
    assert gens.describe()[0]["current"] and not gens.describe()[1]["current"]


def test_only_the_last_ten_are_kept() -> None:
    gens = Generations()
    for n in range(1, 13):
        gens.loaded(_config(n), f"text {n}", "f.yaml")
    assert [g.number for g in gens.kept] == list(range(3, 13))
    gens.kept.pop(-2)  # the one a rollback would restore
    assert "no longer kept" in str(gens.rollback_target())


def test_a_rollback_keeps_the_newest_admin_token() -> None:
    old, new = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    gens = Generations()
    gens.loaded(_config(1, old), "1", "f.yaml")
    gens.loaded(_config(2, new), "2", "f.yaml")
    target = gens.rollback_target()
    assert isinstance(target, Generation)
    gens.rolled_back(target)
    assert gens.current.config.admin_token == old
    assert gens.admin_token == new  # a leaked, rotated token stays revoked


def test_an_order_carries_a_generation_to_a_worker() -> None:
    gens = Generations()
    gen = gens.loaded(_config(1), "text", "f.yaml")
    again = Generation.from_order(gen.order(), gen.config)
    assert again == gen
