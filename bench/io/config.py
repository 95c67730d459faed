"""`make bench-io` settings, from `BENCH_IO_*` variables (BENCH_IO_QUICK=1: a short smoke run)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import RESULTS, BenchConfig

# The scenarios' contenders, in table order. Keys are stable: io-latest.json uses them.
FREE: tuple[str, ...] = ("pipeline", "faststream-http", "dramatiq-http", "client-alone")
LIMITED: tuple[str, ...] = (
    "pipeline-limits-1w",
    "pipeline-limits-3w",
    "pipeline-nolimits-1w",
    "pipeline-nolimits-3w",
    "dramatiq-ratelimited",
)
LLM: tuple[str, ...] = ("llm-limits", "llm-nolimits")
ALL: tuple[str, ...] = FREE + LIMITED + LLM

DRAMATIQ_LIMITER_KEY = "bench-io-mailer"  # the Dramatiq WindowRateLimiter's key in the bench's Redis database
MAILER_LIMITS = {"mailer": {"requests_per_second": 200, "max_concurrency": 64}}
LLM_LIMITS = {"llm": {"tokens_per_minute": 60_000, "max_concurrency": 64}}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


@dataclass(frozen=True)
class IoConfig:
    """One `make bench-io` run's knobs."""

    base: BenchConfig = field(default_factory=BenchConfig)  # brokers, loop, PostgreSQL, quiet wait
    quick: bool = False
    rounds: int = 3
    only: tuple[str, ...] = ALL
    # (a): no provider limit
    free_n: int = 10_000
    mail_latency: float = 0.1
    max_seconds: float = 30.0  # stop timing a contender this long after its first delivery
    dramatiq_threads: int = 8
    # (b): provider limit
    limited_n: int = 5_000
    provider_limit: int = 200
    retry_after: str = "1"
    mailer_limits: str = json.dumps(MAILER_LIMITS)
    limited_max_seconds: float = 120.0
    stall_seconds: float = 20.0  # (b): give up when nothing was delivered or dead-lettered for this long
    dramatiq_limited_threads: int = 32
    # (c): the LLM flow
    llm_seconds: float = 90.0
    llm_n: int = 2_000  # 200,000 tokens: more than the 90 s allow
    llm_rounds: int = 1
    model_latency: float = 1.0
    tokens_per_minute: int = 60_000
    completion_tokens: int = 50
    prompt_chars: int = 200  # 50 prompt tokens: 100 tokens a completion
    llm_limits: str = json.dumps(LLM_LIMITS)
    results: Path = RESULTS

    @classmethod
    def from_env(cls) -> IoConfig:
        """Defaults, BENCH_IO_QUICK's smaller ones, then each BENCH_IO_* variable."""
        cfg = cls(base=BenchConfig.from_env())
        if _env("BENCH_IO_QUICK", "0") not in ("0", "false", "no"):
            cfg = dataclasses.replace(
                cfg,
                quick=True,
                rounds=1,
                free_n=1_500,
                max_seconds=8.0,
                limited_n=600,
                limited_max_seconds=30.0,
                stall_seconds=10.0,
                llm_seconds=20.0,
                llm_n=1_000,  # more than a minute's tokens: the run without limits meets the provider's
            )
        ints = {
            "rounds": "BENCH_IO_ROUNDS",
            "free_n": "BENCH_IO_N",
            "dramatiq_threads": "BENCH_IO_DRAMATIQ_THREADS",
            "limited_n": "BENCH_IO_LIMITED_N",
            "provider_limit": "BENCH_IO_PROVIDER_LIMIT",
            "dramatiq_limited_threads": "BENCH_IO_DRAMATIQ_LIMITED_THREADS",
            "llm_n": "BENCH_IO_LLM_N",
            "llm_rounds": "BENCH_IO_LLM_ROUNDS",
            "tokens_per_minute": "BENCH_IO_TPM",
            "completion_tokens": "BENCH_IO_COMPLETION_TOKENS",
            "prompt_chars": "BENCH_IO_PROMPT_CHARS",
        }
        floats = {
            "mail_latency": "BENCH_IO_MAIL_LATENCY",
            "max_seconds": "BENCH_IO_MAX_SECONDS",
            "limited_max_seconds": "BENCH_IO_LIMITED_MAX_SECONDS",
            "stall_seconds": "BENCH_IO_STALL_SECONDS",
            "llm_seconds": "BENCH_IO_LLM_SECONDS",
            "model_latency": "BENCH_IO_MODEL_LATENCY",
        }
        strings = {
            "retry_after": "BENCH_IO_RETRY_AFTER",
            "mailer_limits": "BENCH_IO_MAILER_LIMITS",
            "llm_limits": "BENCH_IO_LLM_LIMITS",
        }
        changes: dict[str, object] = {}
        for name, var in ints.items():
            if os.environ.get(var, "").strip():
                changes[name] = int(os.environ[var])
        for name, var in floats.items():
            if os.environ.get(var, "").strip():
                changes[name] = float(os.environ[var])
        for name, var in strings.items():
            if os.environ.get(var, "").strip():
                changes[name] = os.environ[var].strip()
        only = _env("BENCH_IO_ONLY", "")
        if only:
            changes["only"] = tuple(k.strip() for k in only.split(",") if k.strip())
        if os.environ.get("BENCH_RESULTS", "").strip():
            changes["results"] = Path(os.environ["BENCH_RESULTS"])
        return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Refuse settings that cannot give a meaningful result."""
        unknown = [k for k in self.only if k not in ALL]
        if unknown:
            raise ValueError(f"unknown contender(s) {unknown}; known: {', '.join(ALL)}")
        if self.rounds < 1 or self.llm_rounds < 1:
            raise ValueError("BENCH_IO_ROUNDS and BENCH_IO_LLM_ROUNDS must be at least 1")
        for raw in (self.mailer_limits, self.llm_limits):
            json.loads(raw)  # passed to the workers verbatim: must be JSON
