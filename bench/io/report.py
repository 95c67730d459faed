"""The I/O bench's results: Markdown tables per scenario, JSON, a dated copy (pure but for `write`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import stats
from bench.io.config import FREE, LIMITED, LLM
from bench.io.runs import IoSample
from handlers.http import HTTP_CONNECTIONS

LABELS = {
    "pipeline": "pipeline, 1 worker (HTTP mailer, SQLite)",
    "faststream-http": "bare FastStream + aiohttp",
    "dramatiq-http": "Dramatiq, threads + httpx2.Client",
    "client-alone": "the worker's HTTP session alone (no broker)",
    "pipeline-limits-1w": "pipeline, 1 worker, PIPELINE_LIMITS",
    "pipeline-limits-3w": "pipeline, 3 workers, PIPELINE_LIMITS",
    "pipeline-nolimits-1w": "pipeline, 1 worker, Retry-After only",
    "pipeline-nolimits-3w": "pipeline, 3 workers, Retry-After only",
    "dramatiq-ratelimited": "Dramatiq + WindowRateLimiter (Redis)",
    "llm-limits": "pipeline, 1 worker, PIPELINE_LIMITS (llm)",
    "llm-nolimits": "pipeline, 1 worker, Retry-After only",
}
FREE_RATE_GOAL = 1_000.0  # e-mails/s through one worker against a 100 ms provider
DRAMATIQ_RATIO_GOAL = 10.0
METRICS = (
    "rate",
    "steady_rate",
    "rejected_pct",
    "dead_letters",
    "duplicates",
    "delivered",
    "cpu_us_per_msg",
    "max_in_flight",
    "max_accepted_1s",
    "tokens_per_minute",
    "max_tokens_60s",
    "provider_cpu_us_per_request",
)


def _value(sample: IoSample, metric: str) -> float:
    value = getattr(sample, metric)
    return float(value)


def summaries(samples: Sequence[IoSample]) -> dict[str, dict[str, stats.Summary]]:
    """Per contender, per metric: median, min and max over the rounds without error."""
    out: dict[str, dict[str, stats.Summary]] = {}
    for key in [*FREE, *LIMITED, *LLM]:
        ok = [s for s in samples if s.contender == key and s.error is None]
        if any(s.contender == key for s in samples):
            out[key] = {m: stats.summarize([_value(s, m) for s in ok]) for m in METRICS}
    return out


def _num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _range(s: stats.Summary, digits: int = 0) -> str:
    if s.count == 0:
        return "failed"
    if s.count == 1:
        return _num(s.median, digits)
    return f"{_num(s.median, digits)} ({_num(s.low, digits)}–{_num(s.high, digits)})"


def one_line(s: IoSample) -> str:
    """A run's progress line."""
    tpm = f", {s.tokens_per_minute:,.0f} tokens/min" if s.tokens else ""
    return (
        f"{s.delivered}/{s.n} delivered ({s.ended}) at {s.rate:,.1f}/s (steady {s.steady_rate:,.1f}/s){tpm}; "
        f"429s {s.rejected} of {s.requests} requests; dead letters {s.dead_letters}; duplicates {s.duplicates}; "
        f"max in flight {s.max_in_flight}; {s.cpu_us_per_msg:,.0f} µs CPU/delivery; machine {s.machine_busy:.0%} busy; "
        f"stopped in {s.details.get('stop_seconds', '?')} s"
    )


def ratio_of(summary: dict[str, dict[str, stats.Summary]], top: str, bottom: str) -> float:
    """Ratio of median rates; NaN when either is missing."""
    if top not in summary or bottom not in summary:
        return math.nan
    return stats.ratio(summary[top]["rate"].median, summary[bottom]["rate"].median)


def targets(summary: dict[str, dict[str, stats.Summary]]) -> list[tuple[str, float, str, bool | None]]:
    """(name, measured, goal, met) of the free scenario's targets."""
    rate = summary["pipeline"]["rate"].median if "pipeline" in summary else math.nan
    ratio = ratio_of(summary, "pipeline", "dramatiq-http")
    return [
        ("one pipeline worker, e-mails/s", rate, f">= {FREE_RATE_GOAL:,.0f}", _met(rate, FREE_RATE_GOAL)),
        ("pipeline / Dramatiq", ratio, f">= {DRAMATIQ_RATIO_GOAL:g}x", _met(ratio, DRAMATIQ_RATIO_GOAL)),
    ]


def _met(value: float, goal: float) -> bool | None:
    return None if math.isnan(value) else value >= goal


def render_markdown(samples: Sequence[IoSample], meta: dict[str, Any]) -> str:
    """The report: one table per scenario, then notes."""
    summary = summaries(samples)
    cfg = meta.get("config", {})
    rounds = meta.get("rounds", "?")
    lines = [f"# I/O-bound benchmark ({meta.get('date', '?')})", ""]
    lines.append(
        f"`{meta.get('command', 'make bench-io')}`: {rounds} interleaved round(s) ({meta.get('llm_rounds', 1)} for "
        f"the LLM flow), medians (min–max); {meta.get('cpus', '?')} CPUs ({meta.get('cpu_model', '?')}), shared by "
        f"the contender, RabbitMQ, Redis and the provider; {meta.get('seconds', 0):,.0f} s in all."
        + (" **Quick smoke run (BENCH_IO_QUICK=1): small N, one round; not a result.**" if meta.get("quick") else "")
    )
    errors = [s for s in samples if s.error]
    if any(k in summary for k in FREE):
        lines += _free(summary, cfg)
    if any(k in summary for k in LIMITED):
        lines += _limited(summary, cfg)
    if any(k in summary for k in LLM):
        lines += _llm(summary, cfg)
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {s.contender}, round {s.round}: `{(s.error or '')[:300]}`" for s in errors]
    lines += ["", "## How to read it", ""]
    lines += [f"- {note}" for note in notes(cfg)]
    return "\n".join(lines) + "\n"


def _free(summary: dict[str, dict[str, stats.Summary]], cfg: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## (a) A mail API at {cfg.get('mail_latency', 0.1) * 1000:.0f} ms a call, no limit "
        f"(N = {_n(cfg.get('free_n'))} e-mails)",
        "",
        "| contender | e-mails/s | pipeline / this | 429 % | dead letters | duplicates | max in flight | "
        "CPU µs / e-mail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in FREE:
        if key not in summary:
            continue
        m = summary[key]
        ratio = ratio_of(summary, "pipeline", key) if key != "pipeline" else math.nan
        lines.append(
            f"| {LABELS[key]} | {_range(m['rate'])} | {_num(ratio, 1) + 'x' if not math.isnan(ratio) else '-'} | "
            f"{_range(m['rejected_pct'], 1)} | {_range(m['dead_letters'])} | {_range(m['duplicates'])} | "
            f"{_range(m['max_in_flight'])} | {_range(m['cpu_us_per_msg'])} |"
        )
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for name, measured, goal, met in targets(summary):
        shown = _num(measured, 1) + ("x" if goal.endswith("x") else "")
        lines.append(f"| {name} | {shown} | {goal} | {'-' if met is None else ('yes' if met else '**no**')} |")
    return lines


def _limited(summary: dict[str, dict[str, stats.Summary]], cfg: dict[str, Any]) -> list[str]:
    limit = float(cfg.get("provider_limit", 200))
    lines = [
        "",
        f"## (b) The same API limited to {limit:,.0f} requests/s (429 + Retry-After: {cfg.get('retry_after', '1')} "
        f"beyond; N = {_n(cfg.get('limited_n'))})",
        "",
        "| contender | e-mails/s | % of limit | steady 10–90 % | 429 % of requests | dead letters | duplicates | "
        "max accepted in 1 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in LIMITED:
        if key not in summary:
            continue
        m = summary[key]
        pct = 100 * m["rate"].median / limit if limit else math.nan
        lines.append(
            f"| {LABELS[key]} | {_range(m['rate'])} | {_num(pct)} % | {_range(m['steady_rate'])} | "
            f"{_range(m['rejected_pct'], 1)} | {_range(m['dead_letters'])} | {_range(m['duplicates'])} | "
            f"{_range(m['max_accepted_1s'])} |"
        )
    lines += ["", f"PIPELINE_LIMITS for the `PIPELINE_LIMITS` rows: `{cfg.get('mailer_limits', '')}`."]
    return lines


def _llm(summary: dict[str, dict[str, stats.Summary]], cfg: dict[str, Any]) -> list[str]:
    tpm = float(cfg.get("tokens_per_minute", 60_000))
    lines = [
        "",
        f"## (c) Completions from a model API at {cfg.get('model_latency', 1.0):g} s a call, {tpm:,.0f} tokens/min "
        f"({cfg.get('llm_seconds', 90):g} s after the first completion)",
        "",
        "| contender | completions/min | tokens/min | % of limit | max tokens in any 60 s | 429 % of requests | "
        "dead letters | duplicates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in LLM:
        if key not in summary:
            continue
        m = summary[key]
        per_min = stats.Summary(m["rate"].median * 60, m["rate"].low * 60, m["rate"].high * 60, m["rate"].count)
        pct = 100 * m["tokens_per_minute"].median / tpm if tpm else math.nan
        lines.append(
            f"| {LABELS[key]} | {_range(per_min)} | {_range(m['tokens_per_minute'])} | {_num(pct)} % | "
            f"{_range(m['max_tokens_60s'])} | {_range(m['rejected_pct'], 1)} | {_range(m['dead_letters'])} | "
            f"{_range(m['duplicates'])} |"
        )
    lines += ["", f"PIPELINE_LIMITS for the `PIPELINE_LIMITS` row: `{cfg.get('llm_limits', '')}`."]
    return lines


def notes(cfg: dict[str, Any]) -> list[str]:
    """How the numbers are made."""
    return [
        "Everything is counted at the provider (tests/providers.py, its own process): an e-mail is delivered when "
        "the provider accepts a request with its Idempotency-Key (the message id); a duplicate is a key accepted "
        "twice. e-mails/s: distinct deliveries between the first and the last, over that time; steady: between 10% "
        "and 90% of them. 429 %: requests answered 429 over all requests.",
        f"(a) and the Dramatiq rows stop timing {cfg.get('max_seconds', 30):g} s after the first delivery ((b): "
        f"{cfg.get('limited_max_seconds', 120):g} s, or {cfg.get('stall_seconds', 20):g} s without a delivery or "
        "dead letter); what was left in the queue is dropped.",
        "Pipeline: `faststream run streams.app:app` worker(s), PIPELINE_MAILER=http (or PIPELINE_LLM=openai), "
        "PIPELINE_LOG_LEVEL=WARNING, a fresh SQLite store (three workers: a fresh PostgreSQL database, as several "
        "workers on one SQLite file are not a supported deployment); commands preloaded on `tasks`/`email` "
        "(`ai.completion`), command, dead-letter and delay queues emptied and the shared limits' Redis keys "
        "deleted before each run. Dead letters: messages in `email.dlq` (`ai.completion.dlq`).",
        f"Bare FastStream: one subscriber on its own quorum queue, prefetch as the pipeline's, one "
        f"aiohttp session (connections = prefetch), `cmd: SendEmail` validates. Dramatiq: "
        f"{cfg.get('dramatiq_threads', 8)} threads ((b): {cfg.get('dramatiq_limited_threads', 32)}, so that "
        "it can exceed the limit), a sync httpx2.Client per thread, the actor validates `SendEmail`; in (b) the "
        "POST runs inside `dramatiq.rate_limits.WindowRateLimiter` (limit per 1 s window, RedisBackend on the "
        "bench's Redis database), whose RateLimitExceeded, like a 429, is retried by Dramatiq's Retries "
        "middleware (backoff 1 s doubling to 10 s, 20 retries; its dead letters: `<queue>.XQ`).",
        "The worker's HTTP session alone: no broker, no validation: one process sending the same POSTs through "
        f"the adapters' session and `post_json` (aiohttp, {HTTP_CONNECTIONS} connections kept alive), "
        "as many in flight as the "
        "worker's prefetch; the client side's own ceiling on this machine.",
    ]


def to_json(samples: Sequence[IoSample], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything: metadata, summaries, every sample."""
    summary = summaries(samples)
    return {
        "meta": meta,
        "summary": {k: {m: _clean(s.as_dict()) for m, s in v.items()} for k, v in summary.items()},
        "targets": [
            {"name": n, "measured": None if math.isnan(v) else v, "goal": g, "met": ok}
            for n, v, g, ok in targets(summary)
        ],
        "samples": [s.as_dict() for s in samples],
    }


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}


def write(samples: Sequence[IoSample], meta: dict[str, Any], out: Path) -> list[Path]:
    """io-latest.md / .json and a dated copy (a quick run: io-quick-latest.* only, never over a real run)."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(samples, meta)
    data = json.dumps(to_json(samples, meta), indent=2, default=str)
    stems = ["io-quick-latest"] if meta.get("quick") else ["io-latest", "io-" + _stamp(meta)]
    written: list[Path] = []
    for stem in stems:
        for suffix, text in ((".md", markdown), (".json", data)):
            path = out / (stem + suffix)
            path.write_text(text)
            written.append(path)
    return written


def _stamp(meta: dict[str, Any]) -> str:
    """`2026-12-07-1310` from the run's date."""
    date = str(meta.get("date", "undated")).replace(" UTC", "")
    return date.replace(" ", "-").replace(":", "")
