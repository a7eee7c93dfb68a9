"""How many CPU threads torch, faiss, numba and the BLAS/OpenMP pools of numpy, scipy and
scikit-learn use: the cores actually free to this process.

torch defaults to one thread per core it can see. On a shared machine (a laptop with other
jobs, a CI runner) that oversubscribes the cores and every op runs several times slower, so
the default here is the cores in this process's affinity mask (``os.sched_getaffinity``)
minus the load other processes already put on them (the 1-minute load average), at least 1.
``DKVB_THREADS`` or ``--threads`` override it. DataLoader workers get one thread each
(:func:`worker_init`).
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator

ENV = "DKVB_THREADS"
# Intel MKL (torch's CPU BLAS on x86) in its strict reproducible mode, on the best instruction set
# of the machine: its matrix products then give the same bits at any thread count.
MKL_CBWR = "AUTO,STRICT"


def reproducible_products() -> None:
    """Ask MKL for matrix products whose bits do not depend on the thread count.

    The default thread count follows the load (:func:`default_threads`), so without this two runs
    of one seed on a shared machine fit other keys: MKL splits a product between threads with
    other rounding (Fashion-MNIST's keys differed by up to 0.5 between 1 and 2 threads). MKL reads
    ``MKL_CBWR`` at its first call, so ``import dkvb`` sets it before any product; a value already
    in the environment wins. LAPACK factorisations are not covered: the fits run them on one
    thread (:func:`one_thread`). Costs no measurable time here (2-core AVX-512 machine).
    """
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def env_count(name: str) -> int | None:
    """The positive integer in environment variable ``name``; ``None`` when it is unset or empty."""
    env = os.environ.get(name)
    if not env:
        return None
    n = int(env) if env.strip().isdigit() else 0
    if n < 1:
        raise ValueError(f"{name}: must be a positive integer, got {env!r}")
    return n


def default_threads() -> int:
    """``$DKVB_THREADS`` if set, else the available cores minus the current load, at least 1."""
    n = env_count(ENV)
    if n is not None:
        return n
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default :func:`default_threads`) in torch, faiss, numba and the BLAS/OpenMP
    pools numpy, scipy and scikit-learn load (``threadpoolctl``); returns ``n``."""
    import torch

    n = default_threads() if n is None else n
    if n < 1:
        raise ValueError(f"threads: must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    try:  # numpy/scipy's OpenBLAS and scikit-learn's OpenMP: the MIA's logistic regression ran 4x
        from threadpoolctl import threadpool_limits  # slower on two busy cores with their default

        threadpool_limits(n)
    except ImportError:
        pass
    return n


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block (the previous count comes back after).

    Used around small matrix products whose bits must match the same rows' bits in a large
    product: a BLAS library that splits a small product between threads gives each thread a few
    rows, which it computes with other kernels (other rounding) than a large product's. And around
    the fits' LAPACK calls (eigendecompositions, solves), whose threaded blocking rounds otherwise
    at every thread count, which MKL's reproducible mode does not cover.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _blas_controller():
    """The process's threadpoolctl controller, made once numpy and scipy's BLAS are loaded."""
    import scipy.linalg  # noqa: F401  (its BLAS is one of the libraries to find)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_one_thread():
    """Context manager: the BLAS libraries numpy and scipy loaded run on one thread inside the block,
    so their factorisations and products give the same bits at every thread count. The libraries are
    looked up once per process (``threadpool_limits`` reads the process's memory map at every call:
    4 ms in a process that loaded torch, a tenth of a ridge request)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def worker_init(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker process."""
    import torch

    torch.set_num_threads(1)
