"""`make bench`: every contender, side by side, in interleaved rounds; writes bench/results/."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import asyncpg
import redis.asyncio as aioredis

from bench import loops, pipeline, procstat, report, workload
from bench.config import ROOT, BenchConfig
from bench.contenders import handrolled, meter
from bench.model import Sample

BARE: dict[str, tuple[str, str, str]] = {
    # The contenders that time themselves in-process (bench/contenders/meter.py): the bare ones and
    # the hand-rolled ones. key: (module, broker, queue or stream)
    "rabbit-aiopika": ("bench.contenders.rabbit_aiopika", "rabbit", "bench.aiopika"),
    "rabbit-faststream": ("bench.contenders.rabbit_faststream", "rabbit", "bench.faststream"),
    "rabbit-dramatiq": ("bench.contenders.rabbit_dramatiq", "rabbit", "bench_dramatiq"),
    "rabbit-handrolled": ("bench.contenders.rabbit_handrolled", "rabbit", "bench.handrolled"),
    "redis-raw": ("bench.contenders.redis_raw", "redis", "bench.raw"),
    "redis-faststream": ("bench.contenders.redis_faststream", "redis", "bench.faststream"),
    "redis-handrolled": ("bench.contenders.redis_handrolled", "redis", "bench.handrolled"),
}
HANDROLLED = ("rabbit-handrolled", "redis-handrolled")
PIPELINES: dict[str, tuple[str, str]] = {
    # key: (broker, store)
    "rabbit-pipeline-sqlite": ("rabbit", "sqlite"),
    "rabbit-pipeline-sqlite-info": ("rabbit", "sqlite"),
    "rabbit-pipeline-postgres": ("rabbit", "postgres"),
    "redis-pipeline-sqlite": ("redis", "sqlite"),
    "redis-pipeline-sqlite-info": ("redis", "sqlite"),
}
# The pipelines whose worker runs at another PIPELINE_LOG_LEVEL than the bench's WARNING: the default
# INFO, one JSON line per outcome (issue 18: at least 0.85x the same worker at WARNING).
PIPELINE_LOG_LEVELS: dict[str, str] = {
    "rabbit-pipeline-sqlite-info": "INFO",
    "redis-pipeline-sqlite-info": "INFO",
}
GROUP = "bench"
T = TypeVar("T")


def log(text: str) -> None:
    """Progress on stderr, time-stamped."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def wait_quiet(cfg: BenchConfig) -> float:
    """Wait (at most `quiet_wait` s) until the machine was at most `quiet_busy` busy for a second; returns that."""
    deadline = time.monotonic() + cfg.quiet_wait
    while True:
        before = procstat.machine_cpu()
        await asyncio.sleep(1.0)
        busy = procstat.busy_fraction(before, procstat.machine_cpu())
        if busy <= cfg.quiet_busy or time.monotonic() >= deadline:
            return busy


def round_order(contenders: Sequence[T], round_index: int) -> list[T]:
    """Each round starts one contender later, so none always runs first or right after a heavy one."""
    if not contenders:
        return []
    shift = round_index % len(contenders)
    return [*contenders[shift:], *contenders[:shift]]


# --- bare contenders ------------------------------------------------------------------------------


async def preload_bare(key: str, cfg: BenchConfig, rabbit_url: str, n: int) -> None:
    """Fill the contender's own queue or stream with exactly n commands."""
    _module, broker, name = BARE[key]
    if key == "rabbit-dramatiq":
        from bench.contenders import rabbit_dramatiq  # noqa: PLC0415 - imports dramatiq only when used

        await asyncio.to_thread(rabbit_dramatiq.declare, rabbit_url, name)
        ids = list(workload.message_ids("dramatiq", n))
        bodies = ((ids[i], rabbit_dramatiq.encode(name, workload.email_payload(i), ids[i])) for i in range(n))
        await workload.publish_many(rabbit_url, "", name, bodies)
        await workload.wait_depth(rabbit_url, name, n)
    elif broker == "rabbit":
        await workload.preload_rabbit_queue(rabbit_url, name, n, cfg.queue_type)
        if key in HANDROLLED:
            await reset_handrolled_outcomes(rabbit_url)
    else:
        client = aioredis.from_url(cfg.redis_url)
        try:
            await workload.reset_redis_stream(client, name, GROUP, n)
            if key in HANDROLLED:
                await client.delete(handrolled.REDIS_STREAM)
        finally:
            await client.aclose()


async def reset_handrolled_outcomes(rabbit_url: str) -> None:
    """The hand-rolled contender's outcome exchange, and an empty queue bound to it to count them by."""
    conn = await aio_pika.connect(rabbit_url)
    try:
        channel = await conn.channel()
        exchange = await channel.declare_exchange(handrolled.RABBIT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(handrolled.RABBIT_OUTCOMES, durable=False, auto_delete=False)
        await queue.bind(exchange, routing_key=handrolled.EMAIL_SENT)
        await queue.purge()
    finally:
        await conn.close()


async def handrolled_outcomes(key: str, cfg: BenchConfig, rabbit_url: str) -> int:
    """How many outcomes the hand-rolled contender published in its run (then dropped)."""
    if key == "rabbit-handrolled":
        conn = await aio_pika.connect(rabbit_url)
        try:
            channel = await conn.channel()
            queue = await channel.declare_queue(handrolled.RABBIT_OUTCOMES, passive=True)
            ready = int(queue.declaration_result.message_count or 0)
            await queue.purge()
        finally:
            await conn.close()
        return ready
    client = aioredis.from_url(cfg.redis_url)
    try:
        length = int(await client.xlen(handrolled.REDIS_STREAM))
        await client.delete(handrolled.REDIS_STREAM)
    finally:
        await client.aclose()
    return length


async def run_bare(key: str, cfg: BenchConfig, rabbit_url: str, round_no: int, scratch: Path, n: int) -> Sample:
    """Preload, run the contender in its own process until it handled n messages, read its report."""
    module, broker, name = BARE[key]
    await preload_bare(key, cfg, rabbit_url, n)
    out = scratch / f"{key}-{round_no}.json"
    command = [
        sys.executable,
        "-m",
        module,
        "--url",
        rabbit_url if broker == "rabbit" else cfg.redis_url,
        "--name",
        name,
        "--n",
        str(n),
        "--out",
        str(out),
        "--loop",
        loops.resolve(cfg.loop),
        "--prefetch",
        str(cfg.prefetch),
        "--count",
        str(cfg.redis_count),
        "--group",
        GROUP,
        "--threads",
        str(cfg.dramatiq_threads),
        "--queue-type",
        cfg.queue_type,
        "--max-seconds",
        str(cfg.max_drain_seconds),
        "--sqlite",
        cfg.handrolled_sqlite,
    ]
    log_path = scratch / f"{key}-{round_no}.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            code = await asyncio.wait_for(proc.wait(), cfg.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TimeoutError(f"{key} did not drain {n} messages within {cfg.timeout}s") from None
    if code != 0 or not out.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{key} exited with {code}:\n{tail}")
    m = meter.read(out)
    seconds = m.t_last - m.t_first
    intervals = m.handled - 1
    details: dict[str, Any] = {
        "invalid": m.invalid,
        "cpu_from_start_us_per_msg": (m.cpu_last - m.cpu_start) / m.handled * 1e6,
    }
    if key in HANDROLLED:
        outcomes = await handrolled_outcomes(key, cfg, rabbit_url)
        if outcomes < m.handled:
            raise RuntimeError(f"{key} handled {m.handled} messages but published {outcomes} outcomes")
        details["outcomes"] = outcomes
        details["sqlite"] = cfg.handrolled_sqlite
    return Sample(
        contender=key,
        round=round_no,
        n=n,
        drain_rate=intervals / seconds if seconds > 0 else math.nan,
        cpu_us_per_msg=(m.cpu_last - m.cpu_first) / intervals * 1e6 if intervals > 0 else math.nan,
        peak_rss_mb=m.peak_rss_mb,
        seconds=seconds,
        handled=m.handled,
        machine_busy=m.machine_busy,
        details=details,
    )


# --- pipelines ------------------------------------------------------------------------------------


async def run_pipeline_sample(key: str, cfg: BenchConfig, rabbit_url: str, round_no: int, n: int) -> Sample:
    """The pipeline end to end on one broker and store: drain, then latency at half the drain rate."""
    broker, store = PIPELINES[key]
    log_level = PIPELINE_LOG_LEVELS.get(key)
    result = await pipeline.run_pipeline(cfg, rabbit_url, broker, store, n, log_level=log_level)
    lat = result.latency
    details = pipeline.describe(result)
    details["log_level"] = log_level or os.environ.get("BENCH_PIPELINE_LOG_LEVEL", "WARNING")
    if broker == "rabbit" and lat is not None:
        # The same rate with an echo consumer in the worker's place, right after it stopped.
        echo = await pipeline.echo_latency(cfg, rabbit_url, lat.rate, pipeline.worker_prefetch())
        details["echo"] = {"p50_ms": echo.p50_ms, "p99_ms": echo.p99_ms, "max_ms": echo.max_ms}
    return Sample(
        contender=key,
        round=round_no,
        n=n,
        drain_rate=result.drain.rate,
        cpu_us_per_msg=result.drain.cpu_us_per_msg,
        peak_rss_mb=result.peak_rss_mb,
        seconds=result.drain.seconds,
        handled=result.drain.last_count,
        machine_busy=result.drain.machine_busy,
        latency_p50_ms=lat.p50_ms if lat else None,
        latency_p99_ms=lat.p99_ms if lat else None,
        latency_max_ms=lat.max_ms if lat else None,
        latency_rate=lat.rate if lat else None,
        details=details,
    )


# --- the run --------------------------------------------------------------------------------------


async def run_all(cfg: BenchConfig, progress: Callable[[str], None] = log) -> tuple[list[Sample], dict[str, Any]]:
    """Every selected contender, `cfg.rounds` times, interleaved."""
    rabbit_url = await workload.ensure_vhost(cfg.rabbit_url)
    samples: list[Sample] = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        import tempfile  # noqa: PLC0415

        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-run-")))
        for r in range(cfg.rounds):
            for key in round_order(cfg.contenders, r):
                busy = await wait_quiet(cfg)
                progress(f"round {r + 1}/{cfg.rounds}: {key} (N={cfg.n}; machine {busy:.0%} busy before)")
                try:
                    if key in BARE:
                        sample = await run_bare(key, cfg, rabbit_url, r + 1, scratch, cfg.n)
                    else:
                        sample = await run_pipeline_sample(key, cfg, rabbit_url, r + 1, cfg.n)
                except Exception as exc:
                    progress(f"  failed: {exc!r}")
                    sample = Sample(contender=key, round=r + 1, n=cfg.n, error=repr(exc)[:2000])
                else:
                    lat = f", p99 {sample.latency_p99_ms:.1f} ms" if sample.latency_p99_ms is not None else ""
                    progress(
                        f"  {sample.drain_rate:,.0f} msg/s over {sample.handled} messages, "
                        f"{sample.cpu_us_per_msg:,.0f} µs CPU/msg, {sample.peak_rss_mb:.0f} MB{lat}, "
                        f"machine {sample.machine_busy:.0%} busy"
                    )
                sample.details["busy_before"] = busy
                samples.append(sample)
    meta = await describe_run(cfg, rabbit_url, time.monotonic() - started)
    return samples, meta


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


async def server_versions(cfg: BenchConfig, rabbit_url: str) -> dict[str, str]:
    """RabbitMQ, Redis and PostgreSQL server versions (best effort)."""
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(rabbit_url)
        props = conn.transport.connection.server_properties if conn.transport else {}
        found["RabbitMQ"] = str(props.get("version", "?"))
        await conn.close()
    with contextlib.suppress(Exception):
        client = aioredis.from_url(cfg.redis_url)
        found["Redis"] = str((await client.info("server"))["redis_version"])
        await client.aclose()
    with contextlib.suppress(Exception):
        pg = await asyncpg.connect(cfg.postgres_url)
        found["PostgreSQL"] = str(await pg.fetchval("SHOW server_version"))
        await pg.close()
    return found


async def describe_run(cfg: BenchConfig, rabbit_url: str, seconds: float) -> dict[str, Any]:
    """Metadata written beside the numbers."""
    versions = {"Python": platform.python_version()}
    for dist in ("faststream", "aio-pika", "redis", "dramatiq", "pydantic", "sqlalchemy", "aiosqlite", "asyncpg"):
        versions[dist] = _version(dist)
    if loops.resolve(cfg.loop) == "uvloop":
        versions["uvloop"] = _version("uvloop")
    versions.update(await server_versions(cfg, rabbit_url))
    with contextlib.suppress(Exception):
        import dramatiq  # noqa: PLC0415

        from bench.contenders.rabbit_dramatiq import make_broker  # noqa: PLC0415

        dramatiq_middleware = [type(m).__name__ for m in make_broker(rabbit_url, "bench_probe", None, None).middleware]
        dramatiq.get_broker().close()
    env_knobs = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
    return {
        "command": "make bench" + "".join(f" {k}={v}" for k, v in sorted(env_knobs.items())),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "n": cfg.n,
        "rounds": cfg.rounds,
        "loop": loops.resolve(cfg.loop),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "seconds": round(seconds, 1),
        "rabbit_url": rabbit_url.replace("guest:guest", "guest:***"),
        "redis_url": cfg.redis_url,
        "prefetch": cfg.prefetch,
        "redis_count": cfg.redis_count,
        "queue_type": cfg.queue_type,
        "dramatiq_threads": cfg.dramatiq_threads,
        "handrolled_sqlite": cfg.handrolled_sqlite,
        "dramatiq_middleware": locals().get("dramatiq_middleware", []),
        "latency_seconds": cfg.latency_seconds,
        "max_drain_seconds": cfg.max_drain_seconds,
        "latency_warmup": cfg.latency_warmup,
        "versions": versions,
        "notes": notes(cfg),
    }


def notes(cfg: BenchConfig) -> list[str]:
    """How to read the table."""
    return [
        "Drain rate: messages handled between the first and the last one, over that time. Bare contenders "
        "time themselves in-process; the pipeline is timed from outside by polling its outcomes every 10 ms "
        "(depth of a probe queue bound to `events`/`email.sent`, or XLEN of stream `events`), so its rate "
        "includes the outbox relay up to the outcome publish.",
        "CPU µs/msg: user + system CPU of the consumer process (all threads; /proc/<pid>/stat) over the same "
        "interval, divided by the messages in it. Broker and database server CPU is not included.",
        "Peak RSS: VmHWM of the consumer process at the end of its run (the pipeline: after the latency phase).",
        f"Latency: commands published at a fixed rate (half that round's drain rate) for {cfg.latency_seconds:g} s; "
        f"publish call to outcome arrival, first {cfg.latency_warmup:g} s left out.",
        f"Queues: the bare RabbitMQ contenders read their own {cfg.queue_type} queue (prefetch {cfg.prefetch}); "
        "Dramatiq reads the classic queue it declares itself (prefetch = 2 x threads, its default); the pipeline "
        "reads its real quorum queue `email` (PIPELINE_RABBIT_PREFETCH default). Redis: (e) and (f) read "
        f"{cfg.redis_count} entries per XREADGROUP; the pipeline uses its own defaults.",
        "Every run is its own process on the same event loop; the worker is `faststream run streams.app:app` "
        "with PIPELINE_MAILER=log and PIPELINE_LOG_LEVEL=WARNING (the `-info` pipelines: INFO, the default, one "
        "JSON line per outcome; the worker's stdout and stderr go to a file), a fresh SQLite file or PostgreSQL "
        "database.",
        "Hand-rolled (h), (i): a FastStream subscriber (as (b), (f)) whose handler does the pipeline's job one "
        "message at a time: one SQLAlchemy AsyncSession transaction on a fresh SQLite file (inbox check, event "
        "row, outbox row), the `email.sent` outcome through a FastStream publisher (persistent; on RabbitMQ "
        "awaited until confirmed), the outbox row marked in a second transaction. Timed in-process like the bare "
        "contenders, up to the last outbox mark. SQLite: "
        + (
            "journal_mode=WAL, synchronous=NORMAL (the pipeline's own settings)."
            if cfg.handrolled_sqlite == "wal"
            else "SQLite's defaults (rollback journal, synchronous=FULL)."
        ),
    ]


def main(cfg: BenchConfig) -> int:
    """Run, write the results, print where they are."""
    cfg.validate()
    samples, meta = loops.run(run_all(cfg), cfg.loop)
    written = report.write(samples, meta, cfg.results)
    print(report.render_markdown(samples, meta))
    for path in written:
        log(f"wrote {path}")
    return 1 if all(s.error is not None for s in samples) else 0
