"""`make bench-scale`: throughput with 1, 2 and 3 workers; append rate on a 1M-event store; rebuild time.

Several workers share one PostgreSQL store (several workers on one SQLite file are not a
supported deployment). The store figures use `streams.eventstore.store.EventStore` and `Commit` directly,
in this process, on a store preloaded with bulk INSERTs (not through commits).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import loops, pipeline, procstat, stats, workload
from bench.config import ROOT, BenchConfig
from bench.runner import log, round_order, wait_quiet

PRELOAD_CHUNK = 50_000


# --- workers --------------------------------------------------------------------------------------


@dataclass
class WorkerSample:
    """k workers draining one preloaded queue together."""

    workers: int
    round: int
    rate: float
    steady_rate: float
    cpu_us_per_msg: float
    handled: int
    machine_busy: float
    peak_rss_mb: float
    error: str | None = None


async def scale_workers(cfg: BenchConfig, rabbit_url: str) -> list[WorkerSample]:
    """Throughput of 1, 2, 3 workers on RabbitMQ with a PostgreSQL store, interleaved rounds."""
    found: list[WorkerSample] = []
    for r in range(cfg.scale_rounds):
        for k in round_order(list(cfg.scale_workers), r):
            await wait_quiet(cfg)
            log(f"scale round {r + 1}/{cfg.scale_rounds}: {k} worker(s), N={cfg.scale_n}")
            try:
                result = await pipeline.run_pipeline(
                    cfg, rabbit_url, "rabbit", "postgres", cfg.scale_n, workers=k, latency=False
                )
            except Exception as exc:
                log(f"  failed: {exc!r}")
                found.append(WorkerSample(k, r + 1, math.nan, math.nan, math.nan, 0, math.nan, math.nan, repr(exc)))
                continue
            d = result.drain
            found.append(
                WorkerSample(
                    k,
                    r + 1,
                    d.rate,
                    d.steady_rate,
                    d.cpu_us_per_msg,
                    d.last_count - d.first_count,
                    d.machine_busy,
                    result.peak_rss_mb,
                )
            )
            log(f"  {d.rate:,.0f} msg/s (steady {d.steady_rate:,.0f}), {d.cpu_us_per_msg:,.0f} µs CPU/msg")
    return found


# --- the store ------------------------------------------------------------------------------------


def preload_rows(start: int, stop: int, now: dt.datetime) -> dict[str, list[dict[str, Any]]]:
    """Rows of `stop - start` e-mails that were sent: event, inbox entry, projection row, published outbox row."""
    rows: dict[str, list[dict[str, Any]]] = {"events": [], "inbox": [], "email_log": [], "outbox": []}
    for i in range(start, stop):
        mid = f"pre-{i:09d}"
        event_id = str(uuid.UUID(int=i + 1))
        to = f"user{i}@example.com"
        data = {
            "event_id": event_id,
            "occurred_at": now.isoformat(),
            "message_id": mid,
            "correlation_id": mid,
            "type": "email.sent",
            "to": to,
            "subject": f"Welcome #{i}",
            "provider_id": f"log-{mid}",
        }
        meta = {"message_id": mid, "correlation_id": mid, "causation_id": mid, "attempt": 1, "source": "rabbit:email"}
        rows["events"].append(
            {
                "stream_id": f"email-{mid}",
                "version": 1,
                "event_id": event_id,
                "type": "email.sent",
                "data": data,
                "metadata": meta,
                "recorded_at": now,
            }
        )
        rows["inbox"].append({"consumer": "email", "message_id": mid, "recorded_at": now})
        rows["email_log"].append(
            {
                "message_id": mid,
                "recipient": to,
                "subject": f"Welcome #{i}",
                "status": "sent",
                "attempts": 1,
                "provider_id": f"log-{mid}",
                "reason": None,
                "position": i + 1,
                "updated_at": now,
            }
        )
        rows["outbox"].append(
            {
                "event_id": event_id,
                "transport": "rabbit",
                "event_type": "email.sent",
                "payload": json.dumps(data).encode(),
                "message_id": mid,
                "correlation_id": mid,
                "owner": "preload",
                "created_at": now,
                "published_at": now,
            }
        )
    return rows


def _fast_sqlite(dbapi_conn: Any, _: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=OFF")
    cursor.close()


async def preload_store(url: str, count: int, tables: tuple[str, ...]) -> float:
    """Bulk INSERT `count` sent e-mails into the tables (executemany, big chunks); returns seconds."""
    from streams.eventstore import tables as schema_tables  # noqa: PLC0415

    engine = create_async_engine(url)
    if engine.dialect.name == "sqlite":
        sa_event.listen(engine.sync_engine, "connect", _fast_sqlite)
    started = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    try:
        for start in range(0, count, PRELOAD_CHUNK):
            rows = preload_rows(start, min(start + PRELOAD_CHUNK, count), now)
            async with engine.begin() as conn:
                for name in tables:
                    await conn.execute(insert(schema_tables.metadata.tables[name]), rows[name])
            if start and start % (PRELOAD_CHUNK * 4) == 0:
                log(f"  preloaded {start:,} of {count:,}")
        if engine.dialect.name == "postgresql":
            async with engine.connect() as conn:
                await conn.execute(text("COMMIT"))
                for name in tables:
                    await conn.execute(text(f"ANALYZE {name}"))  # what autovacuum does on a real store
    finally:
        await engine.dispose()
    return time.monotonic() - started


def commits(m: int, tag: str) -> Iterator[Any]:
    """m commits as the pipeline makes them for `SendEmail`: one `EmailSent`, inbox entry, outbox row."""
    from schemas import EmailSent  # noqa: PLC0415
    from streams.core.envelope import Envelope  # noqa: PLC0415
    from streams.eventstore.store import Commit  # noqa: PLC0415

    for i in range(m):
        mid = f"app-{tag}-{i}"
        env = Envelope(transport="rabbit", source="email", message_id=mid, correlation_id=mid, body=b"{}")
        ev = EmailSent(message_id=mid, correlation_id=mid, to=f"user{i}@example.com", subject="Hi", provider_id=None)
        yield Commit(f"email-{mid}", [ev], env, consumer="email")


@dataclass
class AppendSample:
    """One timed batch of commits against one store."""

    backend: str
    store: str  # empty | full
    round: int
    events_before: int
    commits: int
    rate: float
    cpu_us_per_commit: float
    batches: int


async def append_trial(url: str, backend: str, label: str, m: int, concurrency: int, round_no: int) -> AppendSample:
    """Time m commits through `EventStore.commit` from `concurrency` concurrent tasks (group commit on)."""
    from streams.eventstore.store import EventStore  # noqa: PLC0415
    from streams.eventstore.tables import events  # noqa: PLC0415

    store = EventStore(url, owner="bench")
    await store.start(create=False)
    try:
        async with store.engine.connect() as conn:
            before = int(await conn.scalar(select(func.count()).select_from(events)) or 0)
        units = list(commits(m, uuid.uuid4().hex[:8]))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for unit in units:
            queue.put_nowait(unit)

        async def writer() -> None:
            while not queue.empty():
                await store.commit(queue.get_nowait())

        batches_before = store.committer.batches
        cpu0, t0 = procstat.cpu_seconds(), time.monotonic()
        await asyncio.gather(*(writer() for _ in range(concurrency)))
        seconds, cpu = time.monotonic() - t0, procstat.cpu_seconds() - cpu0
        return AppendSample(
            backend,
            label,
            round_no,
            before,
            m,
            stats.rate(m, seconds),
            cpu / m * 1e6,
            store.committer.batches - batches_before,
        )
    finally:
        await store.close()


@dataclass
class RebuildSample:
    """`pipeline projections rebuild` on the full store."""

    backend: str
    events: int
    direct_seconds: float
    cli_seconds: float | None
    cli_output: str = ""


async def rebuild_direct(url: str) -> tuple[float, int]:
    """`streams.eventstore.projections.rebuild(engine)` in this process; (seconds, events read)."""
    from streams.eventstore import projections  # noqa: PLC0415

    engine: AsyncEngine = create_async_engine(url)
    try:
        started = time.monotonic()
        seen, _tasks, _emails = await projections.rebuild(engine)
        return time.monotonic() - started, seen
    finally:
        await engine.dispose()


def rebuild_cli(url: str) -> tuple[float | None, str]:
    """`pipeline projections rebuild` as an operator runs it; wall time including start-up, or None if it failed."""
    cli = Path(sys.executable).parent / "pipeline"
    env = {**os.environ, "PIPELINE_DATABASE_URL": url}
    started = time.monotonic()
    done = subprocess.run(
        [str(cli), "projections", "rebuild"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    seconds = time.monotonic() - started
    output = (done.stdout + done.stderr).strip()[-500:]
    return (seconds if done.returncode == 0 else None), output


@dataclass
class StoreResults:
    """The store figures of one backend."""

    backend: str
    preload_events: int
    preload_seconds: float
    appends: list[AppendSample] = field(default_factory=list)
    rebuild: RebuildSample | None = None


async def scale_store(cfg: BenchConfig, backend: str) -> StoreResults:
    """Append rate on an empty and on a preloaded store (interleaved trials), then rebuild time."""
    async with pipeline.scratch_dir() as scratch:
        empty = await pipeline.fresh_store(backend, cfg, scratch)
        full = await pipeline.fresh_store(backend, cfg, scratch)
        try:
            log(f"{backend}: preloading {cfg.store_events:,} sent e-mails into {', '.join(cfg.store_tables)}")
            seconds = await preload_store(full.url, cfg.store_events, cfg.store_tables)
            log(f"  preloaded in {seconds:.0f} s")
            found = StoreResults(backend, cfg.store_events, seconds)
            stores = {"empty": empty.url, "full": full.url}
            for r in range(cfg.append_rounds):
                for label in round_order(["empty", "full"], r):
                    await wait_quiet(cfg)
                    sample = await append_trial(
                        stores[label], backend, label, cfg.append_commits, cfg.append_concurrency, r + 1
                    )
                    log(
                        f"  append {label} ({sample.events_before:,} events): {sample.rate:,.0f} commits/s, "
                        f"{sample.cpu_us_per_commit:,.0f} µs CPU/commit, {sample.batches} transactions"
                    )
                    found.appends.append(sample)
            await wait_quiet(cfg)
            direct, seen = await rebuild_direct(full.url)
            log(f"  rebuild (direct): {seen:,} events in {direct:.1f} s")
            cli, output = rebuild_cli(full.url)
            log(f"  rebuild (CLI): {cli if cli is None else round(cli, 1)} s: {output[-200:]}")
            found.rebuild = RebuildSample(backend, seen, direct, cli, output)
            return found
        finally:
            await empty.drop()
            await full.drop()


# --- report ---------------------------------------------------------------------------------------


def render(workers: list[WorkerSample], stores: list[StoreResults], meta: dict[str, Any]) -> str:
    """scale.md."""
    lines = [
        "# Scaling figures",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}, {meta['cpus']} CPUs, loop `{meta['loop']}`.",
        "",
    ]
    for part, key in (("worker figures", "workers_from"), ("store figures", "stores_from")):
        if meta.get(key):
            lines += [f"The {part} were kept from the run of {meta[key]} (that part was not run this time).", ""]
    if workers:
        lines += [
            "## Worker processes (RabbitMQ, PostgreSQL store)",
            "",
            f"N = {meta['scale_n']} preloaded commands, all workers started together on the same queue; "
            f"drain timed for at most {meta['max_drain_seconds']} s after the first outcome. Several workers "
            "on one SQLite file are not a supported deployment (one writer at a time): PostgreSQL only.",
            "",
            "| workers | drain msg/s | steady 10–90% msg/s | CPU µs/msg (all workers) | speed-up | machine busy |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        base = stats.summarize([w.rate for w in workers if w.workers == min(meta["scale_workers"])]).median
        for k in meta["scale_workers"]:
            ok = [w for w in workers if w.workers == k and w.error is None]
            rate = stats.summarize([w.rate for w in ok])
            lines.append(
                f"| {k} | {_fmt(rate)} | {_fmt(stats.summarize([w.steady_rate for w in ok]))} "
                f"| {_fmt(stats.summarize([w.cpu_us_per_msg for w in ok]))} "
                f"| {stats.ratio(rate.median, base):.2f}x "
                f"| {stats.summarize([w.machine_busy for w in ok]).median:.0%} |"
            )
        lines += [
            "",
            f"This machine has {meta['cpus']} CPUs shared by the workers, RabbitMQ and PostgreSQL: past "
            "that, more workers only share the same CPUs.",
            "",
        ]
    for s in stores:
        lines += [f"## Event store: {s.backend}", ""]
        lines += [
            f"Preloaded {s.preload_events:,} sent e-mails (one row each in {', '.join(meta['store_tables'])}) "
            f"by bulk INSERT in {s.preload_seconds:.0f} s. Appends: {meta['append_commits']:,} commits per trial "
            f"(one `EmailSent` each, with inbox and outbox rows, as the pipeline commits a `SendEmail`), from "
            f"{meta['append_concurrency']} concurrent tasks through `EventStore.commit` (group commit), trials "
            "interleaved.",
            "",
            "| store | events before | commits/s | CPU µs/commit | transactions/trial |",
            "|---|---:|---:|---:|---:|",
        ]
        for label in ("empty", "full"):
            trials = [a for a in s.appends if a.store == label]
            if not trials:
                continue
            lines.append(
                f"| {label} | {min(a.events_before for a in trials):,}–{max(a.events_before for a in trials):,} "
                f"| {_fmt(stats.summarize([a.rate for a in trials]))} "
                f"| {_fmt(stats.summarize([a.cpu_us_per_commit for a in trials]))} "
                f"| {stats.median([a.batches for a in trials]):.0f} |"
            )
        full = stats.summarize([a.rate for a in s.appends if a.store == "full"]).median
        empty = stats.summarize([a.rate for a in s.appends if a.store == "empty"]).median
        ratio = stats.ratio(full, empty)
        verdict = "yes" if not math.isnan(ratio) and ratio >= 0.8 else "**no**"
        lines += ["", f"Full / empty append rate: **{ratio:.2f}** (target: within 20%, i.e. >= 0.80: {verdict}).", ""]
        if s.rebuild is not None:
            rb = s.rebuild
            cli = f"{rb.cli_seconds:.1f} s" if rb.cli_seconds is not None else f"failed: `{rb.cli_output[-200:]}`"
            goal = (
                "" if s.backend != "sqlite" else f" (target <= 60 s: {'yes' if rb.direct_seconds <= 60 else '**no**'})"
            )
            lines += [
                f"Rebuild of {rb.events:,} events: `projections.rebuild(engine)` {rb.direct_seconds:.1f} s{goal}; "
                f"`pipeline projections rebuild` (process start included) {cli}.",
                "",
            ]
    return "\n".join(lines) + "\n"


def _fmt(s: stats.Summary) -> str:
    if s.count == 0:
        return "-"
    if s.count == 1:
        return f"{s.median:,.0f}"
    return f"{s.median:,.0f} ({s.low:,.0f}–{s.high:,.0f})"


def render_chart(workers: list[WorkerSample], path: Path) -> None:
    """Drain rate by number of workers."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ks = sorted({w.workers for w in workers})
    med = [stats.summarize([w.rate for w in workers if w.workers == k and w.error is None]).median for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, med, marker="o")
    ax.scatter([w.workers for w in workers], [w.rate for w in workers], alpha=0.4, s=12)
    ax.set_xticks(ks)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("drain msg/s")
    ax.set_title("pipeline, RabbitMQ + PostgreSQL", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(cfg: BenchConfig) -> tuple[list[WorkerSample], list[StoreResults], dict[str, Any]]:
    """Every scaling figure selected by BENCH_SCALE_PARTS (workers,store)."""
    parts = set(os.environ.get("BENCH_SCALE_PARTS", "workers,store").split(","))
    rabbit_url = await workload.ensure_vhost(cfg.rabbit_url)
    workers = await scale_workers(cfg, rabbit_url) if "workers" in parts else []
    stores = [await scale_store(cfg, b) for b in cfg.store_backends] if "store" in parts else []
    knobs = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
    meta = {
        "command": "make bench-scale" + "".join(f" {k}={v}" for k, v in sorted(knobs.items())),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "loop": loops.resolve(cfg.loop),
        "scale_n": cfg.scale_n,
        "scale_workers": list(cfg.scale_workers),
        "max_drain_seconds": cfg.max_drain_seconds,
        "store_tables": list(cfg.store_tables),
        "append_commits": cfg.append_commits,
        "append_concurrency": cfg.append_concurrency,
    }
    return workers, stores, meta


def keep_previous(
    path: Path, workers: list[WorkerSample], stores: list[StoreResults], meta: dict[str, Any]
) -> tuple[list[WorkerSample], list[StoreResults], dict[str, Any]]:
    """Parts not run this time (BENCH_SCALE_PARTS) keep their figures from the previous scale.json."""
    if not path.exists() or (workers and stores):
        return workers, stores, meta
    old = json.loads(path.read_text())
    kept = dict(meta)
    if not workers and old.get("workers"):
        workers = [WorkerSample(**w) for w in old["workers"]]
        kept["workers_from"] = old["meta"].get("workers_from") or old["meta"].get("date")
        for key in ("scale_n", "scale_workers", "max_drain_seconds"):
            kept[key] = old["meta"].get(key, kept.get(key))
    if not stores and old.get("stores"):
        stores = [_store_from(s) for s in old["stores"]]
        kept["stores_from"] = old["meta"].get("stores_from") or old["meta"].get("date")
        for key in ("store_tables", "append_commits", "append_concurrency"):
            kept[key] = old["meta"].get(key, kept.get(key))
    return workers, stores, kept


def _store_from(data: dict[str, Any]) -> StoreResults:
    rebuild = data.get("rebuild")
    return StoreResults(
        backend=data["backend"],
        preload_events=data["preload_events"],
        preload_seconds=data["preload_seconds"],
        appends=[AppendSample(**a) for a in data.get("appends", [])],
        rebuild=RebuildSample(**rebuild) if rebuild else None,
    )


def main(cfg: BenchConfig) -> int:
    """Run and write bench/results/scale.md, scale.json (and scale.png)."""
    workers, stores, meta = loops.run(run(cfg), cfg.loop)
    cfg.results.mkdir(parents=True, exist_ok=True)
    workers, stores, meta = keep_previous(cfg.results / "scale.json", workers, stores, meta)
    text_ = render(workers, stores, meta)
    (cfg.results / "scale.md").write_text(text_)
    payload = {
        "meta": meta,
        "workers": [asdict(w) for w in workers],
        "stores": [asdict(s) for s in stores],
    }
    (cfg.results / "scale.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if workers:
        render_chart(workers, cfg.results / "scale.png")
    print(text_)
    return 0
