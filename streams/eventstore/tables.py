"""The database schema: event log, inbox, outbox, dead letters, projections (SQLAlchemy Core)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# BigInteger ids autoincrement on PostgreSQL; SQLite only does so for INTEGER PRIMARY KEY.
Position = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "events",
    metadata,
    Column("position", Position, primary_key=True, autoincrement=True, comment="global order"),
    Column("stream_id", String(300), nullable=False),
    Column("version", Integer, nullable=False),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("data", JSON, nullable=False),
    Column("metadata", JSON, nullable=False, comment="message_id, correlation_id, causation_id, attempt, source"),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
    Index("ix_events_type", "type"),
)

inbox = Table(
    "inbox",
    metadata,
    Column("consumer", String(64), nullable=False),
    Column("message_id", String(256), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("consumer", "message_id", name="pk_inbox"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Position, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("transport", String(16), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False, comment="the event as JSON bytes"),
    Column("message_id", String(256), nullable=False),
    Column("correlation_id", String(256), nullable=False),
    Column("owner", String(200), nullable=False, comment="the worker that wrote it and relays it first"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Index("ix_outbox_unpublished", "published_at", "id"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Position, primary_key=True, autoincrement=True),
    Column("transport", String(16), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("message_id", String(256), nullable=False),
    Column("correlation_id", String(256), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("exception_type", String(255), nullable=False),
    Column("exception_message", Text, nullable=False),
    Column("stacktrace", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("fields", JSON, nullable=True, comment="Redis entry fields, hex-encoded"),
    Column("dead_lettered_at", DateTime(timezone=True), nullable=False),
    Column("replayed_at", DateTime(timezone=True), nullable=True),
    Index("ix_dead_letters_queue_kind", "queue", "kind"),
)

task_status = Table(
    "task_status",
    metadata,
    Column("task_id", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("model", String(128), nullable=True),
    Column("result", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("message_id", String(256), nullable=True),
    Column("position", BigInteger, nullable=False, comment="last event folded in"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

email_log = Table(
    "email_log",
    metadata,
    Column("message_id", String(256), primary_key=True),
    Column("recipient", String(320), nullable=True),
    Column("subject", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("provider_id", String(256), nullable=True),
    Column("reason", Text, nullable=True),
    Column("position", BigInteger, nullable=False, comment="last event folded in"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
