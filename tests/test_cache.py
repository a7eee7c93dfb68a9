"""Embedding cache: hits skip the encoder, interrupted runs resume chunk by chunk with the same
result, float16 storage, and damaged files fail with a message saying what to delete."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dkvb import encoders
from dkvb.cache import cache_path, embed_split, load_cached, subset_indices
from dkvb.datasets import load_dataset

# 64 synthetic 32x32 test images, 8 per batch, 16 per chunk: 8 batches in 4 chunks.
SPLIT = dict(encoder_name="effnet-lite0", dataset_name="synthetic", split="test")
SMALL = dict(image_size=32, pretrained=False, batch_size=8, chunk_size=16, progress=False)


class EncodeSpy:
    """Wraps ``create_encoder`` so the built encoder counts (and can fail) its ``encode`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.rows = 0
        self.fail_at: int | None = None
        real = encoders.create_encoder

        def create(*args, **kwargs):
            encoder = real(*args, **kwargs)
            encode = encoder.encode

            def counting(images: torch.Tensor) -> torch.Tensor:
                if self.fail_at is not None and self.calls == self.fail_at:
                    raise KeyboardInterrupt("simulated interruption")
                self.calls += 1
                self.rows += len(images)
                return encode(images)

            encoder.encode = counting
            return encoder

        monkeypatch.setattr(encoders, "create_encoder", create)

    def reset(self) -> None:
        self.calls = self.rows = 0
        self.fail_at = None


@pytest.fixture
def spy(monkeypatch) -> EncodeSpy:
    return EncodeSpy(monkeypatch)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory) -> Path:
    """A cache holding the uninterrupted float32 result."""
    cache_dir = tmp_path_factory.mktemp("ref")
    embed_split(**SPLIT, cache_dir=cache_dir, **SMALL)
    return cache_dir


@pytest.fixture(scope="module")
def reference(reference_cache):
    return embed_split(**SPLIT, cache_dir=reference_cache, **SMALL)


def _folder(cache_dir: Path) -> Path:
    (folder,) = [p.parent for p in cache_dir.rglob("meta.json")]
    return folder


def test_result_matches_the_dataset(reference):
    ds = load_dataset("synthetic", "test")
    assert reference.x.shape == (64, 1280) and reference.x.dtype == torch.float32
    assert reference.y.tolist() == ds.targets.tolist()
    assert reference.class_names == tuple(ds.class_names)
    assert torch.isfinite(reference.x).all()
    assert reference.x.numpy().flags.writeable  # copied out of the read-only memory map


def test_second_call_is_a_cache_hit(reference, tmp_path, spy):
    first = embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    assert (spy.calls, spy.rows) == (8, 64)
    folder = _folder(tmp_path)
    assert not list((folder / "chunks").glob("*.npy"))  # merged and cleaned up
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shape"] == [64, 1280] and meta["dataset"] == "synthetic" and meta["split"] == "test"
    spy.reset()
    second = embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    assert spy.calls == 0
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert torch.equal(first.x, reference.x)


def test_cache_hit_needs_no_weights(reference, reference_cache, monkeypatch):
    """Cached embeddings load on a machine that lacks (or cannot download) the encoder's weights."""
    def no_weights(*args, **kwargs):
        raise RuntimeError("could not load the pretrained weights (simulated)")

    monkeypatch.setattr(encoders, "create_encoder", no_weights)
    hit = embed_split(**SPLIT, cache_dir=reference_cache, **SMALL)
    assert torch.equal(hit.x, reference.x)


def test_interrupted_encoding_resumes_only_the_missing_chunks(reference, tmp_path, spy):
    spy.fail_at = 5  # batches 0-3 fill chunks 0 and 1; batch 4 is half of chunk 2; batch 5 fails
    with pytest.raises(KeyboardInterrupt):
        embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    chunks = sorted(p.name for p in tmp_path.rglob("chunks/*.npy"))
    assert chunks == ["000000.npy", "000001.npy"]
    assert not list(tmp_path.rglob("meta.json")) and not list(tmp_path.rglob("*.tmp"))
    spy.reset()
    resumed = embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    assert (spy.calls, spy.rows) == (4, 32)  # chunks 2 and 3 only
    assert torch.equal(resumed.x, reference.x) and torch.equal(resumed.y, reference.y)


def test_resume_with_another_chunk_size_or_a_damaged_chunk_re_encodes_those(reference, tmp_path, spy):
    spy.fail_at = 5
    with pytest.raises(KeyboardInterrupt):
        embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    (chunk0,) = tmp_path.rglob("chunks/000000.npy")
    chunk0.write_bytes(b"not a numpy file")
    spy.reset()
    resumed = embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    assert spy.rows == 48  # chunk 0 again, plus chunks 2 and 3
    assert torch.equal(resumed.x, reference.x)

    other = tmp_path / "other"
    spy.reset()
    spy.fail_at = 5
    with pytest.raises(KeyboardInterrupt):
        embed_split(**SPLIT, cache_dir=other, **SMALL)
    spy.reset()
    resumed = embed_split(**SPLIT, cache_dir=other, **{**SMALL, "chunk_size": 32})  # 16-row chunks don't fit
    assert spy.rows == 64
    assert torch.equal(resumed.x, reference.x)


def test_float16_storage(tmp_path, reference):
    half = embed_split(**SPLIT, cache_dir=tmp_path, **SMALL, dtype="float16")
    stored = np.load(_folder(tmp_path) / "embeddings.npy")
    assert stored.dtype == np.float16 and stored.shape == (64, 1280)
    assert half.x.dtype == torch.float32  # float32 in memory
    torch.testing.assert_close(half.x, reference.x, rtol=1e-3, atol=1e-3)
    assert not torch.equal(half.x, reference.x)
    with pytest.raises(ValueError, match="dtype must be one of"):
        embed_split(**SPLIT, cache_dir=tmp_path, **SMALL, dtype="int8")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda f: (f / "embeddings.npy").write_bytes(b"\x93NUMPY garbage"), "corrupt embedding cache"),
        (lambda f: (f / "meta.json").write_text('{"shape": [64'), "corrupt embedding cache"),
        (lambda f: (f / "meta.json").write_text("{}"), "corrupt embedding cache"),
        (lambda f: np.save(f / "embeddings.npy", np.zeros((63, 1280), np.float32)), "does not match its sha256"),
        (lambda f: _flip_last_byte(f / "embeddings.npy"), "embeddings.npy does not match its sha256"),
        (lambda f: (f / "labels.npy").unlink(), "corrupt embedding cache"),
    ],
    ids=["embeddings", "truncated-meta", "empty-meta", "wrong-shape", "flipped-bit", "missing-labels"],
)
def test_corrupt_cache_gives_a_clear_error(reference_cache, tmp_path, damage, match):
    shutil.copytree(reference_cache, tmp_path, dirs_exist_ok=True)
    folder = _folder(tmp_path)
    damage(folder)
    with pytest.raises(ValueError, match=match) as info:
        embed_split(**SPLIT, cache_dir=tmp_path, **SMALL)
    assert str(folder) in str(info.value) and "delete the folder" in str(info.value)


def test_load_cached_without_meta_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        load_cached(tmp_path)


def test_subset_and_key_fields_separate_cache_entries(tmp_path, spy):
    sub = embed_split(**SPLIT, cache_dir=tmp_path, **SMALL, limit=20, seed=3)
    idx = subset_indices(64, 20, 3)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    assert sub.y.tolist() == load_dataset("synthetic", "test").targets[idx].tolist()
    embed_split(**SPLIT, cache_dir=tmp_path, **SMALL, limit=20, seed=4)
    embed_split(**SPLIT, cache_dir=tmp_path, **{**SMALL, "pretrained": True})
    assert len(list(tmp_path.rglob("meta.json"))) == 3
    with pytest.raises(ValueError, match="limit must be positive"):
        subset_indices(64, 0, 0)


def test_cache_path_is_readable_and_keyed():
    key = {"encoder": {"name": "clip:ViT-B-32/openai"}, "dataset": "imagefolder:/data/x", "split": "train"}
    a = cache_path("/c", key)
    assert a.parts[:4] == ("/", "c", "clip_ViT-B-32_openai", "imagefolder_data_x") and a.name.startswith("train-")
    assert cache_path("/c", {**key, "dtype": "float16"}) != a


def _image_folder(root: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
    return root


def test_an_image_folder_cache_is_keyed_by_its_contents_not_its_path(tmp_path, spy):
    from PIL import Image

    folder = _image_folder(tmp_path / "images")
    args = dict(encoder_name="effnet-lite0", dataset_name=f"imagefolder:{folder}", split="train",
                cache_dir=tmp_path / "cache", **SMALL)
    first = embed_split(**args)
    embed_split(**args)
    assert spy.rows == 8  # the second call was a cache hit
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "a" / "0.png")  # same path, new image
    spy.reset()
    second = embed_split(**args)
    assert spy.rows == 8 and not torch.equal(first.x[0], second.x[0]) and torch.equal(first.x[1:], second.x[1:])
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 2


def test_cached_embeddings_from_another_encoder_are_refused_by_the_service(reference_cache):
    from dkvb.embeddings_io import load_embeddings_file

    folder = _folder(reference_cache)
    names = json.loads((folder / "meta.json").read_text())["class_names"]
    assert len(load_embeddings_file(folder, names, {"encoder": "effnet-lite0"})) == 64
    with pytest.raises(ValueError, match="made with encoder 'effnet-lite0', the model was trained on 'clip"):
        load_embeddings_file(folder, names, {"encoder": "clip:ViT-B-32/openai"})
    described = json.loads((folder / "meta.json").read_text())["encoder"]
    other = {**described, "image_size": 224}
    with pytest.raises(ValueError, match=r"another encoder setting.*image_size"):
        load_embeddings_file(folder, names, {"encoder": "effnet-lite0", "encoder_config": other})
