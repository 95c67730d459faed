"""A smoke of the benchmark harness (bench/): its pure parts, and one tiny contender run when connected.

No timed assertions: numbers depend on the machine; only shapes and bookkeeping are checked.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from bench import report, stats
from bench.config import ALL_CONTENDERS, BenchConfig
from bench.contenders.meter import Meter
from bench.model import Sample
from bench.pipeline import summarize_latency
from bench.profile import Profile, component
from bench.runner import round_order
from tests.conftest import require


def test_median_percentile_and_summary() -> None:
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert math.isnan(stats.median([]))
    assert stats.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert stats.percentile([10.0], 99) == 10.0
    assert stats.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    with pytest.raises(ValueError, match="within"):
        stats.percentile([1.0], 101)
    s = stats.summarize([100.0, None, 80.0, math.nan, 120.0])
    assert (s.median, s.low, s.high, s.count) == (100.0, 80.0, 120.0, 3)
    assert s.spread == pytest.approx(0.4)
    assert stats.summarize([None]).count == 0
    assert stats.ratio(3.0, 2.0) == 1.5
    assert math.isnan(stats.ratio(1.0, 0.0))


def test_steady_rate_leaves_out_start_and_tail() -> None:
    samples = [(0.0, 0), (1.0, 10), (2.0, 50), (3.0, 90), (4.0, 100)]
    assert stats.steady_rate(samples, 100) == pytest.approx((90 - 10) / (3.0 - 1.0))
    assert math.isnan(stats.steady_rate([(0.0, 0)], 100))


def test_rounds_are_interleaved_and_rotate() -> None:
    keys = ["a", "b", "c"]
    assert round_order(keys, 0) == ["a", "b", "c"]
    assert round_order(keys, 1) == ["b", "c", "a"]
    assert round_order(keys, 3) == keys
    assert round_order([], 2) == []


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_N", "200")
    monkeypatch.setenv("BENCH_ROUNDS", "1")
    monkeypatch.setenv("BENCH_ONLY", "redis-raw, rabbit-aiopika")
    cfg = BenchConfig.from_env()
    assert (cfg.n, cfg.rounds, cfg.contenders) == (200, 1, ("redis-raw", "rabbit-aiopika"))
    cfg.validate()
    monkeypatch.setenv("BENCH_ONLY", "celery")
    with pytest.raises(ValueError, match="unknown contender"):
        BenchConfig.from_env().validate()
    assert set(BenchConfig().contenders) == set(ALL_CONTENDERS)


def test_meter_counts_to_n_and_then_ignores_stragglers() -> None:
    meter = Meter(3)
    assert [meter.tick(), meter.tick(), meter.tick(), meter.tick()] == [False, False, True, False]
    result = meter.result()
    assert result.handled == 3
    assert not result.capped
    assert result.t_last >= result.t_first
    assert result.peak_rss_mb > 0


def test_meter_stops_at_the_time_cap() -> None:
    meter = Meter(10_000, max_seconds=1e-9)
    ticks = [meter.tick() for _ in range(600)]
    assert ticks.count(True) == 1
    assert meter.result().capped
    assert meter.result().handled == 256  # the cap is looked at every 256 messages


def test_latency_summary_counts_lost_messages_as_worst() -> None:
    sent = {f"m{i}": float(i) for i in range(10)}
    arrived = {f"m{i}": float(i) + 0.010 for i in range(9)}  # m9 never arrives
    lat = summarize_latency(rate=1.0, sent=sent, arrived=arrived, t0=0.0, warmup=2.0, t_end=10.0)
    assert lat.sent == 10
    assert lat.received == 9
    assert lat.p50_ms == pytest.approx(10.0)
    assert math.isinf(lat.p99_ms)
    assert lat.achieved_rate == pytest.approx(1.0)


def _samples() -> list[Sample]:
    found = []
    for r, (fs, dq, pipe, rfs, rpipe) in enumerate([(1000, 800, 900, 600, 2000), (1100, 700, 1000, 500, 1900)]):
        found += [
            Sample("rabbit-faststream", r + 1, 200, fs, 500.0, 48.0, 0.2, handled=200, machine_busy=0.5),
            Sample("rabbit-dramatiq", r + 1, 200, dq, 600.0, 39.0, 0.2, handled=200, machine_busy=0.5),
            Sample(
                "rabbit-pipeline-sqlite",
                r + 1,
                200,
                pipe,
                900.0,
                110.0,
                0.2,
                handled=150,
                machine_busy=0.9,
                latency_p50_ms=5.0,
                latency_p99_ms=20.0,
                latency_rate=pipe / 2,
            ),
            Sample("redis-faststream", r + 1, 200, rfs, 700.0, 52.0, 0.2, handled=200),
            Sample("redis-pipeline-sqlite", r + 1, 200, rpipe, 800.0, 100.0, 0.2, handled=200, latency_p99_ms=30.0),
        ]
    found.append(Sample("redis-raw", 1, 200, error="RuntimeError('broker down')"))
    return found


def test_targets_use_medians_and_paired_rounds() -> None:
    targets = {t.name: t for t in report.targets(_samples())}
    fs = targets["RabbitMQ: pipeline (SQLite) / bare FastStream"]
    assert fs.measured == pytest.approx(950 / 1050)
    assert fs.per_round == pytest.approx((0.9, 1000 / 1100))
    assert fs.holds is True  # >= 0.5
    dramatiq = targets["RabbitMQ: pipeline (SQLite) / Dramatiq"]
    assert dramatiq.measured == pytest.approx(950 / 750)
    assert dramatiq.holds is None  # shown, no target
    assert targets["Redis: pipeline (SQLite) / bare FastStream stream"].holds is True  # 1950 / 550 >= 2
    # The hand-rolled contenders did not run: their targets are listed, unmeasured.
    assert targets["RabbitMQ: pipeline (SQLite) / hand-rolled"].holds is None
    assert targets["Redis: pipeline (SQLite) / hand-rolled"].holds is None
    assert targets["RabbitMQ pipeline, SQLite: p99 latency at half max"].holds is True
    assert targets["Redis pipeline, SQLite: p99 latency at half max"].holds is False


def _handrolled(rates: list[tuple[float, float]]) -> list[Sample]:
    return [
        sample
        for r, (rabbit, redis) in enumerate(rates)
        for sample in (
            Sample("rabbit-handrolled", r + 1, 200, rabbit, 3000.0, 80.0, 1.0, handled=200),
            Sample("redis-handrolled", r + 1, 200, redis, 2500.0, 80.0, 1.0, handled=200),
        )
    ]


def test_the_pipeline_is_measured_against_the_hand_rolled_contenders() -> None:
    samples = _samples() + _handrolled([(100.0, 200.0), (90.0, 180.0)])
    targets = {t.name: t for t in report.targets(samples)}
    rabbit = targets["RabbitMQ: pipeline (SQLite) / hand-rolled"]
    assert rabbit.measured == pytest.approx(950 / 95)
    assert rabbit.per_round == pytest.approx((9.0, 1000 / 90))
    assert (rabbit.goal, rabbit.holds) == (10.0, True)
    redis = targets["Redis: pipeline (SQLite) / hand-rolled"]
    assert redis.measured == pytest.approx(1950 / 190)
    assert redis.holds is True
    names = [t.name for t in report.targets(samples)]
    assert names[:4] == [
        "RabbitMQ: pipeline (SQLite) / bare FastStream",
        "RabbitMQ: pipeline (SQLite) / hand-rolled",
        "Redis: pipeline (SQLite) / bare FastStream stream",
        "Redis: pipeline (SQLite) / hand-rolled",
    ]
    text = report.render_markdown(samples, {"n": 200, "rounds": 2, "loop": "asyncio", "cpus": 2})
    assert "| RabbitMQ: pipeline (SQLite) / hand-rolled | >= 10 x | 10.00 x | 9.00, 11.11 | yes |" in text
    assert "| RabbitMQ: pipeline (SQLite) / bare FastStream | >= 0.5 x | 0.90 x |" in text
    assert "| Redis: pipeline (SQLite) / bare FastStream stream | >= 2 x |" in text
    assert "| RabbitMQ: pipeline (SQLite) / Dramatiq | - | 1.27 x |" in text
    assert "| (h) hand-rolled FastStream + SQLAlchemy | RabbitMQ |" in text
    assert "2 round(s) only" in text  # the targets need at least 3 interleaved rounds
    three = samples + [Sample(s.contender, 3, s.n, s.drain_rate, handled=s.handled) for s in samples if s.round == 1]
    assert "round(s) only" not in report.render_markdown(three, {})


def test_every_contender_is_registered_once() -> None:
    from bench.model import CONTENDERS
    from bench.runner import BARE, PIPELINE_LOG_LEVELS, PIPELINES

    assert set(ALL_CONTENDERS) == set(CONTENDERS)
    assert set(ALL_CONTENDERS) == set(BARE) | set(PIPELINES)
    assert not set(BARE) & set(PIPELINES)
    assert {"rabbit-handrolled", "redis-handrolled"} <= set(BARE)
    names = [(broker, name) for _module, broker, name in BARE.values()]
    assert len(names) == len(set(names))  # each reads its own queue or stream
    # The pipelines at INFO are their WARNING siblings in all but the log level.
    assert PIPELINE_LOG_LEVELS == {"rabbit-pipeline-sqlite-info": "INFO", "redis-pipeline-sqlite-info": "INFO"}
    for key in PIPELINE_LOG_LEVELS:
        assert PIPELINES[key] == PIPELINES[key.removesuffix("-info")]
        assert CONTENDERS[key].broker == CONTENDERS[key.removesuffix("-info")].broker


def _at_info(rates: list[tuple[float, float]]) -> list[Sample]:
    return [
        sample
        for r, (rabbit, redis) in enumerate(rates)
        for sample in (
            Sample("rabbit-pipeline-sqlite-info", r + 1, 200, rabbit, 1000.0, 110.0, 0.2, handled=200),
            Sample("redis-pipeline-sqlite-info", r + 1, 200, redis, 900.0, 100.0, 0.2, handled=200),
        )
    ]


def test_the_pipeline_at_info_is_measured_against_itself_at_warning() -> None:
    """Ratios of medians of the same rounds: the INFO worker over the WARNING one, each broker, goal 0.85."""
    names = ["RabbitMQ: pipeline at INFO / at WARNING", "Redis: pipeline at INFO / at WARNING"]
    unmeasured = {t.name: t for t in report.targets(_samples())}
    assert [unmeasured[n].holds for n in names] == [None, None]  # listed even when the INFO ones did not run
    samples = _samples() + _at_info([(855.0, 1500.0), (800.0, 1700.0)])  # WARNING: 900, 1000 and 2000, 1900
    targets = {t.name: t for t in report.targets(samples)}
    rabbit = targets[names[0]]
    assert rabbit.measured == pytest.approx(827.5 / 950)
    assert rabbit.per_round == pytest.approx((0.95, 0.8))
    assert (rabbit.goal, rabbit.holds) == (0.85, True)
    redis = targets[names[1]]
    assert redis.measured == pytest.approx(1600 / 1950)
    assert redis.per_round == pytest.approx((0.75, 1700 / 1900))
    assert redis.holds is False
    text = report.render_markdown(samples, {"n": 200, "rounds": 2, "loop": "asyncio", "cpus": 2})
    assert "| RabbitMQ: pipeline at INFO / at WARNING | >= 0.85 x | 0.87 x | 0.95, 0.80 | yes |" in text
    assert "| Redis: pipeline at INFO / at WARNING | >= 0.85 x | 0.82 x | 0.75, 0.89 | **no** |" in text
    assert "| (d) pipeline, SQLite, at INFO | RabbitMQ |" in text
    assert "| (g) pipeline, SQLite, at INFO | Redis |" in text
    # Latency and RSS targets stay those of the WARNING workers.
    assert not [t for t in targets if "INFO" in t and "/ at WARNING" not in t]


def test_the_worker_logs_at_its_level_into_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WARNING unless the contender says INFO; stdout and stderr both go to a file, never a pipe."""
    import subprocess

    from bench import pipeline

    monkeypatch.delenv("BENCH_PIPELINE_LOG_LEVEL", raising=False)
    cfg = BenchConfig()
    assert pipeline.worker_env(cfg, "sqlite+aiosqlite:///x.db", cfg.rabbit_url)["PIPELINE_LOG_LEVEL"] == "WARNING"
    env = pipeline.worker_env(cfg, "sqlite+aiosqlite:///x.db", cfg.rabbit_url, PIPELINE_LOG_LEVEL="INFO")
    assert env["PIPELINE_LOG_LEVEL"] == "INFO"
    seen: dict[str, object] = {}

    class FakePopen:
        pid = 0

        def __init__(self, command: list[str], **kwargs: object) -> None:
            seen.update(kwargs)
            stdout = kwargs["stdout"]
            assert hasattr(stdout, "write")
            stdout.write(b"".join(b'{"event":"handled","n":%d}\n' % i for i in range(20_000)))

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    worker = pipeline.start_worker(cfg, env, tmp_path, "w0")
    assert seen["env"] is env
    assert seen["stderr"] == subprocess.STDOUT
    assert getattr(seen["stdout"], "name", None) == str(tmp_path / "w0.log")
    assert worker.log_path == tmp_path / "w0.log"
    assert worker.tail(2) == '{"event":"handled","n":19998}\n{"event":"handled","n":19999}'


def test_the_hand_rolled_store_commits_once_and_marks_the_outbox() -> None:
    """Inbox, event and outbox rows in one transaction; a redelivery has no second effect."""
    from sqlalchemy import func, select

    from bench.contenders.handrolled import Inbox, Outbox, StoredEvent, fresh_store
    from schemas import SendEmail

    async def run() -> tuple[int, int, int, int, bool]:
        cmd = SendEmail(to="ada@example.com", subject="Hi", body="Hello")
        async with fresh_store() as store:
            first = await store.record("m-1", "c-1", cmd)
            assert first is not None
            assert first.payload["message_id"] == "m-1"
            assert first.payload["type"] == "email.sent"
            assert await store.record("m-1", "c-1", cmd) is None
            await store.mark_published(first)
            async with store.session() as session:
                counts = [
                    int(await session.scalar(select(func.count()).select_from(table)) or 0)
                    for table in (Inbox, StoredEvent, Outbox)
                ]
                unpublished = await session.scalar(
                    select(func.count()).select_from(Outbox).where(Outbox.published_at.is_(None))
                )
                event = await session.scalar(select(StoredEvent))
                assert event is not None
                same = event.event_id == first.event_id
        return counts[0], counts[1], counts[2], int(unpublished or 0), same

    assert asyncio.run(run()) == (1, 1, 1, 0, True)


def test_report_renders_markdown_and_json(tmp_path: Path) -> None:
    meta = {"n": 200, "rounds": 2, "loop": "asyncio", "cpus": 2, "max_drain_seconds": 20, "notes": ["a note"]}
    text = report.render_markdown(_samples(), meta)
    assert "| (b) bare FastStream | RabbitMQ |" in text
    assert "1,050 (1,000–1,100; 10%)" in text
    assert "950 (900–1,000; 11%) †" in text  # timed on fewer than N
    assert "round 1, redis-raw: RuntimeError('broker down')" in text
    assert "- a note" in text
    assert "CPU basis" in text
    written = report.write(_samples(), meta, tmp_path, chart=False)
    assert [p.name for p in written] == ["results.md", "results.json"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["rabbit-faststream"]["drain_rate"]["median"] == 1050
    assert len(data["samples"]) == 11
    assert Sample.from_dict(data["samples"][-1]).error == "RuntimeError('broker down')"


def test_chart_renders(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = report.render_chart(_samples(), {"n": 200, "rounds": 2}, tmp_path / "chart.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_profile_summary_from_collapsed_stacks() -> None:
    raw = [
        "thread (1): MainThread;run (asyncio/base_events.py:1);commit (streams/eventstore/store.py:10);"
        "execute (sqlalchemy/x.py:2) 6",
        "thread (1): MainThread;run (asyncio/base_events.py:1);select (selectors.py:5);"
        "EpollSelector.select (selectors.py:468) 4",
        "thread (2): Thread-1;_connection_worker_thread (aiosqlite/core.py:59) 10",
        "thread (2): Thread-1;_connection_worker_thread (aiosqlite/core.py:63) 2",
    ]
    profile = Profile.parse(raw)
    assert sum(profile.busy().values()) == 8
    assert dict(profile.components()) == {"SQLAlchemy": 0.75, "aiosqlite + SQLite": 0.25}
    assert profile.loop_idle() == pytest.approx(0.4)
    assert component(["f (asyncio/events.py:1)", "g (streams/consume/pipeline.py:3)", "h (asyncio/x.py:1)"]).startswith(
        "pipeline code"
    )


@pytest.mark.connected
def test_one_tiny_contender_run(tmp_path: Path) -> None:
    """The raw Redis consumer-group loop, N=200, in its own process, through the real runner."""
    require("redis")
    from bench import runner

    cfg = BenchConfig(n=200, rounds=1, contenders=("redis-raw",), max_drain_seconds=0, timeout=60)
    sample = asyncio.run(runner.run_bare("redis-raw", cfg, cfg.rabbit_url, 1, tmp_path, cfg.n))
    assert sample.error is None
    assert sample.handled == 200
    assert sample.details["invalid"] == 0
    assert sample.drain_rate > 0
    assert sample.peak_rss_mb > 0


@pytest.mark.connected
def test_one_tiny_hand_rolled_run(tmp_path: Path) -> None:
    """The hand-rolled Redis contender, N=200, through the real runner: every message has its outcome."""
    require("redis")
    from bench import runner

    cfg = BenchConfig(n=200, rounds=1, contenders=("redis-handrolled",), max_drain_seconds=0, timeout=60)
    sample = asyncio.run(runner.run_bare("redis-handrolled", cfg, cfg.rabbit_url, 1, tmp_path, cfg.n))
    assert sample.error is None
    assert sample.handled == 200
    assert sample.details["outcomes"] == 200
    assert sample.drain_rate > 0


def test_cpu_basis_ratios() -> None:
    rows = dict(report.cpu_ratios(_samples()))
    assert rows["RabbitMQ: pipeline (SQLite) / bare FastStream"] == pytest.approx(500 / 900)


def test_the_latency_phase_shows_the_echo_consumer_beside_the_pipeline() -> None:
    """The pipeline's p50 / p99 at its fixed rate, next to the echo consumer's at the same rate (medians)."""
    samples = _samples()
    for sample, (p99, echo_p99) in zip(
        [s for s in samples if s.contender == "rabbit-pipeline-sqlite"], [(20.0, 70.0), (40.0, 90.0)], strict=True
    ):
        sample.details = {
            "latency": {
                "rate": 500.0,
                "achieved_rate": 499.0,
                "worker_cpu_share": 0.5,
                "worker_cpu_us_per_msg": 300.0,
                "p50_ms": 5.0,
                "p99_ms": p99,
            },
            "echo": {"p50_ms": 3.0, "p99_ms": echo_p99, "max_ms": 100.0},
        }
    text = report.render_markdown(samples, {"n": 200, "rounds": 2, "loop": "asyncio", "cpus": 2})
    assert "| (d) pipeline, SQLite | 500 | 499 | 50% | 300 | 5.0 / 30.0 | 3.0 / 80.0 |" in text


def test_the_probe_reads_messages_and_transactions_of_the_group_commit() -> None:
    from bench.probe import commit_totals

    text = (
        "# HELP pipeline_store_batch_size Units of work written per group-commit transaction.\n"
        'pipeline_store_batch_size_bucket{le="1.0"} 3.0\n'
        "pipeline_store_batch_size_count 40.0\n"
        "pipeline_store_batch_size_sum 250.0\n"
        "pipeline_store_batch_size_created 1.7e9\n"
    )
    assert commit_totals(text) == (250.0, 40.0)
    assert commit_totals("") == (0.0, 0.0)
