"""pyoco-client's bulk and dead-letter commands, the real console script against a real stack:
``submit-batch FILE.jsonl`` (chunks, progress, per-line failures), ``cancel --filter`` (refused
without a confirmation, done with ``--yes``; ``cancel --run-id`` unchanged) and ``dlq
list/show/resubmit/drop``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from pyoco_es.cli import client_bulk
from pyoco_es.nats import subjects
from pyoco_es.testing.stack import Stack
from test_cli_e2e import CLIENT, ok_json, pyoco, stack, wait_for  # noqa: F401 - stack is a fixture


def test_chunks_respect_the_item_and_byte_limits() -> None:
    lines = [(n, {"flow_name": "x"}, 100) for n in range(2500)]
    assert [len(c) for c in client_bulk.chunks(lines)] == [1000, 1000, 500]
    big = [(n, {}, 400 * 1024) for n in range(5)]
    assert [len(c) for c in client_bulk.chunks(big)] == [2, 2, 1]


async def test_submit_batch_cancel_filter_and_dlq(stack: Stack, tmp_path: Path) -> None:  # noqa: F811
    url = stack.url
    with trio.fail_after(90):
        jsonl = tmp_path / "runs.jsonl"
        good = [json.dumps({"flow_name": "hello", "params": {"x": i}, "tag": "nobody"}) for i in range(40)]
        big = json.dumps({"flow_name": "hello", "params": {"blob": "b" * 460_000}, "tag": "nobody"})  # two of these fill a chunk
        jsonl.write_text("\n".join([*good[:5], "{not json", json.dumps({"flow_name": "a b c", "tag": "a.b"}), "", big, big, *good[5:]]) + "\n")
        out = await pyoco(url, "submit-batch", str(jsonl))
        assert out.returncode == 1, out.stderr
        assert "line 6: invalid: not JSON" in out.stdout and "line 7: refused: tag" in out.stdout
        assert "accepted=42 duplicate=0 refused=1 invalid=1 lines=44" in out.stdout
        assert "43/43 lines sent" in out.stderr and out.stderr.count("submit-batch:") == 2  # two chunks

        # cancel --filter: refused without a terminal or --yes; then every PENDING 'hello' on tag nobody
        out = await pyoco(url, "cancel", "--filter", "tag=nobody")
        assert out.returncode == 1 and "--yes" in out.stderr
        out = await pyoco(url, "cancel", "--filter", "flow=hello", "--filter", "status=pending", "--yes", timeout=60)
        report = ok_json(out)
        assert len(report["cancel_requested"]) == 42 and report["not_found"] == []
        assert "run(s) asked to cancel so far" in out.stderr
        assert (await pyoco(url, "cancel", "--filter", "color=red", "--yes")).returncode == 1
        assert (await pyoco(url, "cancel")).returncode == 1
        one = ok_json(await pyoco(url, "cancel", "--run-id", report["cancel_requested"][0]))
        assert one["status"] == "CANCELLED"

        # dlq: a named flow nobody knows is dead-lettered (flow_not_found)
        missing = ok_json(await pyoco(url, "submit", "--flow-name", "nope"))["run_id"]
        await stack.nats.publish(subjects.work_subject("default"), b"\x00garbage")

        async def stored() -> bool:
            return (await stack.nats.stream_info(subjects.DLQ_STREAM))["messages"] == 2

        await wait_for(stored, "two dead letters")
        items = ok_json(await pyoco(url, "dlq", "list", "--output", "json"))["items"]
        table = await pyoco(url, "dlq", "list")
        assert table.stdout.splitlines()[0].split()[:6] == list(client_bulk.DLQ_COLUMNS)[:6]
        assert "flow_not_found" in table.stdout and "invalid_job" in table.stdout and missing in table.stdout
        dead = next(i for i in items if i["reason"] == "flow_not_found")
        shown = ok_json(await pyoco(url, "dlq", "show", str(dead["id"])))
        assert shown["body"]["run_id"] == missing
        again = ok_json(await pyoco(url, "dlq", "resubmit", str(dead["id"])))
        assert again["resubmitted_from"] == missing and again["run_id"] != missing
        marked = ok_json(await pyoco(url, "dlq", "show", str(dead["id"])))["resubmitted"]
        assert [(m["run_id"], m["key_id"]) for m in marked] == [(again["run_id"], None)]
        twice = ok_json(await pyoco(url, "dlq", "resubmit", str(dead["id"])))["run_id"]
        wide = await trio.run_process([CLIENT, "--server", url, "dlq", "list"], capture_stdout=True, env={**os.environ, "COLUMNS": "200"})
        row = next(line for line in wide.stdout.decode().splitlines() if line.startswith(str(dead["id"]) + " "))
        assert f"{twice[:8]} (+1)" in row  # the newest re-submission (short id), and how many more
        narrow = (await pyoco(url, "dlq", "list")).stdout.splitlines()[0].split()  # 100 columns: clipped, still there
        assert narrow[:3] == ["id", "reason", "run_id"] and narrow[6].startswith("resub")
        assert ok_json(await pyoco(url, "dlq", "drop", str(dead["id"]))) == {"id": dead["id"], "dropped": True}
        gone = await pyoco(url, "dlq", "show", str(dead["id"]))
        assert gone.returncode == 1 and "404" in gone.stderr and "not found" in gone.stderr and "dlq list" in gone.stderr
