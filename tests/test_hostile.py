"""Hostile input: property tests for the bottleneck, embedding sets, the store and the service.

Whatever comes in (odd shapes, NaN/inf, empty batches, duplicate or out-of-range classes, cut
or bit-flipped files, foreign manifests, a second writer), the answer is a clear ``ValueError``
or ``StoreError`` and nothing is left half-written.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit, resolve_classes
from dkvb.bottleneck import DiscreteKeyValueBottleneck
from dkvb.cli import main
from dkvb.store import (
    StoreError, current_version, list_versions, load_model, model_sha256, save_model, writer_lock,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"class{i}" for i in range(5)]
ORIGINAL: dict[str, str] = {}  # version -> model digest of the stored fixture
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ bottleneck
@st.composite
def bottlenecks(draw, search=st.sampled_from(["torch", "faiss"])):
    dim = draw(st.integers(1, 12))
    size = draw(st.integers(1, 8))
    b = DiscreteKeyValueBottleneck(
        dim, draw(st.integers(1, 4)), size, key_dim=draw(st.integers(1, 4)), value_dim=draw(st.integers(1, 5)),
        topk=draw(st.integers(1, size)), search=draw(search), seed=draw(st.integers(0, 5)),
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 100)))
    b.init_keys(torch.randn(max(size, 4) * 4, dim, generator=g))
    return b


@FUZZ
@given(b=bottlenecks(), n=st.integers(0, 20), data=st.data())
def test_lookup_returns_the_nearest_unmasked_keys_for_any_shape(b, n, data):
    c, k, t = b.num_codebooks, b.codebook_size, b.topk
    free = data.draw(st.integers(t, k))  # leave at least topk keys selectable in every codebook
    order = torch.randperm(k, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    b.key_mask[:, order[free:]] = True
    x = torch.randn(n, b.dim) * data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    out = b(x)
    assert out.indices.shape == (n, c, t) and out.values.shape == (n, c, b.value_dim)
    assert out.indices.dtype == torch.long and ((out.indices >= 0) & (out.indices < k)).all()
    assert not b.key_mask[torch.arange(c).view(1, -1, 1), out.indices].any()
    z = b.project(x)
    d = ((z.unsqueeze(2) - b.keys.unsqueeze(0)) ** 2).sum(-1).masked_fill(b.key_mask, math.inf)
    chosen = d.gather(2, out.indices)
    best = d.topk(t, dim=-1, largest=False).values
    assert torch.allclose(chosen, best, rtol=1e-4, atol=1e-4 * (1 + best.abs().max().item() if n else 1))


@FUZZ
@given(b=bottlenecks(), bad=st.sampled_from([math.nan, math.inf, -math.inf]), n=st.integers(1, 6), data=st.data())
def test_nan_and_inf_embeddings_are_rejected_clearly(b, bad, n, data):
    x = torch.randn(n, b.dim)
    x[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, b.dim - 1))] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        b(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        b.init_keys(torch.cat([x, torch.randn(b.codebook_size, b.dim)]))


@FUZZ
@given(b=bottlenecks(), shape=st.lists(st.integers(0, 5), min_size=0, max_size=3))
def test_wrong_shapes_are_rejected_clearly(b, shape):
    assume(not (len(shape) == 2 and shape[1] == b.dim))
    with pytest.raises(ValueError, match="embedding"):
        b(torch.randn(tuple(shape)))


def test_empty_batches_flow_through_the_model(clusters):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=4, codebook_size=8, key_dim=2), train.dim, train.num_classes)
    model.prepare(train.x[:100])
    assert model(torch.zeros(0, train.dim)).shape == (0, train.num_classes)
    assert model.bottleneck.activation_counts(torch.zeros(0, train.dim), torch.zeros(0, dtype=torch.long),
                                              5).sum() == 0


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_fewer_unmasked_keys_than_topk_is_refused(search):
    b = DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, value_dim=3, topk=3, search=search)
    b.init_keys(torch.randn(50, 8))
    b.key_mask[0, :3] = True
    with pytest.raises((ValueError, RuntimeError), match="codebook 0"):
        b.lookup(torch.randn(3, 8))


def test_integer_embeddings_are_rejected_clearly():
    b = DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, value_dim=3)
    b.init_keys(torch.randn(50, 8))
    with pytest.raises(ValueError, match="float"):
        b.lookup(torch.ones(3, 8, dtype=torch.long))


# ------------------------------------------------------------------ classes
@FUZZ
@given(names=st.lists(st.sampled_from(["cat", "dog", "cow", "owl"]), min_size=2, max_size=6))
def test_duplicate_class_names_are_rejected(names):
    assume(len(set(names)) < len(names))
    with pytest.raises(ValueError, match="duplicate class names"):
        EmbeddingSet(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), names)


@FUZZ
@given(label=st.integers().filter(lambda v: not 0 <= v < 5))
def test_class_ids_out_of_range_are_rejected(label):
    assume(abs(label) < 2**62)
    with pytest.raises(ValueError, match="labels must lie in"):
        EmbeddingSet(torch.zeros(1, 2), torch.tensor([label]), NAMES)
    with pytest.raises(ValueError, match="out of range|unknown class"):
        resolve_classes([label], NAMES)


@FUZZ
@given(spec=st.text(max_size=20))
def test_any_class_spec_resolves_or_fails_with_a_value_error(spec):
    try:
        ids = resolve_classes(spec, NAMES)
    except ValueError:
        return
    assert ids and all(0 <= i < 5 for i in ids) and list(ids) == sorted(set(ids))


# ------------------------------------------------------------------ store
@pytest.fixture(scope="module")
def stored(clusters, tmp_path_factory):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4), train.dim, train.num_classes)
    fit(model, train, TrainConfig(epochs=1, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path_factory.mktemp("hostile") / "model"
    save_model(model, path, class_names=NAMES, encoder="synthetic")
    masked = build_model(model.config, model.input_dim, model.num_classes)
    masked.activation_counts = model.activation_counts.clone()
    masked.load_state_dict(model.state_dict())
    masked.bottleneck.key_mask[:, :2] = True
    save_model(masked, path, class_names=NAMES, encoder="synthetic", base="000001")
    ORIGINAL.update({"000001": model_sha256(model), "000002": model_sha256(masked)})
    return path


@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), version=st.sampled_from(["000001", "000002"]),
       how=st.sampled_from(["truncate", "flip", "truncate+fix-checksum"]))
def test_cut_or_bit_flipped_tensors_are_refused(stored, tmp_path_factory, where, version, how):
    path = tmp_path_factory.mktemp("cut") / "model"
    shutil.copytree(stored, path)
    f = path / "versions" / version / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    pos = int(where * len(data))
    if how == "flip":
        data[pos] ^= 1 << (pos % 8)
    else:
        data = data[:pos]
    f.write_bytes(bytes(data))
    if how == "truncate+fix-checksum":  # a consistent but cut file: safetensors itself must refuse it
        import hashlib

        m = path / "versions" / version / "manifest.json"
        manifest = json.loads(m.read_text())
        manifest["sha256"]["tensors.safetensors"] = hashlib.sha256(bytes(data)).hexdigest()
        m.write_text(json.dumps(manifest))
    with pytest.raises(StoreError):
        load_model(path, "000002")


def test_a_manifest_from_another_version_is_refused(store):
    shutil.copy(store / "versions/000001/manifest.json", store / "versions/000002/manifest.json")
    with pytest.raises(StoreError, match="checksum mismatch"):
        load_model(store, "000002")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@FUZZ
@given(version=st.sampled_from(["000001", "000002"]),
       field=st.sampled_from(["format_version", "encoder", "embedding_dim", "num_classes", "class_names", "kind",
                              "sha256", "tensor_sha256", "model_sha256", "shared", "extra", "junk"]),
       value=json_values, drop=st.booleans())
def test_any_manifest_edit_loads_or_fails_with_a_store_error(stored, tmp_path_factory, version, field, value, drop):
    path = tmp_path_factory.mktemp("manifest") / "model"
    shutil.copytree(stored, path)
    m = path / "versions" / version / "manifest.json"
    manifest = json.loads(m.read_text())
    if drop:
        manifest.pop(field, None)
    else:
        manifest[field] = value
    m.write_text(json.dumps(manifest))
    try:
        model, _ = load_model(path, version)
    except StoreError:
        return
    assert model_sha256(model) == ORIGINAL[version]  # whatever loads is exactly what was saved


@FUZZ
@given(content=st.binary(max_size=40))
def test_any_head_loads_or_fails_with_a_store_error(stored, tmp_path_factory, content):
    path = tmp_path_factory.mktemp("head") / "model"
    shutil.copytree(stored, path)
    (path / "HEAD").write_bytes(content)
    try:
        model, _ = load_model(path)
    except StoreError:
        return
    assert model_sha256(model) == ORIGINAL[current_version(path)]


def test_unreadable_manifest_and_config_are_named(store):
    (store / "versions/000002/manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(StoreError, match="corrupt manifest"):
        load_model(store)
    (store / "versions/000002/manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="not a JSON object"):
        load_model(store)


def test_a_failing_save_leaves_no_partial_version(store, monkeypatch):
    import dkvb.store as store_module

    model, _ = load_model(store)
    monkeypatch.setattr(store_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_model(model, store, class_names=NAMES, encoder="synthetic")
    assert list_versions(store) == ["000001", "000002"] and current_version(store) == "000002"
    assert not list((store / "versions").glob(".tmp-*"))


# ------------------------------------------------------------------ service and CLI
def test_hostile_requests_through_the_cli_fail_cleanly(store, tmp_path, capsys, clusters):
    train, _ = clusters
    x = train.x.clone()
    x[0, 0] = math.nan
    torch.save({"x": x, "y": train.y}, tmp_path / "nan.pt")
    torch.save({"x": train.x, "y": train.y + 5}, tmp_path / "range.pt")
    m = ["--model", str(store)]
    cases = [
        (["forget", *m, "--classes", "class1", "--method", "examples", "--embeddings", str(tmp_path / "nan.pt")],
         "NaN or inf"),
        (["forget", *m, "--classes", "class1", "--method", "examples", "--embeddings", str(tmp_path / "range.pt")],
         "labels must lie in"),
        (["forget", *m, "--class-ids", "5"], "out of range"),
        (["forget", *m, "--class-ids", "-1"], "out of range"),
        (["forget", *m, "--classes", "5"], "unknown class name '5'"),
        (["forget", *m, "--class-ids", "x"], "'x' is not an integer"),
        (["forget", *m], "name the classes"),
        (["forget", *m, "--classes", ","], "name the classes"),
        (["forget", "--model", str(tmp_path / "nothing"), "--classes", "1"], "no stored model"),
        (["restore", *m, "--to", "req-000042"], "unknown request id"),
        (["replay", *m], "no requests logged"),
        (["verify", *m], "needs training and test embeddings"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (argv, err)
    assert list_versions(store) == ["000001", "000002"] and not (tmp_path / "nothing").exists()
    assert main(["forget", *m, "--classes", "class1,class1", "--class-ids", "1"]) == 0  # duplicates collapse
    assert "forgot class1 with" in capsys.readouterr().out


def test_a_second_writer_process_fails_cleanly_with_store_locked_error(store):
    """A real second process (the CLI) against a store whose lock this process holds."""
    with writer_lock(store):
        proc = subprocess.run([sys.executable, "-m", "dkvb", "forget", "--model", str(store), "--classes", "class1"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "another writer holds the store lock" in proc.stderr and "Traceback" not in proc.stderr
    assert list_versions(store) == ["000001", "000002"] and not (store / "audit.jsonl").exists()
