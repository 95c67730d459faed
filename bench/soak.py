"""Soak (`make soak`, issue 18 item 8): one worker under a steady mixed open-loop load for a long time.

One `faststream run streams.app:app` worker on a fresh SQLite file (WARNING logs, log mailer, echo
LLM) gets SendEmail and RequestCompletion on both brokers (RabbitMQ exchange `tasks`, Redis streams)
at SOAK_RATE msg/s in total (default 800) for SOAK_SECONDS (default 3600), published on a fixed
schedule whatever the worker does (open loop). Outcomes are read from a durable probe queue of our
own bound to exchange `events` (`#`) and from stream `events`, and matched to commands by the
event's `message_id`. Every SOAK_SAMPLE_SECONDS (10) the worker's memory (/proc/<pid>/status) and
the counts are sampled. After the load, the backlog gets SOAK_DRAIN_SECONDS (120) to drain.

Checks (exit 1 when one fails): every command confirmed by its broker, every command has a terminal
outcome, one terminal outcome per command, every outcome a success, the worker alive to the end,
and its RSS within 10% of its value after the first minute (SOAK_BASELINE_SECONDS, 60) for the rest
of the load. Results: bench/results/soak-latest.json and .md. The command queues and streams and
stream `events` are emptied first, and only when no other consumer is attached (else exit 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx2
import redis.asyncio as aioredis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from bench.procstat import cpu_seconds, status_kb
from streams.core import names
from tests.chaos.load import FLOW_QUEUE, SUCCESS, TERMINAL, Publisher, make_command
from tests.connected.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RABBIT_URL = os.environ.get("PIPELINE_RABBIT_URL", "amqp://guest:guest@localhost:5672/")
REDIS_URL = os.environ.get("PIPELINE_REDIS_URL", "redis://localhost:6379/0")
PROBE_QUEUE = "soak-probe"
COMMAND_STREAMS = (names.EMAIL_STREAM, names.COMPLETION_STREAM)
# A Redis client whose last command was one of these, less than this long ago, is a consumer.
READ_COMMANDS = {"xreadgroup", "xread", "xautoclaim", "xclaim"}
ATTACHED_IDLE_S = 30
# A group consumer that read this recently is live (a stopped worker's entry stays, its idle time grows).
LIVE_CONSUMER_IDLE_MS = 5000

# state bits, one byte a command
CONFIRMED, OUTCOME, ON_REDIS = 1, 2, 4
MEMORY_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmData")


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


class Refused(Exception):
    """Another consumer is attached: the soak does not run."""


class Soak:
    def __init__(self) -> None:
        self.rate = env_float("SOAK_RATE", 800)
        self.seconds = env_float("SOAK_SECONDS", 3600)
        self.drain_seconds = env_float("SOAK_DRAIN_SECONDS", 120)
        self.sample_every = env_float("SOAK_SAMPLE_SECONDS", 10)
        self.baseline_at = env_float("SOAK_BASELINE_SECONDS", 60)
        self.total = int(self.rate * self.seconds)
        self.run = "soak" + uuid.uuid4().hex[:8]
        self.prefix = self.run + "-"
        self.state = bytearray(self.total)
        self.rng = random.Random(18)
        self.sent = 0
        self.confirmed = 0
        self.publish_errors: list[str] = []
        self.outcomes = 0  # commands with a terminal outcome
        self.duplicates = 0  # terminal events beyond a command's first
        self.cross = 0  # outcomes read on the other broker than the command's
        self.foreign = 0  # events of commands not ours
        self.unreadable: list[str] = []
        self.events_by_type: Counter[str] = Counter()
        self.events_by_broker: Counter[str] = Counter()
        self.commands_by: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_inflight = 0
        self.max_lag = 0.0
        self.t0 = 0.0
        self.load_ended_at: float | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="soak-"))
        self.db_path = self.tmp / "store.db"
        self.redis_from = b"0-0"
        self.port = 0
        self.conn: aio_pika.abc.AbstractRobustConnection | None = None
        self.consumers_at_start: dict[str, int] = {}
        self.intruders: list[dict[str, Any]] = []  # samples where more consumers than at start were attached

    # ---- before: refuse when someone else consumes, then empty -------------------------------------

    async def preflight(self, channel: aio_pika.abc.AbstractChannel, conn: aio_pika.abc.AbstractConnection) -> None:
        attached: list[str] = []
        for queue in (*FLOW_QUEUE.values(), PROBE_QUEUE):
            ch = await conn.channel()
            try:
                declared = await ch.declare_queue(queue, passive=True)
                result = declared.declaration_result
                if result.consumer_count:
                    attached.append(f"RabbitMQ queue {queue!r}: {result.consumer_count} consumer(s)")
            except aio_pika.exceptions.ChannelClosed:
                pass  # no such queue yet: the worker declares it
            finally:
                with contextlib.suppress(Exception):
                    await ch.close()
        client: Any = aioredis.from_url(REDIS_URL)
        try:
            for stream in COMMAND_STREAMS:
                if not await client.exists(stream):
                    continue
                for group in await client.xinfo_groups(stream):
                    for consumer in await client.xinfo_consumers(stream, group["name"]):
                        if consumer["idle"] < LIVE_CONSUMER_IDLE_MS:
                            attached.append(
                                f"Redis stream {stream!r} group {group['name']!r}: consumer "
                                f"{consumer['name']!r} active {consumer['idle']} ms ago"
                            )
            me = await client.client_id()
            db = str(client.connection_pool.connection_kwargs.get("db", 0))
            for info in await client.client_list():
                if int(info["id"]) == me or info.get("db") != db:  # another database: not our streams
                    continue
                cmd = info["cmd"].split("|")[0]
                # A reader, or any client of streams or scripts still connected (a test's probe between workers).
                if (
                    (cmd in READ_COMMANDS and int(info["idle"]) < ATTACHED_IDLE_S)
                    or cmd.startswith("x")
                    or cmd == "eval"
                ):
                    attached.append(f"Redis client {info['addr']} ({info['cmd']}, idle {info['idle']} s)")
            if attached:
                raise Refused("\n  ".join(["another consumer is attached, not emptying anything:", *attached]))
            # Emptied: the worker re-creates the streams and its groups at start-up (MKSTREAM, from 0).
            await client.delete(*COMMAND_STREAMS, names.EVENTS_STREAM)
        finally:
            await client.aclose()
        for queue in FLOW_QUEUE.values():
            ch = await conn.channel()
            try:
                await (await ch.declare_queue(queue, passive=True)).purge()
            except aio_pika.exceptions.ChannelClosed:
                pass
            finally:
                with contextlib.suppress(Exception):
                    await ch.close()
        # Our probe: durable, bound before the worker publishes anything, emptied.
        exchange = await channel.declare_exchange(names.EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        probe = await channel.declare_queue(PROBE_QUEUE, durable=True)
        await probe.bind(exchange, routing_key="#")
        await probe.purge()

    # ---- the worker ------------------------------------------------------------------------------------

    def spawn_worker(self) -> int:
        port = self.port = free_port()
        env = {
            **os.environ,
            "PIPELINE_DATABASE_URL": f"sqlite+aiosqlite:///{self.db_path}",
            "PIPELINE_LOG_LEVEL": "WARNING",
            "PIPELINE_MAILER": "log",
            "PIPELINE_LLM": "echo",
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [str(ROOT / ".venv/bin/faststream"), "run", "streams.app:app", "--host", "127.0.0.1", "--port", str(port)]
        with (self.tmp / "worker.out").open("wb") as out, (self.tmp / "worker.err").open("wb") as err:
            self.worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        return port

    async def start_worker(self) -> int:
        port = self.spawn_worker()
        assert self.worker is not None
        url = f"http://127.0.0.1:{port}/health/ready"
        deadline = time.monotonic() + 90
        async with httpx2.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.worker.returncode}:\n{self.worker_err(4000)}")
                with contextlib.suppress(httpx2.HTTPError):
                    if (await http.get(url)).status_code == 200:
                        return port
                await asyncio.sleep(0.3)
        raise RuntimeError(f"worker not ready within 90 s:\n{self.worker_err(4000)}")

    def worker_err(self, tail: int) -> str:
        text = ""
        for name in ("worker.err", "worker.out"):
            path = self.tmp / name
            if path.exists():
                text += path.read_text(errors="replace")[-tail:]
        return text

    def stop_worker(self) -> int | None:
        if self.worker is None:
            return None
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait(timeout=10)
        return self.worker.returncode

    async def worker_events(self) -> int | None:
        """Outcome events our worker published (its /metrics): the rest came from another worker."""
        with contextlib.suppress(httpx2.HTTPError, ValueError):
            async with httpx2.AsyncClient(timeout=5) as http:
                text = (await http.get(f"http://127.0.0.1:{self.port}/metrics")).text
            return int(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("pipeline_events_published_total")
                )
            )
        return None

    async def consumers(self) -> dict[str, int]:
        """Consumers attached now: per RabbitMQ command queue, and per Redis group (read within 5 s)."""
        counts: dict[str, int] = {}
        assert self.conn is not None
        ch = await self.conn.channel()
        try:
            for queue in FLOW_QUEUE.values():
                declared = await ch.declare_queue(queue, passive=True)
                counts[f"rabbit:{queue}"] = declared.declaration_result.consumer_count or 0
        finally:
            with contextlib.suppress(Exception):
                await ch.close()
        client: Any = aioredis.from_url(REDIS_URL)
        try:
            for stream in COMMAND_STREAMS:
                for group in await client.xinfo_groups(stream):
                    live = [
                        c
                        for c in await client.xinfo_consumers(stream, group["name"])
                        if c["idle"] < LIVE_CONSUMER_IDLE_MS
                    ]
                    counts[f"redis:{stream}/{group['name'].decode()}"] = len(live)
        finally:
            await client.aclose()
        return counts

    # ---- outcomes --------------------------------------------------------------------------------------

    def record(self, broker: str, event_type: str, payload: bytes, header_mid: str = "") -> None:
        try:
            body = json.loads(payload)
            mid = str(body.get("message_id") or header_mid)
        except (ValueError, AttributeError) as exc:
            self.unreadable.append(f"{broker}: {exc!r}")
            return
        if not mid.startswith(self.prefix):
            self.foreign += 1
            return
        index = int(mid[len(self.prefix) :])
        self.events_by_type[event_type] += 1
        self.events_by_broker[broker] += 1
        if event_type not in TERMINAL:
            return
        state = self.state[index]
        if state & OUTCOME:
            self.duplicates += 1
            return
        self.state[index] = state | OUTCOME
        self.outcomes += 1
        if bool(state & ON_REDIS) != (broker == "redis"):
            self.cross += 1

    async def read_rabbit(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue(PROBE_QUEUE, durable=True, passive=True)

        async def on_event(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.record("rabbit", msg.routing_key or "", msg.body, str(msg.headers.get(names.H_MESSAGE_ID, "")))

        await queue.consume(on_event, no_ack=True)

    async def read_redis(self) -> None:
        client: Any = aioredis.from_url(REDIS_URL, socket_timeout=30)
        last = self.redis_from
        try:
            while True:
                reply = await client.xread({names.EVENTS_STREAM: last}, count=2000, block=1000)
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        last = entry_id
                        try:
                            body, headers = BinaryMessageFormatV1.parse(fields[b"__data__"])
                        except (ValueError, KeyError) as exc:
                            self.unreadable.append(f"redis: {exc!r}")
                            continue
                        self.record(
                            "redis",
                            str(headers.get(names.H_EVENT_TYPE, "")),
                            body,
                            str(headers.get(names.H_MESSAGE_ID, "")),
                        )
        finally:
            await client.aclose()

    # ---- load ------------------------------------------------------------------------------------------

    async def publish_one(self, publisher: Publisher, index: int) -> None:
        cmd = make_command(self.rng, index, self.run, "normal")
        self.commands_by[f"{cmd.broker}/{cmd.flow}"] += 1
        if cmd.broker == "redis":
            self.state[index] |= ON_REDIS
        try:
            await publisher.publish(cmd, deadline=60)
        except Exception as exc:
            self.publish_errors.append(f"{cmd.mid}: {exc!r}")
            return
        publisher.ledger.pop(cmd.mid, None)  # the state bytes keep what we need; the ledger would grow
        self.state[index] |= CONFIRMED
        self.confirmed += 1

    async def load(self, publisher: Publisher) -> None:
        start = time.monotonic()
        while self.sent < self.total:
            elapsed = time.monotonic() - start
            due = min(self.total, int(elapsed * self.rate) + 1)
            if due - self.sent > 1:
                self.max_lag = max(self.max_lag, (due - self.sent) / self.rate)
            while self.sent < due:
                task = asyncio.create_task(self.publish_one(publisher, self.sent))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                self.sent += 1
            self.max_inflight = max(self.max_inflight, len(self.tasks))
            await asyncio.sleep(0.005)
        self.load_ended_at = time.monotonic() - self.t0
        if self.tasks:
            await asyncio.wait(list(self.tasks))

    # ---- samples ---------------------------------------------------------------------------------------

    def sample(self, phase: str) -> dict[str, Any]:
        assert self.worker is not None
        pid = self.worker.pid
        row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1), "phase": phase}
        try:
            for key in MEMORY_KEYS:
                row[key.lower() + "_mb"] = round(status_kb(pid, key) / 1024, 1)
            row["wal_index_rss_mb"] = round(self.mapping_rss_kb(pid, "store.db-shm") / 1024, 1)
            row["threads"] = status_kb(pid, "Threads")
            row["cpu_s"] = round(cpu_seconds(pid), 1)
        except (FileNotFoundError, ProcessLookupError):
            row["gone"] = True
        for suffix in ("", "-wal", "-shm"):  # the store, its WAL and the WAL index (mapped: part of RssFile)
            path = self.tmp / f"store.db{suffix}"
            row[f"db{suffix.replace('-', '_')}_mb"] = round(path.stat().st_size / 2**20, 1) if path.exists() else 0.0
        row.update(
            sent=self.sent,
            confirmed=self.confirmed,
            outcomes=self.outcomes,
            backlog=self.confirmed - self.outcomes,
            inflight=len(self.tasks),
            duplicates=self.duplicates,
        )
        self.samples.append(row)
        print(json.dumps(row), flush=True)
        return row

    @staticmethod
    def mapping_rss_kb(pid: int, suffix: str) -> int:
        """Resident kB of the worker's mappings of one file (/proc/<pid>/smaps): the SQLite WAL index."""
        total, inside = 0, False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) == 6 and head[5].rstrip().endswith(suffix)
                elif inside and head[0] == "Rss:":
                    total += int(head[1])
        return total

    async def sampler(self) -> None:
        next_at = self.sample_every
        while True:
            await asyncio.sleep(max(0.0, self.t0 + next_at - time.monotonic()))
            row = self.sample("load" if self.load_ended_at is None else "drain")
            row["worker_events"] = await self.worker_events()
            with contextlib.suppress(Exception):
                now = await self.consumers()
                extra = {k: v for k, v in now.items() if v > self.consumers_at_start.get(k, 0)}
                if extra:
                    self.intruders.append({"t": row["t"], **extra})
                    print(f"another consumer attached: {extra}", flush=True)
            next_at += self.sample_every

    # ---- the run ---------------------------------------------------------------------------------------

    async def main(self) -> dict[str, Any]:
        conn = self.conn = await aio_pika.connect_robust(RABBIT_URL)
        channel = await conn.channel()
        background: list[asyncio.Task[None]] = []
        publisher: Publisher | None = None
        probe_channel: aio_pika.abc.AbstractChannel | None = None
        try:
            await self.preflight(channel, conn)
            port = await self.start_worker()
            assert self.worker is not None
            # Our worker holds one consumer on each (a Redis group lists it after its first read).
            self.consumers_at_start = {k: max(v, 1) for k, v in (await self.consumers()).items()}
            print(f"soak {self.run}: worker pid {self.worker.pid} on :{port}, store {self.db_path}", flush=True)
            print(f"  {self.rate:g} msg/s for {self.seconds:g} s = {self.total} commands", flush=True)
            probe_channel = await conn.channel()
            await self.read_rabbit(probe_channel)
            background.append(asyncio.create_task(self.read_redis()))
            self.t0 = time.monotonic()
            publisher = Publisher(RABBIT_URL, REDIS_URL, self.t0)
            await publisher.open()
            self.sample("start")
            background.append(asyncio.create_task(self.sampler()))
            await self.load(publisher)
            drain_deadline = time.monotonic() + self.drain_seconds
            while self.outcomes < self.confirmed and time.monotonic() < drain_deadline:
                if self.worker.poll() is not None:
                    break
                await asyncio.sleep(0.5)
            drained_at = time.monotonic() - self.t0
            await asyncio.sleep(1)  # a late duplicate still shows
            self.sample("end")["worker_events"] = await self.worker_events()
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if publisher is not None:
                await publisher.close()
            with contextlib.suppress(Exception):
                if probe_channel is not None:
                    await probe_channel.close()  # our consumer goes first, then our probe queue
                await channel.queue_delete(PROBE_QUEUE)
            await conn.close()
            exit_code = self.stop_worker()
        return self.report(drained_at, exit_code)

    def report(self, drained_at: float, exit_code: int | None) -> dict[str, Any]:
        load_samples = [s for s in self.samples if "vmrss_mb" in s and s["phase"] in ("load", "start")]
        baseline_row = next((s for s in load_samples if s["t"] >= self.baseline_at), None)
        after = [s for s in load_samples if baseline_row is not None and s["t"] >= baseline_row["t"]]
        rss = [s["vmrss_mb"] for s in self.samples if "vmrss_mb" in s]
        baseline = baseline_row["vmrss_mb"] if baseline_row else None
        worst = max((abs(s["vmrss_mb"] - baseline) / baseline for s in after), default=None) if baseline else None
        rest = [s["vmrss_mb"] - s.get("wal_index_rss_mb", 0) for s in after]
        rest_dev = max((abs(v - rest[0]) / rest[0] for v in rest), default=None) if rest else None
        missing = sum(1 for b in self.state[: self.sent] if b & CONFIRMED and not b & OUTCOME)
        failures = sum(v for k, v in self.events_by_type.items() if k in TERMINAL and k not in SUCCESS.values())
        stderr = self.worker_err(4000)
        checks = {
            "every command confirmed by its broker": self.confirmed == self.sent == self.total,
            "every command has an outcome": missing == 0 and self.confirmed > 0,
            "one terminal outcome per command": self.duplicates == 0,
            "every outcome a success": failures == 0,
            "worker alive to the end": exit_code in (0, -signal.SIGTERM),
            "no other consumer attached during the run": not self.intruders,
            "RSS within 10% of its first-minute value": worst is not None and worst <= 0.10,
        }
        last: dict[str, Any] = next((s for s in reversed(self.samples) if "vmrss_mb" in s), {})
        return {
            "run": self.run,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "rate": self.rate,
            "seconds": self.seconds,
            "commands_sent": self.sent,
            "commands_confirmed": self.confirmed,
            "commands_by_broker_flow": dict(self.commands_by),
            "outcomes_received": self.outcomes,
            "commands_without_outcome": missing,
            "duplicate_outcomes": self.duplicates,
            "outcomes_on_other_broker": self.cross,
            "events_by_type": dict(self.events_by_type),
            "events_by_broker": dict(self.events_by_broker),
            "foreign_events": self.foreign,
            "unreadable_events": self.unreadable[:20],
            "publish_errors": self.publish_errors[:20],
            "publish_max_lag_s": round(self.max_lag, 3),
            "publish_max_inflight": self.max_inflight,
            "load_ended_at_s": round(self.load_ended_at or 0, 1),
            "drained_at_s": round(drained_at, 1),
            "rss_first_minute_mb": baseline,
            "rss_first_minute_at_s": baseline_row["t"] if baseline_row else None,
            "rss_max_mb": max(rss, default=None),
            "rss_last_mb": last.get("vmrss_mb"),
            "rss_max_deviation_after_first_minute": round(worst, 4) if worst is not None else None,
            "rss_max_deviation_without_wal_index": round(rest_dev, 4) if rest_dev is not None else None,
            "worker_cpu_s": last.get("cpu_s"),
            "outcomes_published_by_our_worker": self.samples[-1].get("worker_events"),
            "consumers_at_start": self.consumers_at_start,
            "other_consumers_seen": self.intruders[:20],
            "worker_exit_code": exit_code,
            "worker_stderr_tail": stderr,
            "checks": checks,
            "ok": all(checks.values()),
            "samples": self.samples,
        }


def markdown(r: dict[str, Any]) -> str:
    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} MB"

    dev = r["rss_max_deviation_after_first_minute"]
    rows = [
        ("date", r["date"]),
        ("load", f"{r['rate']:g} msg/s for {r['seconds']:g} s, both brokers, both flows"),
        ("commands sent / confirmed", f"{r['commands_sent']:,} / {r['commands_confirmed']:,}"),
        ("outcomes received", f"{r['outcomes_received']:,}"),
        ("outcome events published by our worker (/metrics)", f"{r['outcomes_published_by_our_worker']}"),
        ("commands without an outcome", f"{r['commands_without_outcome']:,}"),
        ("duplicate outcomes", f"{r['duplicate_outcomes']:,}"),
        ("backlog drained at", f"{r['drained_at_s']} s (load ended at {r['load_ended_at_s']} s)"),
        ("RSS after the first minute", f"{mb(r['rss_first_minute_mb'])} (at {r['rss_first_minute_at_s']} s)"),
        ("max RSS", mb(r["rss_max_mb"])),
        ("last RSS", mb(r["rss_last_mb"])),
        ("max RSS deviation after the first minute", "-" if dev is None else f"{dev * 100:.1f}%"),
        (
            "the same, RSS less the mapped WAL index (store.db-shm)",
            "-"
            if r["rss_max_deviation_without_wal_index"] is None
            else f"{r['rss_max_deviation_without_wal_index'] * 100:.1f}%",
        ),
        ("worker CPU", f"{r['worker_cpu_s']} s"),
    ]
    out = ["# Soak: one worker, steady mixed load", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "| check | |", "|---|---|"]
    out += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in r["checks"].items()]
    out += [
        "",
        "RSS over time (every minute; MB; anon = heap, file = mapped files):",
        "",
        "| t (s) | RSS | anon | file | of which WAL index | outcomes | backlog | store db / WAL / WAL index (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown = [s for s in r["samples"] if "vmrss_mb" in s and (s["t"] % 60 < 10 or s["phase"] in ("start", "end"))]
    out += [
        f"| {s['t']:.0f} | {s['vmrss_mb']} | {s['rssanon_mb']} | {s['rssfile_mb']} | {s.get('wal_index_rss_mb', '-')} "
        f"| {s['outcomes']:,} "
        f"| {s['backlog']:,} | {s['db_mb']} / {s['db_wal_mb']} / {s['db_shm_mb']} |"
        for s in shown
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    soak = Soak()
    try:
        result = asyncio.run(soak.main())
    except Refused as exc:
        print(f"soak refused: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"soak: the worker did not start: {exc}", file=sys.stderr)
        return 3
    finally:
        if not os.environ.get("SOAK_KEEP"):  # the store reaches GBs; SOAK_KEEP=1 keeps it and the logs
            shutil.rmtree(soak.tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (RESULTS / "soak-latest.md").write_text(md)
    print(md)
    if result["worker_stderr_tail"].strip():
        print("worker stderr (tail):\n" + result["worker_stderr_tail"][-2000:])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
