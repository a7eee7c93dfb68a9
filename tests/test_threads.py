import os

import pytest
import torch

from dkvb import threads
from dkvb.timing import PhaseTimer


def test_default_threads_follow_the_environment_variable(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.default_threads() == 3
    monkeypatch.setenv(threads.ENV, "zero")
    with pytest.raises(ValueError, match="DKVB_THREADS"):
        threads.default_threads()


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.default_threads() == 1  # 4 cores, ~3 busy
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.default_threads() == 1  # never below one
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.default_threads() == 4


def test_set_threads_applies_to_torch():
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_phase_timer_accumulates_per_phase_and_label():
    timer = PhaseTimer()
    for _ in range(3):
        with timer.track("evaluate", "retrain"):
            pass
    with timer.track("unlearn", "retrain"):
        pass
    rows = {(r["phase"], r["label"]): r for r in timer.rows()}
    assert rows[("evaluate", "retrain")]["calls"] == 3
    assert ("total (wall)", "") in rows
    assert "| evaluate | retrain |" in timer.table()


def test_set_threads_limits_the_blas_and_openmp_pools():
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits():  # restored afterwards
        threads.set_threads(1)
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())


def test_jobs_default_to_the_cores_and_follow_dkvb_jobs(monkeypatch):
    from dkvb.threads import available_cores
    from dkvb.workers import default_jobs

    monkeypatch.delenv("DKVB_JOBS", raising=False)
    assert default_jobs() == max(1, min(available_cores(), 4))
    monkeypatch.setenv("DKVB_JOBS", "3")
    assert default_jobs() == 3
    monkeypatch.setenv("DKVB_JOBS", "0")
    with pytest.raises(ValueError, match="DKVB_JOBS: must be a positive integer"):
        default_jobs()


FIT_AND_HASH = """
import hashlib, sys
import dkvb  # first: MKL's reproducible mode must be set before torch's first product
import torch
from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
y = torch.randint(0, 10, (12000,), generator=g)
x = torch.randn(10, 1280, generator=g)[y] * 0.5 + torch.randn(12000, 1280, generator=g)
model = build_model(ModelConfig(num_codebooks=32, codebook_size=64, key_dim=8, projection="discriminant",
                                whiten_dim=128), 1280, 10, seed=0)
fit(model, EmbeddingSet(x, y, [str(i) for i in range(10)]), TrainConfig(epochs=1, lr=0.01, value_init="probe"))
h = hashlib.sha256()
for v in model.state_dict().values():
    h.update(v.contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_a_seed_fits_the_same_model_at_any_thread_count():
    """Keys, probe start and values bit for bit at 1 and 2 threads (the default count follows the
    load). Sized so that MKL and OpenBLAS split the products between threads: with MKL's ordinary
    mode (``MKL_CBWR=AUTO``) the keys differ, and the probe's start did with two BLAS threads."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", threads.ENV)}
    digests = {subprocess.run([sys.executable, "-c", FIT_AND_HASH, str(n)], env=env, check=True, capture_output=True,
                              text=True).stdout.strip() for n in (1, 2)}
    assert len(digests) == 1, digests
