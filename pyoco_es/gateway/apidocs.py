"""``/docs`` and ``/redoc``: the API described by ``/openapi.json``, rendered in the browser by a
small page shipped in the package (``static/apidocs.html``, ``.js``, ``.css``): nothing is fetched
from the internet, and the Content-Security-Policy says so to the browser too.

Both serve the same page: ``/docs`` lists the operations folded (as Swagger UI does),
``/redoc`` in two columns, a route list beside every operation unfolded (as ReDoc does).  Both
are public, like ``/openapi.json``: they show the routes, not data.
"""

from __future__ import annotations

from typing import Final

from quart import Blueprint, Response

from .dashboard import static_page

LAYOUT_PLACEHOLDER: Final = "__PYOCO_APIDOCS_LAYOUT__"
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

blueprint = Blueprint("apidocs", __name__)


async def _page(layout: str) -> Response:
    return await static_page("apidocs.html", "API documentation page", {LAYOUT_PLACEHOLDER: layout},
                             headers={"Content-Security-Policy": CSP})


@blueprint.get("/docs")
async def docs() -> Response:
    return await _page("docs")


@blueprint.get("/redoc")
async def redoc() -> Response:
    return await _page("redoc")
