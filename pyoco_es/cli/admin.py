"""``pyoco-server-admin`` / ``pyoco-es admin``: API keys in the key store pyoco-server uses.

The commands and their JSON output are pyoco-server 0.5's (``api-key create --tenant T`` prints
the key once; ``list`` shows no secrets; ``revoke --key-id K``; a missing key prints
``{"error": "not_found", ...}`` and exits 2); ``--output table`` is ours.  Every key created or
revoked here is also appended to the audit history (``pyoco.evt.audit.api_key``).
"""

from __future__ import annotations

import getpass
import json
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncclick as click

from ..core.apikey import ApiKeyFormatError, check_key_id, check_tenant
from ..core.errors import PyocoError
from ..lifeline import exit_with_parent
from ..runtime import configure_logging, open_system_nats
from .options import DATA_DIR, NATS_URL, fail, settings_with

OUTPUT = click.option(
    "--output", type=click.Choice(["json", "table"]), default="json", show_default=True, help="json: as pyoco-server-admin prints it."
)


def _actor() -> str:
    """Who ran the command, for the audit history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"admin:{user}@{socket.gethostname()}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _emit(doc: Any) -> None:
    click.echo(json.dumps(doc, ensure_ascii=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@NATS_URL
@DATA_DIR
@click.pass_context
def admin(ctx: click.Context, nats_url: str | None, data_dir: Path) -> None:
    """Manage the gateway's API keys (stored in the NATS KV bucket pyoco_auth).

    \b
    Example:
      pyoco-server-admin --nats-url nats://127.0.0.1:4222 api-key create --tenant team-a
    """
    ctx.obj = settings_with(nats_url=nats_url, data_dir=data_dir)


@admin.group("api-key")
def api_key() -> None:
    """Create, list and revoke API keys."""


async def _with_store(ctx: click.Context, fn: Any) -> Any:
    from ..nats import keystore

    settings = ctx.find_root().obj
    configure_logging(settings, service="pyoco-server:admin", stdout_is_output=True)
    try:
        async with open_system_nats(settings, name="pyoco-admin", attach=True) as nats:
            return await fn(nats, keystore, settings)
    except PyocoError as exc:
        fail(exc.message, hint="pass --nats-url (or PYOCO_NATS_URL) of the NATS the gateway uses")


@api_key.command("create")
@click.option("--tenant", required=True, help="tenant_id the key acts for ([A-Za-z0-9_-]{1,64}).")
@OUTPUT
@click.pass_context
async def create(ctx: click.Context, tenant: str, output: str) -> None:
    """Create a key for a tenant and print it (shown this once; only its hash is stored)."""

    async def go(nats: Any, keystore: Any, settings: Any) -> Any:
        return await keystore.create_key(
            nats, tenant_id=tenant, now=time.time(), pepper=settings.auth_pepper, actor=_actor(), bucket=settings.auth_kv_bucket
        )

    try:
        check_tenant(tenant)
    except ApiKeyFormatError as exc:
        fail(str(exc))
    key, rec = await _with_store(ctx, go)
    if output == "json":
        _emit({"key_id": rec.key_id, "tenant_id": rec.tenant_id, "api_key": key, "created_at": rec.created_at})
    else:
        click.echo(f"key_id     {rec.key_id}\ntenant_id  {rec.tenant_id}\ncreated    {_when(rec.created_at)} UTC")
        click.echo(f"api_key    {key}")
        click.echo("(the key is shown only now: store it; only its hash is kept)", err=True)


@api_key.command("list")
@OUTPUT
@click.pass_context
async def list_(ctx: click.Context, output: str) -> None:
    """List keys, newest first (no secrets)."""

    async def go(nats: Any, keystore: Any, settings: Any) -> Any:
        return await keystore.list_keys(nats, bucket=settings.auth_kv_bucket)

    records = await _with_store(ctx, go)
    if output == "json":
        _emit([r.summary() for r in records])
        return
    click.echo(f"{'KEY_ID':<26}{'TENANT':<20}{'CREATED (UTC)':<21}REVOKED (UTC)")
    for r in records:
        click.echo(f"{r.key_id:<26}{r.tenant_id:<20}{_when(r.created_at):<21}{_when(r.revoked_at)}")


@api_key.command("revoke")
@click.option("--key-id", required=True, help="key_id to revoke (from `api-key list`).")
@OUTPUT
@click.pass_context
async def revoke(ctx: click.Context, key_id: str, output: str) -> None:
    """Revoke a key: gateways refuse it from then on (revoking twice keeps the first time)."""
    try:
        check_key_id(key_id)
    except ApiKeyFormatError as exc:
        fail(str(exc))

    async def go(nats: Any, keystore: Any, settings: Any) -> Any:
        return await keystore.revoke_key(nats, key_id, now=time.time(), actor=_actor(), bucket=settings.auth_kv_bucket)

    rec = await _with_store(ctx, go)
    if rec is None:
        if output == "json":
            _emit({"error": "not_found", "key_id": key_id})
        else:
            click.echo(f"no key {key_id}", err=True)
        sys.exit(2)
    if output == "json":
        _emit({"key_id": key_id, "revoked_at": rec.revoked_at})
    else:
        click.echo(f"revoked {key_id} (tenant {rec.tenant_id}) at {_when(rec.revoked_at)} UTC")


def main() -> None:
    exit_with_parent()  # a parent that asked (PYOCO_ES_PARENT_FD): die with it
    admin(_anyio_backend="trio")
