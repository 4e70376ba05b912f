"""The dashboard's Wheels page in a real browser (the stack and browser of test_dashboard.py):
the registry with versions and tags, the history, delete with confirmation, English and Japanese."""

from __future__ import annotations

import httpx
import pytest

from test_dashboard import Page, browser, http, page, stack  # noqa: F401 - fixtures
from wheelmaker import make_wheel

pytestmark = pytest.mark.browser


def test_wheels_page_lists_history_and_deletes_with_confirmation(page: Page, http: httpx.Client) -> None:
    names = []
    for version in ("1.0.0", "1.1.0"):
        name, data = make_wheel("dash-demo", version)
        r = http.post("/wheels", files={"wheel": (name, data)}, data={"tags": "cpu,gpu"},
                      headers={"User-Agent": '<img src=x onerror="alert(1)">'})
        assert r.status_code == 200, r.text
        names.append(name)
    old, new = names

    pg = page.goto("#/wheels")
    pg.locator(f'#wheels-list tr[data-wheel="{new}"]').wait_for()
    assert pg.locator("#tab-wheels").get_attribute("aria-current") == "page"
    assert pg.locator("#wheels-list tbody tr").count() == 2
    assert pg.locator(f'tr[data-wheel="{new}"] .wheel-latest').count() == 1
    assert pg.locator(f'tr[data-wheel="{old}"] .wheel-latest').count() == 0
    assert pg.locator(f'tr[data-wheel="{old}"]').inner_text().split("\t")[:2] == ["dash-demo", "1.0.0"]
    assert "cpu" in pg.locator(f'tr[data-wheel="{old}"]').inner_text()
    pg.locator('#wheels-history tr[data-action="upload"]').nth(1).wait_for()
    page.shot("wheels-wide")

    # Delete asks first; "keep it" keeps it.
    pg.locator(f'tr[data-wheel="{old}"] button[data-action="delete"]').click()
    assert pg.locator("#wheel-delete-dialog").is_visible()
    assert pg.locator("#wheel-delete-name").inner_text() == old
    pg.locator("#wheel-delete-no").click()
    assert [w["name"] for w in http.get("/wheels").json()] == [old, new]
    pg.locator(f'tr[data-wheel="{old}"] button[data-action="delete"]').click()
    pg.locator("#wheel-delete-yes").click()
    pg.locator(f'tr[data-wheel="{old}"]').wait_for(state="detached")
    pg.locator('#wheels-history tr[data-action="delete"]').wait_for()
    assert [w["name"] for w in http.get("/wheels").json()] == [new]

    pg.locator('#lang-switch button[data-lang="ja"]').click()
    assert pg.locator("#tab-wheels").inner_text() == "ホイール"
    assert "パッケージ" in pg.locator("#wheels-list thead").inner_text()
    assert "削除" in pg.locator('#wheels-history tr[data-action="delete"]').inner_text()
    page.shot("wheels-ja")
    pg.locator('#lang-switch button[data-lang="en"]').click()
    assert pg.evaluate("window.__xss") is None
