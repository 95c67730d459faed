"""`streams.emails`: with the domain cache, `email-validator` (so `EmailStr`) answers every address
as it does without it: the same normalized address, or the same error, the first time and after."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import email_validator
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.commands import SendEmail
from streams import emails

ADDRESSES = [
    "ada@example.com",
    "Ada.Lovelace+tag@Example.COM",  # the domain is lower-cased, the local part kept
    "x@mail.example.co.uk",
    "user@münchen.de",  # IDNA: the Unicode domain, and its ASCII form
    "user@xn--mnchen-3ya.de",  # the same domain given in Punycode
    "user@xn--abc.de",  # Punycode that is not valid IDNA
    "jo@localhost",  # no dot
    "jo@mail.test",  # special-use names
    "jo@host.local",
    "jo@example.123",  # a numeric top-level domain
    "jo@-bad.com",
    "jo@bad-.com",
    "jo@ex_ample.com",
    "jo@exa mple.com",
    "jo@example..com",
    "jo@example.com.",
    "jo@" + "a" * 64 + ".com",  # a label past 63 characters
    "jo@" + ".".join(["abcdefghi"] * 30) + ".com",  # a domain past 253 characters
    "a" * 65 + "@example.com",  # a local part past 64 characters
    "no-at-sign.example.com",
    "two@@example.com",
    "ünïcode@example.com",
    "Ada <ada@example.com>",
    "",
]


def _answer(address: str) -> tuple[str, str, str] | tuple[str, str]:
    try:
        v = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        return type(exc).__name__, str(exc)
    return v.normalized, v.ascii_email or "", v.domain


@pytest.fixture
def cached(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    module: Any = importlib.import_module("email_validator.validate_email")
    monkeypatch.setattr(module, "validate_email_domain_name", module.validate_email_domain_name)
    emails._valid_domain.cache_clear()
    emails.install()
    yield
    emails._valid_domain.cache_clear()


def test_every_address_gets_the_same_answer_with_the_cache() -> None:
    module: Any = importlib.import_module("email_validator.validate_email")
    original = module.validate_email_domain_name
    module.validate_email_domain_name = emails._check  # email-validator's own (the worker may have installed it)
    try:
        plain = {a: _answer(a) for a in ADDRESSES}
        emails._valid_domain.cache_clear()
        emails.install()
        assert module.validate_email_domain_name is emails.validate_email_domain_name
        assert {a: _answer(a) for a in ADDRESSES} == plain  # the first time: through the check
        assert {a: _answer(a) for a in ADDRESSES} == plain  # again: valid domains from the cache
        assert emails._valid_domain.cache_info().hits > 0
    finally:
        module.validate_email_domain_name = original
        emails._valid_domain.cache_clear()


@pytest.mark.usefixtures("cached")
def test_an_edit_of_the_special_use_names_is_honoured_after_caching(monkeypatch: pytest.MonkeyPatch) -> None:
    assert validate_email("jo@mail.example", check_deliverability=False).domain == "mail.example"
    names = [*email_validator.SPECIAL_USE_DOMAIN_NAMES, "example"]
    monkeypatch.setattr(email_validator, "SPECIAL_USE_DOMAIN_NAMES", names)
    with pytest.raises(EmailNotValidError, match="special-use"):
        validate_email("jo@mail.example", check_deliverability=False)


@pytest.mark.usefixtures("cached")
def test_send_email_validates_as_before() -> None:
    cmd = SendEmail.model_validate_json(b'{"to": "Ada@Example.COM", "subject": "s", "body": "b"}')
    assert cmd.to == "Ada@example.com"
    for _ in range(2):  # a bad domain fails every time, not only before it is cached
        with pytest.raises(ValidationError, match="special-use"):
            SendEmail.model_validate_json(b'{"to": "ada@mail.test", "subject": "s", "body": "b"}')


def test_the_cache_is_bounded() -> None:
    assert emails._valid_domain.cache_parameters()["maxsize"] == emails.CACHED_DOMAINS


# --- the short way for plain addresses: the library's answer, field for field ---------------------

ROLE_AND_LENGTH = [
    "Postmaster@example.com",  # RFC 2142 role names are lower-cased by the library
    "WWW@example.com",
    "postmaster.x@example.com",  # not a role name: kept as given
    "a" * 64 + "@example.com",  # the longest local part the short way takes
    "a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".com",  # past 254 characters in all
    "a" * 60 + "@" + ".".join(["b" * 40] * 4) + ".de",  # 227 characters
    "a" * 64 + "@" + "b" * 63 + "." + "b" * 63 + "." + "b" * 57 + ".com",  # 254: the longest there is
    "a" * 64 + "@" + "b" * 63 + "." + "b" * 63 + "." + "b" * 58 + ".com",  # 255: one too many
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a@example",
    "a@EXAMPLE.invalid",
    "a@xn--bcher-kva.ch",
    "a@[127.0.0.1]",
    '"quoted"@example.com',
    " ada@example.com",
    "ada@example.com ",
    "ada@example.com\n",
]


def _full(outcome: Any) -> Any:
    """Every field of a `ValidatedEmail`, or the error's type and text."""
    try:
        return vars(outcome())
    except EmailNotValidError as exc:
        return type(exc).__name__, str(exc)


def _same(address: str | bytes, **options: Any) -> None:
    library = _full(lambda: validate_email(address, **options))
    short = _full(lambda: emails.validate_email(address, **options))
    assert short == library, address


@pytest.mark.usefixtures("cached")
@pytest.mark.parametrize("address", ADDRESSES + ROLE_AND_LENGTH)
def test_the_short_way_answers_as_the_library(address: str) -> None:
    _same(address, check_deliverability=False)
    _same(address, check_deliverability=False)  # the domain cached now


ATEXT_CHARS = "abcXYZ019!#$%&'*+/=?^_`{|}~-"


@pytest.mark.usefixtures("cached")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(alphabet=ATEXT_CHARS + '.@ "<>[]\\ü', max_size=80),
        st.builds(
            "{}@{}".format,
            st.text(alphabet=ATEXT_CHARS + ".", min_size=1, max_size=70),
            st.text(alphabet="abcXYZ019.-_ü", min_size=1, max_size=70),
        ),
        st.builds(
            "{}@{}.com".format,
            st.text(alphabet="u.", min_size=1, max_size=70),
            st.lists(st.text(alphabet="dD-", min_size=1, max_size=63), min_size=1, max_size=5).map(".".join),
        ),
    )
)
def test_the_short_way_answers_as_the_library_for_any_address(address: str) -> None:
    _same(address, check_deliverability=False)


@pytest.mark.usefixtures("cached")
def test_options_other_than_the_defaults_go_the_library_way() -> None:
    long_local = "a" * 65 + "@example.com"
    with pytest.raises(EmailNotValidError, match="too long before the @-sign"):
        emails.validate_email(long_local, check_deliverability=False, strict=True)
    _same(long_local, check_deliverability=False)  # not strict: accepted by both
    _same("jo@mail.test", check_deliverability=False, test_environment=True)
    _same(b"ada@example.com", check_deliverability=False)


def test_install_routes_email_str_through_the_short_way(monkeypatch: pytest.MonkeyPatch) -> None:
    module: Any = importlib.import_module("email_validator.validate_email")
    monkeypatch.setattr(module, "validate_email_domain_name", module.validate_email_domain_name)
    monkeypatch.setattr(email_validator, "validate_email", email_validator.validate_email)
    emails.install()
    assert email_validator.validate_email is emails.validate_email
    calls: list[str] = []
    monkeypatch.setattr(emails, "_plain", calls.append)  # None: the library's way
    cmd = SendEmail.model_validate_json(b'{"to": "Ada@Example.COM", "subject": "s", "body": "b"}')
    assert calls == ["Ada@Example.COM"]
    assert cmd.to == "Ada@example.com"  # the library's answer when the short way declines
