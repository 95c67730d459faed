"""One contender in one round: fresh queues and provider, its processes started, deliveries counted at the provider."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import loops, pipeline, procstat, stats
from bench.config import ROOT
from bench.io import brokers
from bench.io.config import IoConfig
from bench.io.provider import ProviderProcess, mail_args, model_args, provider

POLL = 0.1  # seconds between two reads of the provider's counters
DLQ_POLL = 1.0
START_TIMEOUT = 90.0  # until the first delivery


@dataclass
class IoSample:
    """One contender in one round, as the provider saw it."""

    contender: str
    scenario: str
    round: int
    n: int
    delivered: int = 0  # distinct Idempotency-Keys accepted by the provider
    rate: float = math.nan  # deliveries per second, first to last
    steady_rate: float = math.nan  # between 10% and 90% of the deliveries
    seconds: float = math.nan
    requests: int = 0
    rejected: int = 0  # answered 429
    duplicates: int = 0  # accepted with a key accepted before
    dead_letters: int = 0
    max_in_flight: int = 0
    max_accepted_1s: int = 0
    tokens: int = 0
    tokens_per_minute: float = math.nan  # tokens accepted per minute, first to last delivery
    max_tokens_60s: int = 0
    cpu_us_per_msg: float = math.nan  # the contender's process(es), per delivery
    provider_cpu_us_per_request: float = math.nan
    machine_busy: float = math.nan
    ended: str = ""  # all | capped | stalled | timed
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rejected_pct(self) -> float:
        """429s as a share of all requests, in percent."""
        return 100.0 * self.rejected / self.requests if self.requests else math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        data = asdict(self)
        data["rejected_pct"] = self.rejected_pct
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}


@dataclass
class Watch:
    """What `watch` needs besides the provider: processes, the target and when to stop."""

    processes: Sequence[pipeline.Worker]
    target: int
    max_seconds: float  # after the first delivery (0: none)
    stall_seconds: float  # no delivery nor dead letter for this long ends the run (0: never)
    dead_letters: Callable[[], Awaitable[int]]


async def watch(prov: ProviderProcess, w: Watch, sample: IoSample) -> None:
    """Poll the provider until `target` were delivered or dead-lettered, the time cap, or a stall; fill `sample`."""
    pids = [p.pid for p in w.processes]
    started = time.monotonic()
    first: tuple[float, int, int, float, tuple[float, float], float, int] | None = None
    points: list[tuple[float, int]] = []
    last_change, last_progress, dead, dead_at = started, -1, 0, 0.0
    while True:
        s = await prov.stats()
        now = time.monotonic()
        if now - dead_at >= DLQ_POLL:
            dead, dead_at = await w.dead_letters(), now
        if first is None and s.distinct_keys > 0:
            cpu = procstat.total_cpu_seconds(pids)
            first = (now, s.distinct_keys, s.tokens, cpu, procstat.machine_cpu(), prov.cpu_seconds(), s.requests)
        if first is not None:
            points.append((now, s.distinct_keys))
        progress = s.distinct_keys + max(dead, 0)
        if progress != last_progress:
            last_progress, last_change = progress, now
        ended = ""
        if progress >= w.target:
            ended = "all"
        elif first is not None and w.max_seconds and now - first[0] >= w.max_seconds:
            ended = "capped"
        elif first is not None and w.stall_seconds and now - last_change >= w.stall_seconds:
            ended = "stalled"
        elif first is None and now - started > START_TIMEOUT:
            raise TimeoutError(f"nothing delivered within {START_TIMEOUT:.0f}s")
        dead_procs = [p for p in w.processes if not p.alive()]
        if dead_procs and not ended:
            raise RuntimeError(f"process exited with {dead_procs[0].proc.returncode}:\n{dead_procs[0].tail()}")
        if ended:
            break
        await asyncio.sleep(POLL)
    assert first is not None
    t0, d0, tok0, cpu0, machine0, pcpu0, req0 = first
    end = last_change if ended == "stalled" else now
    done = s.distinct_keys - d0
    seconds = end - t0
    sample.delivered = s.distinct_keys
    sample.rate = stats.rate(done, seconds)
    sample.steady_rate = stats.steady_rate(points, s.distinct_keys)
    sample.seconds = seconds
    sample.requests, sample.rejected, sample.duplicates = s.requests, s.rejected, s.duplicates
    sample.dead_letters = await w.dead_letters()
    sample.max_in_flight, sample.max_accepted_1s = s.max_in_flight, s.max_accepted_1s
    sample.tokens, sample.max_tokens_60s = s.tokens, s.max_tokens_60s
    sample.tokens_per_minute = stats.rate(s.tokens - tok0, seconds) * 60
    cpu = procstat.total_cpu_seconds(pids) - cpu0
    sample.cpu_us_per_msg = cpu / done * 1e6 if done > 0 else math.nan
    served = s.requests - req0
    sample.provider_cpu_us_per_request = (prov.cpu_seconds() - pcpu0) / served * 1e6 if served > 0 else math.nan
    sample.machine_busy = procstat.busy_fraction(machine0, procstat.machine_cpu())
    sample.ended = ended
    sample.details["series"] = [list(row) for row in s.series]


def start_process(command: list[str], scratch: Path, name: str) -> pipeline.Worker:
    """A contender process (its own session, output to a file), as the bench's Worker."""
    log_path = scratch / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return pipeline.Worker(proc, 0, log_path)


async def run_pipeline_mail(
    cfg: IoConfig,
    rabbit_url: str,
    sample: IoSample,
    scratch: Path,
    *,
    workers: int,
    limits: str | None,
    provider_limit: int | None,
    max_seconds: float,
    stall_seconds: float,
) -> None:
    """The pipeline's worker(s) sending e-mails through the HTTP mailer to the mail provider."""
    base = cfg.base
    await brokers.reset_pipeline(rabbit_url, base.redis_url)
    await brokers.preload_emails(rabbit_url, sample.n, "io")
    store = await pipeline.fresh_store("sqlite" if workers == 1 else "postgres", base, scratch)
    started: list[pipeline.Worker] = []
    sample.details["store"] = store.kind
    sample.details["limits"] = limits
    try:
        args = mail_args(cfg.mail_latency, provider_limit, cfg.retry_after)
        async with (
            provider("mail", args, scratch / f"{sample.contender}-provider.log") as prov,
            stopping(started, sample),
        ):
            extra = {"PIPELINE_MAILER": "http", "PIPELINE_MAILER_URL": prov.url + "/send"}
            if limits is not None:
                extra["PIPELINE_LIMITS"] = limits
            env = pipeline.worker_env(base, store.url, rabbit_url, **extra)
            name = f"{sample.contender}-{sample.round}"
            started.extend(pipeline.start_worker(base, env, scratch, f"{name}-w{i}") for i in range(workers))
            w = Watch(
                started, sample.n, max_seconds, stall_seconds, lambda: brokers.dead_letters(rabbit_url, "email.dlq")
            )
            await watch(prov, w, sample)
            sample.details["peak_rss_mb"] = max(procstat.peak_rss_mb(p.pid) for p in started)
    finally:
        await brokers.after_run(rabbit_url)
        await store.drop()


async def run_llm(cfg: IoConfig, rabbit_url: str, sample: IoSample, scratch: Path, *, limits: str | None) -> None:
    """One worker sending completions through the OpenAI adapter to the model provider, for `llm_seconds`."""
    base = cfg.base
    await brokers.reset_pipeline(rabbit_url, base.redis_url)
    await brokers.preload_completions(rabbit_url, sample.n, cfg.prompt_chars, "io-llm")
    store = await pipeline.fresh_store("sqlite", base, scratch)
    started: list[pipeline.Worker] = []
    sample.details["limits"] = limits
    try:
        args = model_args(cfg.model_latency, cfg.tokens_per_minute, cfg.completion_tokens)
        async with (
            provider("model", args, scratch / f"{sample.contender}-provider.log") as prov,
            stopping(started, sample),
        ):
            extra = {"PIPELINE_LLM": "openai", "PIPELINE_LLM_URL": prov.url + "/v1"}
            if limits is not None:
                extra["PIPELINE_LIMITS"] = limits
            env = pipeline.worker_env(base, store.url, rabbit_url, **extra)
            started.append(pipeline.start_worker(base, env, scratch, f"{sample.contender}-{sample.round}"))
            dlq = f"{brokers.COMPLETION}.dlq"
            w = Watch(started, sample.n, cfg.llm_seconds, 0, lambda: brokers.dead_letters(rabbit_url, dlq))
            await watch(prov, w, sample)
    finally:
        await brokers.after_run(rabbit_url)
        await store.drop()


async def run_faststream(cfg: IoConfig, rabbit_url: str, sample: IoSample, scratch: Path) -> None:
    """The bare FastStream subscriber with an aiohttp session, prefetch as the pipeline's."""
    await brokers.preload_faststream(rabbit_url, sample.n)
    prefetch = pipeline.worker_prefetch()
    sample.details["prefetch"] = prefetch
    started: list[pipeline.Worker] = []
    args = mail_args(cfg.mail_latency, None, cfg.retry_after)
    try:
        async with (
            provider("mail", args, scratch / f"{sample.contender}-provider.log") as prov,
            stopping(started, sample),
        ):
            command = [
                sys.executable, "-m", "bench.io.contenders.faststream_http", "--url", rabbit_url,
                "--queue", brokers.FASTSTREAM_QUEUE, "--mailer-url", prov.url + "/send",
                "--prefetch", str(prefetch), "--loop", loops.resolve(cfg.base.loop),
            ]  # fmt: skip
            proc = start_process(command, scratch, f"{sample.contender}-{sample.round}")
            started.append(proc)
            w = Watch([proc], sample.n, cfg.max_seconds, 0, _none)
            await watch(prov, w, sample)
            sample.details["peak_rss_mb"] = procstat.peak_rss_mb(proc.pid)
    finally:
        await brokers.after_run(rabbit_url)


async def run_client_alone(cfg: IoConfig, rabbit_url: str, sample: IoSample, scratch: Path) -> None:
    """The client side alone: N POSTs through the worker's HTTP session, the worker's prefetch in flight."""
    prefetch = pipeline.worker_prefetch()
    sample.details["concurrency"] = prefetch
    started: list[pipeline.Worker] = []
    args = mail_args(cfg.mail_latency, None, cfg.retry_after)
    async with provider("mail", args, scratch / f"{sample.contender}-provider.log") as prov, stopping(started, sample):
        command = [
            sys.executable, "-m", "bench.io.contenders.client_alone", "--mailer-url", prov.url + "/send",
            "--n", str(sample.n), "--concurrency", str(prefetch), "--loop", loops.resolve(cfg.base.loop),
        ]  # fmt: skip
        proc = start_process(command, scratch, f"{sample.contender}-{sample.round}")
        started.append(proc)
        await watch(prov, Watch([proc], sample.n, cfg.max_seconds, 0, _none), sample)
        sample.details["peak_rss_mb"] = procstat.peak_rss_mb(proc.pid)


async def run_dramatiq(
    cfg: IoConfig,
    rabbit_url: str,
    sample: IoSample,
    scratch: Path,
    *,
    threads: int,
    rate_limit: int,
    provider_limit: int | None,
    max_seconds: float,
    stall_seconds: float,
) -> None:
    """Dramatiq with `threads` threads (and its Redis WindowRateLimiter when `rate_limit`)."""
    await brokers.preload_dramatiq(rabbit_url, sample.n)
    sample.details["threads"] = threads
    sample.details["rate_limit"] = rate_limit
    started: list[pipeline.Worker] = []
    try:
        args = mail_args(cfg.mail_latency, provider_limit, cfg.retry_after)
        async with (
            provider("mail", args, scratch / f"{sample.contender}-provider.log") as prov,
            stopping(started, sample),
        ):
            command = [
                sys.executable, "-m", "bench.io.contenders.dramatiq_http", "--url", rabbit_url,
                "--queue", brokers.DRAMATIQ_QUEUE, "--mailer-url", prov.url + "/send",
                "--threads", str(threads), "--redis-url", cfg.base.redis_url, "--rate-limit", str(rate_limit),
            ]  # fmt: skip
            proc = start_process(command, scratch, f"{sample.contender}-{sample.round}")
            started.append(proc)
            xq = f"{brokers.DRAMATIQ_QUEUE}.XQ"
            w = Watch([proc], sample.n, max_seconds, stall_seconds, lambda: brokers.dead_letters(rabbit_url, xq))
            await watch(prov, w, sample)
            sample.details["peak_rss_mb"] = procstat.peak_rss_mb(proc.pid)
    finally:
        await brokers.after_run(rabbit_url)


@contextlib.asynccontextmanager
async def stopping(processes: list[pipeline.Worker], sample: IoSample) -> AsyncIterator[None]:
    """On the way out, SIGTERM the processes started meanwhile (SIGKILL after 30 s), while the provider
    still answers (stopped first, it would fail their last calls); the stop's duration, the exit codes
    and the logs' tails go in the details (the scratch directory goes away)."""
    try:
        yield
    finally:
        t0 = time.monotonic()
        sample.details["exit_codes"] = list(await asyncio.gather(*(asyncio.to_thread(p.stop) for p in processes)))
        sample.details["stop_seconds"] = round(time.monotonic() - t0, 2)
        lines = int(os.environ.get("BENCH_IO_LOG_LINES", "15"))
        sample.details["log_tails"] = [p.tail(lines=lines) for p in processes]


async def _none() -> int:
    return 0
