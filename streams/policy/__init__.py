"""The failure policy: what a failure is, when to retry, when a message is poison, when to stop calling.

Classification and retry decisions, circuit breakers per dependency, the crash ledger that finds
the message that kills its worker, and dead-letter alerts. May import `streams.core`,
`streams.flows`, `schemas` and `handlers.errors`; nothing that talks to a broker or a database.
"""
