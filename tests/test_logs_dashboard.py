"""The run view's task output pane in a real browser (live logs, issue 16).

Reuses the dashboard suite's stack (a child process running nats-server, conductor, gateway and
worker ``w1``) and its Playwright page checks (no page errors, nothing fetched elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from test_dashboard import XSS, Page, browser, http, page, stack, submit_yaml, wait_status  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser


def chatty(release: Path, text: str) -> str:
    return f"""\
version: 1
flow:
  graph: |
    talk
  defaults: {json.dumps({"path": str(release), "text": text})}
tasks:
  talk: {{callable: "tests.tasks:chatter_until"}}
"""


def test_log_pane_shows_a_live_line_while_the_task_runs(page: Page, http: httpx.Client, tmp_path: Path) -> None:
    """A line the task prints appears in the pane while the run is RUNNING; the pane ends as
    complete with the run; search filters; task text (HTML, escapes) is shown as text."""
    release = tmp_path / "release"
    run_id = submit_yaml(http, chatty(release, XSS + " \x1b[2J"), flow_name="logs-demo")
    pg = page.goto(f"#/runs/{run_id}")
    first = pg.locator("#logs-body .log-line .log-text").first
    first.wait_for()
    assert http.get(f"/runs/{run_id}").json()["status"] == "RUNNING"  # seen live, before the end
    assert XSS in first.inner_text() and "\\x1b[2J" in first.inner_text()
    assert pg.locator('#logs-state[data-state="live"]').count() == 1
    page.shot("logs-live")
    pg.fill("#logs-search", "onerror")  # typing while the run changes (the view re-renders)
    release.touch()
    wait_status(http, run_id, {"COMPLETED"})
    pg.locator('#logs-state[data-state="ended"]').wait_for()
    pg.locator('#detail-status[data-status="COMPLETED"]').wait_for()
    assert pg.evaluate("document.activeElement && document.activeElement.id") == "logs-search"
    assert pg.input_value("#logs-search") == "onerror"
    total = pg.locator("#logs-body .log-line").count()
    stored = http.get(f"/runs/{run_id}/logs").json()["lines"]
    assert total == len(stored) >= 1
    pg.fill("#logs-search", "no such text")
    pg.locator("#logs-empty:not([hidden])").wait_for()
    assert pg.locator("#logs-body .log-line").count() == 0
    pg.fill("#logs-search", "")
    assert pg.locator("#logs-body .log-line").count() == total
    pg.locator('.log-tab[data-task="talk"]').click()
    assert pg.locator("#logs-body .log-line").count() == total
    pg.wait_for_timeout(200)  # give any injected handler its chance
    assert pg.evaluate("window.__xss") is None
    assert pg.evaluate("document.querySelectorAll('img').length") == 0

