"""/docs and /redoc (issue 15): pages that render /openapi.json from files shipped in the package,
public like /openapi.json, and with nothing that points outside the gateway.  The browser check
is in test_dashboard_auth.py (it lists a known route)."""

from __future__ import annotations

import re
from pathlib import Path

from pyoco_es.gateway.context import STATIC_DIR

from test_gateway_auth import agw  # noqa: F401 - a fixture: a gateway with PYOCO_HTTP_AUTH_MODE=api_key
from test_gateway_support import GW

ASSETS = ("apidocs.html", "apidocs.js", "apidocs.css")


async def test_docs_and_redoc_are_public_html_with_a_strict_policy(agw: GW) -> None:  # noqa: F811
    for path, layout in (("/docs", "docs"), ("/redoc", "redoc")):
        r = await agw.client.get(path)  # no key on an api_key gateway
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"] and "connect-src 'self'" in r.headers["content-security-policy"]
        assert f'data-layout="{layout}"' in r.text and '<script src="/static/apidocs.js">' in r.text
    for name in ASSETS:
        r = await agw.client.get(f"/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC_DIR / name).read_text(encoding="utf-8"), name
    r = await agw.client.get("/openapi.json")
    paths = r.json()["paths"]
    assert "/docs" in paths and "/redoc" in paths and "/auth/whoami" in paths


def test_the_pages_reach_nothing_outside_the_gateway() -> None:
    for name in ASSETS:
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|\b(?:src|href)=[\"']?//|url\(|@import", text), name
    js = (STATIC_DIR / "apidocs.js").read_text(encoding="utf-8")
    code = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
    assert re.findall(r'fetch\("([^"]+)"', js) == ["/openapi.json"]  # the only request it makes


def test_the_pages_ship_in_the_wheel() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"].get("package-data", {})
    assert any("static" in pattern for patterns in data.values() for pattern in patterns), data
