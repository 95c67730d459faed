"""`python -m bench.io` (what `make bench-io` runs): see bench/README.md, "I/O-bound"."""

from __future__ import annotations

import dataclasses
import sys

from bench import loops
from bench.io import runner
from bench.io.config import IoConfig


def main() -> int:
    """Read the configuration, run, write bench/results/io-latest.*."""
    cfg = IoConfig.from_env()
    # Decided once: a uvloop installed while the run goes on must not change the loop halfway.
    cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, loop=loops.resolve(cfg.base.loop)))
    return runner.main(cfg)


if __name__ == "__main__":
    sys.exit(main())
