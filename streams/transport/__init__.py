"""The brokers: topology, outcome publishing per broker, Redis retries, consumer groups and keepalive.

Everything that knows RabbitMQ or Redis Streams beyond FastStream's subscribers lives here.
May import `streams.core`, `streams.flows`, `streams.policy` and `streams.eventstore`.
"""
