"""E-mail domains validated once, not once a message.

Pydantic's `EmailStr` validates with `email-validator`, and two thirds of its 17 µs an address go
to the domain (every character checked against UTS #46, the IDNA round trip): about a tenth of
the worker's CPU a `SendEmail`, for the same few domains over and over. `install()` puts a cache
in front of `email_validator`'s domain check, keyed by everything its answer depends on (the
domain, the two options, the special-use names list, which callers may edit). Only valid domains
are cached: an invalid one is checked every time and fails as before, with the same error. The
local part, the lengths and the normalized address are still `email-validator`'s every time.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import email_validator
from email_validator import syntax
from email_validator.syntax import DomainNameValidationResult

CACHED_DOMAINS = 4096  # least recently used go first: random domains cannot grow it

_check = syntax.validate_email_domain_name
# The module, not the function the package exports under the same name.
_validate_module: Any = importlib.import_module("email_validator.validate_email")


@functools.lru_cache(maxsize=CACHED_DOMAINS)
def _valid_domain(
    domain: str, test_environment: bool, globally_deliverable: bool, _special_use: tuple[str, ...]
) -> tuple[str, str]:
    info = _check(domain, test_environment=test_environment, globally_deliverable=globally_deliverable)
    return info["ascii_domain"], info["domain"]


def validate_email_domain_name(
    domain: str, test_environment: bool = False, globally_deliverable: bool = True
) -> DomainNameValidationResult:
    """`email_validator.syntax.validate_email_domain_name`, remembered for valid domains."""
    special_use = tuple(email_validator.SPECIAL_USE_DOMAIN_NAMES)
    ascii_domain, unicode_domain = _valid_domain(domain, test_environment, globally_deliverable, special_use)
    return {"ascii_domain": ascii_domain, "domain": unicode_domain}


def install() -> None:
    """Make `email_validator.validate_email` (so `EmailStr`) check each domain through the cache."""
    _validate_module.validate_email_domain_name = validate_email_domain_name
