"""TLS broker URLs are accepted by the settings, and their passwords are masked (no server needed).

Not marked `chaos` (see tests/chaos/conftest.py): it runs in `make check` too.
"""

from __future__ import annotations

import pytest

from streams.core.settings import Settings, mask_url

SECRET = "s3cr3t-tls"


@pytest.mark.parametrize(
    ("rabbit_url", "redis_url"),
    [
        (f"amqps://app:{SECRET}@mq.example.com:5671/prod", f"rediss://default:{SECRET}@cache.example.com:6380/0"),
        (f"amqps://app:{SECRET}@mq.example.com/", f"rediss://:{SECRET}@cache.example.com/1"),
        ("amqps://mq.example.com:5671/", "rediss://cache.example.com:6380/0"),
    ],
)
def test_tls_urls_are_accepted_and_masked(rabbit_url: str, redis_url: str) -> None:
    settings = Settings(rabbit_url=rabbit_url, redis_url=redis_url, _env_file=None)
    assert settings.rabbit_url == rabbit_url
    assert settings.redis_url == redis_url
    shown = settings.safe_dump()
    assert SECRET not in str(shown)
    assert str(shown["rabbit_url"]).startswith("amqps://")
    assert str(shown["redis_url"]).startswith("rediss://")
    assert SECRET not in mask_url(rabbit_url)
    assert SECRET not in mask_url(redis_url)


@pytest.mark.parametrize("bad", ["http://mq.example.com/", "amqpx://mq/", "ftp://u:p@h/"])
def test_other_schemes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        Settings(rabbit_url=bad, _env_file=None)
