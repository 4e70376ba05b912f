"""What a newcomer reads is what the code does: the examples' README shows the real flow file,
the README tells how to pick the port."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_examples_readme_shows_no_flow_but_the_real_file() -> None:
    text = (ROOT / "examples" / "README.md").read_text()
    flow = (ROOT / "examples" / "flow.yaml").read_text()
    for block in re.findall(r"```ya?ml\n(.*?)```", text, flags=re.S):
        assert block.strip() in flow, f"examples/README.md shows a flow that is not examples/flow.yaml:\n{block}"
    assert "(flow.yaml)" in text


def test_the_readme_says_how_to_pick_the_port() -> None:
    text = (ROOT / "README.md").read_text()
    assert "--port" in text
