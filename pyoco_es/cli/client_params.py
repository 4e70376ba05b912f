"""pyoco-client's input parsing: params (JSON, KEY=VALUE, files), tags, and the input errors
that say how to write them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import asyncclick as click
import yaml

from .client_errors import ERR_INPUT, CliError, input_error
from .client_http import ClientSettings


_TAG_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def client_settings() -> ClientSettings:
    """The settings of the running ``pyoco-client`` command (server, API key, its name)."""
    settings = click.get_current_context().find_object(ClientSettings)
    assert settings is not None
    return settings


def sub_command(name: str) -> str:
    """How the user calls sub-command ``name`` (``pyoco-client NAME`` or ``pyoco-es client NAME``), for hints."""
    return f"{client_settings().command_path} {name}"


def parse_json_object(raw: str, *, flag: str, example: str) -> dict[str, Any]:
    """``--params``: a JSON object, or an input error saying how to write one."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise input_error(f"{flag} must be valid JSON object ({exc})", hint=example) from exc
    if not isinstance(value, dict):
        raise input_error(f"{flag} must be JSON object (got {type(value).__name__})", hint=example)
    return value


def parse_param_assignments(items: Sequence[str], *, example: str) -> dict[str, Any]:
    """``--param k=v`` (repeatable): the value is JSON when it parses, else the plain string."""
    out: dict[str, Any] = {}
    for raw in items:
        key, sep, text = raw.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            raise input_error(f"--param must be key=value (got {raw!r})", hint=example)
        if not key:
            raise input_error(f"--param key is empty (got {raw!r})", hint=example)
        if text == "":
            out[key] = ""
            continue
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def read_text_file(path: str, *, flag: str) -> str:
    """A UTF-8 file named by ``flag``, or ``ERR-PYOCO-0018: file I/O error`` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(
            ERR_INPUT,
            "file I/O error",
            reason=f"cannot read {flag} {path}: {detail}",
            hint="check the path and that the file is readable UTF-8 text",
        ) from exc


def parse_params_file(path: str, *, example: str) -> dict[str, Any]:
    """``--params-file``: a JSON or YAML (``yaml.safe_load``) object."""
    text = read_text_file(path, flag="--params-file")
    try:
        value = json.loads(text)
    except ValueError as json_exc:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as yaml_exc:
            raise input_error(
                f"--params-file must be JSON/YAML object ({path}): not JSON ({json_exc}) nor YAML ({yaml_exc})".replace("\n", " "),
                hint=example,
            ) from yaml_exc
    if not isinstance(value, dict):
        raise input_error(f"--params-file must contain an object at the top level ({path}, got {type(value).__name__})", hint=example)
    return value


def build_params(params_file: str | None, params: str | None, param: Sequence[str]) -> dict[str, Any]:
    """Merge params-file → --params → --param; later wins."""
    sub = sub_command("submit")
    merged: dict[str, Any] = {}
    if params_file:
        merged.update(parse_params_file(params_file, example=f"{sub} --params-file params.yaml  (containing e.g. x: 1)"))
    if params is not None:
        merged.update(parse_json_object(params, flag="--params", example=f"{sub} --params '{{\"x\": 1}}'"))
    if param:
        merged.update(parse_param_assignments(param, example=f"{sub} --param x=1 --param name=alice"))
    return merged


def parse_tags(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    tags = [t.strip() for t in raw.split(",") if t.strip()]
    return tags or None


def check_tag(tag: str | None, command: str) -> str | None:
    if tag is None:
        return None
    tag = tag.strip()
    if tag and not _TAG_RE.fullmatch(tag):
        raise input_error(
            f"--tag must be letters, digits, '_' or '-' (got {tag!r})",
            hint=f"{sub_command(command)} --tag default",
        )
    return tag or None

