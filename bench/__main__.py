"""`python -m bench run|scale|profile|probe|report`: the main table, scaling figures, py-spy profiles,
one worker's latency at chosen rates, re-rendering."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from bench import loops
from bench.config import BenchConfig


def main(argv: list[str] | None = None) -> int:
    """Dispatch to one part of the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("part", choices=("run", "scale", "profile", "probe", "report"), nargs="?", default="run")
    args = parser.parse_args(argv)
    cfg = BenchConfig.from_env()
    # Decided once: a uvloop installed while the run goes on must not change the loop halfway.
    cfg = dataclasses.replace(cfg, loop=loops.resolve(cfg.loop))
    if args.part == "run":
        from bench import runner  # noqa: PLC0415

        return runner.main(cfg)
    if args.part == "scale":
        from bench import scale  # noqa: PLC0415

        return scale.main(cfg)
    if args.part == "probe":
        from bench import probe  # noqa: PLC0415

        return probe.main(cfg)
    if args.part == "report":
        from bench import report  # noqa: PLC0415

        report.rerender(cfg.results)
        from bench import profile as profile_  # noqa: PLC0415

        profile_.rerender(cfg.results)
        return 0
    from bench import profile  # noqa: PLC0415

    return profile.main(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
