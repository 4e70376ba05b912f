"""Static checks on the dashboard assets (no browser): translations complete, no HTML sinks,
nothing fetched from the internet, and the language placeholder the gateway replaces."""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[1] / "pyoco_es" / "gateway" / "static"
def _table(lang: str) -> dict[str, str]:
    text = (STATIC / "i18n.js").read_text(encoding="utf-8")
    block = re.search(rf"^  {lang}: \{{\n(.*?)^  \}},", text, re.S | re.M)
    assert block, f"no {lang} table in i18n.js"
    return dict(re.findall(r'^\s+"([\w.]+)": "((?:[^"\\]|\\.)*)",$', block.group(1), re.M))


def test_every_string_exists_in_english_and_japanese() -> None:
    en, ja = _table("en"), _table("ja")
    assert len(en) > 150
    assert sorted(set(en) - set(ja)) == []
    assert sorted(set(ja) - set(en)) == []
    # placeholders match, so no translated sentence loses a value
    for key in en:
        assert sorted(re.findall(r"\{(\w+)\}", en[key])) == sorted(re.findall(r"\{(\w+)\}", ja[key])), key


def test_every_key_the_page_uses_is_translated() -> None:
    en = _table("en")
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    js = "\n".join(p.read_text(encoding="utf-8") for p in _scripts())
    used = set(re.findall(r'data-i18n(?:-[a-z-]+)?="([\w.]+)"', html))
    used |= set(re.findall(r'\bt\("([\w.]+)"[,)]', js))  # literal keys; prefixes like "err." + code are dynamic
    used |= set(re.findall(r'\bi18n: "([\w.]+)"', js))  # dataset: {i18n: ...} of elements made in script
    assert used, "found no translated strings"
    assert sorted(k for k in used if k not in en) == []


def _scripts() -> list[Path]:
    """Every dashboard script but the string table (app.js and the pages in their own files);
    apidocs.js belongs to /docs and /redoc, not to the dashboard (test_apidocs.py)."""
    return sorted(p for p in STATIC.glob("*.js") if p.name not in ("i18n.js", "apidocs.js"))


def test_every_script_is_loaded_before_it_is_needed() -> None:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    for p in _scripts():
        assert f'<script src="/static/{p.name}"></script>' in html, p.name


def test_no_html_sinks_in_the_script() -> None:
    js = "\n".join(p.read_text(encoding="utf-8") for p in _scripts())
    code = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    code = re.sub(r"^\s*//.*$", "", code, flags=re.M)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink


def test_no_internet_assets_and_the_language_placeholder() -> None:
    for name in ("index.html", "styles.css", "i18n.js", *(p.name for p in _scripts())):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), name
        assert "@import" not in text and "url(http" not in text, name
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert 'data-server-lang="__PYOCO_DASHBOARD_LANG_VALUE__"' in html
