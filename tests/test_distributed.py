"""``torchrun --nproc_per_node=2 -m dkvb embed`` gives exactly the single-process cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dkvb.cache import load_cached, subset_indices
from dkvb.cli import main
from dkvb.datasets import load_dataset
from dkvb.distributed import barrier, process_group, rank_and_world

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "tiny_synthetic.yaml"
# batch 4 -> chunks of 64 rows: 200 train rows in 4 uneven chunks (ranks take 0,2 and 1,3), 64 test rows in 1.
OVERRIDES = ["encoder.batch_size=4", "encoder.pretrained=false", "dataset.train_limit=200", "seed=1"]


def _sets(cache_dir: Path) -> dict[str, Path]:
    folders = {p.parent.name.split("-")[0]: p.parent for p in cache_dir.rglob("meta.json")}
    assert sorted(folders) == ["test", "train"], folders
    return folders


def test_outside_torchrun_is_single_process():
    assert rank_and_world() == (0, 1)
    barrier()  # no-op
    with process_group("cpu") as device:
        assert device == "cpu" and rank_and_world() == (0, 1)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    args = [str(CONFIG), *[a for o in OVERRIDES for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "dkvb", "embed", *args,
         "--set", f"cache_dir={tmp_path / 'multi'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1" in proc.stderr  # the second rank encoded chunks of its own
    assert proc.stdout.count("train (200, 1280)") == 1  # printed by rank 0 only

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the torchrun ranks (OMP_NUM_THREADS=1)
    try:
        assert main(["embed", *args, "--set", f"cache_dir={tmp_path / 'single'}"]) == 0
    finally:
        torch.set_num_threads(n)

    multi, single = _sets(tmp_path / "multi"), _sets(tmp_path / "single")
    for split, limit in (("train", 200), ("test", None)):
        assert multi[split].name == single[split].name  # same cache key
        assert not list(multi[split].glob("chunks/*.npy"))  # merged by rank 0
        a, b = load_cached(multi[split]), load_cached(single[split])
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)  # exact, row for row
        ds = load_dataset("synthetic", split)
        idx = subset_indices(len(ds), limit, 1)
        assert a.y.tolist() == ds.targets[idx].tolist()  # no gaps, no duplicates, in order
        assert len(np.unique(a.x.numpy(), axis=0)) == len(idx)
