"""The I/O bench's pure parts (bench/io): settings from the environment and the report's bookkeeping.

No timed assertions: the numbers live in bench/results/io-latest.*; here only shapes are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.io import report
from bench.io.config import ALL, IoConfig
from bench.io.runs import IoSample


def _sample(key: str, scenario: str, rate: float, **fields: int) -> IoSample:
    return IoSample(contender=key, scenario=scenario, round=1, n=1000, rate=rate, steady_rate=rate, **fields)  # type: ignore[arg-type]


def test_quick_mode_and_overrides_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """BENCH_IO_QUICK shrinks the run; a BENCH_IO_* variable still wins; an unknown contender is refused."""
    monkeypatch.setenv("BENCH_IO_QUICK", "1")
    monkeypatch.setenv("BENCH_IO_LIMITED_N", "321")
    cfg = IoConfig.from_env()
    assert (cfg.quick, cfg.rounds, cfg.limited_n) == (True, 1, 321)
    assert cfg.free_n < IoConfig().free_n
    assert cfg.only == ALL
    monkeypatch.setenv("BENCH_IO_ONLY", "pipeline,celery")
    with pytest.raises(ValueError, match="celery"):
        IoConfig.from_env().validate()


def test_report_shows_ratios_limits_and_failures(tmp_path: Path) -> None:
    """Ratios of median rates, the share of the provider's limit and failed runs make it into the report."""
    samples = [
        _sample("pipeline", "free", 1200.0, requests=1000, delivered=1000),
        _sample("dramatiq-http", "free", 80.0, requests=1000, delivered=1000),
        _sample("pipeline-limits-1w", "limited", 190.0, requests=1000, rejected=0, delivered=1000),
        _sample("pipeline-nolimits-1w", "limited", 150.0, requests=1250, rejected=250, duplicates=2),
        IoSample(contender="llm-limits", scenario="llm", round=1, n=10, error="RuntimeError('boom')"),
    ]
    meta = {"date": "2026-12-07 13:30 UTC", "config": {"provider_limit": 200}, "rounds": 1, "quick": False}
    text = report.render_markdown(samples, meta)

    assert "| Dramatiq, threads + httpx2.Client | 80 | 15.0x |" in text
    assert "| one pipeline worker, e-mails/s | 1,200.0 | >= 1,000 | yes |" in text
    assert "| pipeline / Dramatiq | 15.0x | >= 10x | yes |" in text
    assert "| pipeline, 1 worker, PIPELINE_LIMITS | 190 | 95 % |" in text
    assert "| 20.0 | 0 | 2 |" in text  # 429 % of requests, dead letters, duplicates
    assert "llm-limits, round 1: `RuntimeError('boom')`" in text

    written = report.write(samples, meta, tmp_path)
    assert sorted(p.name for p in written) == [
        "io-2026-12-07-1330.json",
        "io-2026-12-07-1330.md",
        "io-latest.json",
        "io-latest.md",
    ]
    data = json.loads((tmp_path / "io-latest.json").read_text())
    assert data["summary"]["pipeline-nolimits-1w"]["rejected_pct"]["median"] == 20.0
    assert [t["met"] for t in data["targets"]] == [True, True]
