"""Model store: round trip, verification naming the field, shared tensors, the writer lock, and
crash safety checked by SIGKILLing real writer processes (forked children) mid-save."""
import json
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from dkvb import ModelConfig, TrainConfig, build_model, fit
from dkvb.store import (
    FORMAT_VERSION, StoreError, StoreLockedError, current_version, list_versions, load_model, model_sha256,
    read_manifest, save_model, set_head, writer_lock,
)

NAMES = [f"class{i}" for i in range(5)]


@pytest.fixture(scope="module")
def model(clusters):
    train, _ = clusters
    m = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random"), train.dim, train.num_classes, seed=0)
    fit(m, train, TrainConfig(epochs=1, lr=1e-2))
    m.compute_activation_counts(train.x, train.y)
    return m


def masked(model, n):
    """A copy of ``model`` with the first ``n`` keys of every codebook masked."""
    out = build_model(model.config, model.input_dim, model.num_classes, seed=0)
    out.activation_counts = model.activation_counts.clone()
    out.load_state_dict(model.state_dict())
    out.bottleneck.key_mask[:, :n] = True
    return out


def save(model, path, **kw):
    return save_model(model, path, class_names=NAMES, encoder="synthetic", **kw)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ round trip and verification
def test_round_trip_keeps_every_tensor_and_describes_the_model(tmp_path, model):
    v = save(model, tmp_path / "m", extra={"note": 1})
    loaded, manifest = load_model(tmp_path / "m", expect_encoder="synthetic", expect_dim=model.input_dim)
    assert same_state(loaded, model) and loaded.activation_counts.shape == (5, 8, 16)
    assert v == current_version(tmp_path / "m") == "000001"
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["encoder"], manifest["embedding_dim"], manifest["class_names"]) == ("synthetic", 32, NAMES)
    assert set(manifest["sha256"]) == {"tensors.safetensors", "config.json"}
    assert manifest["model_sha256"] == model_sha256(model) == model_sha256(loaded)
    names = set(load_file(str(tmp_path / "m/versions/000001/tensors.safetensors")))
    assert {"bottleneck.keys", "bottleneck.projection", "bottleneck.values", "bottleneck.key_mask",
            "activation_counts"} <= names
    assert json.loads((tmp_path / "m/versions/000001/config.json").read_text()) == model.config


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m["sha256"].update({"tensors.safetensors": "0" * 64}), "sha256.tensors.safetensors"),
    (lambda m: m["sha256"].update({"config.json": "0" * 64}), "sha256.config.json"),
    (lambda m: m.pop("class_names"), "class_names"),
    (lambda m: m.update(class_names=NAMES[:4]), "class_names"),
    (lambda m: m.update(class_names=NAMES[:4] + NAMES[:1]), "class_names"),
    (lambda m: m.update(model_sha256="0" * 64), "model_sha256"),
    (lambda m: m.update(embedding_dim=31), "embedding_dim"),
    (lambda m: m.update(kind="linear"), "kind"),
])
def test_a_mismatch_is_refused_naming_the_field(tmp_path, model, edit, field):
    save(model, tmp_path / "m")
    path = tmp_path / "m/versions/000001/manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=field.replace(".", r"\.")):
        load_model(tmp_path / "m")


def test_expectations_of_the_caller_are_checked(tmp_path, model):
    save(model, tmp_path / "m")
    with pytest.raises(StoreError, match="manifest field encoder is 'synthetic', expected 'clip'"):
        load_model(tmp_path / "m", expect_encoder="clip")
    with pytest.raises(StoreError, match="manifest field embedding_dim is 32, expected 64"):
        load_model(tmp_path / "m", expect_dim=64)


def test_missing_store_head_or_version_is_named(tmp_path, model):
    with pytest.raises(StoreError, match="no stored model"):
        load_model(tmp_path / "nope")
    save(model, tmp_path / "m")
    (tmp_path / "m/HEAD").write_text("000007\n")
    with pytest.raises(StoreError, match="version 000007 does not exist"):
        load_model(tmp_path / "m")
    (tmp_path / "m/HEAD").write_text("../../etc\n")
    with pytest.raises(StoreError, match="not a version name"):
        load_model(tmp_path / "m")
    (tmp_path / "m/HEAD").unlink()
    with pytest.raises(StoreError, match="HEAD is missing"):
        load_model(tmp_path / "m")


def test_save_refuses_bad_models_and_writes_nothing(tmp_path, model):
    with pytest.raises(ValueError, match="duplicate class names"):
        save_model(model, tmp_path / "m", class_names=NAMES[:4] + ["class0"], encoder="e")
    with pytest.raises(ValueError, match="class_names has 4 entries"):
        save_model(model, tmp_path / "m", class_names=NAMES[:4], encoder="e")
    bad = masked(model, 0)
    with torch.no_grad():
        bad.bottleneck.values[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in \\['bottleneck.values'\\]"):
        save(bad, tmp_path / "m")
    assert list_versions(tmp_path / "m") == [] and current_version(tmp_path / "m") is None


@pytest.mark.parametrize("buffer, value, message", [
    ("value_ridge_shards", 0, "value_ridge_shards 0: must be at least 1"),
    ("value_ridge", -1.0, "value_ridge -1.0: must be a finite penalty >= 0"),
])
def test_a_ridge_buffer_that_describes_no_fit_is_refused_naming_it(tmp_path, model, buffer, value, message):
    bad = masked(model, 0)  # written by other code: its digests match the bad buffer
    getattr(bad, buffer).fill_(value)
    save(bad, tmp_path / "m")
    with pytest.raises(StoreError, match=message):
        load_model(tmp_path / "m")


# ------------------------------------------------------------------ versions and shared tensors
def test_shared_version_stores_only_the_key_mask(tmp_path, model):
    base = save(model, tmp_path / "m")
    v2 = save(masked(model, 2), tmp_path / "m", base=base)
    v3 = save(masked(model, 3), tmp_path / "m", base=v2)  # rests on the full version 000001, not on 000002
    for v, n in ((v2, 2), (v3, 3)):
        own = load_file(str(tmp_path / f"m/versions/{v}/tensors.safetensors"))
        assert list(own) == ["bottleneck.key_mask"]
        manifest = read_manifest(tmp_path / "m", v)
        assert manifest["shared"]["version"] == base and "bottleneck.values" in manifest["shared"]["tensors"]
        loaded, _ = load_model(tmp_path / "m", v)
        assert same_state(loaded, masked(model, n))
        assert manifest["model_sha256"] == model_sha256(masked(model, n))
    full = (tmp_path / "m/versions/000001/tensors.safetensors").stat().st_size
    assert (tmp_path / f"m/versions/{v3}/tensors.safetensors").stat().st_size < full / 10


def test_a_corrupt_base_is_detected_through_a_shared_version(tmp_path, model):
    base = save(model, tmp_path / "m")
    save(masked(model, 1), tmp_path / "m", base=base)
    f = tmp_path / "m/versions/000001/tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shared.sha256"):
        load_model(tmp_path / "m")


def test_head_moves_only_when_asked(tmp_path, model):
    save(model, tmp_path / "m")
    v2 = save(masked(model, 1), tmp_path / "m", base="000001", update_head=False)
    assert current_version(tmp_path / "m") == "000001"
    set_head(tmp_path / "m", v2)
    assert current_version(tmp_path / "m") == v2
    with pytest.raises(StoreError, match="does not exist"):
        set_head(tmp_path / "m", "000009")


def test_a_verified_cache_spares_rehashing_the_base(tmp_path, model, monkeypatch):
    import dkvb.store.read as reading

    base = save(model, tmp_path / "m")
    save(masked(model, 1), tmp_path / "m", base=base)
    cache = {}
    first, _ = load_model(tmp_path / "m", cache=cache)
    hashed = []
    real = reading.sha256_file
    monkeypatch.setattr(reading, "sha256_file", lambda p: hashed.append(p.parent.name) or real(p))
    again, _ = load_model(tmp_path / "m", cache=cache)
    assert same_state(first, again) and "000001" not in hashed


# ------------------------------------------------------------------ writer lock
def fork(fn):
    """Run ``fn`` in a forked child (which never returns into pytest); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            torch.set_num_threads(1)
            fn()
        finally:
            os._exit(0)
    return pid


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def test_a_second_writer_fails_at_once_and_a_dead_holder_frees_the_lock(tmp_path, model):
    save(model, tmp_path / "m")
    r, w = os.pipe()

    def hold():
        with writer_lock(tmp_path / "m"):
            os.write(w, b"x")
            time.sleep(60)

    pid = fork(hold)
    try:
        assert os.read(r, 1) == b"x"
        start = time.perf_counter()
        with pytest.raises(StoreLockedError, match="another writer holds the store lock"):
            save(masked(model, 1), tmp_path / "m")
        assert time.perf_counter() - start < 5
        assert list_versions(tmp_path / "m") == ["000001"]
    finally:
        kill(pid)  # SIGKILL: the kernel drops the flock
    assert save(masked(model, 1), tmp_path / "m") == "000002"


def test_the_lock_is_reentrant_within_a_thread(tmp_path, model):
    with writer_lock(tmp_path / "m"):
        save(model, tmp_path / "m")
        set_head(tmp_path / "m", "000001")
    assert current_version(tmp_path / "m") == "000001"


# ------------------------------------------------------------------ crash safety
def check_old_or_new(path, allowed):
    """The store loads, and as one of the ``allowed`` models (by full-state digest)."""
    loaded, manifest = load_model(path)
    digest = model_sha256(loaded)
    assert digest == manifest["model_sha256"]
    assert digest in allowed, "loaded a model that was never saved: a mix of two saves"
    return allowed[digest]


def test_sigkill_at_random_times_in_a_loop_of_saves_leaves_old_or_new(tmp_path, model):
    models = [masked(model, n) for n in (0, 1, 2)]
    allowed = {model_sha256(m): n for n, m in enumerate(models)}
    path = tmp_path / "m"
    save(models[0], path)

    def writer():
        i = 1
        while True:
            save(models[i % 3], path, base="000001" if i % 2 else None)
            i += 1

    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        pid = fork(writer)
        time.sleep(rng.uniform(0.0, 0.15))
        kill(pid)
        seen.add(check_old_or_new(path, allowed))
        for v in list_versions(path):  # every version that made it into place is complete
            load_model(path, v)
    assert len(list_versions(path)) > 1  # the writers did get through some saves
    save(models[0], path)  # the next writer removes what killed writers left
    assert not list((path / "versions").glob(".tmp-*")) and not list(path.glob(".*.tmp"))


def test_sigkill_at_every_step_of_a_save_leaves_old_or_new(tmp_path, model, monkeypatch, sigkill_at_nth_sync):
    """Kill the writer at its n-th fsync or rename, for every n a save makes."""
    old, new = model, masked(model, 1)
    allowed = {model_sha256(old): "old", model_sha256(new): "new"}
    save(old, tmp_path / "count")
    calls = []
    with monkeypatch.context() as mp:
        for name in ("fsync", "replace"):
            mp.setattr(os, name, lambda *a, _r=getattr(os, name): calls.append(1) or _r(*a))
        save(new, tmp_path / "count", base="000001")
    steps = len(calls)
    assert steps >= 6
    seen = []
    for n in range(1, steps + 2):  # n = steps + 1: the save completes
        path = tmp_path / f"m{n}"
        save(old, path)

        def writer(n=n, path=path):
            sigkill_at_nth_sync(n)  # in the child only
            save(new, path, base="000001")

        os.waitpid(fork(writer), 0)
        seen.append(check_old_or_new(path, allowed))
    assert seen[0] == "old" and seen[-1] == "new" and seen == sorted(seen, key=["old", "new"].index)


def test_format_1_stores_still_load(tmp_path, model):
    save(model, tmp_path / "m")
    path = tmp_path / "m/versions/000001/manifest.json"
    manifest = json.loads(path.read_text())
    for field in ("tensor_sha256", "model_sha256"):
        del manifest[field]
    path.write_text(json.dumps({**manifest, "format_version": 1}))
    loaded, _ = load_model(tmp_path / "m")
    assert same_state(loaded, model)
    assert save(masked(model, 1), tmp_path / "m", base="000001") == "000002"  # and can be a base
    assert same_state(load_model(tmp_path / "m")[0], masked(model, 1))
    path.write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(StoreError, match="tensor_sha256"):  # format 2 must carry the digests
        load_model(tmp_path / "m", "000001")
