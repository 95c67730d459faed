"""Shell sessions of docs/getting-started.md; their `pipeline` and `make` lines are checked against the code."""
