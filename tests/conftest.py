"""Shared fixtures: a tiny, well-separated synthetic embedding problem, and helpers built on it."""
from __future__ import annotations

import shutil

import pytest
import torch

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit


def make_clusters(n: int, dim: int = 32, num_classes: int = 5, *, seed: int = 0, spread: float = 3.0) -> EmbeddingSet:
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(num_classes, dim, generator=g) * spread
    g.manual_seed(seed)
    y = torch.arange(n) % num_classes
    return EmbeddingSet(centers[y] + torch.randn(n, dim, generator=g), y, [f"class{i}" for i in range(num_classes)])


@pytest.fixture(scope="session")
def clusters() -> tuple[EmbeddingSet, EmbeddingSet]:
    return make_clusters(2000, seed=0), make_clusters(500, seed=1)


SMALL_DKVB = ModelConfig(num_codebooks=16, codebook_size=32, key_dim=4, projection="random")


@pytest.fixture(scope="session")
def trained_dkvb(clusters):
    train, _ = clusters
    model = build_model(SMALL_DKVB, train.dim, train.num_classes, seed=0)
    return fit(model, train, TrainConfig(epochs=5, lr=1e-2))


@pytest.fixture(scope="session")
def trained_linear(clusters):
    train, _ = clusters
    model = build_model({"kind": "linear"}, train.dim, train.num_classes, seed=0)
    return fit(model, train, TrainConfig(epochs=5, lr=1e-2))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster, and far faster on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sigkill_at_nth_sync(n: int) -> None:
    """In a forked child: SIGKILL this process at its n-th ``os.fsync``/``os.replace`` call."""
    import os
    import signal

    count = [0]
    for name in ("fsync", "replace"):
        def wrapped(*a, _r=getattr(os, name)):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _r(*a)
        setattr(os, name, wrapped)


@pytest.fixture(scope="session")
def sigkill_at_nth_sync():
    """Crash tests: ``sigkill_at_nth_sync(n)`` makes a forked writer die at its n-th fsync/rename."""
    return _sigkill_at_nth_sync


def _killed_copy(store, path, n: int, write) -> None:
    """Copy ``store`` to ``path`` and run ``write(path)`` in a forked child SIGKILLed at its n-th
    fsync/rename (or finishing, when it makes fewer); returns once the child is gone."""
    import os

    shutil.copytree(store, path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            _sigkill_at_nth_sync(n)
            write(path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.fixture(scope="session")
def killed_copy():
    """Crash tests: ``killed_copy(store, path, n, write)`` leaves at ``path`` what a writer killed at
    its n-th fsync/rename left behind."""
    return _killed_copy


@pytest.fixture
def tiny_config(tmp_path):
    """A tiny experiment YAML (synthetic images, random ResNet-18, 8 x 16 keys) for end-to-end script runs."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "name: tiny\n"
        "dataset: {name: synthetic}\n"
        "encoder: {name: 'torchvision:resnet18', image_size: 32, batch_size: 64, pretrained: false}\n"
        "model: {num_codebooks: 8, codebook_size: 16, key_dim: 4, projection: random}\n"
        "train: {epochs: 3, lr: 0.01}\nlinear_train: {epochs: 3, lr: 0.01}\n"
        f"cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'results'}\n"
    )
    return cfg


@pytest.fixture
def store(stored, tmp_path):
    """A writable copy of the test module's ``stored`` model (each module that uses it defines ``stored``)."""
    path = tmp_path / "model"
    shutil.copytree(stored, path)
    return path
