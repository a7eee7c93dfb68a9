"""Forked request workers (dkvb.workers)."""
from dkvb.workers import fork_map


def _square(x: int) -> int:
    return x * x


def test_fork_map_keeps_the_order_of_the_items():
    assert list(fork_map(_square, range(7), jobs=3)) == [x * x for x in range(7)]
    assert list(fork_map(_square, range(3), jobs=1)) == [0, 1, 4]


def _die_on_two(x: int) -> int:
    import os
    import signal

    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    return x


def test_a_killed_worker_stops_the_run_with_an_error_instead_of_hanging():
    import pytest

    from dkvb.workers import WorkerDied

    got = []
    with pytest.raises(WorkerDied, match="out of memory.*fewer jobs"):
        for r in fork_map(_die_on_two, range(6), jobs=2):
            got.append(r)
    assert got == [0, 1][: len(got)]  # what came back before the dead one stands, in order
