"""An ordered map over worker processes that starts only when the data turns out to be large.

prepare's per-row work (shape, PII, chat template, tokenization) is pure, so it can run in other
processes while the main process keeps everything order-dependent (exact duplicates, the indexes,
the files). Results come back in submission order, so the outcome is the same with any number of
workers. Small inputs (tests, the sample tenants) never pay for starting processes: the first
`inline` items run here, and the pool starts only if more follow.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

START_METHOD: str | None = None  # None: fork on Linux, spawn elsewhere (tests force spawn)
INLINE_ITEMS = 8  # items run in this process before a pool is worth starting (prepare: 8 batches, ~8k rows)
T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Worker processes for `num_proc: null`: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
    inline: int | None = None,
) -> Iterator[R]:
    """fn(item) for each item, in order. fn runs in `workers` processes set up by initializer(*initargs),
    after the first `inline` items ran in this process (set up the same way by the caller)."""
    iterator = iter(items)
    inline = INLINE_ITEMS if inline is None else inline
    while workers <= 1 or inline > 0:
        try:
            item = next(iterator)
        except StopIteration:
            return
        inline -= 1
        yield fn(item)
    # On Linux fork shares the parent's loaded modules and objects (no re-import, no pickling of the
    # state); elsewhere fork is unsafe or missing, and spawn pickles initargs instead.
    method = START_METHOD or ("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=initializer, initargs=initargs
    ) as pool:
        pending: deque[Future] = deque()
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:  # bounded: at most 2 batches per worker in flight
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
