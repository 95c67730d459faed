"""The pipeline worker: FastStream consumers, the event store, failure policy and operations.

Layers, lowest first (a module imports only from its own layer or below; `tests/unit/test_layers.py`
enforces it): `core`, `flows`, `policy`, `eventstore`, `transport`, `ops`, `consume`, `deadletters`,
`app` (the wiring: `faststream run streams.app:app`), `cli` (the `pipeline` command).
"""
