"""The chaos run (`make chaos`): nothing confirmed is lost, no effect is doubled, only poison is parked.

`CHAOS_SEED` (default random, printed) makes the whole run reproducible: which commands are
poison, which broker and flow each goes to, when each fault strikes and which worker dies.
`CHAOS_N` (default 20,000) and `CHAOS_RATE` (commands per second) scale it. The summary and the
timeline are written to `tests/chaos/results/run-<seed>.json` and `latest.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.chaos.scenario import ChaosConfig, ChaosRun, save


async def test_chaos_run_loses_nothing_and_doubles_nothing(seed: int, servers_installed: None, tmp_path: Path) -> None:
    cfg = ChaosConfig.from_env(seed)
    summary = await ChaosRun(cfg, tmp_path).run()
    path = save(summary)
    brief = {k: v for k, v in summary.items() if k not in ("timeline", "deaths", "throughput")}
    brief["recoveries"] = summary["throughput"]["recoveries"]
    brief["baseline_per_second"] = summary["throughput"]["baseline_per_second"]
    print(json.dumps(brief, indent=1, default=str)[:20000])
    print(f"summary written to {path}")

    assert summary["confirmed"] == cfg.n + summary["named_marked"], "every command was confirmed"
    assert summary["lost"] == [], "confirmed but neither handled nor dead-lettered"
    assert summary["duplicate_side_effects"] == {}, "an e-mail sent twice (two keys answered 2xx for one command)"
    assert summary["idempotency_key_not_message_id"] == {}, "the provider gets the message id as idempotency key"
    assert summary["not_exactly_one_outcome"] == {}, "one outcome per command after dedupe on event_id"
    assert summary["wrong_outcome"] == {}, "success for valid commands, message.dead_lettered for poison"
    assert summary["bad_dead_letters"] == [], "dead letters are exactly the poison set, with every header"
    assert summary["dead_letters_missing_broker"] == []
    assert summary["dead_letters_missing_table"] == []
    assert summary["dead_letters_unexpected_table"] == []
    assert summary["dead_letter_duplicates_broker"] == {}
    assert summary["dead_letters_broker"] == summary["poison"]
    assert summary["dead_letters_table"] == summary["poison"]
    assert summary["observer_errors"] == []
    assert set(summary["phase_b"]["fired"]) == {"after_handler", "after_commit", "before_publish"}
    assert summary["throughput"]["baseline_per_second"] > 0, "a baseline was measured before the first fault"
    slow = [r for r in summary["throughput"]["recoveries"] if (r["recovered_within_seconds"] or 1e9) > 60]
    assert slow == [], f"throughput not back to 80% of baseline within 60 s: {slow}"
