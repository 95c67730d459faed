"""initial: event log, inbox, outbox, dead letters, projections (streams/eventstore/tables.py)

Revision ID: 0001
Revises:
Create Date: 2025-11-28

Databases from before migrations (tables made by `metadata.create_all`, no alembic_version)
are adopted: only the missing tables are created, and `streams.eventstore.schema` then requires the
result to match `streams.eventstore.tables` exactly.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# BigInteger ids autoincrement on PostgreSQL; SQLite only does so for INTEGER PRIMARY KEY.
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    inspector = None if context.is_offline_mode() else sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names()) if inspector else set()

    if "events" not in existing:
        op.create_table(
            "events",
            sa.Column("position", Position, autoincrement=True, nullable=False, comment="global order"),
            sa.Column("stream_id", sa.String(length=300), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("event_id", sa.String(length=64), nullable=False),
            sa.Column("type", sa.String(length=64), nullable=False),
            sa.Column("data", sa.JSON(), nullable=False),
            sa.Column(
                "metadata",
                sa.JSON(),
                nullable=False,
                comment="message_id, correlation_id, causation_id, attempt, source",
            ),
            sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("position"),
            sa.UniqueConstraint("event_id"),
            sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
        )
        op.create_index("ix_events_type", "events", ["type"], unique=False)
    elif (  # create_all before migrations left this comment out
        inspector
        and inspector.dialect.supports_comments
        and "metadata" in {c["name"] for c in inspector.get_columns("events")}
    ):
        op.alter_column(
            "events",
            "metadata",
            existing_type=sa.JSON(),
            existing_nullable=False,
            comment="message_id, correlation_id, causation_id, attempt, source",
        )

    if "inbox" not in existing:
        op.create_table(
            "inbox",
            sa.Column("consumer", sa.String(length=64), nullable=False),
            sa.Column("message_id", sa.String(length=256), nullable=False),
            sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("consumer", "message_id", name="pk_inbox"),
        )

    if "outbox" not in existing:
        op.create_table(
            "outbox",
            sa.Column("id", Position, autoincrement=True, nullable=False),
            sa.Column("event_id", sa.String(length=64), nullable=False),
            sa.Column("transport", sa.String(length=16), nullable=False),
            sa.Column("event_type", sa.String(length=64), nullable=False),
            sa.Column("payload", sa.LargeBinary(), nullable=False, comment="the event as JSON bytes"),
            sa.Column("message_id", sa.String(length=256), nullable=False),
            sa.Column("correlation_id", sa.String(length=256), nullable=False),
            sa.Column(
                "owner",
                sa.String(length=200),
                nullable=False,
                comment="the worker that wrote it and relays it first",
            ),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("event_id"),
        )
        op.create_index("ix_outbox_unpublished", "outbox", ["published_at", "id"], unique=False)

    if "dead_letters" not in existing:
        op.create_table(
            "dead_letters",
            sa.Column("id", Position, autoincrement=True, nullable=False),
            sa.Column("transport", sa.String(length=16), nullable=False),
            sa.Column("queue", sa.String(length=255), nullable=False),
            sa.Column("message_id", sa.String(length=256), nullable=False),
            sa.Column("correlation_id", sa.String(length=256), nullable=False),
            sa.Column("kind", sa.String(length=16), nullable=False),
            sa.Column("exception_type", sa.String(length=255), nullable=False),
            sa.Column("exception_message", sa.Text(), nullable=False),
            sa.Column("stacktrace", sa.Text(), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("headers", sa.JSON(), nullable=False),
            sa.Column("body", sa.LargeBinary(), nullable=False),
            sa.Column("fields", sa.JSON(), nullable=True, comment="Redis entry fields, hex-encoded"),
            sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_dead_letters_queue_kind", "dead_letters", ["queue", "kind"], unique=False)

    if "task_status" not in existing:
        op.create_table(
            "task_status",
            sa.Column("task_id", sa.String(length=128), nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("model", sa.String(length=128), nullable=True),
            sa.Column("result", sa.Text(), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("message_id", sa.String(length=256), nullable=True),
            sa.Column("position", sa.BigInteger(), nullable=False, comment="last event folded in"),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("task_id"),
        )

    if "email_log" not in existing:
        op.create_table(
            "email_log",
            sa.Column("message_id", sa.String(length=256), nullable=False),
            sa.Column("recipient", sa.String(length=320), nullable=True),
            sa.Column("subject", sa.Text(), nullable=True),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("provider_id", sa.String(length=256), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("position", sa.BigInteger(), nullable=False, comment="last event folded in"),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("message_id"),
        )


def downgrade() -> None:
    op.drop_table("email_log")
    op.drop_table("task_status")
    op.drop_index("ix_dead_letters_queue_kind", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("inbox")
    op.drop_index("ix_events_type", table_name="events")
    op.drop_table("events")
