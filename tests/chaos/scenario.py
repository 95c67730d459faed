"""One chaos run: load on both brokers and flows, faults on a seeded timeline, then the books are checked.

Phase A: N commands (1% poison) published open-loop at a fixed rate over both brokers and both
flows while the timeline SIGKILLs random workers, restarts RabbitMQ and Redis, and takes the
mail provider down for 10 s. Phase B: one-shot crash points (after_handler, after_commit,
before_publish), each armed in one worker for one incarnation. Then quiescence, and the checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from streams.core import names
from streams.transport import scheduler
from tests.chaos.infra import Supervisor, Timeline, fresh_postgres, plain_pg
from tests.chaos.load import FLOW_QUEUE, SUCCESS, Command, Observer, Publisher, make_command
from tests.connected.conftest import wait_ready
from tests.connected.rabbitserver import RabbitServer
from tests.connected.redisserver import RedisServer
from tests.httpserver import RecordingServer, ScriptedResponse

RESULTS = Path(__file__).resolve().parent / "results"
FAILURE_HEADERS = names.DEAD_LETTER_HEADERS
NAMED_POINTS = ("after_handler", "after_commit", "before_publish")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class ChaosConfig:
    """The knobs of one run (environment `CHAOS_*`)."""

    seed: int
    n: int = 20_000
    rate: float = 60.0  # commands per second, open loop, both brokers together
    workers: int = 3
    poison_ratio: float = 0.01
    kills: int = 10
    outage_seconds: float = 10.0
    window: float = 10.0  # seconds of the sliding window for throughput
    recovery_limit: float = 60.0
    delivery_limit: int = 3  # a poison message costs three worker deaths (streams.policy.suspects)
    prefetch: int = 64
    redis_read_count: int = 64
    redis_max_workers: int = 16
    quiesce_timeout: float = 900.0
    named_per_point: int = 4  # marked messages per crash point and round
    # Workers under `python -m streams.ops.forkserver`, which replaces a dead worker by a fork of a warm
    # parent; off: `faststream run`, restarted by the supervisor (a full interpreter start).
    forkserver: bool = True

    @classmethod
    def from_env(cls, seed: int) -> ChaosConfig:
        return cls(
            seed=seed,
            n=_env_int("CHAOS_N", cls.n),
            rate=_env_float("CHAOS_RATE", cls.rate),
            workers=_env_int("CHAOS_WORKERS", cls.workers),
            kills=_env_int("CHAOS_KILLS", cls.kills),
            delivery_limit=_env_int("CHAOS_DELIVERY_LIMIT", cls.delivery_limit),
            prefetch=_env_int("CHAOS_PREFETCH", cls.prefetch),
            redis_read_count=_env_int("CHAOS_REDIS_READ_COUNT", cls.redis_read_count),
            redis_max_workers=_env_int("CHAOS_REDIS_MAX_WORKERS", cls.redis_max_workers),
            forkserver=_env_int("CHAOS_FORKSERVER", 1) == 1,
        )


@dataclass
class Fault:
    """One fault on the timeline; `start`/`end` are seconds since t0 (end = start for a kill)."""

    kind: str
    at: float  # planned
    start: float = 0.0
    end: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def plan_faults(cfg: ChaosConfig, rng: random.Random, publish_seconds: float, warmup: float) -> list[Fault]:
    """Kills at random moments; the three big faults in separate thirds of the faulted span."""
    first, last = warmup, max(warmup + 30.0, 0.75 * publish_seconds)
    faults = [Fault("sigkill", round(rng.uniform(first, last), 2)) for _ in range(cfg.kills)]
    big = ["rabbit_restart", "redis_restart", "mailer_503"]
    rng.shuffle(big)
    third = (last - first) / 3
    for i, kind in enumerate(big):
        lo = first + i * third
        faults.append(Fault(kind, round(rng.uniform(lo + 0.15 * third, lo + 0.6 * third), 2)))
    return sorted(faults, key=lambda f: f.at)


class ChaosRun:
    """Everything one run holds; `run()` returns the summary (also written under results/)."""

    def __init__(self, cfg: ChaosConfig, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.rng = random.Random(cfg.seed)
        self.timeline = Timeline()
        self.run_id = f"c{cfg.seed}"
        self.poison_marker = f"CHAOS-POISON-{cfg.seed}"
        self.commands: list[Command] = []
        self.faults: list[Fault] = []
        self.named: list[Command] = []
        self.named_crashes: dict[str, list[dict[str, Any]]] = {}

    # -- set-up ------------------------------------------------------------------------------

    def build_commands(self) -> None:
        n = self.cfg.n
        # Poison starts after the warm-up, so the baseline is the pipeline's, not its crash loops.
        first = min(int(self.warmup() * self.cfg.rate), n // 2)
        poison = set(self.rng.sample(range(first, n), round(n * self.cfg.poison_ratio)))
        for i in range(n):
            if i in poison:
                self.commands.append(make_command(self.rng, i, self.run_id, "poison", self.poison_marker))
            else:
                self.commands.append(make_command(self.rng, i, self.run_id, "normal"))

    def warmup(self) -> float:
        """Seconds of load before the first fault or poison message: the baseline is measured there."""
        return min(60.0, max(30.0, 0.1 * self.cfg.n / self.cfg.rate))

    def worker_env(
        self, rabbit: RabbitServer, redis: RedisServer, db_url: str, mail: RecordingServer
    ) -> dict[str, str]:
        return {
            "PIPELINE_RABBIT_URL": rabbit.url,
            "PIPELINE_REDIS_URL": redis.url,
            "PIPELINE_DATABASE_URL": db_url,
            "PIPELINE_MAILER": "http",
            "PIPELINE_MAILER_URL": mail.url_for("/send"),
            "PIPELINE_MAILER_TIMEOUT": "5",
            "PIPELINE_RETRY_BASE_DELAY": "1",
            "PIPELINE_RETRY_MAX_DELAY": "8",
            "PIPELINE_RETRY_MAX_ATTEMPTS": "12",
            "PIPELINE_REDIS_MOVER_INTERVAL_MS": "50",
            "PIPELINE_REDIS_CLAIM_IDLE_MS": "3000",
            "PIPELINE_OUTBOX_ORPHAN_SECONDS": "3",
            "PIPELINE_BREAKER_THRESHOLD": "5",
            "PIPELINE_BREAKER_RECOVERY_SECONDS": "2",
            "PIPELINE_DELIVERY_LIMIT": str(self.cfg.delivery_limit),
            "PIPELINE_RABBIT_PREFETCH": str(self.cfg.prefetch),
            "PIPELINE_REDIS_READ_COUNT": str(self.cfg.redis_read_count),
            "PIPELINE_REDIS_MAX_WORKERS": str(self.cfg.redis_max_workers),
            "PIPELINE_GRACEFUL_TIMEOUT": "10",
            "PIPELINE_LOG_LEVEL": "INFO",
            "PIPELINE_FAULT_CRASH_MARKER": self.poison_marker,
            "PIPELINE_FAULT_CRASH_POINTS": "before_handler",
        }

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        self.build_commands()
        tl = self.timeline
        tl.log("run", seed=self.cfg.seed, config=asdict(self.cfg))
        rabbit = RabbitServer()
        redis = RedisServer("--appendonly", "yes", "--appendfsync", "always")
        await asyncio.to_thread(rabbit.start)
        await asyncio.to_thread(redis.start)
        tl.log("servers up", rabbit=rabbit.url, redis=redis.url)
        try:
            with RecordingServer(default=ScriptedResponse(200, {"id": "ok"})) as mail:
                async with fresh_postgres() as db_url:
                    return await self._run(rabbit, redis, mail, db_url)
        finally:
            await asyncio.to_thread(rabbit.stop)
            await asyncio.to_thread(redis.stop)

    async def _run(
        self, rabbit: RabbitServer, redis: RedisServer, mail: RecordingServer, db_url: str
    ) -> dict[str, Any]:
        tl = self.timeline
        env = self.worker_env(rabbit, redis, db_url, mail)
        sup = Supervisor(self.tmp, env, self.cfg.workers, tl, self.rng, forkserver=self.cfg.forkserver)
        observer = Observer(rabbit.url, redis.url, tl.t0, wall0=tl.wall0)
        await observer.declare()
        await sup.start()
        for slot in sup.slots:
            assert slot.worker is not None
            await wait_ready(slot.worker, timeout=90)
        tl.log("workers ready", count=len(sup.slots))
        await observer.start()
        publisher = Publisher(rabbit.url, redis.url, tl.t0)
        await publisher.open()
        try:
            phase_a = await self.phase_a(sup, publisher, observer, rabbit, redis, mail)
            await self.quiesce(observer, publisher, rabbit, redis, db_url, "phase A")
            phase_b = await self.phase_b(sup, publisher, observer)
            await self.quiesce(observer, publisher, rabbit, redis, db_url, "phase B")
            books = await self.check_books(publisher, observer, mail, rabbit, redis, db_url, sup)
        finally:
            await publisher.close()
            await observer.stop()
            await sup.stop()
        return {
            "seed": self.cfg.seed,
            "config": asdict(self.cfg),
            "duration_seconds": tl.now(),
            "phase_a": phase_a,
            "phase_b": phase_b,
            **books,
            "worker_deaths": len(tl.of("worker died")),
            # Exit code 70: the shutdown watchdog ended a SIGTERM'd worker whose shutdown hung.
            "hung_shutdowns": [d for d in tl.of("worker died") if d.get("code") == 70],
            "worker_restarts": sup.restarts,
            "publish_retries": len(publisher.failed_tries),
            "timeline": [e for e in tl.entries if e["what"] != "worker died"],
            "deaths": tl.of("worker died"),
        }

    async def phase_a(
        self,
        sup: Supervisor,
        publisher: Publisher,
        observer: Observer,
        rabbit: RabbitServer,
        redis: RedisServer,
        mail: RecordingServer,
    ) -> dict[str, Any]:
        cfg = self.cfg
        tl = self.timeline
        publish_seconds = cfg.n / cfg.rate
        warmup = self.warmup()
        self.faults = plan_faults(cfg, self.rng, publish_seconds, warmup)
        tl.log("fault plan", plan=[(f.kind, f.at) for f in self.faults])
        start = tl.now()
        by_broker: dict[str, list[Command]] = {"rabbit": [], "redis": []}
        for cmd in self.commands:
            by_broker[cmd.broker].append(cmd)
        tl.log("phase A publishing", n=cfg.n, rate=cfg.rate, seconds=round(publish_seconds, 1))

        async def pace(cmds: list[Command]) -> None:
            # Both brokers follow one schedule: command i is due at start + i / rate.
            index = {c.mid: i for i, c in enumerate(self.commands)}
            inflight: set[asyncio.Task[None]] = set()
            for cmd in cmds:
                due = start + index[cmd.mid] / cfg.rate
                delay = due - tl.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(publisher.publish(cmd))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                if len(inflight) >= 32:  # a broker that is down holds at most this many back
                    await asyncio.wait(set(inflight), return_when=asyncio.FIRST_COMPLETED)
            if inflight:
                await asyncio.gather(*inflight)

        injector = asyncio.create_task(self.inject(sup, rabbit, redis, mail, start))
        await asyncio.gather(pace(by_broker["rabbit"]), pace(by_broker["redis"]))
        published_at = tl.now()
        tl.log("phase A published", confirmed=len(publisher.ledger), seconds=round(published_at - start, 1))
        await injector
        return {
            "start": start,
            "published_at": published_at,
            "warmup_seconds": warmup,
            "faults": [asdict(f) for f in self.faults],
        }

    async def inject(
        self, sup: Supervisor, rabbit: RabbitServer, redis: RedisServer, mail: RecordingServer, start: float
    ) -> None:
        await asyncio.gather(*(self._strike(f, sup, rabbit, redis, mail, start) for f in self.faults))

    async def _strike(
        self,
        fault: Fault,
        sup: Supervisor,
        rabbit: RabbitServer,
        redis: RedisServer,
        mail: RecordingServer,
        start: float,
    ) -> None:
        """One fault at its planned moment; faults overlap freely (a kill may land during a restart)."""
        tl = self.timeline
        delay = start + fault.at - tl.now()
        if delay > 0:
            await asyncio.sleep(delay)
        fault.start = tl.now()
        if fault.kind == "sigkill":
            alive = sup.alive()
            if not alive:
                tl.log("sigkill skipped: no worker alive")
                fault.detail["skipped"] = True
            else:
                victim = self.rng.choice(alive)
                fault.detail["slot"] = victim.index
                sup.kill(victim, "timeline")
        elif fault.kind == "rabbit_restart":
            tl.log("RabbitMQ stop_app")
            await asyncio.to_thread(rabbit.stop_app)
            await asyncio.sleep(3)
            await asyncio.to_thread(rabbit.start_app)
            tl.log("RabbitMQ start_app done")
        elif fault.kind == "redis_restart":
            tl.log("Redis restart (AOF always)")
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(2)
            await asyncio.to_thread(redis.start)
            tl.log("Redis back")
        elif fault.kind == "mailer_503":
            tl.log("mailer answers 503", seconds=self.cfg.outage_seconds)
            mail.default = ScriptedResponse(503, {"error": "down"})
            await asyncio.sleep(self.cfg.outage_seconds)
            mail.default = ScriptedResponse(200, {"id": "ok"})
            tl.log("mailer answers 200 again")
        fault.end = tl.now()

    async def phase_b(self, sup: Supervisor, publisher: Publisher, observer: Observer) -> dict[str, Any]:
        """Arm one crash point per slot for one incarnation; publish marked messages until each fired."""
        tl = self.timeline
        markers = {point: f"CHAOS-{point.upper()}-{self.cfg.seed}" for point in NAMED_POINTS}
        armed: dict[str, int] = {}
        for i, point in enumerate(NAMED_POINTS):
            slot = sup.slots[i % len(sup.slots)]
            sup.arm(
                slot,
                {
                    "PIPELINE_FAULT_CRASH_MARKER": markers[point],
                    "PIPELINE_FAULT_CRASH_POINTS": point,
                    "PIPELINE_FAULT_CRASH_ONCE": str(self.tmp / f"fired-{point}"),
                },
                f"one-shot {point}",
            )
        for i, point in enumerate(NAMED_POINTS):
            slot = sup.slots[i % len(sup.slots)]
            deadline = time.monotonic() + 120
            while slot.armed_now is None or slot.worker is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"slot {slot.index} never came back armed for {point}")
                await asyncio.sleep(0.2)
            await wait_ready(slot.worker, timeout=90)
            armed[point] = len(slot.deaths)
        tl.log("phase B armed", slots={p: i % len(sup.slots) for i, p in enumerate(NAMED_POINTS)})
        fired: dict[str, dict[str, Any]] = {}
        index = self.cfg.n
        for _round in range(12):
            for point in NAMED_POINTS:
                if point in fired:
                    continue
                for _ in range(self.cfg.named_per_point):
                    cmd = make_command(self.rng, index, self.run_id, f"named:{point}", markers[point])
                    index += 1
                    self.named.append(cmd)
                    await publisher.publish(cmd)
            await asyncio.sleep(4)
            for i, point in enumerate(NAMED_POINTS):
                slot = sup.slots[i % len(sup.slots)]
                if point not in fired and len(slot.deaths) > armed[point]:
                    fired[point] = slot.deaths[armed[point]]
            if len(fired) == len(NAMED_POINTS):
                break
        tl.log("phase B crash points fired", fired={p: d["t"] for p, d in fired.items()})
        return {"markers": markers, "fired": fired, "marked_messages": len(self.named)}

    # -- quiescence --------------------------------------------------------------------------

    async def broker_backlog(self, rabbit: RabbitServer, redis: RedisServer, db_url: str) -> dict[str, int]:
        """What is still somewhere: queue messages (ready + unacked), stream lag + pending, retries, outbox."""
        backlog: dict[str, int] = {}
        out = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-n", rabbit.node, "list_queues", "-q", "name", "messages"],
            env=rabbit._env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and not parts[0].endswith(".dlq") and parts[0] != "chaos-probe":
                backlog[f"rabbit:{parts[0]}"] = int(parts[1])
        if out.returncode != 0:
            backlog["rabbit:unreachable"] = 1
        client: Any = aioredis.from_url(redis.url)
        try:
            for stream, group in (
                (names.EMAIL_STREAM, names.EMAIL_GROUP),
                (names.COMPLETION_STREAM, names.COMPLETION_GROUP),
            ):
                for info in await client.xinfo_groups(stream):
                    if info["name"].decode() == group:
                        backlog[f"redis:{stream}:lag"] = int(info.get("lag") or 0)
                        backlog[f"redis:{stream}:pending"] = int(info.get("pending") or 0)
                backlog[f"redis:{stream}:retry"] = await scheduler.pending(client, stream)
        finally:
            await client.aclose()
        conn = await asyncpg.connect(plain_pg(db_url))
        try:
            backlog["outbox:unpublished"] = int(
                await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            )
        finally:
            await conn.close()
        return {k: v for k, v in backlog.items() if v}

    async def quiesce(
        self,
        observer: Observer,
        publisher: Publisher,
        rabbit: RabbitServer,
        redis: RedisServer,
        db_url: str,
        phase: str,
    ) -> float:
        tl = self.timeline
        started = tl.now()
        deadline = time.monotonic() + self.cfg.quiesce_timeout
        last_report = 0.0
        empty_since: float | None = None
        while True:
            await observer.poll()
            missing = [m for m in publisher.ledger if not observer.terminal(m)]
            backlog = await self.broker_backlog(rabbit, redis, db_url)
            idle = tl.now() - observer.last_event_at
            empty_since = (empty_since or tl.now()) if not backlog else None
            if not backlog and idle > 3 and (not missing or tl.now() - (empty_since or 0) > 30):
                # Nothing left anywhere: what still has no outcome never will (the books say so).
                tl.log(f"{phase} quiescent", after_seconds=round(tl.now() - started, 1), without_outcome=len(missing))
                return tl.now()
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                tl.log(
                    f"{phase} waiting",
                    missing=len(missing),
                    seen=len(observer.events),
                    backlog=backlog,
                    sample=missing[:3],
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{phase}: no quiescence in {self.cfg.quiesce_timeout}s: "
                    f"{len(missing)} without outcome, backlog {backlog}"
                )
            await asyncio.sleep(1)

    # -- the books ---------------------------------------------------------------------------

    async def read_dead_letters(self, rabbit: RabbitServer, redis: RedisServer) -> list[dict[str, Any]]:
        letters: list[dict[str, Any]] = []
        conn = await aio_pika.connect(rabbit.url)
        try:
            channel = await conn.channel()
            for queue_name in FLOW_QUEUE.values():
                queue = await channel.declare_queue(names.dlq(queue_name), passive=True)
                while (msg := await queue.get(no_ack=True, fail=False)) is not None:
                    headers = {
                        k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (msg.headers or {}).items()
                    }
                    letters.append(
                        {
                            "broker": "rabbit",
                            "queue": queue_name,
                            "mid": msg.message_id,
                            "headers": headers,
                            "body": bytes(msg.body),
                        }
                    )
        finally:
            await conn.close()
        client: Any = aioredis.from_url(redis.url)
        try:
            for stream in FLOW_QUEUE.values():
                for _eid, fields in await client.xrange(names.dlq(stream)):
                    body, _ = BinaryMessageFormatV1.parse(fields[b"__data__"]) if b"__data__" in fields else (b"", {})
                    headers = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items() if k != b"__data__"}
                    letters.append(
                        {
                            "broker": "redis",
                            "queue": stream,
                            "mid": headers.get(names.H_MESSAGE_ID),
                            "headers": headers,
                            "body": body,
                        }
                    )
        finally:
            await client.aclose()
        return letters

    async def check_books(
        self,
        publisher: Publisher,
        observer: Observer,
        mail: RecordingServer,
        rabbit: RabbitServer,
        redis: RedisServer,
        db_url: str,
        sup: Supervisor,
    ) -> dict[str, Any]:
        ledger = publisher.ledger
        commands = {p.command.mid: p.command for p in ledger.values()}
        poison = {m for m, c in commands.items() if c.kind == "poison"}
        named = {m for m, c in commands.items() if c.kind.startswith("named:")}
        letters = await self.read_dead_letters(rabbit, redis)
        conn = await asyncpg.connect(plain_pg(db_url))
        try:
            rows = await conn.fetch("SELECT message_id, kind, queue, transport, body FROM dead_letters")
            stored_events = int(await conn.fetchval("SELECT count(*) FROM events"))
        finally:
            await conn.close()
        dead_mids = Counter(str(letter["mid"]) for letter in letters)
        table_mids = Counter(str(r["message_id"]) for r in rows)

        lost = sorted(m for m in ledger if not observer.terminal(m) and m not in dead_mids)
        multi = {m: [s.type for s in observer.terminal(m)] for m in ledger if len(observer.terminal(m)) != 1}
        wrong_outcome = {}
        for mid, cmd in commands.items():
            types = [s.type for s in observer.terminal(mid)]
            expected = names.MESSAGE_DEAD_LETTERED if cmd.kind == "poison" else SUCCESS[cmd.flow]
            if types != [expected]:
                wrong_outcome[mid] = {"kind": cmd.kind, "outcomes": types}
        # The provider honours `Idempotency-Key` as real ones do: a repeated call under a key it
        # already answered 2xx sends nothing. An e-mail sent twice is a second key (or a call
        # without one) answered 2xx for the same command; its recipient names the command.
        recipient_of = {json.loads(c.body)["to"]: m for m, c in commands.items() if c.flow == "email"}
        keys_sent: dict[str, set[str]] = {}
        repeated_calls: Counter[str] = Counter()
        wrong_keys: dict[str, list[str]] = {}
        unreadable = 0
        for number, (request, status) in enumerate(mail.answered()):
            if not 200 <= status < 300:
                continue
            try:
                mid = recipient_of.get(request.json.get("to", ""), "unknown")
            except ValueError:  # cut off by a dying worker: a real provider would refuse it, nothing sent
                unreadable += 1
                continue
            key = request.headers.get("idempotency-key") or f"no-key-{number}"
            sent = keys_sent.setdefault(mid, set())
            if key in sent:
                repeated_calls[mid] += 1
            sent.add(key)
            if key != mid:
                wrong_keys.setdefault(mid, []).append(key)
        dup_effects = {m: len(k) for m, k in keys_sent.items() if len(k) > 1}
        repeated_after_crash = {
            m: c for m, c in repeated_calls.items() if commands.get(m) and commands[m].kind == "named:after_handler"
        }
        bad_letters = []
        for letter in letters:
            mid = str(letter["mid"])
            problems = []
            if mid not in poison:
                problems.append(f"not poison (kind {commands[mid].kind if mid in commands else 'unknown'})")
            if letter["headers"].get(names.H_FAILURE_KIND) != "poison":
                problems.append(f"x-failure-kind {letter['headers'].get(names.H_FAILURE_KIND)}")
            problems += [f"missing {h}" for h in FAILURE_HEADERS if not letter["headers"].get(h)]
            if mid in commands and letter["body"] != commands[mid].body:
                problems.append("body changed")
            if mid in commands and letter["broker"] != commands[mid].broker:
                problems.append("wrong broker")
            if problems:
                bad_letters.append(
                    {
                        "mid": mid,
                        "broker": letter["broker"],
                        "problems": problems,
                        "headers": {k: v[:200] for k, v in letter["headers"].items()},
                    }
                )
        event_copies = Counter(observer.copies.values())
        summary = {
            "confirmed": len(ledger),
            "confirmed_by": dict(Counter(f"{c.broker}:{c.flow}:{c.kind.split(':')[0]}" for c in commands.values())),
            "poison": len(poison),
            "named_marked": len(named),
            "lost": lost,
            "not_exactly_one_outcome": multi,
            "wrong_outcome": wrong_outcome,
            "duplicate_side_effects": dup_effects,
            "idempotency_key_not_message_id": wrong_keys,
            "calls_repeated_under_one_key": sum(repeated_calls.values()),
            "mail_requests_cut_off": unreadable,
            "commands_with_repeated_calls": len(repeated_calls),
            "repeated_under_idempotency_key_after_after_handler_crash": repeated_after_crash,
            "dead_letters_broker": len(letters),
            "dead_letters_table": len(rows),
            "dead_letter_duplicates_broker": {m: c for m, c in dead_mids.items() if c > 1},
            "dead_letter_duplicates_table": {m: c for m, c in table_mids.items() if c > 1},
            "dead_letters_missing_broker": sorted(poison - set(dead_mids)),
            "dead_letters_missing_table": sorted(poison - set(table_mids)),
            "dead_letters_unexpected_table": sorted(set(table_mids) - poison),
            "bad_dead_letters": bad_letters,
            "outcome_events": len(observer.events),
            "outcome_event_copies": {str(k): v for k, v in sorted(event_copies.items())},
            "stored_events": stored_events,
            "mailer_requests": len(mail.requests),
            "mailer_503": sum(1 for _ in ()),
            "observer_errors": observer.errors,
            "unexpected_message_ids": sorted(m for m in observer.by_message if m not in ledger)[:20],
        }
        summary["throughput"] = self.throughput(observer)
        return summary

    def throughput(self, observer: Observer) -> dict[str, Any]:
        """Baseline before the first fault; per fault, seconds until a window ran at >= 80% of it again."""
        tl_end = self.timeline.now()
        w = self.cfg.window
        per_second = observer.rates(tl_end)
        start = int(self.faults[0].start) if self.faults else len(per_second)
        first_outcome = next((i for i, c in enumerate(per_second) if c), 0)
        base_from = first_outcome + 5
        warm = per_second[base_from:start]
        # 0 when the warm-up produced nothing to measure: the test fails on it rather than pass vacuously.
        baseline = statistics.mean(warm) if warm else 0.0
        target = 0.8 * baseline

        def rate(at: int) -> float:
            chunk = per_second[at : at + int(w)]
            return sum(chunk) / w

        recoveries = []
        for fault in self.faults:
            begin = int(fault.end) + 1
            recovered = None
            for t in range(begin, min(begin + 120, len(per_second))):
                if rate(t) >= target:
                    recovered = round(t + w - fault.end, 1)
                    break
            dip = min(
                (rate(t) for t in range(int(fault.start), min(int(fault.end) + int(w) + 1, len(per_second)))),
                default=0.0,
            )
            recoveries.append(
                {
                    "kind": fault.kind,
                    "start": fault.start,
                    "end": fault.end,
                    "lowest_window_rate": round(dip, 1),
                    "recovered_within_seconds": recovered,
                }
            )
        return {
            "baseline_per_second": round(baseline, 1),
            "target_per_second": round(target, 1),
            "window_seconds": w,
            "per_second": per_second,
            "recoveries": recoveries,
        }


def save(summary: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"run-{summary['seed']}.json"
    text = json.dumps(summary, indent=1, default=str)
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path
