"""Security checks against a real worker on private servers with real credentials.

RabbitMQ gets a user with a password (`rabbitmqctl add_user`), Redis runs `--requirepass`, and
every URL setting carries a password (broker, database, mail provider, LLM, alert webhook). The
worker handles good and bad messages and lives through a RabbitMQ and a Redis restart (so
connection errors get logged); then no password may appear in its logs, `/health/*`,
`/metrics`, the AsyncAPI page or the generated AsyncAPI document. Try-it-out is off.
`pipeline dlq replay` / `purge` change nothing on a dry run or a declined or unanswered
confirmation, and act when asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest

from tests.chaos.infra import PG_ADMIN, plain_pg
from tests.chaos.load import Command, Publisher
from tests.connected.conftest import start_worker, wait_ready, wait_until
from tests.connected.rabbitserver import RabbitServer
from tests.connected.redisserver import RedisServer
from tests.httpserver import RecordingServer, ScriptedResponse

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "rabbit": "rabbitS3cr3t" + uuid.uuid4().hex[:6],
    "redis": "redisS3cr3t" + uuid.uuid4().hex[:6],
    "database": "pgS3cr3t" + uuid.uuid4().hex[:6],
    "mailer": "mailS3cr3t" + uuid.uuid4().hex[:6],
    "llm": "llmS3cr3t" + uuid.uuid4().hex[:6],
    "alert": "alertS3cr3t" + uuid.uuid4().hex[:6],
}


def leaks(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("pipeline")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "streams.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Stack:
    """Private RabbitMQ (with a user), Redis (with a password), a fresh database, a mail server."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rabbit = RabbitServer()
        self.redis = RedisServer("--requirepass", SECRETS["redis"], "--appendonly", "yes", "--appendfsync", "always")
        self.mail = RecordingServer(default=ScriptedResponse(200, {"id": "ok"}))
        self.db_name = f"chaos_sec_{uuid.uuid4().hex[:8]}"

    @property
    def rabbit_url(self) -> str:
        return f"amqp://pipeline:{SECRETS['rabbit']}@127.0.0.1:{self.rabbit.port}/"

    @property
    def redis_url(self) -> str:
        return f"redis://:{SECRETS['redis']}@127.0.0.1:{self.redis.port}/0"

    @property
    def db_url(self) -> str:
        return f"postgresql+asyncpg://postgres:{SECRETS['database']}@127.0.0.1:5432/{self.db_name}"

    def env(self) -> dict[str, str]:
        port = self.mail.port
        return {
            "PIPELINE_RABBIT_URL": self.rabbit_url,
            "PIPELINE_REDIS_URL": self.redis_url,
            "PIPELINE_DATABASE_URL": self.db_url,
            "PIPELINE_DB_AUTO_UPGRADE": "true",
            "PIPELINE_MAILER": "http",
            "PIPELINE_MAILER_URL": f"http://mailer:{SECRETS['mailer']}@127.0.0.1:{port}/send",
            "PIPELINE_LLM_URL": f"http://llm:{SECRETS['llm']}@127.0.0.1:{port}/v1",
            "PIPELINE_ALERT_URL": f"http://alert:{SECRETS['alert']}@127.0.0.1:{port}/alert",
            "PIPELINE_LOG_LEVEL": "DEBUG",
        }

    async def start(self) -> None:
        await asyncio.to_thread(self.rabbit.start)
        await asyncio.to_thread(self.rabbit._ctl, "add_user", "pipeline", SECRETS["rabbit"])
        await asyncio.to_thread(self.rabbit._ctl, "set_permissions", "-p", "/", "pipeline", ".*", ".*", ".*")
        await asyncio.to_thread(self.redis.start)
        self.mail.start()
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'CREATE DATABASE "{self.db_name}"')
        finally:
            await admin.close()

    async def stop(self) -> None:
        self.mail.stop()
        await asyncio.to_thread(self.redis.stop)
        await asyncio.to_thread(self.rabbit.stop)
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def stack(servers_installed: None, tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def _command(mid: str, broker: str, body: dict[str, Any] | bytes, flow: str = "email") -> Command:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Command(mid, broker, flow, "normal", raw)


async def test_no_password_leaks_and_operator_commands_act_only_when_asked(stack: Stack, tmp_path: Path) -> None:
    env = stack.env()
    worker = start_worker(tmp_path, env, name="secure")
    try:
        await wait_ready(worker, timeout=90)
        publisher = Publisher(stack.rabbit_url, stack.redis_url, 0.0)
        await publisher.open()
        good = {"to": "ada@example.com", "subject": "hi", "body": "Hello"}
        mids = []
        for broker in ("rabbit", "redis"):
            bad: list[dict[str, Any] | bytes] = [good, b"\xff not json", {"to": "nobody"}]
            for i, body in enumerate(bad):
                mid = f"sec-{broker}-{i}-{uuid.uuid4().hex[:6]}"
                mids.append(mid)
                await publisher.publish(_command(mid, broker, body))
        await publisher.close()

        async def parked() -> bool:
            conn = await asyncpg.connect(plain_pg(stack.db_url))
            try:
                return int(await conn.fetchval("SELECT count(*) FROM dead_letters")) >= 4
            finally:
                await conn.close()

        await wait_until(parked, 60, interval=0.5)
        # Connection errors get logged: restart both brokers under the worker.
        await asyncio.to_thread(stack.rabbit.stop_app)
        await asyncio.sleep(2)
        await asyncio.to_thread(stack.rabbit.start_app)
        await asyncio.to_thread(stack.redis.restart)
        await wait_ready(worker, timeout=90)

        seen: dict[str, str] = {}
        async with httpx2.AsyncClient(base_url=worker.base_url, timeout=10) as client:
            for path in ("/health/live", "/health/ready", "/health/consumers", "/metrics", "/docs/asyncapi"):
                response = await client.get(path)
                seen[path] = f"{response.status_code}\n{response.text}"
            try_it = await client.post("/docs/asyncapi/try", json={"channelName": "email", "message": good})
            assert try_it.status_code == 404, f"try-it-out must be off, got {try_it.status_code}"
        assert "rabbitmq" in seen["/health/ready"]
        assert "pipeline_" in seen["/metrics"] or "faststream" in seen["/metrics"]
        docs = await asyncio.to_thread(cli, env, "--help")  # the entry point starts with these settings
        gen = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "faststream",
                "docs",
                "gen",
                "--yaml",
                "streams.app:app",
                "--out",
                str(tmp_path / "a.yaml"),
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert gen.returncode == 0, gen.stderr[-2000:]
        seen["asyncapi.yaml"] = (tmp_path / "a.yaml").read_text()
        seen["docs gen output"] = gen.stdout + gen.stderr
        seen["cli --help"] = docs.stdout + docs.stderr

        # Operator commands: a dry run and a declined or unanswered purge change nothing.
        async def counts() -> tuple[int, int]:
            conn = await asyncpg.connect(plain_pg(stack.db_url))
            try:
                total = int(await conn.fetchval("SELECT count(*) FROM dead_letters"))
                replayed = int(await conn.fetchval("SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL"))
                return total, replayed
            finally:
                await conn.close()

        before = await counts()
        assert before[0] >= 4, before
        assert before[1] == 0, before
        runs = {
            "list": cli(env, "dlq", "list"),
            "replay dry run": cli(env, "dlq", "replay", "--all", "--dry-run"),
            "purge declined": cli(env, "dlq", "purge", stdin="n\n"),
            "purge unanswered": cli(env, "dlq", "purge", stdin=""),
            "purge broker declined": cli(env, "dlq", "purge", "--broker-queues", stdin="no\n"),
        }
        for name, run in runs.items():
            seen[f"cli {name}"] = run.stdout + run.stderr
        assert runs["list"].returncode == 0, runs["list"].stderr
        assert runs["replay dry run"].returncode == 0
        assert "would replay" in runs["replay dry run"].stdout
        for name in ("purge declined", "purge unanswered", "purge broker declined"):
            assert runs[name].returncode != 0, f"{name}: {runs[name].stdout} {runs[name].stderr}"
            assert "nothing was deleted" in runs[name].stderr
        assert await counts() == before, "dry run and declined purges changed nothing"

        # ...and they act when asked.
        first_id = (await _dead_letter_ids(stack))[0]
        replay = cli(env, "dlq", "replay", str(first_id))
        seen["cli replay one"] = replay.stdout + replay.stderr
        assert replay.returncode == 0, replay.stderr
        assert (await counts())[1] == 1, "replayed when asked"
        purge = cli(env, "dlq", "purge", "--yes")
        seen["cli purge --yes"] = purge.stdout + purge.stderr
        assert purge.returncode == 0, purge.stderr

        async def emptied() -> bool:
            # The replayed (invalid) message comes back as a new dead letter: only that may remain.
            return (await counts())[0] <= 1

        await wait_until(emptied, 30, interval=0.5)
    finally:
        worker.stop()
    seen["worker log"] = worker.log()
    assert "Connection" in seen["worker log"] or "connect" in seen["worker log"].lower(), "broker errors were logged"
    found = {where: leaks(text) for where, text in seen.items() if leaks(text)}
    assert found == {}, (
        f"passwords leaked: {found}\n"
        + "\n".join(line for line in seen.get("worker log", "").splitlines() if leaks(line))[:4000]
    )


async def _dead_letter_ids(stack: Stack) -> list[int]:
    conn = await asyncpg.connect(plain_pg(stack.db_url))
    try:
        return [int(r[0]) for r in await conn.fetch("SELECT id FROM dead_letters ORDER BY id")]
    finally:
        await conn.close()
