"""E-mail domains validated once, not once a message.

Pydantic's `EmailStr` validates with `email-validator`, and two thirds of its 17 µs an address go
to the domain (every character checked against UTS #46, the IDNA round trip): about a tenth of
the worker's CPU a `SendEmail`, for the same few domains over and over. `install()` puts a cache
in front of `email_validator`'s domain check, keyed by everything its answer depends on (the
domain, the two options, the special-use names list, which callers may edit). Only valid domains
are cached: an invalid one is checked every time and fails as before, with the same error.

With the domain cached, most of the rest (7 of 10 µs a `SendEmail`) is the general parse: the
address scanned character by character for quotes and angle brackets, the options imported
again on every call. `install()` also puts a short way in front of `email_validator.validate_email`
for the address nearly every message carries: plain ASCII `local@domain`, the local part a
dot-atom of at most 64 characters and no RFC 2142 role name, the options left at their defaults,
no deliverability check. It builds the very `ValidatedEmail` the library builds for such an
address (the same fields, the domain from the cached check, the same length limits); anything
else, or anything that would fail, goes the library's whole way and gets its answer and error.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any

import email_validator
from email_validator import ValidatedEmail, syntax
from email_validator.rfc_constants import ATEXT, CASE_INSENSITIVE_MAILBOX_NAMES, EMAIL_MAX_LENGTH, LOCAL_PART_MAX_LENGTH
from email_validator.syntax import DomainNameValidationResult

CACHED_DOMAINS = 4096  # least recently used go first: random domains cannot grow it

_check = syntax.validate_email_domain_name
# The module, not the function the package exports under the same name.
_validate_module: Any = importlib.import_module("email_validator.validate_email")
_library_validate_email = _validate_module.validate_email

# `local@domain` with nothing to unquote or unfold: the local part a dot-atom (RFC 5322 3.2.3,
# email-validator's own character class), the domain ASCII letters, digits, dots and hyphens.
_PLAIN = re.compile(r"([" + ATEXT + r"]+(?:\.[" + ATEXT + r"]+)*)@([A-Za-z0-9.-]+)")
_ROLE_NAMES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)  # lower-cased by the library
_OPTIONS = (
    "allow_smtputf8",
    "allow_empty_local",
    "allow_quoted_local",
    "allow_domain_literal",
    "allow_display_name",
    "strict",
    "test_environment",
    "globally_deliverable",
    "timeout",
    "dns_resolver",
)


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


def validate_email(
    email: str | bytes, /, *, check_deliverability: bool | None = None, **options: Any
) -> ValidatedEmail:
    """`email_validator.validate_email`, with a short way for a plain ASCII address."""
    if (
        check_deliverability is False
        and isinstance(email, str)
        and not any(options.get(k) is not None for k in _OPTIONS)
    ):
        plain = _plain(email)
        if plain is not None:
            return plain
    return _library_validate_email(email, check_deliverability=check_deliverability, **options)  # type: ignore[no-any-return]


def _plain(email: str) -> ValidatedEmail | None:
    """What the library answers for a plain valid address; None for anything else."""
    m = _PLAIN.fullmatch(email)
    if m is None:
        return None
    local, domain_part = m.groups()
    if len(local) > LOCAL_PART_MAX_LENGTH or local.lower() in _ROLE_NAMES:
        return None
    try:
        domain = validate_email_domain_name(
            domain_part,
            test_environment=email_validator.TEST_ENVIRONMENT,
            globally_deliverable=email_validator.GLOBALLY_DELIVERABLE,
        )
    except email_validator.EmailNotValidError:
        return None  # the library's way says why
    ret = ValidatedEmail()
    ret.original = email
    ret.display_name = None
    ret.smtputf8 = False
    ret.local_part = local
    ret.ascii_local_part = local
    ret.domain = domain["domain"]
    ret.ascii_domain = domain["ascii_domain"]
    ret.normalized = local + "@" + ret.domain
    ret.ascii_email = local + "@" + ret.ascii_domain
    if _octets(ret.normalized) > EMAIL_MAX_LENGTH or len(ret.ascii_email) > EMAIL_MAX_LENGTH:
        return None  # too long: the library's way says by how much
    return ret


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def install() -> None:
    """Make `email_validator.validate_email` (so `EmailStr`) take the short way for plain addresses
    and check each domain through the cache."""
    _validate_module.validate_email_domain_name = validate_email_domain_name
    email_validator.validate_email = validate_email
