"""The dashboard against a gateway in PYOCO_HTTP_AUTH_MODE=api_key (issue 13), in a real browser.

The page must say plainly why it shows nothing (no key: "API key required"; a wrong key: "API
key refused") and, once a key works, whose key it is (the tenant) and that tenant's runs.  The
stack runs in a child process (``python tests/test_dashboard_auth.py --serve DIR``), as in
test_dashboard.py, whose browser and page helpers this module reuses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_dashboard import Page, browser, child_stack  # noqa: F401 - browser is a fixture

pytestmark = pytest.mark.browser
PEPPER = "dash-pepper"


def _serve(data_dir: str) -> None:
    """Child process: an api_key stack with one key (tenant ``acme``) and one run of that tenant."""
    import trio

    from pyoco_es.config import Settings
    from pyoco_es.nats import keystore
    from pyoco_es.testing.stack import open_stack

    settings = Settings(http_auth_mode="api_key", auth_pepper=PEPPER, dashboard_lang="en", sse_heartbeat_interval=2.0)

    async def main() -> None:
        async with open_stack(Path(data_dir), settings=settings) as stack:
            key, _ = await keystore.create_key(stack.nats, tenant_id="acme", now=1.0, pepper=PEPPER, actor="test")
            import httpx

            async with httpx.AsyncClient(base_url=stack.url) as client:
                for _ in range(100):  # the ring follows the bucket: wait (with a deadline) until it knows the key
                    r = await client.post("/runs", json={"flow_name": "acme-flow"}, headers={"X-API-Key": key})
                    if r.status_code == 200:
                        break
                    await trio.sleep(0.05)
                assert r.status_code == 200, r.text
            print(json.dumps({"url": stack.url, "key": key, "run_id": r.json()["run_id"]}), flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    trio.run(main)


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with child_stack(__file__, tmp_path_factory.mktemp("dashboard-auth-stack")) as info:
        yield info


def _save_key(pg: Any, key: str) -> None:
    pg.click("#auth-open")
    pg.fill("#auth-key", key)
    pg.click("#auth-save")


def test_key_required_then_refused_then_tenant_and_runs(browser: Any, auth_stack: dict[str, str]) -> None:  # noqa: F811
    page = Page(browser, auth_stack["url"])
    try:
        pg = page.goto("#/runs")
        pg.locator('#auth-state[data-state="required"]').wait_for()
        assert pg.locator("#auth-state").inner_text().strip() == "API key required"
        assert pg.locator(".run-row").count() == 0
        page.shot("auth-required")

        _save_key(pg, auth_stack["key"][:-4] + "AAAA")
        pg.locator('#auth-state[data-state="refused"]').wait_for()
        assert "API key refused" in pg.locator("#auth-state").inner_text()
        assert pg.locator(".run-row").count() == 0
        page.shot("auth-refused")

        _save_key(pg, auth_stack["key"])
        pg.locator('#auth-state[data-state="ok"]').wait_for()
        assert pg.locator("#auth-state-tenant").inner_text() == "acme"
        pg.locator(f'.run-row[data-run-id="{auth_stack["run_id"]}"]').wait_for()
        pg.locator('#conn[data-state="live"]').wait_for()
        page.shot("auth-tenant")

        pg.click('#lang-switch button[data-lang="ja"]')
        pg.wait_for_function("document.querySelector('#auth-state-text').textContent === 'テナント'")
        pg.click('#lang-switch button[data-lang="en"]')
    finally:
        page.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    _serve(sys.argv[2])


def test_api_docs_pages_render_the_openapi_document_offline(browser: Any, auth_stack: dict[str, str]) -> None:  # noqa: F811
    """/docs and /redoc are public (no key on this api_key gateway), fetch nothing outside the
    gateway (Page checks every request) and list the routes with their parameters and schemas."""
    page = Page(browser, auth_stack["url"])
    console: list[str] = []
    page.page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    try:
        for path, layout in (("docs", "docs"), ("redoc", "redoc")):
            pg = page.goto(path)
            pg.locator('html[data-loaded="1"]').wait_for()
            assert pg.evaluate("document.documentElement.dataset.layout") == layout
            op = pg.locator('.ad-op[data-method="get"][data-path="/runs/{run_id}/watch"]')
            if layout == "docs":
                assert not op.evaluate("el => el.open")
                op.locator("summary").click()
            assert op.locator('tr[data-param="Last-Event-ID"]').is_visible()
            assert "SSE of the run's snapshots" in op.locator(".ad-summary").inner_text()
            yaml_op = pg.locator('.ad-op[data-method="post"][data-path="/runs/yaml"]').text_content() or ""
            assert "multipart/form-data" in yaml_op and "workflow*: string" in yaml_op
            assert "WhoAmI" in pg.locator("#schema-WhoAmI").inner_text()
            # the document's key scheme: protected operations name the header, public ones do not
            assert op.locator("summary .ad-key").inner_text() == "X-API-Key"
            assert pg.locator('.ad-op[data-method="get"][data-path="/health"] .ad-key').count() == 0
            page.shot(f"apidocs-{layout}")
        pg.fill("#ad-filter", "whoami")
        assert pg.locator(".ad-op:not([hidden])").count() == 1
        assert not console, console  # no failed load, no script error
    finally:
        page.close()
