"""Unlearning as a service: logged, idempotent forget/restore requests, replay bit for bit,
crash recovery, the CLI, and the sequential-forgetting benchmark on a tiny synthetic config."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, evaluate, fit
from dkvb.cli import main
from dkvb.embeddings_io import load_embeddings_file
from dkvb.service import (
    LOG, ModelService, ReplayError, forget, read_log, replay, restore,
)
from dkvb.store import StoreError, StoreLockedError, current_version, list_versions, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stored(clusters, tmp_path_factory):
    """A trained DKVB model with cached activation counts, saved once; tests copy it."""
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="random"), train.dim, train.num_classes)
    fit(model, train, TrainConfig(epochs=2, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path_factory.mktemp("stored") / "model"
    save_model(model, path, class_names=list(train.class_names), encoder="synthetic")
    return path


def mask_of(path, version=None):
    return load_model(path, version)[0].key_mask


# ------------------------------------------------------------------ requests
def test_activations_request_needs_no_embeddings_and_is_logged(store, clusters):
    train, test = clusters
    rec = forget(store, "class1")
    assert rec["op"] == "forget" and rec["method"] == "dkvb-activations" and rec["classes"] == ["class1"]
    assert rec["keys_masked"] == len(rec["mask_delta"]) > 0 and "metrics" not in rec
    assert rec["version_before"] == "000001" and rec["version_after"] == current_version(store) == "000002"
    assert rec["model_sha256_before"] != rec["model_sha256_after"]
    model, manifest = load_model(store)
    assert manifest["model_sha256"] == rec["model_sha256_after"]
    assert evaluate(model, train, test, [1])["forget_test_acc"] <= 0.01
    # the version holds only the key mask; everything else is shared with the trained model
    assert list(load_file(str(store / "versions/000002/tensors.safetensors"))) == ["bottleneck.key_mask"]
    log = read_log(store)
    assert [r["op"] for r in log] == ["origin", "forget"] and log[-1]["request_id"] == rec["request_id"]
    for field in ("request_id", "time", "classes", "method", "params", "keys_masked", "model_sha256_before",
                  "model_sha256_after"):
        assert field in log[-1]


def test_forgetting_again_is_a_logged_noop(store):
    first = forget(store, ["class1"])
    again = forget(store, "class1")
    assert again["noop"] and again["already_forgotten"] == ["class1"] and again["keys_masked"] == 0
    assert current_version(store) == first["version_after"] and len(list_versions(store)) == 2
    both = forget(store, "class1,class2")
    assert not both["noop"] and both["already_forgotten"] == ["class1"] and both["new_classes"] == ["class2"]
    assert both["forgotten"] == ["class1", "class2"]


def test_examples_request_reads_embeddings_and_records_metrics(store, clusters):
    train, test = clusters
    with pytest.raises(ValueError, match="reads training embeddings"):
        forget(store, "class3", "examples")
    rec = forget(store, "class3", "examples", {"num_examples": 5}, data=train, test=test, seed=4)
    assert rec["method"] == "dkvb-examples" and rec["params"]["num_examples"] == 5 and rec["data_sha256"]
    assert set(rec["metrics"]) == {"forget_train_acc", "forget_test_acc", "retain_train_acc", "retain_test_acc", "mia"}
    only_train = forget(store, "class4", data=train)
    assert set(only_train["metrics"]) == {"forget_train_acc", "retain_train_acc"}


def test_bad_requests_change_nothing(store, clusters):
    train, _ = clusters
    versions = list_versions(store)
    for args, match in [(("class9",), "unknown class name"), (([7],), "out of range"), (("7",), "unknown class name '7'"), (("",), "empty forget set"),
                        (("class1", "retrain"), "masking methods only"),
                        (("class1", "activations", {"nope": 1}), "unknown parameter")]:
        with pytest.raises(ValueError, match=match):
            forget(store, *args)
    with pytest.raises(ValueError, match="every class"):
        forget(store, "class0,class1,class2,class3,class4")
    with pytest.raises(ValueError, match="wrong embedding size"):
        forget(store, "class1", data=EmbeddingSet(train.x[:, :5], train.y, train.class_names))
    with pytest.raises(StoreError, match="no stored model"):
        forget(store.parent / "typo", "class1")
    assert not (store.parent / "typo").exists()
    assert list_versions(store) == versions and not (store / LOG).exists()  # a failed request writes nothing


def test_the_service_refuses_non_dkvb_models(tmp_path, clusters):
    train, _ = clusters
    linear = build_model({"kind": "linear"}, train.dim, train.num_classes)
    save_model(linear, tmp_path / "linear", class_names=list(train.class_names), encoder="synthetic")
    with pytest.raises(ValueError, match="holds a 'linear' model"):
        forget(tmp_path / "linear", "class1")
    assert not (tmp_path / "linear" / LOG).exists()


# ------------------------------------------------------------------ restore and replay
def test_restore_moves_head_back_and_is_logged(store):
    r1 = forget(store, "class1")
    r2 = forget(store, "class2")
    back = restore(store, r1["request_id"])
    assert back["op"] == "restore" and back["version_after"] == r1["version_after"] == current_version(store)
    assert back["forgotten"] == ["class1"]
    assert torch.equal(mask_of(store), mask_of(store, r1["version_after"]))
    r3 = forget(store, "class3")  # builds on the restored model
    assert r3["forgotten"] == ["class1", "class3"] and r3["version_before"] == r1["version_after"]
    assert restore(store, "origin")["version_after"] == "000001" and not mask_of(store).any()
    assert restore(store, "origin")["noop"]
    with pytest.raises(ValueError, match="unknown request id"):
        restore(store, "req-999999")
    assert r2["version_after"] in list_versions(store)  # versions are never deleted


@pytest.mark.parametrize("head", [None, "garbage\n"])
def test_a_broken_head_of_a_served_store_is_reported_and_the_log_decides(store, head, caplog):
    rec = forget(store, "class1")
    (store / "HEAD").unlink() if head is None else (store / "HEAD").write_text(head)
    with caplog.at_level("WARNING", logger="dkvb.store.layout"):
        assert load_model(store)[1]["model_sha256"] == rec["model_sha256_after"]
    assert "HEAD is " + ("missing" if head is None else "corrupt") in caplog.text
    assert forget(store, "class2")["version_after"] == current_version(store)  # the next request rewrites HEAD


def test_replay_reproduces_the_mask_bit_for_bit(store, clusters):
    train, _ = clusters
    svc = ModelService(store)
    svc.forget("class1")
    svc.forget("class2", params={"num_keys": 3})
    ex = svc.forget("class3", "examples", {"num_examples": 3, "rounds": 2}, data=train, seed=7)
    svc.forget("class2")
    svc.restore(ex["request_id"])
    svc.forget("class0", params={"min_share": 0.5})
    mask = replay(store)
    assert torch.equal(mask, mask_of(store))
    without = svc.replay()
    assert without.matches_head and [s["how"] for s in without.steps].count("logged delta") == 1
    full = svc.replay(train)
    assert full.matches_head and full.recomputed == 4 and torch.equal(full.mask, mask)
    other = EmbeddingSet(train.x + 1, train.y, train.class_names)
    with pytest.raises(ReplayError, match="data_sha256"):
        svc.replay(other)


def test_a_tampered_log_is_detected(store):
    forget(store, "class1")
    forget(store, "class2")
    lines = (store / LOG).read_text().splitlines()
    rec = json.loads(lines[1])
    rec["mask_delta"] = rec["mask_delta"][1:]
    (store / LOG).write_text("\n".join([lines[0], json.dumps(rec, separators=(",", ":")), lines[2]]) + "\n")
    with pytest.raises(StoreError, match="line 3: field prev_sha256"):
        read_log(store)
    (store / LOG).write_text("\n".join([lines[0], lines[2]]) + "\n")
    with pytest.raises(StoreError, match="lines were removed"):
        replay(store)
    (store / LOG).write_text("not json\n")
    with pytest.raises(StoreError, match="is not a JSON record"):
        forget(store, "class3")


def _retrained(clusters, seed=1):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="random"), train.dim,
                        train.num_classes, seed=seed)
    fit(model, train, TrainConfig(epochs=2, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    return model


def test_a_retrained_model_replaces_a_served_one_with_the_forget_requests_reapplied(store, clusters):
    from dkvb.service import replace_model

    train, test = clusters
    forget(store, "class1")
    forget(store, "class2", "examples", {"num_examples": 8}, data=train, seed=3)
    restore(store, "req-000003")  # the state after both forgets
    model = _retrained(clusters)
    names = list(train.class_names)
    with pytest.raises(StoreError, match="serves deletion requests.*forgotten now: class1, class2"):
        save_model(model, store, class_names=names, encoder="synthetic")
    with pytest.raises(ValueError, match="reads training embeddings"):  # examples needs them: nothing written
        replace_model(store, model, class_names=names, encoder="synthetic")
    before = (read_log(store), current_version(store))
    rec = replace_model(store, model, data=train, class_names=names, encoder="synthetic")
    assert before[0] == read_log(store)[:-1] and before[1] != current_version(store)
    assert rec["op"] == "origin" and rec["forgotten"] == ["class1", "class2"]
    assert [(s["request_id"], s["new_classes"], s["method"]) for s in rec["reapplied"]] == [
        ("req-000002", ["class1"], "dkvb-activations"), ("req-000003", ["class2"], "dkvb-examples")]
    served, manifest = load_model(store)
    assert rec["version_after"] == current_version(store) != rec["version"]
    assert torch.equal(served.key_mask, mask_of(store, rec["version"]) | served.key_mask) and served.key_mask.any()
    assert not mask_of(store, rec["version"]).any()  # the new model as trained, what replay starts from
    assert manifest["extra"]["service"]["forgotten"] == ["class1", "class2"]
    assert evaluate(served, train, test, [1])["forget_test_acc"] <= 0.01  # forgotten in the new model too
    result = ModelService(store).replay(train)
    assert result.matches_head and result.steps[-1]["how"] == "loaded, 2 re-applied"
    assert ModelService(store).replay().steps[-1]["how"] == "loaded, 2 re-applied (logged deltas)"
    later = forget(store, "class3")  # later requests build on the new model
    assert later["version_before"] == rec["version_after"] and later["forgotten"] == ["class1", "class2", "class3"]
    assert torch.equal(replay(store), mask_of(store))
    assert restore(store, rec["request_id"])["forgotten"] == ["class1", "class2"]


def test_a_replacement_lacking_a_forgotten_class_is_refused(store, clusters):
    from dkvb.service import replace_model

    forget(store, "class1")
    names = [f"other{i}" for i in range(len(clusters[0].class_names))]
    with pytest.raises(ValueError, match=r"lacks the forgotten class\(es\) \['class1'\]"):
        replace_model(store, _retrained(clusters), class_names=names, encoder="synthetic")
    assert [r["op"] for r in read_log(store)] == ["origin", "forget"]


# ------------------------------------------------------------------ crash recovery
def test_a_request_killed_after_logging_is_completed_by_the_next(store, monkeypatch):
    import dkvb.served as served

    forget(store, "class1")
    monkeypatch.setattr(served, "atomic_write_text", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        forget(store, "class2")
    monkeypatch.undo()
    assert current_version(store) == "000002" and read_log(store)[-1]["version_after"] == "000003"
    rec = forget(store, "class3")
    assert rec["version_before"] == "000003" and rec["forgotten"] == ["class1", "class2", "class3"]
    assert torch.equal(replay(store), mask_of(store))


def test_a_cut_last_line_is_dropped(store):
    forget(store, "class1")
    with open(store / LOG, "ab") as f:
        f.write(b'{"request_id":"req-0000')
    assert len(read_log(store)) == 2  # readers skip it
    forget(store, "class2")
    assert [r["op"] for r in read_log(store)] == ["origin", "forget", "forget"]
    assert torch.equal(replay(store), mask_of(store))


def test_sigkill_at_every_step_of_a_request_leaves_a_consistent_store(store, monkeypatch, tmp_path, killed_copy):
    """Kill a forget request at its n-th fsync/rename (real SIGKILL of a forked child), for every n."""
    forget(store, "class1")
    probe = tmp_path / "probe"
    shutil.copytree(store, probe)
    calls = []
    with monkeypatch.context() as mp:
        for name in ("fsync", "replace"):
            mp.setattr(os, name, lambda *a, _r=getattr(os, name): calls.append(1) or _r(*a))
        forget(probe, "class2")
    outcomes = set()
    for n in range(1, len(calls) + 2):
        path = tmp_path / f"s{n}"
        killed_copy(store, path, n, lambda p: forget(p, "class2"))
        load_model(path)  # HEAD loads: the old model or the new one
        logged = read_log(path)[-1]["request_id"] == "req-000003"
        outcomes.add((logged, current_version(path)))
        rec = forget(path, "class3")  # the next request recovers
        assert rec["forgotten"] == (["class1", "class2", "class3"] if logged else ["class1", "class3"])
        assert torch.equal(replay(path), mask_of(path))
    assert (False, "000002") in outcomes and (True, "000003") in outcomes


def test_a_second_writer_fails_cleanly(store, capsys):
    from dkvb.store import writer_lock

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            with writer_lock(store):
                os.write(w, b"x")
                signal.pause()
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(StoreLockedError):
            forget(store, "class1")
        assert main(["forget", "--model", str(store), "--classes", "class1"]) == 2
        err = capsys.readouterr().err
        assert "another writer holds the store lock" in err and "Traceback" not in err
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not (store / LOG).exists() and list_versions(store) == ["000001"]


# ------------------------------------------------------------------ embeddings files
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "npz", "npy"])
def test_embeddings_files(tmp_path, clusters, fmt):
    train, _ = clusters
    x, y = train.x[:50], train.y[:50]
    path = tmp_path / f"emb.{fmt}"
    if fmt == "pt":
        torch.save({"x": x, "y": y}, path)
    elif fmt == "safetensors":
        save_file({"x": x, "y": y}, str(path))
    elif fmt == "npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        np.save(path, x.numpy())
        np.save(tmp_path / "emb_labels.npy", y.numpy())
    data = load_embeddings_file(path, train.class_names)
    assert torch.equal(data.x, x) and torch.equal(data.y, y)


def test_bad_embeddings_files_are_rejected(tmp_path, clusters):
    train, _ = clusters
    names = train.class_names
    x = train.x[:10].clone()
    x[3, 2] = float("nan")
    torch.save({"x": x, "y": train.y[:10]}, tmp_path / "nan.pt")
    torch.save({"x": train.x[:10], "y": train.y[:10] + 10}, tmp_path / "range.pt")
    torch.save({"emb": train.x[:10]}, tmp_path / "keys.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for name, match in [("nan.pt", "NaN or inf"), ("range.pt", r"labels must lie in \[0, 5\)"),
                        ("keys.pt", "expected arrays 'x'"), ("junk.pt", "unreadable embeddings"),
                        ("emb.csv", "not found")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_embeddings_file(tmp_path / name, names)


@pytest.mark.parametrize("fmt", ["pt", "npz", "safetensors"])
def test_embeddings_files_name_their_encoder_and_a_mismatch_is_refused(tmp_path, clusters, fmt):
    train, _ = clusters
    names, manifest = train.class_names, {"encoder": "synthetic", "embedding_dim": train.dim}
    x, y = train.x[:20], train.y[:20]

    def write(name, encoder):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "pt":
            torch.save({"x": x, "y": y, **({"encoder": encoder} if encoder is not None else {})}, path)
        elif fmt == "npz":
            np.savez(path, x=x.numpy(), y=y.numpy(), **({"encoder": encoder} if encoder is not None else {}))
        else:
            save_file({"x": x, "y": y}, str(path), metadata={"encoder": encoder} if encoder is not None else None)
        return path

    assert len(load_embeddings_file(write("same", "synthetic"), names, manifest)) == 20
    with pytest.raises(ValueError, match=r"made with encoder 'effnet-lite0', the model was trained on 'synthetic'"):
        load_embeddings_file(write("other", "effnet-lite0"), names, manifest)
    described = json.dumps({"name": "synthetic", "image_size": 32})
    full = {**manifest, "encoder_config": {"name": "synthetic", "image_size": 64}}
    with pytest.raises(ValueError, match=r"another encoder setting than the model's \(fields \['image_size'\]"):
        load_embeddings_file(write("described", described), names, full)
    bare = write("bare", None)
    with pytest.raises(ValueError, match=r"does not say which encoder made these embeddings.*--trust-embeddings"):
        load_embeddings_file(bare, names, manifest)
    assert len(load_embeddings_file(bare, names, manifest, trust=True)) == 20  # trusted explicitly
    assert len(load_embeddings_file(bare, names)) == 20  # no model to check against
    with pytest.raises(ValueError, match=rf"embeddings have {train.dim} dimensions, the model takes 3 \(manifest field"):
        load_embeddings_file(bare, names, {**manifest, "embedding_dim": 3}, trust=True)


def test_cli_refuses_embeddings_without_an_encoder_unless_trusted(store, clusters, tmp_path, capsys):
    train, _ = clusters
    torch.save({"x": train.x, "y": train.y}, tmp_path / "bare.pt")
    torch.save({"x": train.x, "y": train.y, "encoder": "effnet-lite0"}, tmp_path / "other.pt")
    torch.save({"x": train.x[:, :3], "y": train.y, "encoder": "synthetic"}, tmp_path / "narrow.pt")
    m = ["--model", str(store), "--classes", "class1", "--method", "examples"]
    for name, message in [("bare", "does not say which encoder"), ("other", "made with encoder 'effnet-lite0'"),
                          ("narrow", f"embeddings have 3 dimensions, the model takes {train.dim}")]:
        assert main(["forget", *m, "--embeddings", str(tmp_path / f"{name}.pt")]) == 2
        err = capsys.readouterr().err
        assert message in err and f"{name}.pt" in err and len(err.strip().splitlines()) == 1
    assert not (store / LOG).exists()  # refused before any request was logged
    assert main(["forget", *m, "--embeddings", str(tmp_path / "bare.pt"), "--trust-embeddings"]) == 0
    assert "forgot class1 with dkvb-examples" in capsys.readouterr().out


# ------------------------------------------------------------------ CLI
def test_cli_forget_log_replay_restore(store, clusters, tmp_path, capsys):
    train, test = clusters
    torch.save({"x": train.x, "y": train.y, "encoder": "synthetic"}, tmp_path / "train.pt")
    torch.save({"x": test.x, "y": test.y, "encoder": "synthetic"}, tmp_path / "test.pt")
    m = ["--model", str(store)]
    assert main(["forget", *m, "--classes", "class1,class2"]) == 0
    assert "req-000002: forgot class1, class2 with dkvb-activations" in capsys.readouterr().out
    assert main(["forget", *m, "--classes", "class1"]) == 0
    out = capsys.readouterr().out
    assert "already forgotten, skipped: class1" in out and "no-op" in out
    assert main(["forget", *m, "--class-ids", "3", "--method", "examples", "--param", "num_examples=4",
                 "--embeddings", str(tmp_path / "train.pt"), "--test-embeddings", str(tmp_path / "test.pt")]) == 0
    out = capsys.readouterr().out
    assert "forgot class3 with dkvb-examples" in out and "forget_test_acc" in out
    assert main(["log", *m]) == 0
    out = capsys.readouterr().out
    assert "req-000004" in out and "dkvb-examples" in out and "no-op" in out
    assert main(["replay", *m, "--embeddings", str(tmp_path / "train.pt")]) == 0
    assert "bit for bit" in capsys.readouterr().out
    assert main(["restore", *m, "--to", "req-000002"]) == 0
    assert "restored the model after req-000002" in capsys.readouterr().out
    assert main(["log", *m, "--json"]) == 0
    assert [json.loads(line)["op"] for line in capsys.readouterr().out.splitlines()][-1] == "restore"
    assert main(["replay", *m]) == 0
    assert main(["forget", *m, "--classes", "class9"]) == 2
    assert "unknown class name 'class9'" in capsys.readouterr().err
    assert main(["forget", *m, "--classes", "1", "--param", "oops"]) == 2
    assert "must look like key=value" in capsys.readouterr().err


# ------------------------------------------------------------------ sequential-forgetting benchmark
@pytest.mark.slow
def test_sequential_forgetting_benchmark_on_a_tiny_synthetic_config(tmp_path, tiny_config):
    cfg = tiny_config
    out = tmp_path / "seq"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/sequential_forgetting.py"), str(cfg),
                           "--out", str(out), "--threads", "1",
                           "--set", "model.codebook_size=4",
                           "--dkvb", "activations", "--dkvb", "activations:min_share=0,min_count=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "tiny.json").read_text())
    assert (out / "tiny.png").stat().st_size > 0
    default, greedy = result["dkvb"]
    assert [r["forgotten"] for r in default["rows"]] == [0, 1, 2]  # 4 classes: up to half
    assert [r["forgotten"] for r in result["baseline"]] == [0, 1, 2]
    for row in default["rows"][1:]:
        assert row["forget_test_acc"] <= 0.5 and 0 <= row["retain_test_acc"] <= 1
    assert default["refused"] is None and default["replay_matches"]
    # min_share 0 masks every key a forget class touches: the service refuses a request that would
    # empty a codebook, the series stops there and the refusal is recorded, not raised
    assert greedy["params"] == {"min_share": 0, "min_count": 1}
    assert greedy["refused"] is not None and "codebook" in greedy["refused"]["error"]
    assert len(greedy["rows"]) == greedy["refused"]["forgotten"]
    assert greedy["replay_matches"] is (True if len(greedy["rows"]) > 1 else None)  # None: nothing accepted
    assert result["replay_matches"]
    assert "| forgotten |" in proc.stdout and "| refused |" in proc.stdout  # the printed table


@pytest.mark.parametrize("spec, message", [("activations:min_shar=0.1", "unknown parameter(s) ['min_shar']"),
                                            ("activations:oops", "'oops' must look like key=value")])
def test_sequential_forgetting_benchmark_rejects_a_bad_series_before_any_work(tmp_path, tiny_config, spec, message):
    # a typo must not be recorded as a refused request: it fails before embedding or training
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/sequential_forgetting.py"), str(tiny_config),
                           "--out", str(tmp_path / "seq"), "--dkvb", spec], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "seq").exists()


def test_erase_values_request_stores_the_zeroed_values_and_replays(store, clusters):
    from dkvb.verify import unmasked_accuracy

    train, test = clusters
    forget(store, "class1", params={"erase_values": True})
    model, _ = load_model(store)
    assert model.bottleneck.values[model.key_mask].abs().sum() == 0
    forget_test, _ = test.split([1])
    assert unmasked_accuracy(model, forget_test) < 0.5  # clearing the mask gives the class back no more
    assert torch.equal(replay(store), model.key_mask)


def test_refit_requests_through_the_service_store_values_keep_codes_and_replay(store, clusters):
    train, test = clusters
    svc = ModelService(store)
    with pytest.raises(ValueError, match="reads training embeddings"):
        svc.forget("class1", params={"refit_epochs": 1})
    first = svc.forget("class1", params={"refit_epochs": 1}, data=train, metrics=False)
    assert svc._codes[0] == first["version_after"]  # kept for the next request, in memory only
    second = svc.forget("class2", params={"refit_epochs": 1}, data=train, metrics=False)
    assert second["flops"] < first["flops"]  # the first searched every training embedding, the second only what moved
    model, _ = load_model(store)
    assert model.code_cache is None  # never saved
    m = evaluate(model, train, test, [1, 2])
    assert m["forget_test_acc"] <= 0.01 and m["retain_test_acc"] >= 0.95
    full = svc.replay(train)  # the masks do not depend on the re-fitted values
    assert full.matches_head and full.recomputed == 2
    fresh = ModelService(store).forget("class3", params={"refit_epochs": 1}, data=train, metrics=False)
    assert fresh["flops"] > second["flops"]  # a new process has no kept codes


def test_released_keys_requests_log_no_mask_change_store_values_and_replay(store, clusters):
    train, test = clusters
    svc = ModelService(store)
    before, _ = load_model(store)
    params = {"refit_epochs": 1, "release_keys": True}
    for c in ("class1", "class2"):
        rec = svc.forget(c, params=params, data=train, metrics=False)
        assert rec["keys_masked"] == 0 and rec["mask_delta"] == [] and rec["flops"] > 0
    model, _ = load_model(store)
    assert not model.key_mask.any()
    assert not torch.equal(model.bottleneck.values, before.bottleneck.values)  # the re-fitted values are stored
    m = evaluate(model, train, test, [1, 2])
    assert m["forget_test_acc"] <= 0.01 and m["retain_test_acc"] >= 0.95
    full = svc.replay(train)
    assert full.matches_head and [s["how"] for s in full.steps][-2:] == ["keys released (mask unchanged)"] * 2


def test_a_probe_started_model_is_served_its_start_changes_are_stored_and_replay(clusters, tmp_path):
    train, test = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="random"), train.dim,
                        train.num_classes)
    fit(model, train, TrainConfig(epochs=2, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path / "model"
    save_model(model, path, class_names=list(train.class_names), encoder="synthetic")
    rec = forget(path, "class1")
    stored = set(load_file(str(path / f"versions/{rec['version_after']}/tensors.safetensors")))
    # the class's start correction is stored apart; the values themselves are the base version's
    assert {"bottleneck.key_mask", "bottleneck.value_delta", "bottleneck.value_start"} <= stored
    assert "bottleneck.values" not in stored
    served, _ = load_model(path)
    assert served.bottleneck.corrections.classes.tolist() == [1]
    assert served.bottleneck.start.weight[..., 1].abs().sum() == 0
    assert model.bottleneck.start.weight[..., 1].abs().sum() > 0
    assert evaluate(served, train, test, [1])["forget_test_acc"] <= 0.01
    forget(path, "class2")
    assert torch.equal(replay(path), load_model(path)[0].key_mask)


def test_a_count_valued_model_is_served_its_recounted_values_are_stored_and_replay(clusters, tmp_path):
    from dkvb.value_init import values_are_counts

    train, test = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="random"), train.dim,
                        train.num_classes)
    fit(model, train, TrainConfig(epochs=0, value_init="counts"))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path / "model"
    save_model(model, path, class_names=list(train.class_names), encoder="synthetic")
    rec = forget(path, "class1")
    assert "bottleneck.values" in set(load_file(str(path / f"versions/{rec['version_after']}/tensors.safetensors")))
    served, _ = load_model(path)
    assert values_are_counts(served, (1,)) and not values_are_counts(served)
    assert evaluate(served, train, test, [1])["forget_test_acc"] <= 0.01
    forget(path, "class2")
    assert values_are_counts(load_model(path)[0], (1, 2))
    assert torch.equal(replay(path), load_model(path)[0].key_mask)


def test_the_log_holds_the_share_the_default_resolved_to_and_older_records_replay_with_the_old_default(tmp_path):
    from conftest import make_clusters

    from dkvb.replay import _replay_forget
    from dkvb.request import flat_mask
    from dkvb.unlearn import ForgetRequest, create_unlearner
    from dkvb.unlearn.activations import SHARE_FACTOR, START_SHARE_FACTOR

    train = make_clusters(1500, num_classes=5, spread=1.5, seed=0)  # overlapping classes: the two rules differ
    n = train.num_classes
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="discriminant",
                                    whiten_dim=8), train.dim, n)
    fit(model, train, TrainConfig(epochs=2, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path / "model"
    save_model(model, path, class_names=list(train.class_names), encoder="synthetic")
    rec = forget(path, "class1")
    assert rec["params"]["min_share"] == pytest.approx(START_SHARE_FACTOR / n)  # the value used, not None
    assert read_log(path)[-1]["params"]["min_share"] == rec["params"]["min_share"]
    assert torch.equal(replay(path), load_model(path)[0].key_mask)
    # a record logged before the share was resolved (min_share None) replays with the default of
    # then, the projection's factor alone: the mask that request made
    old = create_unlearner("dkvb-activations", min_share=SHARE_FACTOR["discriminant"] / n).unlearn(
        model, ForgetRequest((1,), train)).model.key_mask
    legacy = {"request_id": "r1", "method": "dkvb-activations", "new_classes": ["class1"], "seed": 0,
              "params": {**rec["params"], "min_share": None}, "mask_delta": flat_mask(old & ~model.key_mask)}
    mask, how = _replay_forget(legacy, model, list(train.class_names), model.key_mask.clone(), None)
    assert how == "recomputed" and torch.equal(mask, old)
    assert int(old.sum()) > int(load_model(path)[0].key_mask.sum())  # the old default masked more


@pytest.mark.parametrize("values", ["counts", "ridge"])
def test_a_served_model_with_keys_from_a_pool_forgets_like_retraining(clusters, tmp_path, values):
    """Keys fitted on a pool, count or ridge values, the recount or solve alone: after two logged
    requests the served model is the model built without those classes, to float rounding."""
    from conftest import make_clusters

    train, test = clusters
    pool = make_clusters(400, dim=train.dim, num_classes=3, seed=7)
    config = ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="whitened")

    def built(data):
        model = build_model(config, train.dim, train.num_classes)
        model.prepare(pool.x, pool.y)
        fit(model, data, TrainConfig(epochs=0, value_init=values))
        model.compute_activation_counts(data.x, data.y)
        return model

    path = tmp_path / "model"
    save_model(built(train), path, class_names=list(train.class_names), encoder="synthetic")
    if values == "ridge":  # the solve reads every class's training embeddings: a request without them is refused
        with pytest.raises(ValueError, match="reads training embeddings"):
            forget(path, "class1", params={"mask_keys": False})
    for name in ("class1", "class2"):
        assert forget(path, name, params={"mask_keys": False}, data=train)["keys_masked"] == 0
    served, _ = load_model(path)
    retrained = built(train.subset(~train.class_mask((1, 2))))
    assert torch.equal(served.bottleneck.keys, retrained.bottleneck.keys)
    assert (served.bottleneck.values - retrained.bottleneck.values).abs().max() <= 1e-5
    # a ridge request forms the dual solution's N x F product in float32: logits to a few ulps
    assert (served(test.x) - retrained(test.x)).abs().max() <= (1e-5 if values == "ridge" else 1e-6)
    assert torch.equal(served(test.x).argmax(1), retrained(test.x).argmax(1))
    assert torch.equal(replay(path, data=train if values == "ridge" else None), served.key_mask)
