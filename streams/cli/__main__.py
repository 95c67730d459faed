"""`python -m streams.cli`: the same as the `pipeline` console script."""

from streams.cli import app

app(prog_name="pipeline")
