"""What an operator touches while a worker runs: health, the activity monitor, shutdown, warm restarts.

May import every layer below it (`core`, `flows`, `policy`, `eventstore`, `transport`), never the
consuming path or the app.
"""
