"""The way a message travels: subscriber, middleware, (Redis) batch, pipeline, commit, outcome.

`routes` declares the FastStream subscribers from the flows; `middleware` puts every message
through `pipeline.Pipeline`, which records the outcome in the event store and publishes it, or
applies the failure policy. May import every layer below it, never `streams.app` or the CLI.
"""
