"""Who is calling: ``GET /auth/whoami`` (the dashboard shows the tenant of its key with it).

With ``PYOCO_HTTP_AUTH_MODE=api_key`` the route needs a key like every data route (401/403 from
the ASGI layer, :mod:`.auth`) and names the key's tenant and id; with auth off it answers anyone
and says so (``auth_mode: "none"``, no tenant).
"""

from __future__ import annotations

from quart import Blueprint, Response

from .answer import json_response
from .context import caller, current_gateway

blueprint = Blueprint("identity", __name__)


@blueprint.get("/auth/whoami")
async def whoami() -> Response:
    gw = current_gateway()
    who = caller()
    mode = "api_key" if gw.keys is not None else "none"
    return json_response({
        "auth_mode": mode,
        "tenant_id": who.tenant_id if who is not None else None,
        "api_key_id": who.key_id if who is not None else None,
    })
