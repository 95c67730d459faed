"""The foundation every other part stands on: names, settings, logging, metrics, envelopes.

Holds the contract's names, the settings class, the retry arithmetic, structured logging, the
Prometheus registry, background loops, group commit, fault injection and the transport-neutral
`Envelope`. Imports nothing from `streams` outside `streams.core`; may import `schemas` and
`handlers.errors`.
"""
