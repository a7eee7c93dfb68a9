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
@given(bad=st.sampled_from([math.nan, math.inf, -math.inf]), n=st.integers(1, 40), data=st.data())
def test_embeddings_written_after_their_check_are_checked_again(bad, n, data):
    """A set is scanned for NaN/inf once; its subsets and slices are trusted until written to."""
    from dkvb.data import all_finite, check_embeddings

    full = EmbeddingSet(torch.randn(n, 3), torch.zeros(n, dtype=torch.long), ["a"])
    part = full.subset(torch.arange(n) % 2 == 0)
    check_embeddings(full.x[: n // 2 + 1], 3)
    check_embeddings(part.x, 3)
    assert torch.equal(part.x, full.x[::2]) and torch.equal(part.y, full.y[::2])
    row = data.draw(st.integers(0, n - 1))
    full.x[row, data.draw(st.integers(0, 2))] = bad
    assert not all_finite(full.x) and all_finite(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        check_embeddings(full.x[row:], 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        check_embeddings(full.x, 3)
    part.x[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        check_embeddings(part.x, 3)


def test_a_request_digest_of_every_class_is_remembered_until_the_set_is_written_to():
    """The audit log's digest of what a request read: the same for a set's rows read whole or picked,
    and new after a write in place."""
    from dkvb.request import data_digest

    data = EmbeddingSet(torch.randn(30, 4), torch.arange(30) % 3, ["a", "b", "c"])
    whole = data_digest(data, [0, 1, 2])
    picked = EmbeddingSet(data.x.clone(), data.y.clone(), data.class_names)
    assert whole == data_digest(data, [0, 1, 2]) == data_digest(picked, [0, 1, 2]) != data_digest(data, [0, 1])
    data.x[4, 0] += 1.0
    assert data_digest(data, [0, 1, 2]) != whole
    data.y[4] = 0
    assert data_digest(data, [0, 1, 2]) == data_digest(EmbeddingSet(data.x.clone(), data.y.clone(),
                                                                     data.class_names), [0, 1, 2])


def test_a_fingerprint_is_remembered_until_the_tensor_is_written_to():
    """A set is hashed once; a write in place, also through a view, gives its new fingerprint."""
    from dkvb.data import fingerprint

    x = torch.randn(50, 4)
    first = fingerprint(x)
    assert fingerprint(x) == first == fingerprint(x.clone())
    x[3:5][0, 1] += 1.0
    assert fingerprint(x) == fingerprint(x.clone()) != first


@FUZZ
@given(b=bottlenecks(), shape=st.lists(st.integers(0, 5), min_size=0, max_size=3))
def test_wrong_shapes_are_rejected_clearly(b, shape):
    assume(not (len(shape) == 2 and shape[1] == b.dim))
    with pytest.raises(ValueError, match="embedding"):
        b(torch.randn(tuple(shape)))


def test_empty_batches_flow_through_the_model(clusters):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=4, codebook_size=8, key_dim=2, projection="random"), train.dim, train.num_classes)
    model.prepare(train.x[:100], train.y[:100])
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
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random"), train.dim, train.num_classes)
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
    import dkvb.store.write as store_module

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
    torch.save({"x": x, "y": train.y, "encoder": "synthetic"}, tmp_path / "nan.pt")
    torch.save({"x": train.x, "y": train.y + 5, "encoder": "synthetic"}, tmp_path / "range.pt")
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


# ------------------------------------------------------------------ deletion requests that can be trusted
from dkvb.audit import ANCHOR, LOG, KEY_ENV  # noqa: E402
from dkvb.errors import AuditError  # noqa: E402
from dkvb.service import ServedStore, forget, read_log, replay, restore  # noqa: E402

ODD = ["1", "10", "2", "-1", " sp ", "x,y"]  # sorted as a folder lists them: "1" < "10" < "2"


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    """A DKVB model whose class names look like numbers, options, padded text and lists."""
    from tests.conftest import make_clusters

    train = make_clusters(600, num_classes=len(ODD))
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random"), train.dim, train.num_classes)
    fit(model, train, TrainConfig(epochs=1, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path_factory.mktemp("odd") / "model"
    save_model(model, path, class_names=ODD, encoder="synthetic")
    return path


def _forgotten_by_cli(odd_store, tmp_path, *args) -> list[str]:
    path = tmp_path / "m"
    shutil.copytree(odd_store, path)
    assert main(["forget", "--model", str(path), *args]) == 0
    return read_log(path)[-1]["forgotten"]


@pytest.mark.parametrize("args, forgotten", [
    (["--classes", "1"], ["1"]),
    (["--classes", "2,10"], ["10", "2"]),
    (["--class", "-1"], ["-1"]),
    (["--class", " sp "], [" sp "]),
    (["--class", "x,y"], ["x,y"]),
    (["--class-ids", "1"], ["10"]),
    (["--class-ids", "0,2", "--classes", "1"], ["1", "2"]),
])
def test_a_class_name_means_that_name(odd_store, tmp_path, args, forgotten):
    assert _forgotten_by_cli(odd_store, tmp_path, *args) == forgotten


def test_class_names_from_a_file_are_taken_exactly(odd_store, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text(" sp \nx,y\n")
    assert _forgotten_by_cli(odd_store, tmp_path, "--classes-file", str(names)) == [" sp ", "x,y"]


def test_strings_are_never_guessed_as_indices():
    from dkvb.config import load_config
    from dkvb.experiment import forget_requests

    assert resolve_classes("1", ODD) == (0,) and resolve_classes(["x,y"], ODD) == (5,)
    assert resolve_classes([1], ODD) == (1,)  # an int is an index
    for spec in ("0001", ["01"], [" 1"], "3"):
        with pytest.raises(ValueError, match="unknown class name"):
            resolve_classes(spec, ODD)
    with pytest.raises(ValueError, match="must be a name"):
        resolve_classes([1.0], ODD)
    assert forget_requests(load_config(None, ['forget=[["1"], ["2", "-1"]]']), tuple(ODD)) == [(0,), (2, 3)]


def test_readers_serve_the_logged_version_when_a_writer_dies_before_moving_head(store, monkeypatch):
    import dkvb.served as served

    forget(store, "class1")
    monkeypatch.setattr(served, "atomic_write_text", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        forget(store, "class2")
    monkeypatch.undo()
    assert current_version(store) == "000003" and read_log(store)[-1]["version_after"] == "000004"
    model, manifest = load_model(store)  # a plain reader, no writer has run since
    assert ServedStore(store).forgotten_of(manifest) == ["class1", "class2"]
    assert model_sha256(model) == read_log(store)[-1]["model_sha256_after"]


@pytest.mark.parametrize("first", [True, False], ids=["first-request", "later-request"])
def test_sigkill_at_any_step_never_serves_a_model_the_log_does_not_name(store, tmp_path, killed_copy, first):
    """The first request appends two records (origin, forget): a kill between them must be survived too."""
    if not first:
        forget(store, "class1")
    before = model_sha256(load_model(store)[0])
    for n in range(1, 16):
        path = tmp_path / f"k{n}"
        killed_copy(store, path, n, lambda p: forget(p, "class2"))
        model, manifest = load_model(path)
        records = ServedStore(path).log()
        if not records or records[-1]["op"] == "origin":  # killed before the forget was logged
            assert model_sha256(model) == before, n
            continue
        assert model_sha256(model) == records[-1]["model_sha256_after"], n
        assert ServedStore(path).forgotten_of(manifest) == records[-1]["forgotten"], n
        assert forget(path, "class3")["version_before"] == records[-1]["version_after"], n  # the next one recovers


@pytest.mark.parametrize("first", [True, False], ids=["first-request", "later-request"])
@pytest.mark.parametrize("then", ["restore", "prune", "forget"])
def test_a_version_left_by_a_forget_killed_before_logging_never_takes_a_logged_request_id(
        store, tmp_path, killed_copy, first, then):
    """A forget killed after writing its version but before logging leaves an orphan that names the
    next request id; the next request (a restore or prune writes no version) removes it, so the log
    names that id with its own version and every reader accepts the store."""
    from dkvb.service import ModelService
    from dkvb.served import service_extra
    from dkvb.store import read_manifest

    origin = current_version(store)
    if not first:
        forget(store, "class2")
    orphans = []
    for n in range(1, 16):
        path = tmp_path / f"{then}{n}"
        killed_copy(store, path, n, lambda p: ModelService(p).forget(["class1"]))
        newest = list_versions(path)[-1]
        rid = service_extra(read_manifest(path, newest)).get("request_id")
        records = ServedStore(path).check()  # readers accept the orphan
        if rid is None or rid in {r["request_id"] for r in records}:
            continue
        orphans.append(n)
        if then == "restore":
            rec = ModelService(path).restore("origin")
            assert rec["request_id"] == rid and rec["version_after"] == origin, n
        elif then == "prune":
            ModelService(path).prune()
        else:
            assert ModelService(path).forget(["class3"])["request_id"] == rid, n
        assert newest not in list_versions(path), n  # removed, and its name never handed out again
        records = ServedStore(path).check()
        if records:  # (a prune of a store without a log logs nothing)
            assert records[-1]["version_after"] == current_version(path), n
            assert torch.equal(replay(path), load_model(path)[0].key_mask), n
        rec = forget(path, "class4")  # and the store goes on serving requests
        assert rec["version_after"] > newest and ServedStore(path).check()[-1]["request_id"] == rec["request_id"], n
    assert orphans and (not first or {9, 10, 11} <= set(orphans)), orphans


@pytest.mark.parametrize("head", [None, b"", b"garbage\n", b"999999\n"])
def test_restore_works_with_head_missing_or_corrupt(store, head):
    r1 = forget(store, "class1")
    forget(store, "class2")
    if head is None:
        (store / "HEAD").unlink()
    else:
        (store / "HEAD").write_bytes(head)
    assert ServedStore(store).load()[1]["model_sha256"] == read_log(store)[-1]["model_sha256_after"]
    rec = restore(store, r1["request_id"])
    assert rec["version_after"] == current_version(store) == r1["version_after"]
    assert torch.equal(replay(store), load_model(store)[0].key_mask)


def test_retraining_a_served_run_refuses_without_force_and_reapplies_with_it(store, clusters, tmp_path):
    from dkvb.config import load_config
    from dkvb.experiment import train_models

    train, _ = clusters
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", "encoder.name=synthetic", "train.epochs=1",
                             "model={num_codebooks: 8, codebook_size: 16, key_dim: 4}"])
    served = cfg.run_dir / "models" / "dkvb"
    shutil.copytree(store, served)
    forget(served, "class1")
    with pytest.raises(StoreError, match="serves deletion requests.*forgotten now: class1"):
        train_models(cfg, train, kinds={"dkvb"}, progress=False)
    assert read_log(served)[-1]["forgotten"] == ["class1"] and current_version(served) == "000003"
    model, _ = train_models(cfg, train, kinds={"dkvb"}, progress=False, force=True)["dkvb"]
    last = read_log(served)[-1]
    assert last["op"] == "origin" and last["forgotten"] == ["class1"] and last["version_after"] == current_version(served)
    assert [s["request_id"] for s in last["reapplied"]] == ["req-000002"] and last["version"] != last["version_after"]
    assert torch.equal(model.key_mask, load_model(served)[0].key_mask) and model.key_mask.any()
    assert torch.equal(replay(served), model.key_mask)


def _cut_last_line(p: Path) -> None:
    p.write_bytes(b"".join(p.read_bytes().splitlines(keepends=True)[:-1]))


def _edit_last_line(p: Path) -> None:
    lines = p.read_bytes().splitlines(keepends=True)
    rec = json.loads(lines[-1])
    rec["forgotten"] = []
    p.write_bytes(b"".join(lines[:-1]) + json.dumps(rec, separators=(",", ":")).encode() + b"\n")


@pytest.mark.parametrize("damage", [
    lambda s: (s / LOG).write_bytes(b""),
    lambda s: (s / LOG).unlink(),
    lambda s: _cut_last_line(s / LOG),
    lambda s: _edit_last_line(s / LOG),
    lambda s: ((s / LOG).unlink(), (s / ANCHOR).unlink()),
    lambda s: (_cut_last_line(s / LOG), (s / ANCHOR).unlink()),
], ids=["emptied", "deleted", "cut", "last-line-edited", "log-and-anchor-deleted", "cut-and-anchor-deleted"])
def test_history_loss_is_detected_by_replay_and_refused_by_the_next_forget(store, damage, capsys):
    forget(store, "class1")
    forget(store, "class2")
    damage(store)
    with pytest.raises(AuditError):
        replay(store)
    with pytest.raises(AuditError):
        forget(store, "class3")
    assert main(["replay", "--model", str(store)]) == 2
    err = capsys.readouterr().err
    assert "audit" in err and len(err.strip().splitlines()) == 1


def _recompute_chain(store: Path) -> None:
    """What someone without the key can do: edit a record, then recompute every hash and the anchor."""
    records = [json.loads(line) for line in (store / LOG).read_bytes().splitlines()]
    records[1]["classes"] = ["class3"]
    _rewrite_chain(store, records)


def test_a_keyed_log_detects_a_recomputed_chain(store, monkeypatch, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(store, plain)
    forget(plain, "class1")
    _recompute_chain(plain)
    assert read_log(plain)[1]["classes"] == ["class3"]  # without a key a recomputed chain passes (documented)
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    monkeypatch.setenv("DKVB_AUDIT_KEY_FILE", str(key))
    forget(store, "class1")
    assert all("mac" in json.loads(line) for line in (store / LOG).read_bytes().splitlines())
    _recompute_chain(store)
    with pytest.raises(AuditError, match="mac"):
        read_log(store)
    with pytest.raises(AuditError, match="mac"):
        forget(store, "class2")
    monkeypatch.delenv("DKVB_AUDIT_KEY_FILE")
    monkeypatch.setenv(KEY_ENV, "another")
    with pytest.raises(AuditError, match="mac"):
        read_log(store)


def test_a_keyed_log_is_not_appended_to_without_the_key(store, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    forget(store, "class1")
    monkeypatch.delenv(KEY_ENV)
    assert len(read_log(store)) == 2  # readable (chain and anchor checked) without the key
    with pytest.raises(AuditError, match="is keyed"):
        forget(store, "class2")


def test_version_names_are_never_reused(store):
    forget(store, "class1")
    newest = list_versions(store)[-1]
    shutil.rmtree(store / "versions" / newest)
    model, _ = load_model(store, "000001")
    out = tmp = store.parent / "other"
    shutil.copytree(store, tmp)
    assert save_model(model, out, class_names=NAMES, encoder="synthetic", update_head=False) > newest


def test_manifest_class_names_and_forgotten_list_are_checksummed(store):
    forget(store, "class1")
    m = store / "versions" / current_version(store) / "manifest.json"
    for edit in (lambda d: d["class_names"].reverse(), lambda d: d["extra"]["service"]["forgotten"].clear()):
        original = m.read_text()
        manifest = json.loads(original)
        edit(manifest)
        m.write_text(json.dumps(manifest))
        with pytest.raises(StoreError, match="manifest_sha256"):
            load_model(store)
        m.write_text(original)


def test_prune_keeps_what_head_and_replay_need(store, clusters, capsys):
    _, test = clusters
    r1 = forget(store, "class1", params={"erase_values": True})  # HEAD holds its own values, shares the rest
    forget(store, "class2")
    restore(store, r1["request_id"])
    m = ["--model", str(store)]
    assert main(["prune", *m, "--dry-run"]) == 0
    # 000003 is served, 000002 is the origin replay starts from, 000001 the base both share
    assert "would delete 1 version(s): 000004" in capsys.readouterr().out
    assert list_versions(store) == ["000001", "000002", "000003", "000004"]
    assert main(["prune", *m]) == 0
    assert list_versions(store) == ["000001", "000002", "000003"]
    model, _ = load_model(store)  # HEAD and its base are kept
    assert torch.equal(replay(store), model.key_mask)
    assert read_log(store)[-1]["op"] == "prune" and read_log(store)[-1]["removed"] == ["000004"]
    with pytest.raises(ValueError, match="was deleted"):
        restore(store, "req-000003")
    capsys.readouterr()
    assert main(["log", *m]) == 0 and "deleted versions 000004" in capsys.readouterr().out


@pytest.mark.parametrize("override, match", [
    ("train.epochs=1e12", "train.epochs must be an integer, got '1e12'"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("dataset.download=yes please", "dataset.download must be true or false"),
    ("dataset.train_limit=None", "must be an integer or null, got 'None'"),
    ("name=../../escape", "name must be one folder name"),
    (f"name={'x' * 300}", "name must be one folder name"),
    ("methods=[{name: dkvb-activations, params: {nope: 1}}]", "unknown parameter"),
    ("dataset.name=imagefolder:", "dataset.name must be text"),  # YAML reads a mapping here
    ("dataset.name='imagefolder:'", "dataset.name must be 'imagefolder:<path>'"),
    ("model.num_codebooks=abc", "model.num_codebooks must be an integer or 'auto', got 'abc'"),
    ("model.codebook_size=2.5", "model.codebook_size must be an integer or 'auto', got 2.5"),
    ("model.discriminant_shrinkage=lots", "model.discriminant_shrinkage must be a number or 'auto'"),
])
def test_bad_config_values_fail_early_in_one_line(tmp_path, capsys, override, match):
    cfg = ["--set", f"cache_dir={tmp_path / 'cache'}", "--set", f"output_dir={tmp_path / 'out'}",
           "--set", "dataset.name=synthetic", "--set", "encoder.pretrained=false"]
    assert main(["run", str(ROOT / "experiments/tiny_synthetic.yaml"), *cfg, "--set", override]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_malformed_yaml_and_a_missing_store_fail_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\nmodel: [\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: malformed YAML at line" in err and len(err.strip().splitlines()) == 1
    assert main(["log", "--model", str(tmp_path / "nothing")]) == 2
    assert "no stored model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["log", "-v", "--model", str(tmp_path / "nothing")])  # -v after it too: the traceback comes back


def test_a_full_disk_names_the_file_in_one_line(store, monkeypatch, capsys):
    import errno

    import dkvb.store.write as store_module

    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(store_module, "save_file", full)
    assert main(["forget", "--model", str(store), "--classes", "class1"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "tensors.safetensors" in err and len(err.strip().splitlines()) == 1
    assert list_versions(store) == ["000001", "000002"] and not (store / LOG).exists()


def _read_only(monkeypatch, root: Path, *, lock_writable: bool = False) -> None:
    """Simulate a read-only file system under ``root`` (as root, chmod does not stop writes): every
    open for writing, mkdir and rename there fails with EROFS, reads still work. ``lock_writable``
    leaves the lock file writable, so the request fails later, inside the locked block."""
    import builtins
    import errno

    top = str(root.resolve())
    real_open, real_os_open, real_mkdir, real_replace, real_rename = (
        builtins.open, os.open, os.mkdir, os.replace, os.rename)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(p) -> bool:
        path = os.path.abspath(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else ""
        return path.startswith(top) and not (lock_writable and path.endswith("/.lock"))

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: refuse(f) if inside(f) and any(
        c in mode for c in "wax+") else real_open(f, mode, *a, **k))
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: refuse(p) if inside(p) and flags & writing
                        else real_os_open(p, flags, *a, **k))
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: refuse(p) if inside(p) else real_mkdir(p, *a, **k))
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: refuse(d) if inside(d) else real_replace(s, d, *a, **k))
    monkeypatch.setattr(os, "rename", lambda s, d, *a, **k: refuse(d) if inside(d) else real_rename(s, d, *a, **k))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("lock_writable", [False, True], ids=["whole store", "all but the lock"])
def test_a_read_only_store_refuses_forget_in_one_line_and_stays_verifiable(store, monkeypatch, capsys,
                                                                           lock_writable):
    forget(store, "class1")
    before = _snapshot(store)
    _read_only(monkeypatch, store, lock_writable=lock_writable)
    assert main(["forget", "--model", str(store), "--classes", "class2"]) == 2
    err = capsys.readouterr().err
    assert f"{store}: cannot write to the model store (Read-only file system" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(StoreError, match="cannot write to the model store"):
        forget(store, "class2")
    with pytest.raises(StoreError, match="cannot write to the model store"):
        restore(store, "origin")
    assert _snapshot(store) == before  # nothing written: log, anchor, HEAD and versions as they were
    monkeypatch.undo()
    assert [r["op"] for r in read_log(store)] == ["origin", "forget"]
    assert torch.equal(replay(store), load_model(store)[0].key_mask)  # still verifiable
    assert forget(store, "class2")["forgotten"] == ["class1", "class2"]  # and writable again


def test_a_file_size_limit_fails_in_one_line(store):
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run([sys.executable, "-c", "import sys; from dkvb.cli import main; sys.exit(main(sys.argv[1:]))",
                           "forget", "--model", str(store), "--classes", "class1", "--param", "erase_values=true"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dkvb forget:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "tensors.safetensors" in errors[0]
    assert "Traceback" not in proc.stderr
    assert load_model(store)[1]["model_sha256"] == ORIGINAL["000002"]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", "truncated", "bomb"])
def test_bad_images_name_the_file(tmp_path, monkeypatch, content):
    from PIL import Image

    from dkvb.datasets.base import FileImages

    path = tmp_path / "img.png"
    Image.fromarray(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()).save(path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif content == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: unreadable image"):
        FileImages([str(path)])[0]


def test_store_files_follow_the_umask(store, tmp_path):
    old = os.umask(0o022)
    try:
        forget(store, "class1")
        model, _ = load_model(store)
        save_model(model, tmp_path / "fresh", class_names=NAMES, encoder="synthetic")
    finally:
        os.umask(old)
    for root in (store, tmp_path / "fresh"):
        for p in root.rglob("*"):
            if p.is_file() and p.name != ".lock" and not p.is_relative_to(root / "versions/000001") | (root == store):
                assert p.stat().st_mode & 0o777 == 0o644, p
    for name in ("HEAD", LOG, ANCHOR, f"versions/{current_version(store)}/tensors.safetensors"):
        assert (store / name).stat().st_mode & 0o777 == 0o644, name


def test_log_escapes_control_characters_in_class_names(tmp_path, clusters, capsys):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random"), train.dim, train.num_classes)
    fit(model, train, TrainConfig(epochs=1, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    names = ["ok", "red\x1b[31m", "bell\a", "line\nbreak", "fine"]
    save_model(model, tmp_path / "m", class_names=names, encoder="synthetic")
    assert main(["forget", "--model", str(tmp_path / "m"), "--class", "red\x1b[31m", "--class", "line\nbreak"]) == 0
    assert main(["log", "--model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\a" not in out and "red\\x1b[31m" in out and "line\\nbreak" in out


# ------------------------------------------------------------------ someone who can write the store's files
def _served_digest(store: Path) -> str:
    return model_sha256(load_model(store)[0])


def _rewrite_manifest(vdir: Path, edit) -> None:
    """Edit a manifest and recompute its own digest, as anyone who knows the format can."""
    from dkvb.store import manifest_sha256

    manifest = json.loads((vdir / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (vdir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("also", ["", "marker", "pruned"])
def test_history_lost_while_the_origin_is_served_is_refused_everywhere(store, capsys, also):
    from dkvb.audit import MARKER
    from dkvb.service import ModelService

    forget(store, "class1")
    forget(store, "class2")
    restore(store, "origin")
    if also == "pruned":  # only the origin versions remain: the marker alone remembers the history
        ModelService(store).prune()
    for name in (LOG, ANCHOR) + ((MARKER,) if also == "marker" else ()):
        (store / name).unlink()
    versions = list_versions(store)
    svc = ModelService(store)
    for request in (lambda: svc.forget("class3"), lambda: svc.restore("origin"), svc.prune, lambda: read_log(store)):
        with pytest.raises(AuditError, match="history was deleted|lacks: the log was cut"):
            request()
    assert list_versions(store) == versions and not (store / LOG).exists()
    assert main(["log", "--model", str(store)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "audit" in err
    with pytest.raises(StoreError, match="serves deletion requests"):  # nor may a retrain take its place
        save_model(load_model(store, "000001")[0], store, class_names=NAMES, encoder="synthetic")


def _forge_restore(store: Path, version: str) -> None:
    """One unauthenticated line appended to the log, chained to the last one (no mac)."""
    from dkvb.audit import line_sha

    last = (store / LOG).read_bytes().splitlines()[-1]
    forged = {"request_id": "req-000099", "op": "restore", "to": "origin", "version_after": version,
              "prev_sha256": line_sha(last)}
    with open(store / LOG, "ab") as f:
        f.write(json.dumps(forged, separators=(",", ":")).encode() + b"\n")


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
def test_a_forged_tail_is_refused_by_readers_and_recover_serves_the_last_verified_record(store, monkeypatch, capsys,
                                                                                         keyed):
    if keyed:
        monkeypatch.setenv(KEY_ENV, "k")
    forget(store, "class1")
    served = _served_digest(store)
    _forge_restore(store, "000001")
    (store / ANCHOR).write_text((store / ANCHOR).read_text()) if keyed else None
    if not keyed:  # unkeyed: one line past the anchor that chains is a pending record; a second is refused
        _forge_restore(store, "000001")
    for env in ([KEY_ENV] if keyed else []) + [None]:
        if env is None:
            monkeypatch.delenv(KEY_ENV, raising=False)
        with pytest.raises(AuditError, match=r"req-000099.*dkvb recover|dkvb recover"):
            load_model(store)
        assert main(["log", "--model", str(store)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    if keyed:
        assert main(["recover", "--model", str(store)]) == 2  # a keyed log is recovered with the key only
        assert "keyed" in capsys.readouterr().err
        monkeypatch.setenv(KEY_ENV, "k")
    assert main(["recover", "--model", str(store)]) == 0
    assert "serving version 000003 again" in capsys.readouterr().out
    assert _served_digest(store) == served and read_log(store)[-1]["op"] == "recover"
    assert b"req-000099" in (store / "audit.rejected.jsonl").read_bytes()
    assert torch.equal(replay(store), load_model(store)[0].key_mask)
    assert main(["recover", "--model", str(store)]) == 0 and "nothing to recover" in capsys.readouterr().out


def test_a_keyed_store_stays_keyed_when_every_mac_is_stripped(store, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    forget(store, "class1")
    records = [json.loads(line) for line in (store / LOG).read_bytes().splitlines()]
    records[1]["forgotten"] = []
    _rewrite_chain(store, records)
    with pytest.raises(AuditError, match="mac (is missing|does not match)"):
        load_model(store)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuditError, match="mac is missing"):  # the marker says the log is keyed
        load_model(store)
    with pytest.raises(AuditError, match="mac is missing"):
        forget(store, "class2")


def _rewrite_chain(store: Path, records: list[dict]) -> None:
    """Write ``records`` as the log, every hash, mac-less line and the anchor recomputed."""
    from dkvb.audit import encode, line_sha

    prev, out = None, b""
    for r in records:
        r.pop("prev_sha256")
        r.pop("mac", None)
        line = encode(r, prev, None)
        out += line + b"\n"
        prev = line_sha(line)
    (store / LOG).write_bytes(out)
    (store / ANCHOR).write_text(json.dumps({"records": len(records), "last_sha256": prev}))


def test_replay_compares_each_logged_model_digest_with_the_stored_version(store, monkeypatch):
    from safetensors.torch import load_file, save_file

    from dkvb.io import sha256_file
    from dkvb.store import state_sha256, tensor_sha256

    monkeypatch.setenv(KEY_ENV, "k")
    rec = forget(store, "class1", params={"erase_values": True})
    vdir = store / "versions" / rec["version_after"]
    tensors = load_file(str(vdir / "tensors.safetensors"))
    origin = load_model(store, "000001")[0].state_dict()
    tensors["bottleneck.values"] = origin["bottleneck.values"].clone()  # the erased values back
    save_file(tensors, str(vdir / "tensors.safetensors"))

    def recompute(m):
        m["sha256"]["tensors.safetensors"] = sha256_file(vdir / "tensors.safetensors")

    _rewrite_manifest(vdir, recompute)
    with pytest.raises(StoreError, match="tensor_sha256"):  # the tensors no longer match their digests
        load_model(store)

    def all_digests(m):
        recompute(m)
        m["tensor_sha256"]["bottleneck.values"] = tensor_sha256(tensors["bottleneck.values"])
        m["model_sha256"] = state_sha256(m["tensor_sha256"])

    _rewrite_manifest(vdir, all_digests)
    assert load_model(store, rec["version_after"])[0].bottleneck.values.abs().sum() > 0  # consistent in itself
    with pytest.raises(AuditError, match="differs from the digest the audit log's record req-000002 holds"):
        load_model(store)  # but not the model the log says is served
    with pytest.raises(AuditError, match="req-000002 logged model_sha256_after .* the version was rewritten"):
        replay(store)
    with pytest.raises(AuditError, match="the version was rewritten"):
        forget(store, "class2")


def test_swapped_class_names_in_a_manifest_are_refused(store, capsys):
    forget(store, "class1")
    vdir = store / "versions" / current_version(store)

    def swap(m):
        m["class_names"][2], m["class_names"][3] = m["class_names"][3], m["class_names"][2]

    _rewrite_manifest(vdir, swap)
    with pytest.raises(AuditError, match="class_names differs .* origin record req-000001 .* index \\[2, 3\\]"):
        load_model(store)
    assert main(["forget", "--model", str(store), "--classes", "class3"]) == 2
    assert "class_names" in capsys.readouterr().err
    assert read_log(store)[-1]["forgotten"] == ["class1"]


@pytest.mark.parametrize("where", ["anchor", "head"])
def test_a_committed_request_that_cannot_finish_is_reported_committed(store, monkeypatch, capsys, where):
    import errno

    import dkvb.served as served

    audit_module = sys.modules["dkvb.audit.log"]

    forget(store, "class1")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[0]))

    monkeypatch.setattr(audit_module if where == "anchor" else served,
                        "atomic_write_json" if where == "anchor" else "atomic_write_text", full)
    assert main(["forget", "--model", str(store), "--classes", "class2"]) == 0
    out, err = capsys.readouterr()
    assert "req-000003: forgot class2" in out and "committed and served" in err and "No space left" in err
    monkeypatch.undo()
    assert read_log(store)[-1]["forgotten"] == ["class1", "class2"]
    assert forget(store, "class3")["version_before"] == read_log(store)[-2]["version_after"]
    assert current_version(store) == read_log(store)[-1]["version_after"]


def test_prune_names_every_version_it_deletes_even_when_stopped(store, monkeypatch):
    from dkvb.service import ModelService

    pruning = sys.modules["dkvb.store.prune"]
    forget(store, "class1")
    forget(store, "class2")
    restore(store, "origin")
    shutil.copytree(store / "versions" / "000002", store.parent / "elsewhere")
    (store / "versions" / "000009").symlink_to(store.parent / "elsewhere")
    with pytest.raises(StoreError, match="000009 is a symbolic link"):
        ModelService(store).prune()
    assert list_versions(store) == ["000001", "000002", "000003", "000004", "000009"]
    assert read_log(store)[-1]["op"] == "restore"
    (store / "versions" / "000009").unlink()
    real = pruning.shutil.rmtree
    monkeypatch.setattr(pruning.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the first version was renamed aside
        ModelService(store).prune()
    monkeypatch.setattr(pruning.shutil, "rmtree", real)
    assert read_log(store)[-1]["removed"] == ["000003", "000004"]
    ModelService(store).prune()
    assert list_versions(store) == ["000001", "000002"]
    gone = {v for r in read_log(store) if r["op"] == "prune" for v in r["removed"]}
    assert gone == {"000003", "000004"}


def test_a_seed_too_large_names_the_option(store, capsys):
    with pytest.raises(SystemExit) as e:
        main(["forget", "--model", str(store), "--classes", "class1", "--seed", str(2**66)])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_embeddings_are_matched_to_the_models_encoder_setting_and_classes(tmp_path, clusters):
    import numpy as np

    from dkvb.embeddings_io import load_embeddings_file

    train, _ = clusters
    x, y = train.x[:20], train.y[:20]
    full = {"encoder": "effnet-lite0", "embedding_dim": train.dim,
            "encoder_config": {"name": "effnet-lite0", "image_size": 224, "mean": [0.5]}}
    named = tmp_path / "named.pt"
    torch.save({"x": x, "y": y, "encoder": "effnet-lite0"}, named)  # the name alone: any image size
    with pytest.raises(ValueError, match=r"names only the encoder .*image_size.*--trust-embeddings"):
        load_embeddings_file(named, NAMES, full)
    assert len(load_embeddings_file(named, NAMES, full, trust=True)) == 20
    torch.save({"x": x, "y": y, "encoder": "effnet-lite0", "class_names": NAMES[::-1]}, named)
    with pytest.raises(ValueError, match="another dataset or class order"):
        load_embeddings_file(named, NAMES, full, trust=True)
    cache = tmp_path / "cache"  # a cache folder of another dataset: 2 classes for the model's 5
    cache.mkdir()
    np.save(cache / "embeddings.npy", x.numpy())
    np.save(cache / "labels.npy", (y % 2).numpy())
    (cache / "meta.json").write_text(json.dumps({"shape": [20, train.dim], "class_names": ["a", "b"],
                                                 "encoder": full["encoder_config"]}))
    with pytest.raises(ValueError, match=r"labels index 2 classes \['a', 'b'\], the model has 5 classes"):
        load_embeddings_file(cache, NAMES, full)


def test_bad_jobs_and_a_served_run_folder_fail_before_any_work(store, tmp_path, capsys, monkeypatch):
    from dkvb.config import load_config

    cfg = ["--set", f"cache_dir={tmp_path / 'cache'}", "--set", f"output_dir={tmp_path / 'out'}",
           "--set", "dataset.name=synthetic", "--set", "encoder.pretrained=false"]
    yaml = str(ROOT / "experiments/tiny_synthetic.yaml")
    monkeypatch.setenv("DKVB_JOBS", "abc")
    assert main(["run", yaml, *cfg]) == 2
    assert "DKVB_JOBS: must be a positive integer, got 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("DKVB_JOBS")
    assert not (tmp_path / "cache").exists()
    served = load_config(yaml, [c for c in cfg if c != "--set"]).run_dir / "models" / "dkvb"
    shutil.copytree(store, served)
    forget(served, "class1")
    before = {p: p.read_bytes() for p in served.rglob("*") if p.is_file() and p.name != ".lock"}
    for force in ([], ["--force"]):
        assert main(["run", yaml, *cfg, *force]) == 2
        err = capsys.readouterr().err
        assert "serves deletion requests: a comparison run needs the trained model" in err
        assert len(err.strip().splitlines()) == 1 and ("dkvb train --force" in err) == bool(force)
    assert {p: p.read_bytes() for p in served.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("counter", ["999999", "garbage"])
def test_a_used_up_or_edited_version_counter_is_refused_before_writing(store, counter):
    (store / "versions" / ".issued").write_text(counter + "\n")
    versions = sorted(p.name for p in (store / "versions").iterdir())
    with pytest.raises(StoreError, match="used up" if counter[0] == "9" else "version counter must be"):
        forget(store, "class1")
    assert sorted(p.name for p in (store / "versions").iterdir()) == versions and not (store / LOG).exists()


def _erased_on_disk(store: Path, rows: list[int]) -> dict[str, int]:
    """{file: keys} for every tensors file of the store whose values are non-zero at ``rows``."""
    from safetensors.torch import load_file

    from dkvb.store.erase import holding

    found = {}
    for f in sorted(store.rglob("*.safetensors")):
        held = holding(load_file(str(f)).get("bottleneck.values"), rows)
        if held:
            found[str(f.relative_to(store))] = held
    return found


def test_erase_values_then_prune_leaves_no_file_holding_the_erased_values(store, capsys):
    rec = forget(store, "class1", params={"erase_values": True})
    assert "hold them until dkvb prune erases them" in rec["note"]
    forget(store, "class2")
    restore(store, rec["request_id"])
    erased = rec["mask_delta"]
    assert _erased_on_disk(store, erased) == {"versions/000001/tensors.safetensors": len(erased)}
    served = _served_digest(store)
    assert main(["prune", "--model", str(store), "--dry-run"]) == 0
    assert f"would erase the values of {len(erased)} key(s) in kept version 000001" in capsys.readouterr().out
    assert main(["prune", "--model", str(store)]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 version(s): 000004" in out and "erased the values of" in out and "notice" not in out
    assert _erased_on_disk(store, erased) == {}
    last = read_log(store)[-1]
    assert last["erased_in"] == {"000001": len(erased)} and last["erased_rows"] == sorted(erased)
    assert set(last["rewritten"]) == {"000001", "000002"}  # 000002 (the origin) shares its values with 000001
    assert _served_digest(store) == served  # the served model is unchanged
    assert torch.equal(replay(store), load_model(store)[0].key_mask)  # masks do not depend on the values
    assert restore(store, "origin")["model_sha256_after"] == last["rewritten"]["000002"]
    assert forget(store, "class3")["version_before"] == "000002"


def test_a_prune_killed_while_erasing_is_completed_by_the_next_request(store, monkeypatch):
    import dkvb.store.erase as erasing

    rec = forget(store, "class1", params={"erase_values": True})
    real = erasing._write_manifest
    calls = []

    def die_after_the_tensors(vdir, manifest):
        calls.append(vdir.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(erasing, "_write_manifest", die_after_the_tensors)
    with pytest.raises(KeyboardInterrupt):
        from dkvb.service import ModelService
        ModelService(store).prune()
    monkeypatch.setattr(erasing, "_write_manifest", real)
    assert calls == ["000001"] and read_log(store)[-1]["op"] == "prune"
    with pytest.raises(StoreError, match="checksum mismatch"):  # half-written: refused, never served wrong
        load_model(store, "000001")
    forget(store, "class2")  # the next writer completes the rewrite first
    assert _erased_on_disk(store, rec["mask_delta"]) == {}
    assert torch.equal(replay(store), load_model(store)[0].key_mask)


def test_a_full_disk_while_caching_embeddings_names_the_file(tmp_path, monkeypatch):
    import numpy as np

    import dkvb.cache as cache

    def short_write(f, array):
        raise OSError("327680 requested and 324576 written")

    monkeypatch.setattr(cache.np, "save", short_write)
    named = r"^\S*chunk\.npy: cannot write the embedding cache \(327680 requested .*disk full"
    with pytest.raises(OSError, match=named):
        cache._save_npy(tmp_path / "chunk.npy", np.zeros((4, 2), np.float32))
    assert list(tmp_path.iterdir()) == []  # no partial file left
