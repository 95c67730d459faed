"""`python -m bench probe`: one worker's publish-to-outcome latency at fixed rates, with its CPU.

For side-by-side trials of a change (run it before and after, alternating): the latency phase of
`make bench` alone, at rates you choose, on one worker started once, with what the worker spent
(share of one core, CPU per outcome) and the size of its store transactions (messages per group
commit, from `/metrics`). A worker on this machine keeps its loop about as busy at any moderate
rate (smaller batches when fewer arrive), so its CPU share says less than its CPU per outcome.

    BENCH_PROBE_BROKER=rabbit BENCH_PROBE_RATES=2000,2000 python -m bench probe
    BENCH_PROBE_PRELOAD=20000 ...   # drain that many first, as `make bench` does before its phase
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx2

from bench import pipeline, procstat, workload
from bench.config import BenchConfig

BATCH_METRIC = "pipeline_store_batch_size"


async def transactions(port: int) -> tuple[float, float]:
    """The worker's group commits so far: (messages, transactions)."""
    async with httpx2.AsyncClient(timeout=5.0) as client:
        return commit_totals((await client.get(f"http://127.0.0.1:{port}/metrics")).text)


def commit_totals(text: str) -> tuple[float, float]:
    """(messages, transactions) of the group commit, from a Prometheus exposition."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{BATCH_METRIC}_sum"):
            total = float(line.split()[-1])
        elif line.startswith(f"{BATCH_METRIC}_count"):
            count = float(line.split()[-1])
    return total, count


async def probe(cfg: BenchConfig, broker: str, store_kind: str, rates: list[float], preload: int) -> list[str]:
    """Start a worker, drain `preload` commands, then one latency phase a rate; a line each."""
    rabbit_url = await workload.ensure_vhost(cfg.rabbit_url)
    lines: list[str] = []
    async with pipeline.scratch_dir() as scratch:
        store = await pipeline.fresh_store(store_kind, cfg, scratch)
        worker: pipeline.Worker | None = None
        try:
            if broker == "rabbit":
                await pipeline.prepare_rabbit(rabbit_url, preload)
            else:
                await pipeline.prepare_redis(cfg.redis_url, preload)
            worker = pipeline.start_worker(cfg, pipeline.worker_env(cfg, store.url, rabbit_url), scratch, "probe")
            await worker.wait_ready()
            if preload:
                async with pipeline.OutcomeCounter(broker, rabbit_url, cfg.redis_url) as counter:
                    deadline = time.monotonic() + cfg.timeout
                    while await counter.count() < preload and time.monotonic() < deadline:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            for rate in rates:
                before = await transactions(worker.port)
                cpu0, t0 = procstat.total_cpu_seconds([worker.pid]), time.monotonic()
                if broker == "rabbit":
                    lat = await pipeline.latency_rabbit(rabbit_url, rate, cfg.latency_seconds, cfg.latency_warmup)
                else:
                    lat = await pipeline.latency_redis(cfg.redis_url, rate, cfg.latency_seconds, cfg.latency_warmup)
                cpu, seconds = procstat.total_cpu_seconds([worker.pid]) - cpu0, time.monotonic() - t0
                after = await transactions(worker.port)
                per_commit = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
                line = (
                    f"{broker} {store_kind} at {rate:,.0f} msg/s: p50 {lat.p50_ms:.1f} p99 {lat.p99_ms:.1f} "
                    f"max {lat.max_ms:.1f} ms; worker {cpu / seconds:.0%} of a core, "
                    f"{cpu / max(lat.received, 1) * 1e6:,.0f} µs CPU an outcome, {per_commit:.1f} messages a commit"
                )
                print(line, flush=True)
                lines.append(line)
        finally:
            if worker is not None:
                worker.stop()
            await store.drop()
    return lines


def main(cfg: BenchConfig) -> int:
    """Entry point of `python -m bench probe`."""
    broker = os.environ.get("BENCH_PROBE_BROKER", "rabbit")
    store_kind = os.environ.get("BENCH_PROBE_STORE", "sqlite")
    rates = [float(r) for r in os.environ.get("BENCH_PROBE_RATES", "2000").split(",") if r.strip()]
    preload = int(os.environ.get("BENCH_PROBE_PRELOAD", "0") or 0)
    from bench import loops  # noqa: PLC0415

    loops.run(probe(cfg, broker, store_kind, rates, preload), cfg.loop)
    return 0
