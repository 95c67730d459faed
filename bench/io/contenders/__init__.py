"""The peers of `make bench-io`, each a process that consumes its own queue and calls the provider."""
