"""Who is calling: ``GET /auth/whoami`` (the dashboard shows the tenant of its key with it), and
:func:`require_key`, the app's own key check behind the ASGI layer.

With ``PYOCO_HTTP_AUTH_MODE=api_key`` the route needs a key like every data route (401/403 from
the ASGI layer, :mod:`.auth`) and names the key's tenant and id; with auth off it answers anyone
and says so (``auth_mode: "none"``, no tenant).

**Defence in depth.**  The ASGI layer is the first check and the one that ends open requests
on revocation.  :func:`require_key` runs in Quart's ``before_request`` for every matched route
and refuses a protected one that reached the app without a verified caller: an app served
without the layer (``create_app`` under another ASGI server, a test client), or a request the
layer judged public or unroutable while Quart routed it elsewhere.  When the layer has verified
the key it costs one dict lookup; otherwise it verifies the key itself through the same cached
key ring (PBKDF2 once per key).  Such a request is not ended by a later revocation.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from quart import Blueprint, Response, request

from ..core.errors import InfraError, PyocoError
from .answer import json_response
from .auth import PRINCIPAL_SCOPE_KEY, Refusal, public_rules
from .context import caller, current_gateway

log = logging.getLogger(__name__)


class KeyRequired(PyocoError):
    """No API key on a protected route (pyoco-server's 401 ``api key required``)."""

    http_status: ClassVar[int] = 401


class KeyInvalid(PyocoError):
    """A malformed, unknown, wrong or revoked key (pyoco-server's 403 ``invalid api key``)."""

    http_status: ClassVar[int] = 403

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


async def require_key() -> None:
    """Quart ``before_request``: a protected route needs a verified caller (see the module doc).

    Raises:
        KeyRequired, KeyInvalid: no key, or a key that is not valid.
        InfraError: the key ring has not loaded the records yet (503).
    """
    gw = current_gateway()
    if gw.keys is None or caller() is not None or request.method == "OPTIONS":
        return
    rule = request.url_rule
    if rule is None or rule.rule in public_rules(public_metrics=gw.settings.http_metrics_public):
        return
    outcome = await gw.keys.authenticate(request.headers.get(gw.settings.api_key_header))
    if isinstance(outcome, Refusal):
        log.warning("%s %s refused by the app's own key check (%d, %s): key id %s",
                    request.method, rule.rule, outcome.status, outcome.reason, outcome.key_id or "-", extra=outcome.log_extra())
        if outcome.status == 503:
            raise InfraError(outcome.detail)
        raise (KeyRequired if outcome.status == 401 else KeyInvalid)(outcome.detail)
    request.scope[PRINCIPAL_SCOPE_KEY] = outcome
