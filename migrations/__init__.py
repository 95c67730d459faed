"""Alembic migrations of the event store (`pipeline db upgrade`; see `streams.eventstore.schema`)."""
