"""`make bench-io`: the pipeline on its real, I/O-bound work, against local providers (tests/providers.py).

(a) e-mails through a 100 ms mail API without limit: the pipeline, Dramatiq and a bare FastStream
subscriber, each doing the same HTTP POST; (b) the same API limited to 200 requests/s (429 +
Retry-After beyond): one and three workers with and without PIPELINE_LIMITS, and Dramatiq with its
Redis rate limiter; (c) completions through a 1 s model API limited in tokens per minute.
Everything is counted at the provider. See bench/README.md ("I/O-bound").
"""
