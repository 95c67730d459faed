"""Turns samples into the results: summaries, target ratios, Markdown table, JSON and a PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stats
from bench.model import CONTENDERS, Sample

METRICS = (
    "drain_rate",
    "cpu_us_per_msg",
    "peak_rss_mb",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_rate",
    "machine_busy",
    "handled",
)


# Issue 18's ratios of median drain rates: (top, bottom, name, goal); a NaN goal is informational.
RATIOS: tuple[tuple[str, str, str, float], ...] = (
    ("rabbit-pipeline-sqlite", "rabbit-faststream", "RabbitMQ: pipeline (SQLite) / bare FastStream", 0.5),
    ("rabbit-pipeline-sqlite", "rabbit-handrolled", "RabbitMQ: pipeline (SQLite) / hand-rolled", 10.0),
    ("redis-pipeline-sqlite", "redis-faststream", "Redis: pipeline (SQLite) / bare FastStream stream", 2.0),
    ("redis-pipeline-sqlite", "redis-handrolled", "Redis: pipeline (SQLite) / hand-rolled", 10.0),
    ("rabbit-pipeline-sqlite-info", "rabbit-pipeline-sqlite", "RabbitMQ: pipeline at INFO / at WARNING", 0.85),
    ("redis-pipeline-sqlite-info", "redis-pipeline-sqlite", "Redis: pipeline at INFO / at WARNING", 0.85),
    ("rabbit-pipeline-sqlite", "rabbit-dramatiq", "RabbitMQ: pipeline (SQLite) / Dramatiq", math.nan),
)
MIN_ROUNDS = 3  # issue 18: ratios of medians of at least this many interleaved rounds


def summaries(samples: Sequence[Sample]) -> dict[str, dict[str, stats.Summary]]:
    """Per contender (in table order), per metric: median, min, max over the rounds without error."""
    out: dict[str, dict[str, stats.Summary]] = {}
    keys = [k for k in CONTENDERS if any(s.contender == k for s in samples)]
    keys += sorted({s.contender for s in samples} - set(keys))
    for key in keys:
        ok = [s for s in samples if s.contender == key and s.error is None]
        out[key] = {m: stats.summarize([getattr(s, m) for s in ok]) for m in METRICS}
    return out


@dataclass(frozen=True)
class Target:
    """One target of issue 18 and what the run measured (a NaN goal: shown, no target)."""

    name: str
    measured: float
    goal: float
    higher_is_better: bool
    unit: str
    per_round: tuple[float, ...] = ()

    @property
    def holds(self) -> bool | None:
        """True or False; None when it could not be measured or has no goal."""
        if math.isnan(self.measured) or math.isnan(self.goal):
            return None
        return self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal


def _paired_ratios(samples: Sequence[Sample], top: str, bottom: str) -> tuple[float, ...]:
    """Ratio of drain rates within each round where both ran (rounds are interleaved)."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        if s.error is None:
            by_round.setdefault(s.round, {})[s.contender] = s.drain_rate
    return tuple(stats.ratio(r[top], r[bottom]) for _, r in sorted(by_round.items()) if top in r and bottom in r)


def targets(samples: Sequence[Sample]) -> list[Target]:
    """Issue 18's targets, from the medians of this run (a target whose contenders did not run: `-`)."""
    summary = summaries(samples)

    def med(key: str, metric: str) -> float:
        return summary[key][metric].median if key in summary else math.nan

    found: list[Target] = []
    for top, bottom, name, goal in RATIOS:
        if math.isnan(goal) and (top not in summary or bottom not in summary):
            continue  # an informational ratio: only when both ran
        found.append(
            Target(
                name,
                stats.ratio(med(top, "drain_rate"), med(bottom, "drain_rate")),
                goal,
                True,
                "x",
                _paired_ratios(samples, top, bottom),
            )
        )
    for key in ("rabbit-pipeline-sqlite", "rabbit-pipeline-postgres", "redis-pipeline-sqlite"):
        if key in summary:
            label = CONTENDERS[key].label.removeprefix("(d) ").removeprefix("(g) ")
            broker = CONTENDERS[key].broker
            found.append(
                Target(f"{broker} {label}: p99 latency at half max", med(key, "latency_p99_ms"), 25, False, "ms")
            )
            found.append(Target(f"{broker} {label}: peak RSS", med(key, "peak_rss_mb"), 150, False, "MB"))
    return found


def cpu_ratios(samples: Sequence[Sample]) -> list[tuple[str, float]]:
    """Pipeline vs bare, from the medians of CPU per message (bottom cost / top cost)."""
    summary = summaries(samples)
    found = []
    for top, bottom, name, _goal in RATIOS:
        if top in summary and bottom in summary:
            found.append(
                (name, stats.ratio(summary[bottom]["cpu_us_per_msg"].median, summary[top]["cpu_us_per_msg"].median))
            )
    return found


def _num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def _cell(s: stats.Summary, digits: int = 0, spread: bool = True) -> str:
    if s.count == 0:
        return "-"
    text = _num(s.median, digits)
    if s.count > 1:
        inner = f"{_num(s.low, digits)}–{_num(s.high, digits)}"
        if spread and not math.isnan(s.spread):
            inner += f"; {s.spread * 100:.0f}%"
        text += f" ({inner})"
    return text


def render_markdown(samples: Sequence[Sample], meta: dict[str, Any]) -> str:
    """The results table, the targets, and how the run was made."""
    summary = summaries(samples)
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{meta.get('command', 'make bench')}` on {meta.get('date', '?')}: "
        f"N = {meta.get('n', '?')} preloaded messages per contender and round, "
        f"{meta.get('rounds', '?')} interleaved rounds, event loop `{meta.get('loop', '?')}`, "
        f"{meta.get('cpus', '?')} CPUs ({meta.get('cpu_model', '?')}).",
        "",
        "Each cell: median of the rounds (min–max; spread = (max − min) / median). "
        "Latency: publish-to-outcome at a fixed rate of half that round's drain rate.",
        "",
        "| contender | broker | does | drain msg/s | CPU µs/msg | peak RSS MB | p50 ms | p99 ms | at msg/s "
        "| timed msgs | machine busy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    capped_any = False
    for key, metrics in summary.items():
        info = CONTENDERS.get(key)
        label, broker, what = (info.label, info.broker, info.what) if info else (key, "?", "?")
        lat = metrics["latency_p99_ms"].count > 0
        capped = any(s.capped for s in samples if s.contender == key)
        capped_any = capped_any or capped
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    broker,
                    what,
                    _cell(metrics["drain_rate"]) + (" †" if capped else ""),
                    _cell(metrics["cpu_us_per_msg"]),
                    _cell(metrics["peak_rss_mb"], spread=False),
                    _cell(metrics["latency_p50_ms"], 1, spread=False) if lat else "-",
                    _cell(metrics["latency_p99_ms"], 1, spread=False) if lat else "-",
                    _num(metrics["latency_rate"].median) if lat else "-",
                    _num(metrics["handled"].median),
                    f"{metrics['machine_busy'].median:.0%}" if metrics["machine_busy"].count else "-",
                ]
            )
            + " |"
        )
    if capped_any:
        lines += [
            "",
            f"† timed for {meta.get('max_drain_seconds', '?')} s after the first message, on fewer than N messages "
            "(column `timed msgs`), with the rest of the N still queued behind; the rest was then dropped.",
        ]
    lines += [
        "",
        "`machine busy`: share of both CPUs in use during the drain, by anyone (the contender, the broker, "
        "the database, the harness polling, and any other work on the machine).",
    ]
    phase = [
        (key, [s.details["latency"] for s in samples if s.contender == key and (s.details or {}).get("latency")])
        for key in summary
    ]
    phase = [(k, rows) for k, rows in phase if rows and rows[0].get("worker_cpu_share") is not None]
    if phase:
        lines += [
            "",
            "Latency phase, the worker(s) at the fixed rate (medians): how busy, and the CPU per outcome when "
            "batches are small. Echo consumer: the same rate, the same harness, with an echo consumer in the "
            "worker's place (`bench/contenders/rabbit_echo.py`: a batch's `email.sent` published with aiormq, confirms "
            "awaited together, one ack with multiple; no validation, store or outbox): what RabbitMQ and this "
            "machine cost alone.",
            "",
            "| contender | publish rate msg/s | achieved msg/s | worker CPU (share of one core) | CPU µs/msg "
            "| p50 / p99 ms | echo consumer p50 / p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, rows in phase:
            label = CONTENDERS[key].label if key in CONTENDERS else key

            def med(field: str, rows: list[dict[str, Any]] = rows) -> float:
                return stats.median([float(r[field]) for r in rows if r.get(field) is not None])

            echoes = [s.details["echo"] for s in samples if s.contender == key and (s.details or {}).get("echo")]
            echo = (
                f"{_num(stats.median([e['p50_ms'] for e in echoes]), 1)} / "
                f"{_num(stats.median([e['p99_ms'] for e in echoes]), 1)}"
                if echoes
                else "-"
            )
            lines.append(
                f"| {label} | {_num(med('rate'))} | {_num(med('achieved_rate'))} "
                f"| {med('worker_cpu_share'):.0%} | {_num(med('worker_cpu_us_per_msg'))} "
                f"| {_num(med('p50_ms'), 1)} / {_num(med('p99_ms'), 1)} | {echo} |"
            )
    errors = [s for s in samples if s.error is not None]
    rounds_run = max((s.round for s in samples), default=0)
    lines += [
        "",
        "## Targets (issue 18)",
        "",
        "Ratios of median drain rates, side by side in the same interleaved rounds (per round: the ratio "
        "within each round).",
    ]
    if rounds_run < MIN_ROUNDS:
        lines += [
            "",
            f"**{rounds_run} round(s) only**: the targets are judged on medians of at least {MIN_ROUNDS} "
            "interleaved rounds; this run is a trial.",
        ]
    lines += [
        "",
        "| target | goal | measured (medians) | per round | holds |",
        "|---|---:|---:|---|:-:|",
    ]
    for t in targets(samples):
        goal = "-" if math.isnan(t.goal) else f"{'>=' if t.higher_is_better else '<='} {t.goal:g} {t.unit}"
        digits = 2 if t.unit == "x" else 1
        rounds = ", ".join(_num(r, 2) for r in t.per_round) if t.per_round else ""
        holds = {True: "yes", False: "**no**", None: "-"}[t.holds]
        lines.append(f"| {t.name} | {goal} | {_num(t.measured, digits)} {t.unit} | {rounds} | {holds} |")
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- round {s.round}, {s.contender}: {s.error}" for s in errors]
    cpu_rows = cpu_ratios(samples)
    if cpu_rows:
        lines += [
            "",
            "CPU basis (informational): the same ratios from CPU µs per message (bare / pipeline), i.e. the drain "
            "ratio if both were bound by one core of their own. Less disturbed than drain rates when other work "
            "shares the machine.",
            "",
            "| ratio | from CPU µs/msg |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {_num(value, 2)} x |" for name, value in cpu_rows]
    versions = meta.get("versions", {})
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    notes = meta.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_json(samples: Sequence[Sample], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything: metadata, every sample, the summaries and the targets."""
    return {
        "meta": meta,
        "samples": [s.as_dict() for s in samples],
        "summary": {k: {m: _clean(v.as_dict()) for m, v in ms.items()} for k, ms in summaries(samples).items()},
        "targets": [
            {
                "name": t.name,
                "goal": _clean_float(t.goal),
                "unit": t.unit,
                "higher_is_better": t.higher_is_better,
                "measured": _clean_float(t.measured),
                "per_round": [_clean_float(r) for r in t.per_round],
                "holds": t.holds,
            }
            for t in targets(samples)
        ],
    }


def _clean_float(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _clean_float(v) if isinstance(v, float) else v for k, v in data.items()}


def write(samples: Sequence[Sample], meta: dict[str, Any], out: Path, *, chart: bool = True) -> list[Path]:
    """Write results.md, results.json and chart.png into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md", out / "results.json"]
    written[0].write_text(render_markdown(samples, meta))
    written[1].write_text(json.dumps(to_json(samples, meta), indent=2) + "\n")
    if chart:
        written.append(render_chart(samples, meta, out / "chart.png"))
    return written


def render_chart(samples: Sequence[Sample], meta: dict[str, Any], path: Path) -> Path:
    """Drain rate and CPU per message, medians with min-max whiskers, one bar per contender."""
    import matplotlib  # noqa: PLC0415 - optional dependency group `bench`

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    summary = summaries(samples)
    keys = [k for k in summary if summary[k]["drain_rate"].count]
    labels = [CONTENDERS[k].label if k in CONTENDERS else k for k in keys]
    shades = {"rabbit": ("#d9822b", "#a0522d", "#f0b27a"), "redis": ("#2b6cb0", "#1a3f6b", "#90b4e0")}
    colors = [
        shades["rabbit" if k.startswith("rabbit") else "redis"][0 if "pipeline" in k else 1 if "handrolled" in k else 2]
        for k in keys
    ]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(keys) + 2.2), sharey=True)
    for ax, metric, title in (
        (axes[0], "drain_rate", "drain rate, msg/s (higher is better)"),
        (axes[1], "cpu_us_per_msg", "CPU per message, µs (lower is better)"),
    ):
        med = [summary[k][metric].median for k in keys]
        low = [m - summary[k][metric].low for k, m in zip(keys, med, strict=True)]
        high = [summary[k][metric].high - m for k, m in zip(keys, med, strict=True)]
        ys = list(range(len(keys)))
        ax.barh(ys, med, xerr=[low, high], color=colors, capsize=3)
        for y, m, h in zip(ys, med, high, strict=True):
            if not math.isnan(m):
                ax.text(m + (0 if math.isnan(h) else h), y, f"  {m:,.0f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(ys, labels)
    axes[0].invert_yaxis()  # shared: once for both
    fig.suptitle(
        f"N={meta.get('n')} preloaded SendEmail, {meta.get('rounds')} rounds (median, min–max), "
        f"loop {meta.get('loop')}, {meta.get('cpus')} CPUs — orange RabbitMQ, blue Redis, "
        "medium = pipeline, darkest = hand-rolled",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rerender(out: Path) -> None:
    """Write results.md and chart.png again from results.json (after a change to the rendering)."""
    data = json.loads((out / "results.json").read_text())
    samples = [Sample.from_dict(s) for s in data["samples"]]
    write(samples, data["meta"], out)
