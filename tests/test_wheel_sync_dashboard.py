"""Wheel sync in the dashboard (real browser, real stack with a syncing worker in a child process):
the workers page shows each worker's synced wheels and failures, a run's detail shows the code its
attempt ran, and the timeline's claim line names it.  Hostile text in a worker's ``wheel_sync``
stays text.  Screenshots: ``test-artifacts/dashboard/wheelsync-*.png``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_dashboard import XSS, Page, browser, child_stack, submit_yaml, wait_status  # noqa: F401 - browser: the module's Chromium fixture

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.browser

FLOW = """\
version: 1
flow:
  graph: which
tasks:
  which: {callable: "wsdemo.tasks:which"}
"""


def _serve(data_dir: str) -> None:
    """Child process: a stack whose worker syncs wheels, wsdemo 1.0 in the registry, a worker
    record with hostile ``wheel_sync`` text; runs until stdin closes."""
    import trio

    from pyoco_es.config import Settings
    from pyoco_es.nats import subjects
    from pyoco_es.testing.stack import open_stack
    from test_wheel_sync import build_wheel, demo_wheel, put_wheel

    settings = Settings(
        worker_heartbeat_interval=0.5,
        worker_poll_timeout=0.25,
        worker_drain_timeout=2.0,
        dashboard_lang="en",
        wheel_sync_enabled=True,
        wheel_sync_dir=str(Path(data_dir) / "wheels"),
        wheel_sync_interval=0.2,
    )

    async def main() -> None:
        async with open_stack(Path(data_dir), settings=settings, worker=True, worker_id="w1", concurrency=1, allowed_modules=("wsdemo",)) as stack:
            await put_wheel(stack.nats, *demo_wheel("1.0"))
            await put_wheel(stack.nats, *build_wheel("wsbroken", "1.0", {"wsbroken.py": ""}, broken=True))
            now = time.time()
            evil = {
                "worker_id": "evil-sync", "state": "IDLE", "tags": ["default"], "last_seen_at": now, "heartbeat_at": now,
                "wheel_sync": {"enabled": True, "last_result": "error", "last_synced_at": now, "last_attempt_at": now, "last_error": XSS,
                               "installed_wheels": [{"wheel_name": XSS, "package_name": XSS, "package_version": XSS, "sha256_hex": XSS}],
                               "failed_wheels": [{"wheel_name": XSS, "error": XSS}], "skipped_incompatible_count": 1,
                               "skipped_incompatible": [{"wheel_name": XSS}]},
            }  # fmt: skip
            await stack.nats.kv_put(subjects.WORKERS_BUCKET, "evil-sync", json.dumps(evil).encode())
            print(json.dumps({"url": stack.url}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    trio.run(main)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with child_stack(__file__, tmp_path_factory.mktemp("wheelsync-stack")) as info:
        yield info


def test_workers_page_run_detail_and_timeline_show_synced_code(browser: Any, stack: dict[str, str]) -> None:
    with httpx.Client(base_url=stack["url"], timeout=10) as http:
        deadline = time.monotonic() + 30
        while True:  # the worker's first passes: wsdemo installed, wsbroken refused by pip
            w1 = next((w for w in http.get("/workers?scope=all").json() if w["worker_id"] == "w1"), {})
            sync = w1.get("wheel_sync") or {}
            if sync.get("installed_wheels") and sync.get("failed_wheels"):
                break
            assert time.monotonic() < deadline, sync
            time.sleep(0.1)
        run_id = submit_yaml(http, FLOW)
        doc = wait_status(http, run_id, {"COMPLETED", "FAILED"})
        assert doc["status"] == "COMPLETED", doc.get("error")
        assert [(w["name"], w["version"]) for w in doc["wheels"]] == [("wsdemo", "1.0")]

    page = Page(browser, stack["url"])
    try:
        pg = page.goto("#/workers")
        card = pg.locator('.worker[data-worker-id="w1"]')
        card.locator(".wsync-wheel", has_text="wsdemo 1.0").wait_for()
        assert card.locator('.wsync-state[data-result="error"]').is_visible()  # the broken wheel
        assert "wsbroken-1.0-py3-none-any.whl" in card.locator(".wsync-failed").inner_text()
        evil = pg.locator('.worker[data-worker-id="evil-sync"]')
        assert XSS in evil.inner_text()
        page.shot("wheelsync-workers")
        pg.click('#lang-switch button[data-lang="ja"]')
        card.locator("dt", has_text="wheel 同期").wait_for()
        page.shot("wheelsync-workers-ja")
        pg.click('#lang-switch button[data-lang="en"]')

        pg = page.goto("#/runs/" + run_id)
        pg.locator("#run-detail .wsync-wheel", has_text="wsdemo 1.0").wait_for()
        pg.locator("#timeline", has_text="wsdemo 1.0 (").wait_for()
        page.shot("wheelsync-run")
        assert pg.evaluate("window.__xss") is None
    finally:
        page.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    _serve(sys.argv[2])
