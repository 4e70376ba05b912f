"""The web dashboard in a real browser (Debian chromium through Playwright) against a real stack.

The stack (embedded nats-server, conductor, gateway, one worker ``w1``) runs in a child process
started by this module (``python tests/test_dashboard.py --serve DIR``), so the sync Playwright
API never blocks the Trio loop serving the app.  The child stops when its stdin closes.

Each test saves screenshots under ``test-artifacts/dashboard/`` (wide 1280x800 and narrow
400 px).  Every page load also checks that the browser fetched nothing outside the gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from pyoco_es.lifeline import tied_to_this_process
from pyoco_es.testing.fleet import watched_python

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS = '<img src=x onerror="window.__xss=(window.__xss||0)+1">'
EVIL_WORKER_KEY = "evil-worker"

pytestmark = pytest.mark.browser

TWO_TASKS = (ROOT / "examples" / "flow.yaml").read_text().replace("{x: 1}", "{x: 41}")

# ignores the cooperative cancel, so the run stays CANCELLING for the grace period (1.5 s) and is
# then killed: the page must show both statuses
STUBBORN = """\
version: 1
flow:
  graph: |
    ignore_cancel
  defaults: {seconds: 60}
tasks:
  ignore_cancel: {callable: "examples.tasks:ignore_cancel"}
"""

# the task kills its own process: every attempt is released and retried, then the run fails
POISON = """\
version: 1
flow:
  graph: |
    die
tasks:
  die: {callable: "tests.tasks:die"}
"""

FAILING_XSS = f"""\
version: 1
flow:
  graph: |
    boom
  defaults: {{x: {json.dumps(XSS)}}}
tasks:
  boom: {{callable: "examples.tasks:boom"}}
"""


# -- the stack, in a child process ---------------------------------------------------------------


def _serve(data_dir: str) -> None:
    """Child process: run the stack until stdin closes; print its URLs as one JSON line."""
    import trio

    from pyoco_es.config import Settings
    from pyoco_es.nats import subjects
    from pyoco_es.testing.stack import open_stack

    settings = Settings(
        worker_heartbeat_interval=0.5,
        run_lease_seconds=5.0,
        cancel_grace_period=1.5,
        worker_poll_timeout=0.25,
        worker_drain_timeout=2.0,
        allowed_modules=("examples", "tests.tasks"),
        dashboard_lang="en",
        sse_heartbeat_interval=2.0,
    )

    async def main() -> None:
        async with open_stack(Path(data_dir), settings=settings, worker=True, worker_id="w1", concurrency=4) as stack:
            now = time.time()
            evil = {
                "worker_id": XSS,
                "state": "IDLE",
                "tags": [XSS, "ok-tag"],
                "current_run_id": XSS,
                "last_run_id": XSS,
                "last_run_status": XSS,
                "instance_id": XSS,
                "last_seen_at": now,
                "heartbeat_at": now,
            }
            await stack.nats.kv_put(subjects.WORKERS_BUCKET, EVIL_WORKER_KEY, json.dumps(evil).encode())
            print(json.dumps({"url": stack.url, "nats_url": stack.nats_url}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    trio.run(main)


@contextmanager
def child_stack(script: str, data_dir: Path) -> Iterator[dict[str, str]]:
    """Run ``python script --serve data_dir`` (a ``_serve`` above) and yield the JSON line it
    prints; the child stops when its stdin closes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYOCO_LOAD_DOTENV="0")
    log = open(data_dir / "stack.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        watched_python(sys.executable, script, "--serve", str(data_dir)),
        cwd=ROOT,
        **tied_to_this_process(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=10)
            raise AssertionError("the stack did not start:\n" + (data_dir / "stack.log").read_text(errors="replace")[-4000:])
        info = json.loads(line)
        yield info
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with child_stack(__file__, tmp_path_factory.mktemp("dashboard-stack")) as info:
        yield info


@pytest.fixture(scope="module")
def http(stack: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack["url"], timeout=10) as client:
        yield client


def submit_yaml(http: httpx.Client, text: str, *, flow_name: str = "main", tag: str | None = None) -> str:
    data = {"flow_name": flow_name}
    if tag:
        data["tag"] = tag
    res = http.post("/runs/yaml", data=data, files={"workflow": ("flow.yaml", text.encode(), "application/x-yaml")})
    assert res.status_code == 200, res.text
    return str(res.json()["run_id"])


def wait_status(http: httpx.Client, run_id: str, statuses: set[str], timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = http.get(f"/runs/{run_id}").json()
        if doc.get("status") in statuses:
            return doc  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} stuck in {doc.get('status')}")
        time.sleep(0.05)


# -- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A Playwright page plus the checks every test wants: no page errors, no foreign requests."""

    def __init__(self, browser: Any, base: str, *, width: int = 1280, height: int = 800, dark: bool = False) -> None:
        self.base = base
        self.context = browser.new_context(
            viewport={"width": width, "height": height}, locale="en-US", color_scheme="dark" if dark else "light"
        )
        self.context.set_default_timeout(15_000)
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []

        def route(r: Any) -> None:
            if r.request.url.startswith(base) or r.request.url.startswith("data:"):
                r.continue_()
            else:
                self.foreign.append(r.request.url)
                r.abort()

        self.context.route("**/*", route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def goto(self, fragment: str) -> Any:
        self.page.goto(self.base + "/" + fragment)
        return self.page

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors
        assert not self.foreign, f"the dashboard fetched outside the gateway: {self.foreign}"
        assert not self.dialogs, f"unexpected dialogs (script ran?): {self.dialogs}"


@pytest.fixture
def page(browser: Any, stack: dict[str, str]) -> Iterator[Page]:
    p = Page(browser, stack["url"])
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def narrow(browser: Any, stack: dict[str, str]) -> Iterator[Page]:
    p = Page(browser, stack["url"], width=400, height=860)
    try:
        yield p
    finally:
        p.close()


def row(pg: Any, run_id: str) -> Any:
    return pg.locator(f'.run-row[data-run-id="{run_id}"]')


# -- tests ---------------------------------------------------------------------------------------


def test_runs_appear_and_complete_without_reload(page: Page, narrow: Page, http: httpx.Client) -> None:
    pg = page.goto("#/runs")
    pg.locator('#conn[data-state="live"]').wait_for()
    pg.evaluate("window.__loads = performance.getEntriesByType('navigation').length")
    ids = [submit_yaml(http, TWO_TASKS, flow_name=f"two-tasks-{i}", tag="default") for i in range(3)]
    for run_id in ids:
        row(pg, run_id).wait_for()
    for run_id in ids:
        pg.locator(f'.run-row[data-run-id="{run_id}"][data-status="COMPLETED"]').wait_for()
    # still the same document: the updates were pushed, not reloaded
    assert pg.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert pg.evaluate("window.__loads") == 1
    first = row(pg, ids[-1])
    assert "two-tasks-2" in first.inner_text()
    assert first.locator(".c-duration").inner_text().strip() not in ("", "—")
    # the metrics strip counts them
    pg.wait_for_function(
        "parseInt(document.querySelector('.metric-status[data-status=\"COMPLETED\"] .metric-value').textContent) >= 3"
    )

    # filters: by flow (server side) and run-id search (in the page)
    pg.fill("#f-flow", "two-tasks-1")
    pg.locator(".run-row").first.wait_for()
    pg.wait_for_function("document.querySelectorAll('.run-row').length === 1")
    assert row(pg, ids[1]).count() == 1
    pg.fill("#f-flow", "")
    pg.wait_for_function("document.querySelectorAll('.run-row').length >= 3")
    pg.fill("#f-search", ids[0][:12])
    pg.wait_for_function("document.querySelectorAll('.run-row').length === 1")
    assert row(pg, ids[0]).count() == 1
    pg.fill("#f-search", "")
    page.shot("runs-wide")
    # Enter on a prefix naming one run opens it
    pg.fill("#f-search", ids[2][:10])
    pg.press("#f-search", "Enter")
    pg.locator(f'#detail-run-id:text-is("{ids[2]}")').wait_for()
    pg.go_back()
    pg.fill("#f-search", "")

    npg = narrow.goto("#/runs")
    row(npg, ids[0]).wait_for()
    narrow.shot("runs-narrow")
    # on a phone the filters fold away behind a button
    assert npg.locator("#f-status").is_hidden()
    npg.click("#filters-toggle")
    assert npg.locator("#f-status").is_visible()
    narrow.shot("runs-narrow-filters")
    # nothing sticks out sideways on a phone-sized window
    assert npg.evaluate("document.documentElement.scrollWidth") <= 400


def test_pagination_never_misses_a_run(page: Page, http: httpx.Client) -> None:
    # 55 runs on a tag no worker serves: they stay PENDING, so the list holds still
    ids = [
        http.post("/runs", json={"flow_name": f"parked-{i}", "tag": "parked"}).json()["run_id"] for i in range(55)
    ]
    pg = page.goto("#/runs?tag=parked")
    pg.locator("#runs-more").wait_for()
    assert pg.locator(".run-row").count() == 50
    # while the user reads page one, the oldest run (on page two) changes and jumps to the top
    assert http.post(f"/runs/{ids[0]}/cancel").status_code == 200
    pg.locator(f'.run-row[data-run-id="{ids[0]}"][data-status="CANCELLED"]').wait_for()
    pg.click("#runs-more")
    pg.wait_for_function("document.querySelectorAll('.run-row').length === 55")
    shown = pg.locator(".run-row").evaluate_all("els => els.map(e => e.dataset.runId)")
    assert sorted(shown) == sorted(ids)  # every run exactly once
    assert shown[0] == ids[0]
    assert pg.locator("#runs-more").is_hidden()
    page.shot("runs-paged")


def test_live_stream_reconnects_and_catches_up(page: Page, http: httpx.Client) -> None:
    pg = page.goto("#/runs")
    pg.locator('#conn[data-state="live"]').wait_for()
    # the network drops and stays down for a while
    pg.route("**/runs/stream*", lambda r: r.abort())
    pg.evaluate("window.pyocoDashboard.dropLiveStream()")
    pg.locator('#conn[data-state="down"]').wait_for()
    run_id = submit_yaml(http, TWO_TASKS, flow_name="while-offline")
    wait_status(http, run_id, {"COMPLETED"})
    page.shot("connection-down")
    assert row(pg, run_id).count() == 0
    # the network comes back: the page reconnects by itself and shows what it missed
    pg.unroute("**/runs/stream*")
    pg.locator('#conn[data-state="live"]').wait_for(timeout=20_000)
    pg.locator(f'.run-row[data-run-id="{run_id}"][data-status="COMPLETED"]').wait_for()


def test_api_key_is_stored_and_sent(page: Page) -> None:
    sent: list[tuple[str, str | None]] = []
    pg = page.goto("#/runs")
    pg.on("request", lambda r: sent.append((r.url, r.headers.get("x-secret-key"))))
    pg.click("#auth-open")
    pg.fill("#auth-header", "X-Secret-Key")
    pg.fill("#auth-key", "k-123")
    page.shot("api-key-dialog")
    before = len(sent)
    pg.click("#auth-save")
    pg.locator('#conn[data-state="live"]').wait_for()
    pg.wait_for_function("document.querySelector('#auth-open').classList.contains('auth-set')")
    assert pg.evaluate("localStorage.getItem('pyoco.auth_key')") == "k-123"
    pg.wait_for_timeout(300)
    after = sent[before:]
    with_key = [url for url, key in after if key == "k-123"]
    assert any("/runs/stream" in u for u in with_key), after
    assert any("/runs?" in u for u in with_key), after
    assert not [url for url, key in after if "/runs" in url and key != "k-123"], after
    pg.click("#auth-open")
    pg.click("#auth-clear")
    assert pg.evaluate("localStorage.getItem('pyoco.auth_key')") is None


def test_run_detail_shows_tasks_and_timeline(page: Page, narrow: Page, browser: Any, http: httpx.Client) -> None:
    run_id = submit_yaml(http, TWO_TASKS, flow_name="detail-demo")
    wait_status(http, run_id, {"COMPLETED"})
    pg = page.goto(f"#/runs/{run_id}")
    pg.locator('#detail-status[data-status="COMPLETED"]').wait_for()
    pg.locator('.task[data-task="add_one"][data-state="SUCCEEDED"]').wait_for()
    pg.locator('.task[data-task="to_text"][data-state="SUCCEEDED"]').wait_for()
    pg.locator('.task[data-task="to_text"] > summary').click()
    assert "value=42" in pg.locator('.task[data-task="to_text"] .task-output').inner_text()
    assert '"x": 41' in pg.locator("#detail-params").inner_text()
    timeline = pg.locator("#timeline")
    timeline.locator('.ev[data-type="run.completed"]').wait_for()
    types = timeline.locator(".ev").evaluate_all("els => els.map(e => e.dataset.type)")
    assert types[0] == "run.submitted"
    assert "run.claimed" in types and types[-1] == "run.completed"
    assert types.count("task.completed") == 2
    claimed = timeline.locator('.ev[data-type="run.claimed"]')
    text = claimed.inner_text()
    assert "w1" in text and "attempt 1" in text  # who, and which attempt
    assert timeline.locator('.ev[data-type="run.submitted"] .chip-who').inner_text() == "gateway"
    page.shot("run-detail-wide")

    npg = narrow.goto(f"#/runs/{run_id}")
    npg.locator('#detail-status[data-status="COMPLETED"]').wait_for()
    npg.locator('#timeline .ev[data-type="run.completed"]').wait_for()
    narrow.shot("run-detail-narrow")
    assert npg.evaluate("document.documentElement.scrollWidth") <= 400

    dark = Page(browser, page.base, dark=True)
    try:
        dark.goto(f"#/runs/{run_id}").locator('#timeline .ev[data-type="run.completed"]').wait_for()
        dark.shot("run-detail-dark")
        dark.goto("#/runs").locator(".run-row").first.wait_for()
        dark.shot("runs-dark")
    finally:
        dark.close()


def test_timeline_shows_each_attempt_of_a_retried_run(page: Page, http: httpx.Client) -> None:
    run_id = submit_yaml(http, POISON, flow_name="poison")
    wait_status(http, run_id, {"FAILED"}, timeout=30)
    pg = page.goto(f"#/runs/{run_id}")
    pg.locator('#timeline .ev[data-type="run.failed"]').wait_for()
    assert pg.locator('#timeline .ev[data-type="run.claimed"]').count() == 3
    assert pg.locator('#timeline .ev[data-type="run.released"]').count() == 2
    dividers = pg.locator("#timeline .ev-divider").evaluate_all("els => els.map(e => e.dataset.attempt)")
    assert dividers == ["2", "3"]
    assert "3 of 3" in pg.locator("#detail-error").inner_text()
    # the task was cut off by the dying process: the fold marks it FAILED ("interrupted: …"), and
    # the page says what happened to it (docs/dashboard.md), not running, with the error kept
    task = pg.locator('.task[data-task="die"][data-state="INTERRUPTED"]')
    task.wait_for()
    assert "Interrupted" in task.inner_text() and "interrupted" in task.inner_text()
    page.shot("run-retried")


def test_cancel_shows_cancelling_then_cancelled(page: Page, http: httpx.Client) -> None:
    run_id = submit_yaml(http, STUBBORN, flow_name="stubborn")
    pg = page.goto(f"#/runs/{run_id}")
    pg.locator('#detail-status[data-status="RUNNING"]').wait_for()
    pg.locator('.task[data-task="ignore_cancel"][data-state="RUNNING"]').wait_for()
    # record every status the page displays from now on
    pg.evaluate(
        """() => {
        window.__seen = [];
        const note = () => {
          const el = document.getElementById('detail-status');
          const s = el && el.dataset.status;
          if (s && window.__seen[window.__seen.length - 1] !== s) window.__seen.push(s);
        };
        note();
        new MutationObserver(note).observe(document.getElementById('run-detail'), {subtree: true, childList: true, attributes: true});
      }"""
    )
    pg.click("#cancel-run")
    dialog = pg.locator("#cancel-dialog")
    dialog.wait_for(state="visible")
    assert run_id in dialog.inner_text()
    page.shot("cancel-confirm")
    pg.click("#cancel-yes")
    pg.locator('#detail-status[data-status="CANCELLING"]').wait_for()
    assert pg.locator("#cancel-run").is_disabled()
    page.shot("run-cancelling")
    pg.locator('#detail-status[data-status="CANCELLED"]').wait_for(timeout=20_000)
    seen = pg.evaluate("window.__seen")
    assert seen.index("CANCELLING") < seen.index("CANCELLED"), seen
    assert pg.locator("#cancel-run").is_hidden()
    pg.locator('#timeline .ev[data-type="run.cancelled"]').wait_for()
    assert pg.locator('#timeline .ev[data-type="run.cancel_requested"]').count() == 1
    pg.locator('.watch[data-state="final"]').wait_for()
    page.shot("run-cancelled")
    assert http.get(f"/runs/{run_id}").json()["status"] == "CANCELLED"
    # The killed task is "Interrupted" with the time it ran (docs/dashboard.md), not "Cancelled" and "—".
    task = pg.locator('.task[data-task="ignore_cancel"]')
    assert task.get_attribute("data-state") == "INTERRUPTED"
    assert "Interrupted" in task.inner_text()
    assert task.locator(".dur").inner_text() not in ("", "—")
    ended = pg.locator('#timeline .ev[data-type="run.cancelled"]')
    assert "forced (stopped after the grace period)" in ended.inner_text()
    # Japanese pages translate the enumerated values too (it said "理由: forced").
    pg.click('#lang-switch button[data-lang="ja"]')
    assert "理由: 強制終了" in ended.inner_text() and "forced" not in ended.inner_text()
    assert "中断" in task.inner_text()
    pg.click('#lang-switch button[data-lang="en"]')


def test_hide_and_unhide_worker(page: Page, narrow: Page, http: httpx.Client) -> None:
    pg = page.goto("#/workers")
    card = pg.locator('.worker[data-worker-id="w1"]')
    card.wait_for()
    assert card.get_attribute("data-state") in ("IDLE", "RUNNING")
    page.shot("workers-wide")
    card.locator('button[data-action="hide"]').click()
    card.wait_for(state="detached")
    assert _worker(http, "w1")["hidden"] is True
    pg.check("#w-hidden")
    card.wait_for()
    assert card.locator(".chip-hidden").is_visible()
    page.shot("workers-hidden-shown")
    card.locator('button[data-action="unhide"]').click()
    card.locator('button[data-action="hide"]').wait_for()
    assert _worker(http, "w1")["hidden"] is False
    pg.uncheck("#w-hidden")
    card.wait_for()

    npg = narrow.goto("#/workers")
    npg.locator('.worker[data-worker-id="w1"]').wait_for()
    narrow.shot("workers-narrow")
    assert npg.evaluate("document.documentElement.scrollWidth") <= 400


def _worker(http: httpx.Client, worker_id: str) -> dict[str, Any]:
    for w in http.get("/workers?scope=all&include_hidden=true").json():
        if w["worker_id"] == worker_id:
            return w  # type: ignore[no-any-return]
    raise AssertionError(f"no worker {worker_id}")


def test_language_switch_persists(page: Page, http: httpx.Client) -> None:
    assert 'data-server-lang="en"' in http.get("/").text  # the server's choice was injected
    http.post("/runs", json={"flow_name": "ja-demo", "tag": "parked"})  # something to show
    pg = page.goto("#/runs")
    assert pg.locator("#tab-runs").inner_text() == "Runs"
    assert pg.evaluate("document.documentElement.lang") == "en"
    pg.click('#lang-switch button[data-lang="ja"]')
    assert pg.locator("#tab-runs").inner_text() == "ラン"
    assert pg.locator("#tab-workers").inner_text() == "ワーカー"
    assert pg.evaluate("document.documentElement.lang") == "ja"
    pg.reload()
    pg.locator('#conn[data-state="live"]').wait_for()
    assert pg.locator("#tab-runs").inner_text() == "ラン"
    assert pg.locator("#conn-text").inner_text() == "ライブ"
    # every translated element shows the Japanese string
    missing = pg.evaluate(
        """() => [...document.querySelectorAll('[data-i18n]')]
             .filter(el => el.textContent !== window.PYOCO_I18N.ja[el.dataset.i18n])
             .map(el => el.dataset.i18n)"""
    )
    assert missing == []
    pg.locator(".run-row").first.wait_for()
    page.shot("runs-ja")
    page.goto("#/workers").locator('.worker[data-worker-id="w1"]').wait_for()
    assert "最終ハートビート" in pg.locator('.worker[data-worker-id="w1"]').inner_text()
    page.shot("workers-ja")
    pg.click('#lang-switch button[data-lang="en"]')
    assert pg.locator("#tab-workers").inner_text() == "Workers"
    assert pg.evaluate("localStorage.getItem('pyoco.lang')") == "en"


def test_server_language_is_the_default(browser: Any, stack: dict[str, str], http: httpx.Client) -> None:
    # what the gateway serves with PYOCO_DASHBOARD_LANG=ja: the same page with the placeholder set to ja
    html = http.get("/").text.replace('data-server-lang="en"', 'data-server-lang="ja"')
    p = Page(browser, stack["url"])
    try:
        p.context.route(stack["url"] + "/", lambda r: r.fulfill(body=html, content_type="text/html; charset=utf-8"))
        pg = p.goto("#/runs")
        assert pg.locator("#tab-runs").inner_text() == "ラン"  # a fresh browser follows the server
        pg.click('#lang-switch button[data-lang="en"]')
        pg.reload()
        assert pg.locator("#tab-runs").inner_text() == "Runs"  # the user's choice then wins
    finally:
        p.close()


def test_xss_probe_nothing_executes(page: Page, http: httpx.Client) -> None:
    res = http.post(
        "/runs",
        json={"flow_name": XSS, "params": {"note": XSS, XSS: [XSS]}, "tag": "nowhere", "tags": ["nowhere"]},
    )  # tags are subject tokens since issue 10, so markup cannot reach the page through them
    assert res.status_code == 200, res.text
    pending_id = res.json()["run_id"]
    failed_id = submit_yaml(http, FAILING_XSS, flow_name=XSS)
    failed = wait_status(http, failed_id, {"FAILED"})
    assert XSS in (failed.get("error") or "")

    pg = page.goto("#/runs")
    row(pg, pending_id).wait_for()
    row(pg, failed_id).wait_for()
    assert XSS in row(pg, pending_id).inner_text()  # shown as text
    page.shot("xss-runs")

    pg = page.goto(f"#/runs/{failed_id}")
    pg.locator('#detail-status[data-status="FAILED"]').wait_for()
    assert XSS in pg.locator("#detail-error").inner_text()
    pg.locator('.task[data-task="boom"] .task-error').wait_for()
    assert XSS in pg.locator('.task[data-task="boom"] .task-error').inner_text()
    assert "Traceback" in pg.locator('.task[data-task="boom"] .task-traceback').inner_text()
    pg.locator('#timeline .ev[data-type="run.failed"]').wait_for()
    page.shot("xss-run-failed")

    pg = page.goto(f"#/runs/{pending_id}")
    pg.locator("#detail-params").wait_for()
    assert json.dumps(XSS) in pg.locator("#detail-params").inner_text()  # pretty JSON, as text

    # the URL is data too: a run id in the fragment is shown as text in the not-found message
    pg = page.goto("#/runs/" + quote(XSS, safe=""))
    pg.locator("#run-detail .empty", has_text="not found").wait_for()
    assert XSS in pg.locator("#run-detail .empty").inner_text()

    pg = page.goto("#/workers")
    evil = pg.locator(f'.worker[data-worker-id="{EVIL_WORKER_KEY}"], .worker:has-text("onerror")').first
    evil.wait_for()
    assert XSS in evil.inner_text()
    page.shot("xss-workers")
    pg.wait_for_timeout(300)  # give any injected handler its chance
    assert pg.evaluate("window.__xss") is None
    assert pg.evaluate("document.querySelectorAll('img').length") == 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    _serve(sys.argv[2])
