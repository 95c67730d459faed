"""`make bench-profile`: py-spy on the pipeline worker during a drain (RabbitMQ and Redis, SQLite store).

Writes `profile-<broker>.svg` (flame graph) and `profile-<broker>.md` (where the time goes, from a
second, raw recording of the same window: by component and by pipeline step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench import loops, pipeline, workload
from bench.config import BenchConfig
from bench.runner import PIPELINE_LOG_LEVELS, PIPELINES, log, wait_quiet

# Innermost frame of a stack that is not the event loop or the standard library decides the component.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("streams/", "pipeline code (streams/)"),
    ("handlers/", "pipeline code (handlers/)"),
    ("schemas/", "pipeline code (schemas/)"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("aiosqlite/", "aiosqlite + SQLite"),
    ("asyncpg/", "asyncpg"),
    ("aio_pika/", "aio-pika / aiormq / pamqp"),
    ("aiormq/", "aio-pika / aiormq / pamqp"),
    ("pamqp/", "aio-pika / aiormq / pamqp"),
    ("redis/", "redis-py"),
    ("fast_depends/", "FastDepends (DI, validation)"),
    ("faststream/", "FastStream"),
    ("pydantic", "Pydantic"),
    ("email_validator/", "Pydantic"),
    ("prometheus_client/", "prometheus_client"),
    ("structlog/", "logging"),
    ("logging/", "logging"),
    ("anyio/", "the event loop itself (uvloop C code, under anyio.run)"),
    ("uvicorn/", "uvicorn"),
    ("greenlet", "SQLAlchemy"),
)
# Pipeline steps: a sample counts for a step when the step's frame is anywhere in its stack.
STEPS: tuple[tuple[str, str], ...] = (
    ("consume (faststream/_internal/endpoint/subscriber/usecase.py", "FastStream subscriber: one call (consume)"),
    ("decode_message (faststream/", "decode the body (FastStream decode_message)"),
    ("Pipeline.run_batch", "Pipeline.run_batch (inbox, ledger, handlers, commit)"),
    ("CrashLedger", "crash ledger (Redis scripts)"),
    ("PipelineMiddleware.consume_scope", "pipeline middleware (FastStream path)"),
    ("Pipeline.run ", "Pipeline.run (one by one)"),
    ("EventStore.seen", "EventStore.seen / seen_many (inbox lookup)"),
    ("EventStore.commit", "EventStore.commit / commit_many (await group commit)"),
    ("GroupCommitter._flush", "group commit transaction (writer task)"),
    ("projections.py", "projections (live fold)"),
    ("Relay._relay_batch", "outbox relay (read, publish, mark)"),
    ("EventStore.unpublished", "relay: read outbox"),
    ("EventStore.mark_published", "relay: mark published"),
    ("publish_events", "relay: publish outcome"),
    ("run_in_threadpool", "FastDepends sync dependency in a thread (get_mailer)"),
    ("send_email (handlers/email.py", "handler (handlers.email + LogMailer)"),
    ("_PydanticSerializer", "FastDepends argument validation (SendEmail)"),
    ("BasePrometheusMiddleware", "Prometheus middleware"),
    ("_LoggingMiddleware", "FastStream logging middleware"),
)
# Innermost frames of threads that wait (py-spy's own idle detection does not see them as idle here).
IDLE_LEAVES = (
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
    "Queue.get (queue.py",
    "EpollSelector.select (selectors.py",
)
RATE = 50  # samples per second: the worker runs dozens of threads, each sampled
LOOP_IDLE = "EpollSelector.select (selectors.py"  # asyncio's loop waiting
# uvloop's loop is C code: a main-thread sample with no Python frame above the loop's entry is inside
# uvloop itself (waiting in epoll, or its own bookkeeping), which py-spy cannot tell apart.
IN_C_LOOP = ("Runner.run (asyncio/runners.py", "BaseEventLoop.run_until_complete (asyncio/base_events.py")


def idle(stack: str) -> bool:
    """True for a sample of a thread that waits (an idle pool thread, or the event loop in epoll)."""
    leaf = stack.rsplit(";", 1)[-1]
    return leaf.startswith(IDLE_LEAVES)


@dataclass
class Profile:
    """Collapsed stacks of one recording."""

    stacks: Counter[str]

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Profile:
        """py-spy `--format raw` lines: `frame;frame;... count`."""
        stacks: Counter[str] = Counter()
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks[stack] += int(count)
        return cls(stacks)

    def busy(self) -> Counter[str]:
        """Stacks without idle waits (aiosqlite worker threads blocked on their queue)."""
        return Counter({s: c for s, c in self.stacks.items() if not idle(s)})

    def loop_idle(self) -> float:
        """Share of the main thread's samples spent waiting in epoll: how far from saturated its loop is."""
        main = {s: c for s, c in self.stacks.items() if s.startswith("thread") and "MainThread" in s.split(";", 1)[0]}
        total = sum(main.values())
        waiting = sum(c for s, c in main.items() if s.rsplit(";", 1)[-1].startswith((LOOP_IDLE, *IN_C_LOOP)))
        return waiting / total if total else float("nan")

    def tasks(self, top: int = 14) -> list[tuple[str, float]]:
        """Main thread's busy samples by what the loop was running: the frames right below the loop."""
        main = {s: c for s, c in self.busy().items() if "MainThread" in s.split(";", 1)[0]}
        total = sum(main.values()) or 1
        found: Counter[str] = Counter()
        for stack, count in main.items():
            found[task_of(stack.split(";"))] += count
        return [(name, count / total) for name, count in found.most_common(top)]

    def idle_threads(self) -> int:
        """Distinct threads seen."""
        return len({s.split(";", 1)[0] for s in self.stacks})

    def components(self) -> list[tuple[str, float]]:
        """Share of busy samples by the innermost non-stdlib component."""
        busy = self.busy()
        total = sum(busy.values()) or 1
        found: Counter[str] = Counter()
        for stack, count in busy.items():
            found[component(stack.split(";"))] += count
        return [(name, count / total) for name, count in found.most_common()]

    def steps(self) -> list[tuple[str, float]]:
        """Share of busy samples that were inside each pipeline step (inclusive, overlapping)."""
        busy = self.busy()
        total = sum(busy.values()) or 1
        return [(label, sum(c for s, c in busy.items() if key in s) / total) for key, label in STEPS]

    def threads(self) -> list[tuple[str, float]]:
        """Share of busy samples by thread (the first frame, with `--threads`)."""
        busy = self.busy()
        total = sum(busy.values()) or 1
        found: Counter[str] = Counter()
        for stack, count in busy.items():
            head = stack.split(";", 1)[0]
            found[
                "main thread" if "MainThread" in head else "other threads" if head.startswith("thread") else head
            ] += count
        return [(name, count / total) for name, count in found.most_common()]

    def leaves(self, top: int = 15) -> list[tuple[str, float]]:
        """The busiest innermost frames."""
        busy = self.busy()
        total = sum(busy.values()) or 1
        found: Counter[str] = Counter()
        for stack, count in busy.items():
            found[stack.rsplit(";", 1)[-1]] += count
        return [(name, count / total) for name, count in found.most_common(top)]


def task_of(frames: list[str]) -> str:
    """The coroutine or callback a main-thread sample was in: two frames below `Handle._run` (asyncio)
    or below the loop's entry (uvloop runs callbacks from C)."""
    names = [f.split(" (", 1)[0] for f in frames]
    for marker in ("Handle._run", "Runner.run", "BaseEventLoop.run_until_complete"):
        if marker in names:
            i = len(names) - 1 - names[::-1].index(marker)
            below = names[i + 1 : i + 3]
            return " > ".join(below) if below else "the event loop itself (C code under uvloop)"
    return "outside the event loop"


def component(frames: list[str]) -> str:
    """The component of a stack: its innermost frame that belongs to a known package."""
    for frame in reversed(frames):
        where = frame.rsplit("(", 1)[-1]
        for marker, name in COMPONENTS:
            if marker in where:
                return name
    return "event loop, threads, stdlib"


def render(profile: Profile, title: str, facts: dict[str, str]) -> str:
    """profile-<broker>.md."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "## By component (innermost known package of each sample)", "", "| component | share |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in profile.components()]
    lines += ["", "## By pipeline step (inclusive; steps nest and overlap)", "", "| step | share |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in profile.steps()]
    lines += ["", "## Main thread, by what the loop was running", "", "| task > step | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in profile.tasks()]
    lines += ["", "## By thread", "", "| thread | share |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in profile.threads()]
    lines += ["", "## Busiest innermost frames", "", "| frame | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in profile.leaves()]
    return "\n".join(lines) + "\n"


def py_spy() -> str:
    """The py-spy executable (installed with `pip install py-spy`)."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


async def record(cfg: BenchConfig, rabbit_url: str, key: str, n: int, py_spy_args: list[str]) -> pipeline.Drain:
    """One drain with one py-spy recorder attached at the first outcome, for `profile_seconds`."""
    broker, store = PIPELINES[key]
    recorders: list[subprocess.Popen[bytes]] = []
    seconds = str(int(cfg.profile_seconds))

    def attach(workers: list[pipeline.Worker]) -> None:
        command = [py_spy(), "record", "--pid", str(workers[0].pid), "--duration", seconds, "--rate", str(RATE)]
        recorders.append(
            subprocess.Popen([*command, *py_spy_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )

    def detach() -> None:
        # The drain is over: stop recording now (py-spy writes its output on SIGINT). A worker
        # stopped while py-spy is still attached can hang in its exit, holding its consumer.
        for rec in recorders:
            if rec.poll() is None:
                rec.send_signal(signal.SIGINT)
            rec.wait(timeout=120)

    await wait_quiet(cfg)
    result = await pipeline.run_pipeline(
        cfg,
        rabbit_url,
        broker,
        store,
        n,
        latency=False,
        max_seconds=cfg.profile_seconds + 2,
        on_first=attach,
        on_drained=detach,
        log_level=PIPELINE_LOG_LEVELS.get(key),
    )
    return result.drain


async def profile_one(cfg: BenchConfig, rabbit_url: str, key: str) -> Path:
    """Two drains, each long enough for `profile_seconds` of py-spy: a flame graph, then raw stacks to sum up."""
    name, _store = PIPELINES[key]  # profile-<broker>.*; profile-<broker>-info.* for a worker at INFO
    if key in PIPELINE_LOG_LEVELS:
        name += "-" + PIPELINE_LOG_LEVELS[key].lower()
    out = cfg.results
    out.mkdir(parents=True, exist_ok=True)
    svg, raw = out / f"profile-{name}.svg", out / f"profile-{name}.raw.txt"
    n = int(os.environ.get("BENCH_PROFILE_N", str(max(cfg.n, 40_000))))  # about 20 s of drain
    log(f"profiling {key}: N={n}, py-spy for {cfg.profile_seconds:g} s from the first outcome (flame graph)")
    drain_svg = await record(cfg, rabbit_url, key, n, ["-o", str(svg)])
    log(f"profiling {key}: again, raw stacks per thread")
    drain_raw = await record(cfg, rabbit_url, key, n, ["-f", "raw", "--threads", "-o", str(raw)])
    profile = Profile.parse(raw.read_text().splitlines()) if raw.exists() else Profile(Counter())
    facts = {
        "command": f"`make bench-profile`: py-spy record --rate {RATE} --duration {cfg.profile_seconds:g}, "
        "attached to the worker at its first outcome, one recorder per drain",
        "drain while profiled": f"{drain_svg.rate:,.0f} msg/s (flame graph run), {drain_raw.rate:,.0f} msg/s, "
        f"{drain_raw.cpu_us_per_msg:,.0f} µs CPU/msg (raw run); the sampler slows the worker",
        "samples": f"{sum(profile.stacks.values()):,} in {profile.idle_threads()} threads, "
        f"{sum(profile.busy().values()):,} busy (idle waits left out: pool threads blocked, loop in epoll)",
        "event loop idle": f"{profile.loop_idle():.0%} of the main thread's samples are in the loop itself "
        "(asyncio: waiting in epoll; uvloop: in its C code, waiting or not)",
        "flame graph": svg.name,
    }
    md = out / f"profile-{name}.md"
    (out / f"profile-{name}.json").write_text(json.dumps({"key": key, "facts": facts}, indent=2) + "\n")
    md.write_text(render(profile, f"Where the pipeline worker spends its time: {key}", facts))
    log(f"  wrote {svg.name}, {raw.name}, {md.name}")
    return md


async def run(cfg: BenchConfig) -> list[Path]:
    """Profile each target in BENCH_PROFILE_ONLY."""
    rabbit_url = await workload.ensure_vhost(cfg.rabbit_url)
    return [await profile_one(cfg, rabbit_url, key) for key in cfg.profile_targets]


def rerender(out: Path) -> list[Path]:
    """profile-*.md again from the recorded raw stacks and facts (after a change to the summary)."""
    written = []
    for facts_path in sorted(out.glob("profile-*.json")):
        broker = facts_path.stem.removeprefix("profile-")
        saved = json.loads(facts_path.read_text())
        profile = Profile.parse((out / f"profile-{broker}.raw.txt").read_text().splitlines())
        md = out / f"profile-{broker}.md"
        md.write_text(render(profile, f"Where the pipeline worker spends its time: {saved['key']}", saved["facts"]))
        written.append(md)
    return written


def main(cfg: BenchConfig) -> int:
    """Entry point of `python -m bench profile`."""
    for path in loops.run(run(cfg), cfg.loop):
        print(path.read_text())
    return 0
