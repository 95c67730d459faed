"""What the pipeline does: each command flow declared once, and the dependencies handed to it.

`flow.Flow` is the declaration (command, handler, dependency, queue, stream, events);
`catalog` lists the flows a worker runs; `deps` picks the adapters (mailer, LLM) from settings.
May import `streams.core`, `schemas` and `handlers`.
"""
