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


def test_every_example_flow_is_valid_and_only_calls_examples() -> None:
    """The examples a newcomer submits (flow, chatty, retry) pass the gateway's own checks, and
    call only what `--allow-module examples` allows."""
    from pyoco_es.flows.yaml import parse_workflow_yaml

    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert {f.name for f in files} >= {"flow.yaml", "chatty.yaml", "retry.yaml"}
    for f in files:
        doc = parse_workflow_yaml(f.read_bytes(), max_bytes=0)
        assert doc is not None
        for call in re.findall(r'callable:\s*"([^"]+)"', f.read_text()):
            assert call.startswith("examples.tasks:"), (f.name, call)


def test_chatty_prints_a_line_at_a_time_within_its_bounds(capsys: object, monkeypatch: object) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # type: ignore[attr-defined] # examples/ is not installed: a worker runs from the project root
    from examples.tasks import chatty

    assert chatty(lines=3, interval=0) == 3
    assert capsys.readouterr().out.splitlines() == ["line 1 of 3", "line 2 of 3", "line 3 of 3"]  # type: ignore[attr-defined]
    assert chatty(lines=-5, interval=-1) == 0
