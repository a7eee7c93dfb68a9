"""Independent pieces of a run in forked worker processes, results in order.

A comparison's forget requests are independent given the trained models, so they can run side
by side: the workers are forked, so they share the parent's embeddings, models and kept
searches (copy-on-write) instead of loading or searching them again. Each worker runs on one
thread: GNU OpenMP (torch's and faiss's thread pools) does not survive a fork, so a forked worker
that starts a parallel region after its parent used one hangs (seen on a 16-core machine, where
four workers of four threads each never returned). Results come back in the order of the items,
whatever worker ran them. A worker that dies (killed for memory, most often) stops the run with
an error instead of leaving it waiting for a result that never comes.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

ENV = "DKVB_JOBS"

_TASK: Callable[[Any], Any] | None = None  # set in the parent before forking; the workers inherit it


class WorkerDied(RuntimeError):
    """A forked worker process ended without returning its result."""


def default_jobs() -> int:
    """``$DKVB_JOBS`` if set, else one job per core this process may run on, at most 4 (each job
    holds its own masked copies and logits). Unlike the thread count this ignores the load
    average: single-threaded workers do not spin-wait on each other, so on a busy core two of
    them cost what one does, while a load average that still remembers a finished job would
    leave a free core idle."""
    from .threads import available_cores, env_count

    n = env_count(ENV)
    return n if n is not None else max(1, min(available_cores(), 4))


def fork_map(fn: Callable[[Any], Any], items: Iterable[Any], *, jobs: int) -> Iterator[Any]:
    """``fn(item)`` for every item, in order: in this process when ``jobs`` is 1 (or fork is not
    available, or CUDA is initialised, which a fork cannot share), else in ``jobs`` forked
    single-threaded workers. Raises :class:`WorkerDied` if one of them is killed; the results
    yielded before stand."""
    global _TASK
    items = list(items)
    if jobs <= 1 or len(items) <= 1 or not _can_fork():
        yield from map(fn, items)
        return
    _TASK = fn
    try:
        ctx, workers = multiprocessing.get_context("fork"), min(jobs, len(items))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init) as pool:
            # (multiprocessing.Pool replaces a killed worker but never returns its item's result)
            try:
                yield from pool.map(_call, items)
            except BrokenProcessPool as e:
                raise WorkerDied(
                    f"a forked worker died (killed by the system: most likely out of memory, as each of "
                    f"the {workers} workers holds its own masked copies and logits); rerun "
                    f"with fewer jobs (--jobs / ${ENV})"
                ) from e
    finally:
        _TASK = None


def _can_fork() -> bool:
    import torch

    return "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()


def _init() -> None:
    from .threads import set_threads

    set_threads(1)  # not more: see the module docstring


def _call(item: Any) -> Any:
    assert _TASK is not None, "fork_map: worker started without a task"
    return _TASK(item)
