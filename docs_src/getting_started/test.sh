make unit     # the in-memory tests only: no server needed
make test     # what CI runs: ruff, mypy --strict, the docs site, the unit and connected tests
