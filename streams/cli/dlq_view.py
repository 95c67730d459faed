"""How `pipeline dlq` shows dead letters: the list table, the full record, purge plans (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from streams import deadletters
from streams.cli.common import plural, safe, when
from streams.deadletters import DeadLetter, PurgePlan


def letters_table(letters: Sequence[DeadLetter]) -> Table:
    """The `dlq list` table; cells are Text, so nothing in them is read as markup."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for title in ("id", "transport", "queue", "kind", "attempts", "message id"):
        table.add_column(title, overflow="fold", justify="right" if title in {"id", "attempts"} else "left")
    for title in ("dead-lettered at", "replayed at", "exception type"):
        table.add_column(title, overflow="fold")
    for dl in letters:
        cells = (
            str(dl.id), dl.transport, dl.queue, dl.kind, str(dl.attempts), dl.message_id,
            when(dl.dead_lettered_at), when(dl.replayed_at), dl.exception_type,
        )  # fmt: skip
        table.add_row(*(Text(deadletters.printable(c)) for c in cells))
    return table


def _field_value(key: bytes, value: bytes) -> str:
    if key == deadletters.DATA_KEY:
        return f"<FastStream envelope, {len(value)} bytes: headers and body below>"
    encoding, text = deadletters.body_text(value)
    return deadletters.redact(text) if encoding == "utf-8" else f"<hex> {text}"


def describe(dl: DeadLetter) -> list[str]:
    """Every column of a dead letter, as `dlq show` prints it: URL passwords masked, escapes shown."""
    lines = [f"dead letter {dl.id}"]
    facts = {
        "transport": dl.transport, "queue": dl.queue, "kind": dl.kind, "attempts": dl.attempts,
        "message id": dl.message_id, "correlation id": dl.correlation_id,
        "dead-lettered at": dl.dead_lettered_at.isoformat(),
        "replayed at": dl.replayed_at.isoformat() if dl.replayed_at else "-",
        "exception type": dl.exception_type, "exception message": dl.exception_message,
    }  # fmt: skip
    lines += [f"  {k + ':':<19}{safe(v)}" for k, v in facts.items()]
    lines += ["headers:"] + [f"  {safe(k)}: {safe(v)}" for k, v in sorted(dl.headers.items())]
    if dl.fields is not None:
        fields = deadletters.decode_fields(dl.fields)
        lines += ["redis fields:"] + [f"  {safe(k.decode('utf-8', 'replace'))}: {safe(_field_value(k, v))}"
                                      for k, v in fields.items()]  # fmt: skip
    lines += ["stacktrace:"] + [f"  {line}" for line in safe(dl.stacktrace).splitlines()]
    encoding, body = deadletters.body_text(dl.body)
    lines += [f"body ({encoding}, {len(dl.body)} bytes):", body]
    return lines


def letter_line(dl: DeadLetter) -> str:
    """One dead letter on one line, as `dlq replay --dry-run` lists it."""
    again = f", replayed before at {when(dl.replayed_at)}" if dl.replayed_at else ""
    return f"{dl.id} ({dl.transport} {dl.queue!r}, {dl.kind}, message id {deadletters.printable(dl.message_id)}{again})"


def purge_description(plan: PurgePlan, sizes: dict[tuple[str, str], int | None], database: str) -> list[str]:
    """What a purge would delete, from the database and (with sizes) from the brokers."""
    lines = [f"would delete {plural(plan.total, 'dead letter')} from the database at {database}:"]
    lines += [f"  {g.count:>5}  {g.transport:<6}  {g.queue}  ({g.kind})" for g in plan.groups]
    for (transport, name), size in sorted(sizes.items()):
        now = "it does not exist" if size is None else f"{plural(size, 'message')} in it now, of every kind"
        action = f"empty RabbitMQ queue {name!r}" if transport == "rabbit" else f"trim Redis stream {name!r} to 0"
        lines.append(f"would {action} ({now})")
    return lines
