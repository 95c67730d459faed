"""Benchmark settings, read from `BENCH_*` environment variables (see bench/README.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Every contender of the main table, in table order. Keys are stable: results.json uses them.
ALL_CONTENDERS: tuple[str, ...] = (
    "rabbit-aiopika",
    "rabbit-faststream",
    "rabbit-dramatiq",
    "rabbit-handrolled",
    "rabbit-pipeline-sqlite",
    "rabbit-pipeline-sqlite-info",
    "rabbit-pipeline-postgres",
    "redis-raw",
    "redis-faststream",
    "redis-handrolled",
    "redis-pipeline-sqlite",
    "redis-pipeline-sqlite-info",
)


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _str(name: str, default: str) -> str:
    raw = os.environ.get(name, "").strip()
    return raw or default


def _list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run's knobs."""

    n: int = 20_000
    rounds: int = 3
    contenders: tuple[str, ...] = ALL_CONTENDERS
    # A private vhost and Redis database keep the bench away from tests running on `/` and db 0.
    rabbit_url: str = "amqp://guest:guest@127.0.0.1:5672/bench"
    redis_url: str = "redis://127.0.0.1:6379/9"
    # A maintenance connection: fresh `bench_<hex>` databases are created and dropped through it.
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    loop: str = "auto"  # auto (uvloop when installed, as `faststream run` does) | asyncio | uvloop
    prefetch: int = 64  # RabbitMQ prefetch of (a), (b) and (h)
    redis_count: int = 100  # XREADGROUP COUNT of (e), max_records of (f) and (i)
    dramatiq_threads: int = 8
    # SQLite of the hand-rolled contenders (h), (i): `wal` (the pipeline's journal_mode=WAL,
    # synchronous=NORMAL) or `default` (SQLite's rollback journal, synchronous=FULL).
    handrolled_sqlite: str = "wal"
    queue_type: str = "quorum"  # of the bare contenders' queues, like the pipeline's command queue
    latency_seconds: float = 10.0  # publish at half the measured max rate for this long (0: skip)
    latency_warmup: float = 1.0  # seconds of the latency phase left out of the percentiles
    timeout: float = 300.0  # one contender run
    # Stop timing a drain this long after its first message (0: always drain all n). The queue
    # still holds the rest, so the rate is that of a deep queue; the rest is dropped.
    max_drain_seconds: float = 20.0
    # Before each run, wait up to quiet_wait seconds for the machine to be at most this busy (0..1).
    quiet_busy: float = 0.5
    quiet_wait: float = 15.0
    results: Path = RESULTS
    # bench-scale
    scale_workers: tuple[int, ...] = (1, 2, 3)
    scale_n: int = 20_000
    scale_rounds: int = 2
    store_events: int = 1_000_000
    store_tables: tuple[str, ...] = ("events", "inbox", "email_log", "outbox")
    append_commits: int = 20_000
    append_concurrency: int = 64
    append_rounds: int = 3
    store_backends: tuple[str, ...] = ("sqlite", "postgres")
    # bench-profile
    profile_seconds: float = 20.0
    profile_targets: tuple[str, ...] = ("rabbit-pipeline-sqlite", "redis-pipeline-sqlite")
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> BenchConfig:
        """The configuration from `BENCH_*` variables, defaults elsewhere."""
        d = cls()
        return cls(
            n=_int("BENCH_N", d.n),
            rounds=_int("BENCH_ROUNDS", d.rounds),
            contenders=_list("BENCH_ONLY", d.contenders),
            rabbit_url=_str("BENCH_RABBIT_URL", d.rabbit_url),
            redis_url=_str("BENCH_REDIS_URL", d.redis_url),
            postgres_url=_str("BENCH_POSTGRES_URL", d.postgres_url),
            loop=_str("BENCH_LOOP", d.loop),
            prefetch=_int("BENCH_PREFETCH", d.prefetch),
            redis_count=_int("BENCH_REDIS_COUNT", d.redis_count),
            dramatiq_threads=_int("BENCH_DRAMATIQ_THREADS", d.dramatiq_threads),
            handrolled_sqlite=_str("BENCH_HANDROLLED_SQLITE", d.handrolled_sqlite),
            queue_type=_str("BENCH_QUEUE_TYPE", d.queue_type),
            latency_seconds=_float("BENCH_LATENCY_SECONDS", d.latency_seconds),
            latency_warmup=_float("BENCH_LATENCY_WARMUP", d.latency_warmup),
            timeout=_float("BENCH_TIMEOUT", d.timeout),
            max_drain_seconds=_float("BENCH_MAX_DRAIN_SECONDS", d.max_drain_seconds),
            quiet_busy=_float("BENCH_QUIET_BUSY", d.quiet_busy),
            quiet_wait=_float("BENCH_QUIET_WAIT", d.quiet_wait),
            results=Path(_str("BENCH_RESULTS", str(d.results))),
            scale_workers=tuple(int(w) for w in _list("BENCH_SCALE_WORKERS", tuple(map(str, d.scale_workers)))),
            scale_n=_int("BENCH_SCALE_N", _int("BENCH_N", d.scale_n)),
            scale_rounds=_int("BENCH_SCALE_ROUNDS", d.scale_rounds),
            store_events=_int("BENCH_STORE_EVENTS", d.store_events),
            store_tables=_list("BENCH_STORE_TABLES", d.store_tables),
            append_commits=_int("BENCH_APPEND_COMMITS", d.append_commits),
            append_concurrency=_int("BENCH_APPEND_CONCURRENCY", d.append_concurrency),
            append_rounds=_int("BENCH_APPEND_ROUNDS", d.append_rounds),
            store_backends=_list("BENCH_STORE_BACKENDS", d.store_backends),
            profile_seconds=_float("BENCH_PROFILE_SECONDS", d.profile_seconds),
            profile_targets=_list("BENCH_PROFILE_ONLY", d.profile_targets),
        )

    def validate(self) -> None:
        """Refuse settings that cannot give a meaningful result."""
        unknown = [c for c in self.contenders if c not in ALL_CONTENDERS]
        if unknown:
            raise ValueError(f"unknown contender(s) {unknown}; known: {', '.join(ALL_CONTENDERS)}")
        if self.n < 2:
            raise ValueError("BENCH_N must be at least 2 (a drain rate needs a first and a last message)")
        if self.rounds < 1:
            raise ValueError("BENCH_ROUNDS must be at least 1")
        if self.handrolled_sqlite not in ("wal", "default"):
            raise ValueError("BENCH_HANDROLLED_SQLITE must be wal or default")
        if self.loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError("BENCH_LOOP must be auto, asyncio or uvloop")
