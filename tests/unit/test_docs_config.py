"""docs/configuration.md is generated from the Settings class, current, and describes every field."""

from __future__ import annotations

from typing import Literal

from pydantic import HttpUrl, SecretStr

from streams.core.settings import Settings
from tools import gen_config


def test_configuration_page_is_up_to_date() -> None:
    """The committed page equals what the generator writes from the code now."""
    committed = gen_config.PAGE.read_text() if gen_config.PAGE.exists() else ""
    assert committed == gen_config.render(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_description() -> None:
    """Every Settings field carries a `description=`, shown on the configuration page."""
    missing = [gen_config.env_name(name) for name, field in Settings.model_fields.items() if not field.description]
    assert missing == [], "give these Settings fields a description=: " + ", ".join(missing)


def test_every_setting_has_a_row_named_after_its_variable() -> None:
    """One row per field, named PIPELINE_ + the field's name in upper case, with its default."""
    rows = [line for line in gen_config.render().splitlines() if line.startswith("| `PIPELINE_")]
    assert len(rows) == len(Settings.model_fields)
    assert "| `PIPELINE_RETRY_MAX_ATTEMPTS` | integer | `5` |" in gen_config.render()


def test_types_read_as_a_reader_writes_them() -> None:
    """Choices, optional values, secrets, URLs and JSON are named for someone setting a variable."""
    assert gen_config.type_name(Literal["log", "http"]) == "`log` or `http`"
    assert gen_config.type_name(Literal["full", "equal", "none"]) == "`full`, `equal` or `none`"
    assert gen_config.type_name(SecretStr | None) == "secret (optional)"
    assert gen_config.type_name(HttpUrl | None) == "URL (optional)"
    assert gen_config.type_name(dict[str, int]) == "JSON"
    assert gen_config.type_name(bool | None) == "boolean (optional)"
