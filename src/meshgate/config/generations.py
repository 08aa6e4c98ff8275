"""The configs a gateway has served: its generations, newest last.

Each load of the file is a generation, numbered from 1 (the file at start).
A rollback is a generation too: it serves again the config of an older one
(`restores`) and never edits the file. What a rollback goes back to is
`previous`: for a load, the generation it replaced; for a rollback, what the
generation it restored had as its own previous. Rolling back twice so goes
two steps back, like an undo, and a rollback with nothing behind it is
refused. The last `KEEP` generations are kept.

The supervisor and every worker keep the same record: the supervisor numbers
each generation and writes it down as an order (`Generation.order`), and each
worker applies the orders in sequence (`Generation.from_order`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from meshgate.config.schema import Config

__all__ = ["KEEP", "Generation", "Generations", "text_digest"]

KEEP = 10


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Generation:
    number: int
    loaded_at: float
    source: str
    text: str
    config: Config
    digest: str
    restores: int | None = None
    """A rollback: the generation whose config this one serves again."""
    previous: int | None = None
    """What a rollback from this generation restores (None: nothing)."""
    after: int | None = None
    """The generation that was current when this one was made."""

    def describe(self, *, current: bool = False) -> dict[str, Any]:
        return {
            "generation": self.number,
            "current": current,
            "loaded_at": self.loaded_at,
            "source": self.source,
            "digest": self.digest,
            "kind": "rollback" if self.restores is not None else "load",
            "restores": self.restores,
            "rolls_back_to": self.previous,
        }

    def order(self) -> dict[str, Any]:
        """This generation as the supervisor hands it to its workers."""
        return {
            "generation": self.number,
            "loaded_at": self.loaded_at,
            "source": self.source,
            "text": self.text,
            "digest": self.digest,
            "restores": self.restores,
            "previous": self.previous,
            "after": self.after,
        }

    @classmethod
    def from_order(cls, order: dict[str, Any], config: Config) -> Generation:
        return cls(
            number=int(order["generation"]),
            loaded_at=float(order["loaded_at"]),
            source=str(order["source"]),
            text=str(order["text"]),
            config=config,
            digest=str(order["digest"]),
            restores=order.get("restores"),
            previous=order.get("previous"),
            after=order.get("after"),
        )


class Generations:
    """The kept generations of one process, oldest first."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self.kept: list[Generation] = []
        self.file: Generation | None = None
        """The newest load: what the file said last (a rollback keeps it)."""

    @property
    def current(self) -> Generation:
        return self.kept[-1]

    @property
    def number(self) -> int:
        return self.kept[-1].number if self.kept else 0

    def find(self, number: int | None) -> Generation | None:
        for gen in self.kept:
            if gen.number == number:
                return gen
        return None

    @property
    def admin_token(self) -> str | None:
        """The admin token in force: the file's newest, never rolled back (a
        token rotated because it leaked must not come back with old routes)."""
        return self.file.config.admin_token if self.file is not None else None

    def add(self, gen: Generation) -> Generation:
        if gen.restores is None:
            self.file = gen
        self.kept.append(gen)
        del self.kept[: -self.keep]
        return gen

    def loaded(self, config: Config, text: str, source: str) -> Generation:
        """A new generation: the file as it was just read."""
        last = self.number or None
        return self.add(
            Generation(
                number=self.number + 1,
                loaded_at=time.time(),
                source=source,
                text=text,
                config=config,
                digest=text_digest(text),
                previous=last,
                after=last,
            )
        )

    def rollback_target(self) -> Generation | str:
        """The generation a rollback would serve again, or why there is none."""
        if not self.kept:
            return "no config is loaded"
        current = self.current
        if current.previous is None:
            return f"generation {current.number} is the first: there is nothing to roll back to"
        target = self.find(current.previous)
        if target is None:
            return (
                f"generation {current.previous} (what {current.number} replaced) is no "
                f"longer kept (the last {self.keep} are)"
            )
        return target

    def rolled_back(self, target: Generation) -> Generation:
        """A new generation serving `target`'s config again."""
        return self.add(
            Generation(
                number=self.number + 1,
                loaded_at=time.time(),
                source=target.source,
                text=target.text,
                config=target.config,
                digest=target.digest,
                restores=target.number,
                previous=target.previous,
                after=self.number,
            )
        )

    def describe(self) -> list[dict[str, Any]]:
        """Newest first."""
        last = self.number
        return [g.describe(current=g.number == last) for g in reversed(self.kept)]
