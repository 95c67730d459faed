"""Transport and wiring: app, brokers, topology, middleware, event store, settings, logging, metrics, health, CLI."""
