"""What the fuzz harnesses of tests/fuzz share: the committed corpus, and the
hypothesis settings for a CI run and for a long run.

Each target's corpus is a folder of files under tests/fuzz/corpus/<target>/,
read as bytes and replayed in full on every run; the generated examples
mutate them. A CI run (`make test`) is deterministic: a fixed number of
examples per test, derandomized, no example database, no deadline. A long
run sets MESHGATE_FUZZ_EXAMPLES (`MESHGATE_FUZZ_EXAMPLES=100000 make fuzz`):
that many examples per test, random, with the example database under
.hypothesis/ so that a failure found is replayed first on the next run.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

__all__ = ["CORPUS", "LONG_RUN", "corpus", "corpus_ids", "fuzz_settings"]

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"

LONG_RUN = int(os.environ.get("MESHGATE_FUZZ_EXAMPLES", "0") or 0)


def corpus(target: str) -> list[tuple[str, bytes]]:
    """Every (file name, bytes) of the target's corpus, sorted by name."""
    folder = CORPUS / target
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    assert files, f"the corpus {folder} is empty"
    return [(p.name, p.read_bytes()) for p in files]


def corpus_ids(target: str) -> list[str]:
    return [name for name, _ in corpus(target)]


def fuzz_settings(ci_examples: int) -> settings:
    """`ci_examples` derandomized examples in CI; MESHGATE_FUZZ_EXAMPLES random
    ones (with the example database) in a long run."""
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
    if LONG_RUN:
        return settings(
            max_examples=LONG_RUN,
            deadline=None,
            suppress_health_check=checks,
            print_blob=True,
        )
    return settings(
        max_examples=ci_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=checks,
        print_blob=True,
    )
