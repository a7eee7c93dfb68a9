"""The test session writes only to temporary folders (the root conftest.py), never to the user's home."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_session_paths_are_temporary():
    tmp = Path(tempfile.gettempdir()).resolve()
    for name in ("HOME", "DKVB_CACHE", "DKVB_DATA", "MPLCONFIGDIR"):
        assert Path(os.environ[name]).resolve().is_relative_to(tmp), name
    assert Path("~").expanduser() == Path(os.environ["HOME"])


def test_user_cache_entries_are_linked_only_where_complete():
    """The user's embeddings are read through links to complete entries only (folders the cache
    never writes to again); the folders above them are real, so new entries stay temporary."""
    cache = Path(os.environ["DKVB_CACHE"])
    for link in (p for p in cache.rglob("*") if p.is_symlink()):
        assert (link / "meta.json").is_file(), link
        assert not any((cache / above).is_symlink() for above in link.relative_to(cache).parents), link


@pytest.mark.slow
def test_a_cli_run_writes_nothing_under_home(tmp_path):
    """``dkvb run`` embeds (and caches), trains, unlearns and plots with HOME pointed at an empty
    folder and the test session's environment otherwise: HOME stays empty, the cache entry lands in
    ``$DKVB_CACHE``."""
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(  # no cache_dir: the default, $DKVB_CACHE, is what is checked
        "name: isolation\n"
        "dataset: {name: synthetic, train_limit: 96, test_limit: 48}\n"
        "encoder: {name: 'torchvision:resnet18', image_size: 32, batch_size: 64, pretrained: false}\n"
        "model: {num_codebooks: 4, codebook_size: 8, key_dim: 4, projection: random}\n"
        "train: {epochs: 1, lr: 0.01}\nlinear_train: {epochs: 1, lr: 0.01}\n"
        f"forget: [[0]]\nmethods: [dkvb-activations, finetune]\noutput_dir: {tmp_path / 'results'}\n"
    )
    cache = Path(os.environ["DKVB_CACHE"])
    before = set(cache.rglob("meta.json"))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dkvb", "run", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "isolation" / "results.json").is_file()
    assert len(set(cache.rglob("meta.json")) - before) == 2  # train and test embeddings were cached
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
