"""Write docs/configuration.md from `streams.core.settings.Settings`: one row per field.

Run `python -m tools.gen_config` (`make docs` does); tests/unit/test_docs_config.py fails when the
page differs from what this writes.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from streams.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
ENV_PREFIX = "PIPELINE_"

HEADER = """\
<!-- Generated from streams.core.settings.Settings by `python -m tools.gen_config` (`make docs`): do not edit. -->
# Configuration

The worker and the `pipeline` CLI read their settings from environment variables with the prefix
`PIPELINE_`, or from a `.env` file in the working directory. They are validated at start-up: a
value out of range, or an inconsistent pair (`PIPELINE_MAILER=http` without `PIPELINE_MAILER_URL`),
stops the worker before it consumes anything, with a message naming the variable. A value of type
JSON is one JSON document, e.g. `PIPELINE_RETRY_OVERRIDES='{"completion": {"max_attempts": 3}}'`.
Secrets are never logged, and passwords in URLs are masked wherever settings are shown.

| variable | type | default | description |
|---|---|---|---|
"""


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    return f"{ENV_PREFIX}{field.upper()}"


def _is_json(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (dict, list, set, tuple):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: `integer`, `log` or `http`, `JSON`, `secret`, `... (optional)`."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        name = _one_of([type_name(a) for a in members])
        return f"{name} (optional)" if len(members) < len(get_args(annotation)) else name
    if origin is Literal:
        return _one_of([f"`{v}`" for v in get_args(annotation)])
    if _is_json(annotation):
        return "JSON"
    if annotation is SecretStr:
        return "secret"
    if annotation is bool:
        return "boolean"
    if annotation is float:
        return "number"
    if annotation is int:
        return "integer"
    if annotation is str:
        return "string"
    return "URL" if getattr(annotation, "__name__", "").endswith("Url") else str(annotation)


def default_value(field: FieldInfo) -> str:
    """The default as one would write it in the environment; `unset` when there is none."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", r"\|")


def render() -> str:
    """The whole page, as it should be on disk."""
    rows = [
        f"| `{env_name(name)}` | {_cell(type_name(field.annotation))} | {_cell(default_value(field))} "
        f"| {_cell(field.description or '')} |"
        for name, field in Settings.model_fields.items()
    ]
    return HEADER + "\n".join(rows) + "\n"


def main() -> None:
    """Write the page."""
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(render())


if __name__ == "__main__":
    main()
