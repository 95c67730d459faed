"""`make bench-io`: scenarios (a) free, (b) limited, (c) LLM, each in interleaved rounds; writes io-latest.*."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import loops, pipeline, runner, workload
from bench.io import report, runs
from bench.io.config import FREE, LIMITED, LLM, IoConfig
from bench.io.runs import IoSample

Run = Callable[[IoConfig, str, IoSample, Path], Awaitable[None]]


def log(text: str) -> None:
    """Progress on stderr, time-stamped."""
    print(f"[bench-io {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def contender_runs(cfg: IoConfig) -> dict[str, tuple[str, int, Run]]:
    """key: (scenario, n, how to run it once)."""

    def limited(workers: int, limits: str | None) -> Run:
        async def go(c: IoConfig, url: str, s: IoSample, scratch: Path) -> None:
            await runs.run_pipeline_mail(
                c, url, s, scratch, workers=workers, limits=limits, provider_limit=c.provider_limit,
                max_seconds=c.limited_max_seconds, stall_seconds=c.stall_seconds,
            )  # fmt: skip

        return go

    async def free_pipeline(c: IoConfig, url: str, s: IoSample, scratch: Path) -> None:
        await runs.run_pipeline_mail(
            c, url, s, scratch, workers=1, limits=None, provider_limit=None, max_seconds=c.max_seconds,
            stall_seconds=c.stall_seconds,
        )  # fmt: skip

    async def free_dramatiq(c: IoConfig, url: str, s: IoSample, scratch: Path) -> None:
        await runs.run_dramatiq(
            c, url, s, scratch, threads=c.dramatiq_threads, rate_limit=0, provider_limit=None,
            max_seconds=c.max_seconds, stall_seconds=c.stall_seconds,
        )  # fmt: skip

    async def limited_dramatiq(c: IoConfig, url: str, s: IoSample, scratch: Path) -> None:
        await runs.run_dramatiq(
            c, url, s, scratch, threads=c.dramatiq_limited_threads, rate_limit=c.provider_limit,
            provider_limit=c.provider_limit, max_seconds=c.limited_max_seconds, stall_seconds=c.stall_seconds,
        )  # fmt: skip

    async def llm(c: IoConfig, url: str, s: IoSample, scratch: Path, limits: str | None) -> None:
        await runs.run_llm(c, url, s, scratch, limits=limits)

    return {
        "pipeline": ("free", cfg.free_n, free_pipeline),
        "faststream-http": ("free", cfg.free_n, runs.run_faststream),
        "dramatiq-http": ("free", cfg.free_n, free_dramatiq),
        "client-alone": ("free", cfg.free_n, runs.run_client_alone),
        "pipeline-limits-1w": ("limited", cfg.limited_n, limited(1, cfg.mailer_limits)),
        "pipeline-limits-3w": ("limited", cfg.limited_n, limited(3, cfg.mailer_limits)),
        "pipeline-nolimits-1w": ("limited", cfg.limited_n, limited(1, None)),
        "pipeline-nolimits-3w": ("limited", cfg.limited_n, limited(3, None)),
        "dramatiq-ratelimited": ("limited", cfg.limited_n, limited_dramatiq),
        "llm-limits": ("llm", cfg.llm_n, lambda c, u, s, d: llm(c, u, s, d, cfg.llm_limits)),
        "llm-nolimits": ("llm", cfg.llm_n, lambda c, u, s, d: llm(c, u, s, d, None)),
    }


async def run_all(cfg: IoConfig) -> tuple[list[IoSample], dict[str, Any]]:
    """Every selected contender, scenario by scenario, in interleaved rounds."""
    rabbit_url = await workload.ensure_vhost(cfg.base.rabbit_url)
    table = contender_runs(cfg)
    samples: list[IoSample] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-io-") as tmp:
        scratch = Path(tmp)
        for group in (FREE, LIMITED, LLM):
            keys = [k for k in group if k in cfg.only]
            rounds = cfg.llm_rounds if group is LLM else cfg.rounds
            for r in range(rounds):
                for key in runner.round_order(keys, r):
                    scenario, n, run = table[key]
                    busy = await runner.wait_quiet(cfg.base)
                    log(f"round {r + 1}/{rounds}: {key} (N={n}; machine {busy:.0%} busy before)")
                    sample = IoSample(contender=key, scenario=scenario, round=r + 1, n=n)
                    try:
                        await run(cfg, rabbit_url, sample, scratch)
                    except Exception as exc:
                        log(f"  failed: {exc!r}")
                        sample.error = repr(exc)[:2000]
                        await _cleanup(rabbit_url)
                    else:
                        log("  " + report.one_line(sample))
                    sample.details["busy_before"] = busy
                    samples.append(sample)
    return samples, describe(cfg, rabbit_url, time.monotonic() - started)


async def _cleanup(rabbit_url: str) -> None:
    from bench.io import brokers  # noqa: PLC0415

    try:
        await brokers.after_run(rabbit_url)
    except Exception as exc:
        log(f"  cleanup failed too: {exc!r}")


def describe(cfg: IoConfig, rabbit_url: str, seconds: float) -> dict[str, Any]:
    """Metadata written beside the numbers."""
    knobs = {k: v for k, v in os.environ.items() if k.startswith(("BENCH_IO_", "BENCH_PIPELINE_"))}
    versions = {"Python": platform.python_version()}
    for dist in ("faststream", "httpx2", "httpcore2", "dramatiq", "aio-pika", "uvloop"):
        versions[dist] = runner._version(dist)
    return {
        "command": "make bench-io" + "".join(f" {k}={v}" for k, v in sorted(knobs.items())),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(seconds, 1),
        "quick": cfg.quick,
        "rounds": cfg.rounds,
        "llm_rounds": cfg.llm_rounds,
        "cpus": os.cpu_count(),
        "cpu_model": runner._cpu_model(),
        "loop": loops.resolve(cfg.base.loop),
        "rabbit_url": rabbit_url.replace("guest:guest", "guest:***"),
        "redis_url": cfg.base.redis_url,
        "worker_prefetch": pipeline.worker_prefetch(),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("base", "results")},
        "versions": versions,
    }


def main(cfg: IoConfig) -> int:
    """Run, write the results, print the table."""
    cfg.validate()
    samples, meta = loops.run(run_all(cfg), cfg.base.loop)
    written = report.write(samples, meta, cfg.results)
    print(report.render_markdown(samples, meta))
    for path in written:
        log(f"wrote {path}")
    return 1 if samples and all(s.error is not None for s in samples) else 0
