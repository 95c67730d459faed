"""Testing a flow with FastStream's in-memory TestBroker (docs/getting-started.md, docs/writing-a-flow.md)."""
