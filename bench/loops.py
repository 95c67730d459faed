"""One event loop for every contender: uvloop when it is installed (as `faststream run` picks it), else asyncio."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def resolve(name: str) -> str:
    """`auto` becomes `uvloop` when importable (what `faststream run` does by default), else `asyncio`."""
    if name == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise RuntimeError("BENCH_LOOP=uvloop but uvloop is not installed")
    return name


def factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop factory of a resolved loop name."""
    if resolve(name) == "uvloop":
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return new_loop
    return asyncio.new_event_loop


def faststream_option(name: str) -> str:
    """The `faststream run --loop` value that selects the same loop in a worker."""
    return "uvloop:new_event_loop" if resolve(name) == "uvloop" else "asyncio:new_event_loop"


def run(main: Coroutine[Any, Any, T], name: str) -> T:
    """Run a coroutine to completion on a fresh loop of the chosen kind."""
    with asyncio.Runner(loop_factory=factory(name)) as runner:
        return runner.run(main)
