"""The dashboard's bulk cancel (bulk.js) and Dead letters page (dlq.js) in headless Chromium against
a real stack (see test_dashboard.py for the fixtures): select runs and cancel them after a
confirmation; list dead letters, open one, re-submit it, drop it after a confirmation; hostile
text stays text."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from test_dashboard import FAILING_XSS, XSS, Page, browser, http, page, stack, submit_yaml, wait_status  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser

TWO_TASKS_NOBODY = "nobody"  # a tag no worker serves: runs stay PENDING


def _pending(http: httpx.Client, n: int) -> list[str]:  # noqa: F811
    body = {"items": [{"flow_name": "held", "tag": TWO_TASKS_NOBODY} for _ in range(n)]}
    results = http.post("/runs/batch", json=body).json()["results"]
    assert all(r["status"] == "accepted" for r in results)
    return [r["run_id"] for r in results]


def test_select_runs_and_cancel_them(page: Page, http: httpx.Client) -> None:  # noqa: F811
    a, b, keep = _pending(http, 3)
    pg = page.goto("#/runs?flow=held")
    for run_id in (a, b, keep):
        pg.locator(f'.run-row[data-run-id="{run_id}"] .sel-box').wait_for()
    pg.click(f'.run-row[data-run-id="{a}"] .sel-box')
    pg.click(f'.run-row[data-run-id="{b}"] .sel-box')
    assert pg.url.endswith("#/runs?flow=held")  # a click on the box does not open the run
    assert pg.locator("#bulk-count").inner_text() == "2 selected"
    assert pg.locator(f'.run-row[data-run-id="{a}"] .sel-box').get_attribute("aria-checked") == "true"
    pg.click("#bulk-cancel")
    pg.locator("#bulk-dialog").wait_for(state="visible")
    assert "Cancel 2 runs?" in pg.locator("#bulk-dialog").inner_text()
    page.shot("bulk-cancel-confirm")
    pg.click("#bulk-yes")
    pg.locator("#toasts .toast").first.wait_for(timeout=30_000)
    assert pg.locator("#toasts").inner_text().startswith("Cancel requested for 2 runs"), pg.locator("#toasts").inner_text()
    for run_id in (a, b):
        wait_status(http, run_id, {"CANCELLED"}, timeout=30)
        pg.locator(f'.run-row[data-run-id="{run_id}"][data-status="CANCELLED"]').wait_for()
    assert pg.locator(f'.run-row[data-run-id="{a}"] .sel-box').count() == 0  # ended runs cannot be selected
    assert http.get(f"/runs/{keep}").json()["status"] == "PENDING"
    # "Select all shown" takes every cancellable row; Japanese labels follow the language
    pg.click("#bulk-all")
    assert pg.locator("#bulk-count").inner_text() == "1 selected"
    pg.click('#lang-switch button[data-lang="ja"]')
    assert pg.locator("#bulk-count").inner_text() == "1 件選択中"
    pg.click('#lang-switch button[data-lang="en"]')
    pg.click("#bulk-clear")
    assert pg.locator("#bulk-count").inner_text() == "0 selected" and pg.locator("#bulk-cancel").is_disabled()
    page.shot("bulk-after")


def _dead_letter(http: httpx.Client, run_id: str, timeout: float = 20.0) -> dict[str, Any]:  # noqa: F811
    deadline = time.monotonic() + timeout
    while True:
        for item in http.get("/dlq").json()["items"]:
            if item.get("run_id") == run_id:
                return item  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"no dead letter for run {run_id}")
        time.sleep(0.05)


def test_dead_letters_page_resubmit_and_drop(page: Page, http: httpx.Client) -> None:  # noqa: F811
    run_id = submit_yaml(http, FAILING_XSS, flow_name="xss-dlq")
    wait_status(http, run_id, {"FAILED"})
    item = _dead_letter(http, run_id)
    pg = page.goto("#/dlq")
    assert pg.locator("#tab-dlq").get_attribute("aria-current") == "page"
    entry = pg.locator(f'.dlq-item[data-dlq-id="{item["id"]}"]')
    entry.wait_for()
    assert "execution_error" in entry.inner_text() and run_id in entry.inner_text()
    pg.wait_for_function("document.title.includes('Dead letters')")  # not "Runs": the page names itself
    entry.locator(".dlq-toggle").click()
    payload = entry.locator(".dlq-payload")
    payload.wait_for()
    pg.wait_for_function(f"document.querySelector('.dlq-item[data-dlq-id=\"{item['id']}\"] .dlq-payload').textContent.includes('worker_id')")
    page.shot("dlq-open")
    entry.get_by_role("button", name="Re-submit").click()
    entry.get_by_role("link", name="New run").wait_for()
    new_href = entry.get_by_role("link", name="New run").get_attribute("href")
    assert new_href and new_href.startswith("#/runs/") and run_id not in new_href
    # the server's mark (new run, when, no key with auth off) shows under the entry, and after a reload
    new_run = http.get(f"/dlq/{item['id']}").json()["resubmitted"][0]["run_id"]
    mark = entry.locator(".dlq-resubmitted")
    mark.wait_for()
    assert "Re-submitted (1×)" in mark.inner_text() and "no key" in mark.inner_text()
    assert mark.locator("a").get_attribute("href") == f"#/runs/{new_run}" and new_href == f"#/runs/{new_run}"
    pg.click("#dlq-refresh")
    pg.wait_for_function(f"document.querySelector('.dlq-item[data-dlq-id=\"{item['id']}\"] .dlq-resubmitted') !== null")
    pg.click('#lang-switch button[data-lang="ja"]')
    assert "再投入済み (1 回)" in entry.locator(".dlq-resubmitted").inner_text()
    pg.click('#lang-switch button[data-lang="en"]')
    page.shot("dlq-resubmitted")
    entry.get_by_role("button", name="Drop").click()
    pg.locator("#dlq-drop-dialog").wait_for(state="visible")
    pg.click("#dlq-drop-yes")
    entry.wait_for(state="detached")
    assert http.get(f"/dlq/{item['id']}").status_code == 404
    assert pg.evaluate("window.__xss") is None, "a dead letter's text ran as HTML"
    assert XSS  # the run's params carried the probe
    page.shot("dlq-after")
