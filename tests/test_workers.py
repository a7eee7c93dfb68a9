"""Forked request workers (dkvb.workers)."""
from dkvb.workers import fork_map


def _square(x: int) -> int:
    return x * x


def test_fork_map_keeps_the_order_of_the_items():
    assert list(fork_map(_square, range(7), jobs=3)) == [x * x for x in range(7)]
    assert list(fork_map(_square, range(3), jobs=1)) == [0, 1, 4]
