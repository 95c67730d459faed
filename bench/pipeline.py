"""The pipeline end to end: fresh stores, worker processes, outcome counting and latency at a fixed rate."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import asyncpg
import httpx2
import redis.asyncio as aioredis
from aiormq.abc import DeliveredMessage
from faststream.rabbit import RabbitBroker
from faststream.redis.parser.binary import BinaryMessageFormatV1

from bench import loops, procstat, stats, workload
from bench.config import ROOT, BenchConfig
from bench.model import StreamReply

EMAIL = "email"  # the pipeline's real command queue and stream (names.EMAIL_QUEUE / EMAIL_STREAM)
EMAIL_GROUP = "email-workers"
TASKS = "tasks"
EVENTS = "events"
EMAIL_SENT = "email.sent"
OUTCOME_PROBE = "bench.outcomes"  # bound to `events` with `email.sent`; counted, consumed for latency


# --- stores -------------------------------------------------------------------------------------


@dataclass
class Store:
    """A fresh event store for one run: a SQLite file in a scratch directory, or a new PostgreSQL database."""

    kind: str
    url: str
    database: str | None = None  # PostgreSQL database to drop afterwards
    admin_url: str | None = None

    async def drop(self) -> None:
        """Remove the PostgreSQL database (SQLite files go with their scratch directory)."""
        if self.database is None or self.admin_url is None:
            return
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()


def asyncpg_url(admin_url: str, database: str) -> str:
    """The SQLAlchemy URL of `database` on the server of a plain `postgresql://` maintenance URL."""
    base, _, _ = admin_url.rpartition("/")
    return base.replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + database


async def fresh_store(kind: str, cfg: BenchConfig, scratch: Path) -> Store:
    """A new, migrated, empty store of that kind (`sqlite` or `postgres`)."""
    from streams.eventstore import schema  # noqa: PLC0415 - the project is imported only where it is used

    if kind == "sqlite":
        path = scratch / f"bench-{uuid.uuid4().hex[:8]}.db"
        store = Store("sqlite", f"sqlite+aiosqlite:///{path}")
    elif kind == "postgres":
        name = f"bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(cfg.postgres_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        store = Store("postgres", asyncpg_url(cfg.postgres_url, name), name, cfg.postgres_url)
    else:
        raise ValueError(f"unknown store {kind!r}")
    await schema.migrate(store.url)  # what `pipeline db upgrade` does, before any worker starts
    return store


# --- workers ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    """One `faststream run streams.app:app` process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """The worker's process id (faststream runs the app in this very process)."""
        return self.proc.pid

    async def wait_ready(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a deadline across many polls
        """Until `/health/ready` answers 200; fails when the process exits first."""
        deadline = time.monotonic() + timeout
        async with httpx2.AsyncClient(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
                with contextlib.suppress(httpx2.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.port}/health/ready")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready within {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def tail(self, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
        """The end of the worker's log (its last `max_bytes` only: at INFO the log holds a line per outcome)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - max_bytes, 0))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL this process group if it does not finish in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)


def worker_env(cfg: BenchConfig, store_url: str, rabbit_url: str, **extra: str) -> dict[str, str]:
    """The worker's environment: bench brokers, the run's store, log mailer, warnings only (unless `extra`
    sets PIPELINE_LOG_LEVEL, as the `-info` contenders do). The worker's stdout and stderr go to a file
    (`start_worker`), so its log lines cost what writing them to a file costs, never a full pipe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(
        {
            "PIPELINE_RABBIT_URL": rabbit_url,
            "PIPELINE_REDIS_URL": cfg.redis_url,
            "PIPELINE_DATABASE_URL": store_url,
            "PIPELINE_MAILER": "log",
            "PIPELINE_LOG_LEVEL": "WARNING",
            "PIPELINE_LOG_FORMAT": "json",
            "PIPELINE_DB_AUTO_UPGRADE": "false",
        }
    )
    # Pipeline settings under test may be passed through as BENCH_PIPELINE_<NAME>=value.
    for key, value in os.environ.items():
        if key.startswith("BENCH_PIPELINE_"):
            env[key.removeprefix("BENCH_")] = value
    env.update(extra)
    return env


def start_worker(cfg: BenchConfig, env: dict[str, str], scratch: Path, name: str) -> Worker:
    """Start a worker with HTTP on a free port, on the benchmark's event loop."""
    port = free_port()
    log_path = scratch / f"{name}.log"
    faststream = Path(sys.executable).parent / "faststream"
    command = [
        str(faststream),
        "run",
        "streams.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        loops.faststream_option(cfg.loop),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Worker(proc, port, log_path)


# --- brokers: empty command queue and stream, preloaded, and their outcomes counted --------------


async def declare_rabbit_topology(rabbit_url: str) -> None:
    """The pipeline's own declarations (exchanges, command, dead-letter and delay queues)."""
    from streams.transport import topology  # noqa: PLC0415

    broker = RabbitBroker(rabbit_url)
    await broker.connect()
    try:
        await topology.declare_rabbit(broker)
    finally:
        await broker.stop()


async def prepare_rabbit(rabbit_url: str, n: int) -> None:
    """Empty `email`, `email.dlq` and the outcome probe, then preload n commands through `tasks`."""
    await declare_rabbit_topology(rabbit_url)
    conn = await aio_pika.connect(rabbit_url)
    try:
        channel = await conn.channel()
        for name in (EMAIL, f"{EMAIL}.dlq"):
            _, consumers = await workload.queue_depth(channel, name)
            if consumers:
                raise RuntimeError(f"queue {name} has {consumers} consumer(s): another worker runs on this vhost")
            await (await channel.declare_queue(name, passive=True)).purge()
        probe = await channel.declare_queue(OUTCOME_PROBE, durable=False, auto_delete=False)
        await probe.bind(EVENTS, routing_key=EMAIL_SENT)
        await probe.purge()
    finally:
        await conn.close()
    if n:
        ids = workload.message_ids("pipe", n)
        await workload.publish_many(rabbit_url, TASKS, EMAIL, ((next(ids), workload.email_body(i)) for i in range(n)))
        await workload.wait_depth(rabbit_url, EMAIL, n)


async def redis_reset(client: aioredis.Redis) -> None:
    """Delete the pipeline's e-mail stream, its dead letters, scheduled retries and `events` (bench db only)."""
    keys: list[Any] = [EMAIL, f"{EMAIL}.dlq", EVENTS]
    keys.extend([k async for k in client.scan_iter(match="{email}:retry*", count=1000)])
    await client.delete(*keys)


async def prepare_redis(redis_url: str, n: int) -> None:
    """Empty stream `email` preloaded with n commands, group `email-workers` from the start, no `events`."""
    client = aioredis.from_url(redis_url)
    try:
        await redis_reset(client)
        if n:
            await workload.preload_redis_stream(client, EMAIL, n, prefix="pipe")
        await client.xgroup_create(EMAIL, EMAIL_GROUP, id="0", mkstream=True)
    finally:
        await client.aclose()


class OutcomeCounter:
    """How many `email.sent` outcomes arrived: the probe queue's depth, or the length of stream `events`."""

    def __init__(self, broker: str, rabbit_url: str, redis_url: str) -> None:
        self.broker = broker
        self.rabbit_url = rabbit_url
        self.redis_url = redis_url
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._redis: aioredis.Redis | None = None

    async def __aenter__(self) -> OutcomeCounter:
        if self.broker == "rabbit":
            self._conn = await aio_pika.connect(self.rabbit_url)
            self._channel = await self._conn.channel()
        else:
            self._redis = aioredis.from_url(self.redis_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def count(self) -> int:
        """Outcomes so far."""
        if self._channel is not None:
            ready, _ = await workload.queue_depth(self._channel, OUTCOME_PROBE)
            return ready
        assert self._redis is not None
        return int(await self._redis.xlen(EVENTS))

    async def dead_letters(self) -> int:
        """Messages in `email.dlq` (all commands are valid: expected 0)."""
        if self._channel is not None:
            ready, _ = await workload.queue_depth(self._channel, f"{EMAIL}.dlq")
            return ready
        assert self._redis is not None
        return int(await self._redis.xlen(f"{EMAIL}.dlq"))


@dataclass
class Drain:
    """A drain seen from outside: when outcomes started and finished arriving, and the workers' CPU."""

    n: int  # preloaded
    first_count: int  # outcomes already there at the first poll that saw any
    last_count: int  # outcomes at the end: n, or fewer when the time cap stopped the measurement
    t_first: float
    t_last: float
    cpu_first: float
    cpu_last: float
    machine_busy: float = math.nan
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def capped(self) -> bool:
        """True when the time cap ended the measurement before all n outcomes arrived."""
        return self.last_count < self.n

    @property
    def seconds(self) -> float:
        """From the first outcome seen to the last."""
        return self.t_last - self.t_first

    @property
    def rate(self) -> float:
        """Outcomes per second between the first poll that saw one and the last poll."""
        return stats.rate(self.last_count - self.first_count, self.seconds)

    @property
    def cpu_us_per_msg(self) -> float:
        """The workers' CPU (user + system) over the drain, per message, in microseconds."""
        done = self.last_count - self.first_count
        return (self.cpu_last - self.cpu_first) / done * 1e6 if done > 0 else math.nan

    @property
    def steady_rate(self) -> float:
        """Rate between 10% and 90% of the outcomes measured."""
        return stats.steady_rate(self.samples, self.last_count)


async def measure_drain(
    count: Callable[[], Awaitable[int]],
    n: int,
    workers: Sequence[Worker],
    give_up_after: float,
    *,
    max_seconds: float = 0.0,
    poll: float = 0.01,
    on_first: Callable[[], None] | None = None,
) -> Drain:
    """Poll the outcome count until n arrived (or `max_seconds` after the first); CPU read at both ends."""
    pids = [w.pid for w in workers]
    deadline = time.monotonic() + give_up_after
    samples: list[tuple[float, int]] = []
    first: tuple[float, int, float, tuple[float, float]] | None = None
    while True:
        done = await count()
        now = time.monotonic()
        samples.append((now, done))
        if first is None and done > 0:
            first = (now, done, procstat.total_cpu_seconds(pids), procstat.machine_cpu())
            if on_first is not None:
                on_first()
        if first is not None and (done >= n or (max_seconds and now - first[0] >= max_seconds)):
            busy = procstat.busy_fraction(first[3], procstat.machine_cpu())
            cpu = procstat.total_cpu_seconds(pids)
            return Drain(n, first[1], min(done, n), first[0], now, first[2], cpu, busy, samples)
        if now > deadline:
            raise TimeoutError(f"{done} of {n} outcomes after {give_up_after}s")
        dead = [w for w in workers if not w.alive()]
        if dead:
            raise RuntimeError(f"worker exited with {dead[0].proc.returncode}:\n{dead[0].tail()}")
        await asyncio.sleep(poll)


async def drop_rest(broker: str, rabbit_url: str, redis_url: str, count: Callable[[], Awaitable[int]]) -> None:
    """After a capped drain: drop the commands not yet delivered, then wait for in-flight ones to settle."""
    if broker == "rabbit":
        conn = await aio_pika.connect(rabbit_url)
        try:
            await (await (await conn.channel()).declare_queue(EMAIL, passive=True)).purge()
        finally:
            await conn.close()
    else:
        client = aioredis.from_url(redis_url)
        try:
            await client.xgroup_setid(EMAIL, EMAIL_GROUP, id="$")  # undelivered entries are skipped
        finally:
            await client.aclose()
    last, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 1.0:
        now = await count()
        if now != last:
            last, still_since = now, time.monotonic()
        await asyncio.sleep(0.1)


# --- latency at a fixed rate ---------------------------------------------------------------------


@dataclass
class Latency:
    """Publish-to-outcome latencies of a fixed-rate phase."""

    rate: float
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    achieved_rate: float
    # The worker(s) during the phase: share of one CPU, and CPU per outcome (batches are small here).
    worker_cpu_share: float = math.nan
    worker_cpu_us_per_msg: float = math.nan


def summarize_latency(
    rate: float, sent: dict[str, float], arrived: dict[str, float], t0: float, warmup: float, t_end: float
) -> Latency:
    """Percentiles over messages sent after the warm-up (pure)."""
    kept = [(arrived[m] - s) * 1000 for m, s in sent.items() if s >= t0 + warmup and m in arrived]
    lost = sum(1 for m, s in sent.items() if s >= t0 + warmup and m not in arrived)
    if lost:
        kept.extend([math.inf] * lost)  # never arrived within the wait: counts as worst
    achieved = stats.rate(len(sent), t_end - t0)
    return Latency(
        rate=rate,
        sent=len(sent),
        received=len(arrived),
        p50_ms=stats.percentile(kept, 50),
        p99_ms=stats.percentile(kept, 99),
        max_ms=max(kept) if kept else math.nan,
        achieved_rate=achieved,
    )


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection in the harness while it timestamps: a full collection of its heap
    (the earlier phases' results, every message id it sent) stopped it for 27-69 ms, three times
    in a 10 s phase, and every message it sent or received meanwhile looked that much slower."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def timed_phase(
    rate: float,
    seconds: float,
    send: Callable[[int], Awaitable[None]],
    sent: dict[str, float],
    arrived: dict[str, float],
) -> tuple[float, float]:
    """Send at `rate` for `seconds`, then wait for every outcome; the phase's start and end of sending."""
    with collector_paused():
        t0 = time.perf_counter()
        t_end = await paced(rate, seconds, send)
        await _await_all(sent, arrived, within=30)
    return t0, t_end


async def paced(rate: float, seconds: float, send: Callable[[int], Awaitable[None]], tick: float = 0.002) -> float:
    """Call `send(i)` for i = 0, 1, ... at `rate` per second for `seconds`; returns the end time."""
    total = max(int(rate * seconds), 1)
    t0 = time.perf_counter()
    i = 0
    while i < total:
        due = min(int((time.perf_counter() - t0) * rate) + 1, total)
        while i < due:
            await send(i)
            i += 1
        await asyncio.sleep(tick)
    return time.perf_counter()


async def latency_rabbit(rabbit_url: str, rate: float, seconds: float, warmup: float) -> Latency:
    """Publish commands at `rate` to `tasks`/`email`; time each until its `email.sent` reaches the probe.

    On plain aiormq, both ways (no aio-pika `Message` and `IncomingMessage` per message): on two
    cores the harness competes with the worker and the broker for CPU, and with aio-pika it took
    about half a core at 2,200 msg/s, as much as RabbitMQ, which showed up as worker latency.
    """
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    conn = await aiormq.connect(rabbit_url)
    try:
        channel = await conn.channel(publisher_confirms=False)
        await channel.queue_declare(OUTCOME_PROBE, passive=True)
        await channel.queue_purge(OUTCOME_PROBE)
        listen = await conn.channel()

        async def on_outcome(message: DeliveredMessage) -> None:
            mid = (message.header.properties.headers or {}).get("message-id")
            if isinstance(mid, bytes):
                mid = mid.decode()
            if isinstance(mid, str):
                arrived.setdefault(mid, time.perf_counter())

        consuming = await listen.basic_consume(OUTCOME_PROBE, on_outcome, no_ack=True)
        run = uuid.uuid4().hex[:8]

        async def send(i: int) -> None:
            mid = f"lat-{run}-{i}"
            properties = aiormq.spec.Basic.Properties(
                message_id=mid, correlation_id=mid, content_type="application/json", delivery_mode=2
            )
            sent[mid] = time.perf_counter()
            body = workload.email_body(i)
            await channel.basic_publish(body, exchange=TASKS, routing_key=EMAIL, properties=properties)

        t0, t_end = await timed_phase(rate, seconds, send, sent, arrived)
        assert consuming.consumer_tag is not None
        await listen.basic_cancel(consuming.consumer_tag)
        return summarize_latency(rate, sent, arrived, t0, warmup, t_end)
    finally:
        await conn.close()


async def latency_redis(redis_url: str, rate: float, seconds: float, warmup: float) -> Latency:
    """XADD commands at `rate` to stream `email`; time each until its `email.sent` is in stream `events`."""
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    client = aioredis.from_url(redis_url)
    reader = aioredis.from_url(redis_url)
    stop = asyncio.Event()
    try:
        info = await client.xinfo_stream(EVENTS) if await client.exists(EVENTS) else None
        last: Any = info["last-generated-id"] if info else b"0-0"

        async def read() -> None:
            nonlocal last
            while not stop.is_set():
                reply: StreamReply = await reader.xread({EVENTS: last}, count=1000, block=100)  # type: ignore[assignment]
                now = time.perf_counter()
                for _name, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        _body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
                        mid = headers.get("message-id")
                        if isinstance(mid, str):
                            arrived.setdefault(mid, now)

        reading = asyncio.create_task(read())
        run = uuid.uuid4().hex[:8]

        async def send(i: int) -> None:
            mid = f"lat-{run}-{i}"
            entry = await workload.redis_entry(workload.email_body(i), mid)
            sent[mid] = time.perf_counter()
            await client.xadd(EMAIL, entry)  # type: ignore[arg-type]

        t0, t_end = await timed_phase(rate, seconds, send, sent, arrived)
        stop.set()
        await reading
        return summarize_latency(rate, sent, arrived, t0, warmup, t_end)
    finally:
        stop.set()
        await client.aclose()
        await reader.aclose()


async def _await_all(sent: dict[str, float], arrived: dict[str, float], within: float) -> None:
    """Until every sent command's outcome arrived (filled in by the listener), or `within` seconds."""
    deadline = time.monotonic() + within
    while len(arrived.keys() & sent.keys()) < len(sent) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def worker_prefetch() -> int:
    """The RabbitMQ prefetch the bench's workers run with (their default, or BENCH_PIPELINE_RABBIT_PREFETCH)."""
    from streams.core.settings import Settings  # noqa: PLC0415 - the project is imported only where it is used

    default = int(Settings.model_fields["rabbit_prefetch"].default)
    return int(os.environ.get("BENCH_PIPELINE_RABBIT_PREFETCH", default))


async def echo_latency(cfg: BenchConfig, rabbit_url: str, rate: float, prefetch: int) -> Latency:
    """Latency at `rate` through the pipeline's queue and exchanges with an echo consumer in the
    worker's place (`bench.contenders.rabbit_echo`): what the broker and the machine cost alone."""
    command = [
        sys.executable,
        "-m",
        "bench.contenders.rabbit_echo",
        "--url",
        rabbit_url,
        "--prefetch",
        str(prefetch),
        "--loop",
        loops.resolve(cfg.loop),
    ]
    proc = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"echo consumer did not start: {line!r}")
        return await latency_rabbit(rabbit_url, rate, cfg.latency_seconds, cfg.latency_warmup)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# --- one pipeline run -----------------------------------------------------------------------------


@dataclass
class PipelineResult:
    """What one pipeline run measured."""

    drain: Drain
    peak_rss_mb: float
    dead_letters: int
    latency: Latency | None
    workers: int
    logs: list[str]


@contextlib.asynccontextmanager
async def scratch_dir() -> AsyncIterator[Path]:
    """A temporary directory for stores and logs, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        yield Path(tmp)


async def run_pipeline(
    cfg: BenchConfig,
    rabbit_url: str,
    broker: str,
    store_kind: str,
    n: int,
    *,
    workers: int = 1,
    latency: bool = True,
    max_seconds: float | None = None,
    on_first: Callable[[list[Worker]], None] | None = None,
    on_drained: Callable[[], None] | None = None,
    log_level: str | None = None,
) -> PipelineResult:
    """Preload n commands, start the worker(s), measure the drain, then latency at half that rate.

    `log_level`: the workers' PIPELINE_LOG_LEVEL; None keeps worker_env's WARNING (or BENCH_PIPELINE_LOG_LEVEL).
    """
    async with scratch_dir() as scratch:
        store = await fresh_store(store_kind, cfg, scratch)
        started: list[Worker] = []
        try:
            if broker == "rabbit":
                await prepare_rabbit(rabbit_url, n)
            else:
                await prepare_redis(cfg.redis_url, n)
            async with OutcomeCounter(broker, rabbit_url, cfg.redis_url) as counter:
                extra = {"PIPELINE_LOG_LEVEL": log_level} if log_level is not None else {}
                env = worker_env(cfg, store.url, rabbit_url, **extra)
                started.extend(start_worker(cfg, env, scratch, f"worker{i}") for i in range(workers))
                drain = await measure_drain(
                    counter.count,
                    n,
                    started,
                    cfg.timeout,
                    max_seconds=max_seconds if max_seconds is not None else cfg.max_drain_seconds,
                    on_first=(lambda: on_first(started)) if on_first is not None else None,
                )
                if on_drained is not None:
                    on_drained()
                if drain.capped:
                    await drop_rest(broker, rabbit_url, cfg.redis_url, counter.count)
                dead = await counter.dead_letters()
            lat: Latency | None = None
            if latency and cfg.latency_seconds > 0 and not math.isnan(drain.rate):
                for w in started:
                    await w.wait_ready()
                rate = drain.rate / 2
                pids = [w.pid for w in started]
                cpu0, t0 = procstat.total_cpu_seconds(pids), time.monotonic()
                if broker == "rabbit":
                    lat = await latency_rabbit(rabbit_url, rate, cfg.latency_seconds, cfg.latency_warmup)
                else:
                    lat = await latency_redis(cfg.redis_url, rate, cfg.latency_seconds, cfg.latency_warmup)
                cpu, seconds = procstat.total_cpu_seconds(pids) - cpu0, time.monotonic() - t0
                lat.worker_cpu_share = cpu / seconds if seconds > 0 else math.nan
                lat.worker_cpu_us_per_msg = cpu / lat.received * 1e6 if lat.received else math.nan
            peak = max(procstat.peak_rss_mb(w.pid) for w in started)
            return PipelineResult(drain, peak, dead, lat, workers, [w.tail() for w in started])
        finally:
            for w in started:
                w.stop()
            await store.drop()


def describe(result: PipelineResult) -> dict[str, Any]:
    """JSON-ready details of a pipeline run."""
    lat = result.latency
    return {
        "handled": result.drain.last_count - result.drain.first_count,
        "capped": result.drain.capped,
        "machine_busy": result.drain.machine_busy,
        "first_count": result.drain.first_count,
        "steady_rate": result.drain.steady_rate,
        "dead_letters": result.dead_letters,
        "latency": json.loads(json.dumps(lat.__dict__, default=str)) if lat else None,
    }
