"""`pipeline dlq list|show|replay|purge`: review, replay and delete the dead letters kept for review.

Dead letters live in the `dead_letters` table at PIPELINE_DATABASE_URL. Replay puts them back
through the normal path (same message and correlation ids, attempt count reset); purge deletes
them, only once confirmed. Every dead-letter function is looked up on the `deadletters` package
at call time, so tests can swap the brokers out in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from schemas import FailureKind
from streams import deadletters
from streams.cli.common import (
    DEFAULT_TIMEOUT,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    TimeoutOpt,
    fail,
    load_settings,
    plural,
    quiet_client_logs,
    render,
)
from streams.cli.dlq_view import describe, letter_line, letters_table, purge_description
from streams.core.settings import Settings, mask_url
from streams.deadletters import DeadLetter, PurgePlan, Selection

T = TypeVar("T")

app = typer.Typer(
    help="Review, replay and purge dead letters (kept in the database at PIPELINE_DATABASE_URL).",
    no_args_is_help=True,
)


# --- running the operations ---------------------------------------------------------------------


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one dead-letter operation; its failure is one line on stderr and exit 1."""
    with quiet_client_logs():
        try:
            return asyncio.run(coro)
        except deadletters.DeadLetterError as exc:
            fail(str(exc), EXIT_UNAVAILABLE)


async def _list(url: str, selection: Selection, limit: int) -> tuple[list[DeadLetter], int]:
    async with deadletters.open_store(url) as engine:
        letters = await deadletters.list_letters(engine, selection, limit)
        return letters, await deadletters.count_letters(engine, selection)


async def _get(url: str, dead_letter_id: int) -> DeadLetter | None:
    async with deadletters.open_store(url) as engine:
        return await deadletters.get_letter(engine, dead_letter_id)


def _letter(settings: Settings, dead_letter_id: int) -> DeadLetter:
    """The dead letter with this id; when there is none, say so and exit 1."""
    letter = _run(_get(settings.database_url, dead_letter_id))
    if letter is None:
        fail(f"no dead letter {dead_letter_id} in the database at {mask_url(settings.database_url)}", EXIT_NOT_FOUND)
    return letter


async def _to_replay(url: str, selection: Selection) -> list[DeadLetter]:
    async with deadletters.open_store(url) as engine:
        return await deadletters.letters_to_replay(engine, selection)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), redirect_stdout=False, redirect_stderr=False,
    )  # fmt: skip


async def _replay(
    settings: Settings, letters: Sequence[DeadLetter], rate: float | None, io_timeout: float, done: list[str]
) -> None:
    """Replay `letters` in order behind a progress bar; `done` gets one line per replayed letter."""
    async with (
        deadletters.open_store(settings.database_url) as engine,
        deadletters.broker_publisher(settings.rabbit_url, settings.redis_url, io_timeout) as publish,
    ):
        with _progress() as progress:
            task = progress.add_task("replaying", total=len(letters))

            def replayed(dl: DeadLetter, where: str) -> None:
                ids = f"message id {dl.message_id}, correlation id {dl.correlation_id}"
                done.append(f"replayed {dl.id} to {where}: {ids}")
                progress.advance(task)

            try:
                await deadletters.replay(
                    engine, letters, publish, throttle=deadletters.Throttle(rate), on_replayed=replayed
                )
            except deadletters.DeadLetterError as exc:
                raise deadletters.DeadLetterError(f"{exc} ({len(done)} of {len(letters)} replayed before)") from exc


async def _plan_purge(
    settings: Settings, selection: Selection, broker_queues: bool, io_timeout: float
) -> tuple[PurgePlan, dict[tuple[str, str], int | None]]:
    async with deadletters.open_store(settings.database_url) as engine:
        plan = await deadletters.plan_purge(engine, selection)
    if not broker_queues or not plan.total:
        return plan, {}
    sizes = await deadletters.broker_dlqs(
        plan.broker_queues, settings.rabbit_url, settings.redis_url, io_timeout, purge=False
    )
    return plan, sizes


async def _purge(
    settings: Settings, plan: PurgePlan, broker_queues: bool, io_timeout: float
) -> tuple[int, dict[tuple[str, str], int | None]]:
    """Broker queues first: if that fails, the rows (the review copy) are all still there."""
    purged: dict[tuple[str, str], int | None] = {}
    if broker_queues:
        purged = await deadletters.broker_dlqs(
            plan.broker_queues, settings.rabbit_url, settings.redis_url, io_timeout, purge=True
        )
    async with deadletters.open_store(settings.database_url) as engine:
        return await deadletters.purge(engine, plan), purged


def _confirmed(question: str) -> bool:
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:  # end of input: no answer is not a yes
        typer.echo()
        return False


def _selection(queue: str | None, kind: FailureKind | None, *, include_replayed: bool = True) -> Selection:
    return Selection(queue, kind.value if kind is not None else None, include_replayed)


QueueOpt = Annotated[
    str | None, typer.Option("--queue", "-q", help="Only dead letters of this queue or stream (e.g. email).")
]
KindOpt = Annotated[FailureKind | None, typer.Option("--kind", "-k", help="Only dead letters of this failure kind.")]
IdArg = Annotated[int, typer.Argument(metavar="ID", help="The dead letter's id (see `pipeline dlq list`).")]


# --- commands -----------------------------------------------------------------------------------


@app.command("list")
def dlq_list(
    queue: QueueOpt = None,
    kind: KindOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N dead letters.")] = 50,
) -> None:
    """List dead letters, newest first."""
    letters, total = _run(_list(load_settings().database_url, _selection(queue, kind), limit))
    if not letters:
        typer.echo("no dead letters match", err=True)
        return
    typer.echo(render(letters_table(letters)))
    typer.echo(f"{len(letters)} of {plural(total, 'matching dead letter')}, newest first", err=True)


@app.command("show")
def dlq_show(dead_letter_id: IdArg) -> None:
    """Show everything kept about one dead letter: headers, stack trace and body."""
    letter = _letter(load_settings(), dead_letter_id)
    try:
        lines = describe(letter)
    except deadletters.DeadLetterError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    typer.echo("\n".join(lines))


@app.command("replay")
def dlq_replay(
    dead_letter_id: Annotated[
        int | None, typer.Argument(metavar="[ID]", help="The dead letter to replay (or --all).")
    ] = None,
    *,
    all_: Annotated[bool, typer.Option("--all", help="Replay every matching dead letter not replayed yet.")] = False,
    queue: QueueOpt = None,
    kind: KindOpt = None,
    include_replayed: Annotated[
        bool, typer.Option("--include-replayed", help="With --all: replay those replayed before, too.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be replayed; change nothing.")] = False,
    rate: Annotated[float | None, typer.Option("--rate", min=0.001, help="At most N messages per second.")] = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Put dead letters back on their queue or stream: same bytes and ids, attempt count reset."""
    if (dead_letter_id is None) == (not all_) or (dead_letter_id is not None and (queue or kind or include_replayed)):
        fail("give one dead letter ID, or --all (with --queue, --kind, --include-replayed to narrow it)", EXIT_INVALID)
    settings = load_settings()
    if dead_letter_id is not None:
        letters = [_letter(settings, dead_letter_id)]
    else:
        letters = _run(_to_replay(settings.database_url, _selection(queue, kind, include_replayed=include_replayed)))
    if not letters:
        typer.echo("nothing to replay: no dead letters match (replayed ones need --include-replayed)", err=True)
        return
    if dry_run:
        typer.echo("\n".join(f"would replay {letter_line(dl)}" for dl in letters))
        typer.echo(f"dry run: {plural(len(letters), 'dead letter')} would be replayed; nothing was changed", err=True)
        return
    done: list[str] = []
    try:
        _run(_replay(settings, letters, rate, timeout, done))
    finally:
        if done:
            typer.echo("\n".join(done))
    typer.echo(f"replayed {plural(len(done), 'dead letter')}", err=True)


@app.command("purge")
def dlq_purge(
    queue: QueueOpt = None,
    kind: KindOpt = None,
    *,
    broker_queues: Annotated[
        bool,
        typer.Option(
            "--broker-queues",
            help="Also empty the brokers' `<queue>.dlq` queues and streams of the matching queues (every kind).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Delete dead letters for good, after saying what would go and getting a yes."""
    settings = load_settings()
    plan, sizes = _run(_plan_purge(settings, _selection(queue, kind), broker_queues, timeout))
    if not plan.total:
        typer.echo("nothing to purge: no dead letters match", err=True)
        return
    typer.echo("\n".join(purge_description(plan, sizes, mask_url(settings.database_url))))
    if not yes and not _confirmed(f"Delete {'it' if plan.total == 1 else f'these {plan.total}'}?"):
        fail("not confirmed: nothing was deleted", EXIT_UNAVAILABLE)
    deleted, purged = _run(_purge(settings, plan, broker_queues, timeout))
    for (transport, name), count in sorted(purged.items()):
        kind_of = "RabbitMQ queue" if transport == "rabbit" else "Redis stream"
        removed = "it does not exist" if count is None else f"{plural(count, 'message')} removed"
        typer.echo(f"emptied {kind_of} {name!r}: {removed}")
    typer.echo(f"deleted {plural(deleted, 'dead letter')} from the database")
