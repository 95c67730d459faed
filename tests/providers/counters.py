"""A provider's counters: the live ones (`Counters`) and their snapshot (`ProviderStats`, what GET /stats answers)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProviderStats:
    """A snapshot of a provider's counters.

    `max_accepted_1s` is the most requests accepted in any 1 s window, `max_tokens_60s` the most
    tokens accepted in any 60 s window (model only). `series` holds one row per second since the
    provider started (or was reset): `[second, requests, accepted, rejected, tokens]`.
    """

    requests: int = 0
    accepted: int = 0
    rejected: int = 0  # answered 429
    errors: int = 0  # answered another 4xx (malformed request)
    in_flight: int = 0
    max_in_flight: int = 0
    max_accepted_1s: int = 0
    distinct_keys: int = 0  # distinct Idempotency-Keys among accepted requests
    duplicates: int = 0  # accepted requests whose key had been accepted before
    tokens: int = 0
    max_tokens_60s: int = 0
    first_at: float | None = None  # seconds since start (or reset) of the first and the last request
    last_at: float | None = None
    series: tuple[tuple[int, int, int, int, int], ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict (what `GET /stats` answers)."""
        data = asdict(self)
        data["series"] = [list(row) for row in self.series]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderStats:
        """Back from `as_json` (e.g. a subprocess's `GET /stats`)."""
        values = dict(data)
        values["series"] = tuple(tuple(row) for row in values.get("series", ()))
        return cls(**values)


@dataclass
class Counters:
    """The live counts, changed under the provider's lock."""

    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_accepted_1s: int = 0
    keys: set[str] = field(default_factory=set)
    duplicates: int = 0
    tokens: int = 0
    max_tokens_60s: int = 0
    first_at: float | None = None
    last_at: float | None = None
    series: dict[int, list[int]] = field(default_factory=dict)
