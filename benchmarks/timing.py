"""Timing helpers: the best of several runs, the same rule for olmstead and its baseline."""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["Stopwatch", "best", "timed_sync"]

T = TypeVar("T")


class Stopwatch:
    """Milliseconds spent inside ``with`` blocks, garbage collection held off meanwhile.

    The collector is paused while timing (as ``timeit`` does) so that a collection
    started by the setup is not billed to whichever side happens to run next.
    """

    def __init__(self) -> None:
        self.ms = 0.0

    def __enter__(self) -> Stopwatch:
        self._gc = gc.isenabled()
        gc.disable()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms += (time.perf_counter() - self._start) * 1000
        if self._gc:
            gc.enable()


def timed_sync(fn: Callable[[], T]) -> tuple[float, T]:
    with Stopwatch() as watch:
        result = fn()
    return watch.ms, result


async def best(repeat: int, run: Callable[[], Awaitable[float]]) -> float:
    """The fastest of ``repeat`` runs (each returns its own milliseconds): noise only adds."""
    return min([await run() for _ in range(repeat)])
