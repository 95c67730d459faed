"""The event store: the append-only log, inbox, outbox and dead letters, its schema and projections.

Written by group commit on SQLite or PostgreSQL; the outbox relay publishes what was committed.
May import `streams.core`, `streams.flows`, `streams.policy`, `schemas` and `handlers.errors`.
"""
