"""Work split over processes forked from this one, so they inherit what is already loaded
(bar data, imports) instead of receiving it: the backtester's baseline passes and report
figures on a second core. Inline when there is one core or no ``fork`` (not Linux)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class InlinePool:
    """The ``submit``/``result`` of an executor, run at once in this process."""

    class _Done:
        def __init__(self, value: Any) -> None:
            self._value = value

        def result(self) -> Any:
            return self._value

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._Done(fn(*args))

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def fork_pool(workers: int) -> Any:
    """A process pool of ``workers`` forked from this process when this machine has a second
    core (Linux), else an ``InlinePool``. Use it as a context manager; pass small arguments
    (they are pickled) and keep large data in module globals set before the first submit."""
    if (os.cpu_count() or 1) < 2 or sys.platform != "linux" or workers < 1:
        return InlinePool()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("fork"))
