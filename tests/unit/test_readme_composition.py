"""The README's composition example is a config meshgate accepts as written."""

from __future__ import annotations

from pathlib import Path

from meshgate.engine.load import load_config_text

README = Path(__file__).resolve().parents[2] / "README.md"
STUBS = """\
upstreams:
  order-service: {endpoints: ["127.0.0.1:1"]}
  customer-service: {endpoints: ["127.0.0.1:2"]}
  order-service-v2: {endpoints: ["127.0.0.1:3"]}
"""


def test_the_composition_example_loads() -> None:
    text = README.read_text()
    section = text[text.index("### Composition") :]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load_config_text(STUBS + block, "README.md", env={})
    aggregate, mediated = config.routes
    assert aggregate.aggregate is not None and len(aggregate.aggregate.backends) == 2
    assert mediated.transform is not None and mediated.transform.buffers()
