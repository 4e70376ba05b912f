"""``pyoco-client`` wheel commands, as pyoco-server 0.5.1's (contract §5.3): ``wheels``,
``wheel-history``, ``wheel-upload`` (with its client-side preflight: ``--preflight
strict|warn|off``, ``--allow-no-entry-points``, ``--allow-missing-usage-doc``) and
``wheel-delete``.  JSON output by default, as upstream; ``--output table`` for people."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote
from typing import Any, Final

import asyncclick as click

from ..core import wheels
from .client_command import api_command
from .client_errors import ERR_INPUT, CliError
from .client_http import Api, decode_json
from .client_output import fmt_time, render_table, terminal_width, write_json, write_text

WHEEL_COLUMNS: Final = ("name", "size_bytes", "tags", "mtime")
HISTORY_COLUMNS: Final = ("occurred_at", "action", "wheel_name", "version", "tags", "actor")
PREFLIGHT_HINT: Final = "fix wheel metadata/entry_points or use --preflight warn/off"

_OUTPUT = click.option(
    "--output", type=click.Choice(["json", "table"]), default="json", show_default=True,
    help="json: the server's JSON (as pyoco-server's client); table: columns that fit the terminal.",
)


def _tags_text(value: Any) -> str:
    return ",".join(str(t) for t in value) if isinstance(value, list) and value else "-"


def wheel_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [[w.get("name"), w.get("size_bytes"), _tags_text(w.get("tags")), w.get("mtime")] for w in items]


def history_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for h in items:
        actor = h.get("actor") if isinstance(h.get("actor"), dict) else {}
        who = actor.get("api_key_id") or actor.get("tenant_id") or "-"
        rows.append([fmt_time(h.get("occurred_at")), h.get("action"), h.get("wheel_name"), h.get("version") or "-", _tags_text(h.get("tags")), who])
    return rows


def _print(body: Any, output: str, columns: tuple[str, ...], rows: Any) -> None:
    if output == "table":
        items = [x for x in body if isinstance(x, dict)] if isinstance(body, list) else []
        write_text(render_table(columns, rows(items), terminal_width()))
    else:
        write_json(body)


def read_wheel(path: str) -> bytes:
    """The file's bytes, or ``ERR-PYOCO-0018: file I/O error`` naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(ERR_INPUT, "file I/O error", reason=f"cannot read --wheel-file {path}: {exc.strerror or exc}",
                       hint="check file path and permission") from exc


def run_preflight(data: bytes, *, mode: str, allow_no_entry_points: bool, allow_missing_usage_doc: bool) -> None:
    """Upstream's preflight: warnings to stderr; errors abort in ``strict``, warn in ``warn``."""
    if mode == "off":
        return
    errors, warnings = wheels.preflight(
        data, require_entry_points=not allow_no_entry_points, require_usage_doc=not allow_missing_usage_doc
    )
    for warning in warnings:
        sys.stderr.write(f"[pyoco-client][preflight][warn] {warning}\n")
    if errors and mode == "warn":
        for error in errors:
            sys.stderr.write(f"[pyoco-client][preflight][warn] {error}\n")
        return
    if errors:
        raise CliError(ERR_INPUT, "invalid command line input", reason=f"wheel preflight failed: {'; '.join(errors)}", hint=PREFLIGHT_HINT)


def register(group: click.Group) -> None:
    """Add the wheel commands to the ``pyoco-client`` group."""

    @group.command("wheels")
    @_OUTPUT
    @api_command
    async def wheels_cmd(api: Api, output: str) -> None:
        """List the wheel registry.

        \b
        Example:
          pyoco-client wheels --output table
        """
        _print(await api.get_json("/wheels"), output, WHEEL_COLUMNS, wheel_rows)

    @group.command("wheel-history")
    @click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)
    @click.option("--wheel-name", default=None, help="Only this wheel filename.")
    @click.option("--action", type=click.Choice(["upload", "delete"]), default=None, help="Only uploads or deletes.")
    @_OUTPUT
    @api_command
    async def wheel_history_cmd(api: Api, limit: int, wheel_name: str | None, action: str | None, output: str) -> None:
        """List wheel uploads and deletes, newest first (who, when, sha256, tags).

        \b
        Example:
          pyoco-client wheel-history --wheel-name demo_pkg-1.0.0-py3-none-any.whl
        """
        params: list[tuple[str, Any]] = [("limit", limit)]
        if wheel_name:
            params.append(("wheel_name", wheel_name))
        if action:
            params.append(("action", action))
        _print(await api.get_json("/wheels/history", params=params), output, HISTORY_COLUMNS, history_rows)

    @group.command("wheel-upload")
    @click.option("--wheel-file", required=True, help="Path to the *.whl.")
    @click.option("--tags", default=None, help="Comma-separated tags: only workers with one of them install it (none: every worker).")
    @click.option("--replace/--no-replace", default=True, show_default=True, help="--no-replace refuses a name already stored.")
    @click.option("--preflight", type=click.Choice(["strict", "warn", "off"]), default="strict", show_default=True,
                  help="Check METADATA, usage docs and entry points before uploading.")
    @click.option("--allow-no-entry-points", is_flag=True, help="Preflight: a wheel without entry points is fine.")
    @click.option("--allow-missing-usage-doc", is_flag=True, help="Preflight: a wheel without usage documentation is fine.")
    @api_command
    async def wheel_upload_cmd(
        api: Api, wheel_file: str, tags: str | None, replace: bool, preflight: str, allow_no_entry_points: bool, allow_missing_usage_doc: bool
    ) -> None:
        """Upload a wheel; its version must be above every stored version of its package.

        \b
        Examples:
          pyoco-client wheel-upload --wheel-file dist/demo_pkg-1.0.0-py3-none-any.whl --tags cpu
          pyoco-client wheel-upload --wheel-file x.whl --preflight warn
        """
        data = read_wheel(wheel_file)
        run_preflight(data, mode=preflight, allow_no_entry_points=allow_no_entry_points, allow_missing_usage_doc=allow_missing_usage_doc)
        form = {"replace": "true" if replace else "false"}
        tag_list = [t.strip() for t in (tags or "").split(",") if t.strip()]
        if tag_list:
            form["tags"] = ",".join(tag_list)
        files = {"wheel": (Path(wheel_file).name, data, "application/octet-stream")}
        write_json(await api.post_json("/wheels", files=files, data=form))

    @group.command("wheel-delete")
    @click.option("--name", required=True, help="The wheel filename.")
    @api_command
    async def wheel_delete_cmd(api: Api, name: str) -> None:
        """Delete a wheel from the registry (workers stop installing it at their next sync).

        \b
        Example:
          pyoco-client wheel-delete --name demo_pkg-1.0.0-py3-none-any.whl
        """
        response = await api.request("DELETE", f"/wheels/{quote(name, safe='')}")
        write_json(decode_json(response, api.settings))
