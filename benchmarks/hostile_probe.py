"""Hostile probes of the audit log, the store and the service (tampering, bad input), end to end
through the ``dkvb`` command line on a tiny synthetic store.

Each probe does what a hostile or unlucky user would (odd class names, kill -9 mid-request, a
missing HEAD, a retrain over a served store, a cut or edited audit log, a recomputed chain, deleted
versions, bad config values, a full disk, control characters, a forged or stripped keyed log, a
rewritten version or manifest, embeddings of another setting or dataset) and checks the promise of a deletion
service: what the log says was forgotten is what the served model has forgotten, and every failure
is one line naming the file or field. Prints how many probes passed and writes a JSON result.

    python benchmarks/hostile_probe.py --out benchmarks/results/hostile_probe.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit
from dkvb.cli import main
from dkvb.store import current_version, list_versions, load_model, model_sha256, save_model

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["1", "10", "2", "-1", " sp ", "x,y"]
PROBES: list[tuple[str, str, Callable[[Path], str | None]]] = []  # (item, name, probe -> failure or None)


def probe(item: str, name: str):
    def wrap(fn: Callable[[Path], str | None]) -> Callable[[Path], str | None]:
        PROBES.append((item, name, fn))
        return fn
    return wrap


def cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dkvb ARGV`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, *needles: str) -> str | None:
    lines = err.strip().splitlines()
    if code != 2 or len(lines) != 1 or "Traceback" in err or not all(n in err for n in needles):
        return f"exit {code}, stderr {err.strip()[:300]!r}"
    return None


def logged(store: Path) -> list[dict]:
    code, out, err = cli("log", "--model", str(store), "--json")
    if code:
        raise RuntimeError(err)
    return [json.loads(line) for line in out.splitlines()]


def served_matches_log(store: Path) -> str | None:
    model, _ = load_model(store)
    last = logged(store)[-1]
    sha = last.get("model_sha256_after") or last.get("model_sha256")
    return None if model_sha256(model) == sha else f"served model {model_sha256(model)[:8]} != logged {sha[:8]}"


# ------------------------------------------------------------------ 1. names mean names
for args, expected in [(("--classes", "1"), ["1"]), (("--class", "-1"), ["-1"]), (("--class", " sp "), [" sp "]),
                       (("--class", "x,y"), ["x,y"]), (("--class-ids", "1"), ["10"])]:
    def _names(store: Path, args=args, expected=expected) -> str | None:
        code, _, err = cli("forget", "--model", str(store), *args)
        got = logged(store)[-1]["forgotten"] if code == 0 else err
        return None if got == expected else f"forgot {got!r}, expected {expected!r}"
    probe("1", f"forget {' '.join(args)!r} forgets {expected}")(_names)


@probe("1", "'0001' is not guessed as an index")
def _zeros(store: Path) -> str | None:
    return one_line_error(*cli("forget", "--model", str(store), "--classes", "0001")[::2], "unknown class name '0001'")


@probe("1", "a quoted forget: [['1']] in a config means the class named 1")
def _config_names(store: Path) -> str | None:
    from dkvb.config import load_config
    from dkvb.experiment import forget_requests

    got = forget_requests(load_config(None, ['forget=[["1"]]']), tuple(NAMES))
    return None if got == [(0,)] else f"resolved to {got}"


# ------------------------------------------------------------------ 2. served model == log
@probe("2", "20 kill -9 at random points of a forget never serve a model the log does not name")
def _kills(store: Path) -> str | None:
    import random

    rng, outcomes = random.Random(0), set()
    for i in range(20):
        path = store.parent / f"kill{i}"
        shutil.copytree(store, path)
        pid = os.fork()
        if pid == 0:  # child: a forget request, killed after a random delay
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    main(["forget", "--model", str(path), "--classes", "2"])
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not (path / "audit.jsonl").exists():  # killed before logging: the trained model is still served
            if model_sha256(load_model(path)[0]) != model_sha256(load_model(store)[0]):
                return f"kill {i}: nothing logged, but the served model changed"
        elif problem := served_matches_log(path):
            return f"kill {i}: {problem}"
        outcomes.add(len(logged(path)) if (path / "audit.jsonl").exists() else 0)
    return None if len(outcomes) > 1 else f"every kill landed at the same point ({outcomes}): the probe saw nothing"


@probe("2", "restore works with HEAD deleted")
def _no_head(store: Path) -> str | None:
    cli("forget", "--model", str(store), "--classes", "1")
    (store / "HEAD").unlink()
    code, _, err = cli("restore", "--model", str(store), "--to", "origin")
    return (f"exit {code}: {err.strip()}" if code else None) or served_matches_log(store)


@probe("2", "retraining over a served store is refused without --force")
def _retrain(store: Path) -> str | None:
    cli("forget", "--model", str(store), "--classes", "1")
    model, _ = load_model(store, "000001")
    try:
        save_model(model, store, class_names=NAMES, encoder="synthetic")
    except Exception as e:  # noqa: BLE001 - the refusal is the expected outcome
        return None if "serves deletion requests" in str(e) else f"refused with {e}"
    return "HEAD was moved to a retrained model while the log says '1' is forgotten"


@probe("2", "retraining with --force re-applies the logged forget requests to the new model")
def _retrain_force(store: Path) -> str | None:
    from dkvb.service import replace_model

    cli("forget", "--model", str(store), "--classes", "1")
    train = make_train()
    rec = replace_model(store, make_model(train, seed=1), data=train, class_names=NAMES, encoder="synthetic")
    if rec["forgotten"] != ["1"] or [s["new_classes"] for s in rec["reapplied"]] != [["1"]]:
        return f"logged {rec['forgotten']} re-applied {rec['reapplied']}"
    code, out, err = cli("replay", "--model", str(store))
    return served_matches_log(store) or (None if code == 0 and "bit for bit" in out else f"replay: {err.strip()}")


# ------------------------------------------------------------------ 3. history loss
def _damaged(damage: Callable[[Path], None]) -> Callable[[Path], str | None]:
    def run(store: Path) -> str | None:
        cli("forget", "--model", str(store), "--classes", "1")
        cli("forget", "--model", str(store), "--classes", "2")
        damage(store)
        problems = [one_line_error(*cli("replay", "--model", str(store))[::2], "audit"),
                    one_line_error(*cli("forget", "--model", str(store), "--classes", "10")[::2], "audit")]
        return "; ".join(p for p in problems if p) or None
    return run


def _edit_last(store: Path) -> None:
    lines = (store / "audit.jsonl").read_bytes().splitlines()
    rec = json.loads(lines[-1])
    rec["forgotten"] = []
    (store / "audit.jsonl").write_bytes(b"\n".join(lines[:-1] + [json.dumps(rec, separators=(",", ":")).encode()])
                                        + b"\n")


for label, damage in [("emptied", lambda s: (s / "audit.jsonl").write_bytes(b"")),
                      ("deleted", lambda s: (s / "audit.jsonl").unlink()),
                      ("tail cut", lambda s: (s / "audit.jsonl").write_bytes(
                          b"".join((s / "audit.jsonl").read_bytes().splitlines(keepends=True)[:-1]))),
                      ("last line edited", _edit_last),
                      ("deleted with its anchor", lambda s: [(s / n).unlink() for n in ("audit.jsonl",
                                                                                           "audit.anchor.json")])]:
    probe("3", f"audit log {label}: detected by replay, refused by forget")(_damaged(damage))


@probe("3", "a recomputed chain is detected with DKVB_AUDIT_KEY")
def _keyed(store: Path) -> str | None:
    from dkvb.audit import encode, line_sha

    os.environ["DKVB_AUDIT_KEY"] = "probe-key"
    try:
        cli("forget", "--model", str(store), "--classes", "1")
        records = [json.loads(line) for line in (store / "audit.jsonl").read_bytes().splitlines()]
        records[1]["classes"] = ["2"]
        prev, out = None, b""
        for r in records:
            r.pop("prev_sha256"), r.pop("mac")
            out += (line := encode(r, prev, None)) + b"\n"
            prev = line_sha(line)
        (store / "audit.jsonl").write_bytes(out)
        (store / "audit.anchor.json").write_text(json.dumps({"records": len(records), "last_sha256": prev}))
        return one_line_error(*cli("replay", "--model", str(store))[::2], "mac")
    finally:
        del os.environ["DKVB_AUDIT_KEY"]


@probe("3", "version names are never reused after the newest version is deleted")
def _reuse(store: Path) -> str | None:
    cli("forget", "--model", str(store), "--classes", "1")
    newest = list_versions(store)[-1]
    shutil.rmtree(store / "versions" / newest)
    model, _ = load_model(store, "000001")
    version = save_model(model, store, class_names=NAMES, encoder="synthetic", update_head=False)
    return None if version > newest else f"reused {version}"


# ------------------------------------------------------------------ 4. prune
@probe("4", "dkvb prune after erase_values keeps HEAD loadable and replay exact")
def _prune(store: Path) -> str | None:
    cli("forget", "--model", str(store), "--classes", "1", "--param", "erase_values=true")
    cli("forget", "--model", str(store), "--classes", "2")
    cli("restore", "--model", str(store), "--to", "req-000002")
    code, out, err = cli("prune", "--model", str(store))
    if code or "deleted 1 version(s)" not in out:
        return f"prune: exit {code} {out.strip()} {err.strip()}"
    code, out, err = cli("replay", "--model", str(store))
    return None if code == 0 and "bit for bit" in out else f"replay after prune: {err.strip()}"


# ------------------------------------------------------------------ 5. inputs
@probe("5", "a renamed class in a manifest is detected (manifest_sha256)")
def _manifest(store: Path) -> str | None:
    m = store / "versions" / current_version(store) / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["class_names"][0] = "renamed"
    m.write_text(json.dumps(manifest))
    return one_line_error(*cli("forget", "--model", str(store), "--classes", "2")[::2], "manifest_sha256")


def _embeddings_file(store: Path, name: str, **entries) -> Path:
    train = make_train()
    path = store.parent / name
    torch.save({"x": train.x, "y": train.y, **entries}, path)
    return path


@probe("5", "an embeddings file that names no encoder is refused unless --trust-embeddings")
def _bare_embeddings(store: Path) -> str | None:
    path = _embeddings_file(store, "bare.pt")
    args = ("forget", "--model", str(store), "--classes", "1", "--method", "examples", "--embeddings", str(path))
    refused = one_line_error(*cli(*args)[::2], str(path), "does not say which encoder", "--trust-embeddings")
    code, _, err = cli(*args, "--trust-embeddings")
    return refused or (f"trusted: exit {code} {err.strip()}" if code else None)


@probe("5", "an embeddings file made by another encoder, or of another size, is refused")
def _other_embeddings(store: Path) -> str | None:
    other = _embeddings_file(store, "other.pt", encoder="effnet-lite0")
    narrow = store.parent / "narrow.pt"
    torch.save({"x": make_train().x[:, :8], "y": make_train().y, "encoder": "synthetic"}, narrow)
    base = ("forget", "--model", str(store), "--classes", "1", "--method", "examples", "--embeddings")
    problems = [one_line_error(*cli(*base, str(other))[::2], "made with encoder 'effnet-lite0'"),
                one_line_error(*cli(*base, str(narrow))[::2], "embeddings have 8 dimensions, the model takes 32")]
    return "; ".join(p for p in problems if p) or None


# ------------------------------------------------------------------ 6. typed, early, one-line errors
for override, needle in [("train.epochs=1e12", "train.epochs must be an integer"),
                         ("train.lr=nan", "train.lr must be a finite number"),
                         ("dataset.download=1", "dataset.download must be true or false"),
                         ("dataset.test_limit=None", "must be an integer or null"),
                         ("name=../../escape", "name must be one folder name"),
                         ("dataset.name='imagefolder:'", "imagefolder:<path>"),
                         ("methods=[{name: dkvb-activations, params: {nope: 1}}]", "unknown parameter")]:
    def _config(store: Path, override=override, needle=needle) -> str | None:
        out = store.parent / "runs"
        code, _, err = cli("run", str(ROOT / "experiments/tiny_synthetic.yaml"), "--set", f"output_dir={out}",
                           "--set", f"cache_dir={store.parent / 'cache'}", "--set", override)
        return one_line_error(code, err, needle) or ("the run started" if out.exists() else None)
    probe("6", f"--set {override} is refused before any work")(_config)


@probe("6", "malformed YAML names the file and line")
def _yaml(store: Path) -> str | None:
    bad = store.parent / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    return one_line_error(*cli("run", str(bad))[::2], str(bad), "malformed YAML at line")


@probe("6", "dkvb log on a missing store exits non-zero")
def _log_missing(store: Path) -> str | None:
    return one_line_error(*cli("log", "--model", str(store.parent / "nothing"))[::2], "no stored model")


@probe("6", "a full disk is one line naming the file")
def _full_disk(store: Path) -> str | None:
    import errno

    import dkvb.store.write as store_module

    real = store_module.save_file

    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    store_module.save_file = full
    try:
        return one_line_error(*cli("forget", "--model", str(store), "--classes", "1")[::2], "No space left",
                              "tensors.safetensors")
    finally:
        store_module.save_file = real


for param, needle in [("num_keys=x", "dkvb-activations: num_keys must be an integer or null, got 'x'"),
                      ("erase_values=maybe", "dkvb-activations: erase_values must be true or false, got 'maybe'"),
                      ("min_share=abc", "dkvb-activations: min_share must be a number or null, got 'abc'")]:
    def _param_type(store: Path, param=param, needle=needle) -> str | None:
        failure = one_line_error(*cli("forget", "--model", str(store), "--classes", "1", "--param", param)[::2], needle)
        return failure or ("a request was logged" if (store / "audit.jsonl").exists() else None)
    probe("6", f"--param {param} is refused by type before any work")(_param_type)


@probe("6", "a read-only store: forget fails in one line naming the store, which stays unchanged and verifiable")
def _read_only(store: Path) -> str | None:
    import builtins
    import errno

    cli("forget", "--model", str(store), "--classes", "1")
    top, writing = str(store.resolve()), os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    saved = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file() and p.name != ".lock"}
    real = builtins.open, os.open, os.mkdir, os.replace

    def inside(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and os.path.abspath(os.fspath(p)).startswith(top)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    builtins.open = lambda f, mode="r", *a, **k: (refuse(f) if inside(f) and any(c in mode for c in "wax+")
                                                  else real[0](f, mode, *a, **k))
    os.open = lambda p, flags, *a, **k: refuse(p) if inside(p) and flags & writing else real[1](p, flags, *a, **k)
    os.mkdir = lambda p, *a, **k: refuse(p) if inside(p) else real[2](p, *a, **k)
    os.replace = lambda s, d, *a, **k: refuse(d) if inside(d) else real[3](s, d, *a, **k)
    try:
        failure = one_line_error(*cli("forget", "--model", str(store), "--classes", "2")[::2], str(store),
                                 "cannot write to the model store", "Read-only file system")
    finally:
        builtins.open, os.open, os.mkdir, os.replace = real
    now = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file() and p.name != ".lock"}
    code, out, err = cli("replay", "--model", str(store))
    return (failure or ("the store changed" if now != saved else None)
            or (None if code == 0 and "bit for bit" in out else f"replay: {err.strip()}"))


# ------------------------------------------------------------------ 7. files usable by others
@probe("7", "store files follow the umask (0644 under 022)")
def _umask(store: Path) -> str | None:
    old = os.umask(0o022)
    try:
        cli("forget", "--model", str(store), "--classes", "1")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [store / "HEAD", store / "audit.jsonl",
             store / "versions" / current_version(store) / "tensors.safetensors"]}
    return None if set(modes.values()) == {"0o644"} else str(modes)


@probe("7", "dkvb log escapes control characters in class names")
def _escape(store: Path) -> str | None:
    model, _ = load_model(store)
    names = ["ok", "red\x1b[31m", "bell\a", "2", "3", "4"]
    other = store.parent / "escape"
    save_model(model, other, class_names=names, encoder="synthetic")
    cli("forget", "--model", str(other), "--class", "red\x1b[31m")
    code, out, _ = cli("log", "--model", str(other))
    return None if code == 0 and "\x1b" not in out and "red\\x1b[31m" in out else repr(out[-200:])


# ------------------------------------------------------------------ 8. someone who can write the store's files
def _sha_served(store: Path) -> str:
    return model_sha256(load_model(store)[0])


def _refused(store: Path, *argvs: tuple[str, ...], needle: str = "audit") -> str | None:
    problems = [one_line_error(*cli(*argv, "--model", str(store))[::2], needle) for argv in argvs]
    return "; ".join(f"{argv[0]}: {p}" for argv, p in zip(argvs, problems) if p) or None


for label, names in [("log and anchor", ("audit.jsonl", "audit.anchor.json")),
                     ("log, anchor and marker", ("audit.jsonl", "audit.anchor.json", "audit.started.json"))]:
    def _lost(store: Path, names=names) -> str | None:
        cli("forget", "--model", str(store), "--classes", "1")
        cli("forget", "--model", str(store), "--classes", "2")
        cli("restore", "--model", str(store), "--to", "origin")
        for n in names:
            (store / n).unlink()
        versions = list_versions(store)
        failure = _refused(store, ("prune",), ("forget", "--classes", "10"), ("restore", "--to", "origin"), ("log",))
        return failure or (None if list_versions(store) == versions else f"versions changed: {list_versions(store)}")
    probe("8", f"{label} deleted while the origin is served: prune, forget, restore and log refuse")(_lost)


def _forged_line(store: Path) -> None:
    from dkvb.audit import line_sha

    last = (store / "audit.jsonl").read_bytes().splitlines()[-1]
    forged = {"request_id": "req-000099", "op": "restore", "to": "origin", "version_after": "000001",
              "prev_sha256": line_sha(last)}
    with open(store / "audit.jsonl", "ab") as f:
        f.write(json.dumps(forged, separators=(",", ":")).encode() + b"\n")


@probe("8", "a forged unkeyed line on a keyed log is refused by readers (key or not); dkvb recover serves again")
def _forged(store: Path) -> str | None:
    os.environ["DKVB_AUDIT_KEY"] = "probe-key"
    try:
        cli("forget", "--model", str(store), "--classes", "1")
        served = _sha_served(store)
        _forged_line(store)
        failure = _refused(store, ("log",), ("replay",), needle="req-000099")
        try:
            load_model(store)
            failure = failure or "load_model served the forged tail"
        except Exception as e:  # noqa: BLE001 - the refusal is expected
            failure = failure or (None if "req-000099" in str(e) else f"refused with {e}")
        del os.environ["DKVB_AUDIT_KEY"]
        failure = failure or _refused(store, ("log",), needle="req-000099")
        os.environ["DKVB_AUDIT_KEY"] = "probe-key"
        code, out, err = cli("recover", "--model", str(store))
        if code or _sha_served(store) != served:
            return failure or f"recover: exit {code} {err.strip()}"
        return failure
    finally:
        os.environ.pop("DKVB_AUDIT_KEY", None)


@probe("8", "macs stripped and the chain recomputed: refused with the key and without it")
def _stripped(store: Path) -> str | None:
    from dkvb.audit import encode, line_sha

    os.environ["DKVB_AUDIT_KEY"] = "probe-key"
    try:
        cli("forget", "--model", str(store), "--classes", "1")
        prev, out = None, b""
        for line in (store / "audit.jsonl").read_bytes().splitlines():
            r = json.loads(line)
            r.pop("prev_sha256"), r.pop("mac")
            out += (line := encode(r, prev, None)) + b"\n"
            prev = line_sha(line)
        (store / "audit.jsonl").write_bytes(out)
        (store / "audit.anchor.json").write_text(json.dumps({"records": 2, "last_sha256": prev}))
        failure = _refused(store, ("replay",), needle="mac")
        del os.environ["DKVB_AUDIT_KEY"]
        return failure or _refused(store, ("replay",), ("forget", "--classes", "2"), needle="mac")
    finally:
        os.environ.pop("DKVB_AUDIT_KEY", None)


@probe("8", "an erased version reverted with every digest recomputed: replay and readers refuse")
def _reverted(store: Path) -> str | None:
    from safetensors.torch import load_file, save_file

    from dkvb.io import sha256_file
    from dkvb.store import manifest_sha256, state_sha256, tensor_sha256

    cli("forget", "--model", str(store), "--classes", "1", "--param", "erase_values=true")
    vdir = store / "versions" / current_version(store)
    tensors = load_file(str(vdir / "tensors.safetensors"))
    tensors["bottleneck.values"] = load_model(store, "000001")[0].bottleneck.values.detach().clone()
    save_file(tensors, str(vdir / "tensors.safetensors"))
    m = json.loads((vdir / "manifest.json").read_text())
    m["sha256"]["tensors.safetensors"] = sha256_file(vdir / "tensors.safetensors")
    m["tensor_sha256"]["bottleneck.values"] = tensor_sha256(tensors["bottleneck.values"])
    m["model_sha256"] = state_sha256(m["tensor_sha256"])
    m["manifest_sha256"] = manifest_sha256(m)
    (vdir / "manifest.json").write_text(json.dumps(m))
    return _refused(store, ("replay",), ("forget", "--classes", "2"), needle="rewritten")


@probe("8", "two class names swapped in the served manifest (digest recomputed): forget refuses")
def _swapped(store: Path) -> str | None:
    from dkvb.store import manifest_sha256

    cli("forget", "--model", str(store), "--classes", "1")
    vdir = store / "versions" / current_version(store)
    m = json.loads((vdir / "manifest.json").read_text())
    m["class_names"][2], m["class_names"][3] = m["class_names"][3], m["class_names"][2]
    m["manifest_sha256"] = manifest_sha256(m)
    (vdir / "manifest.json").write_text(json.dumps(m))
    return _refused(store, ("forget", "--classes", "2"), ("replay",), needle="class_names")


@probe("8", "an embeddings file naming only the encoder is refused for a model that records its image size")
def _name_only(store: Path) -> str | None:
    model, _ = load_model(store)
    other = store.parent / "sized"
    save_model(model, other, class_names=NAMES, encoder="synthetic",
               encoder_config={"name": "synthetic", "image_size": 32})
    path = _embeddings_file(store, "named.pt", encoder="synthetic")
    return one_line_error(*cli("forget", "--model", str(other), "--classes", "1", "--method", "examples",
                               "--embeddings", str(path))[::2], "names only the encoder", "--trust-embeddings")


@probe("8", "a cache folder of another dataset (2 classes for 6) is refused")
def _other_cache(store: Path) -> str | None:
    import numpy as np

    folder, train = store.parent / "cache2", make_train()
    folder.mkdir()
    np.save(folder / "embeddings.npy", train.x.numpy())
    np.save(folder / "labels.npy", (train.y % 2).numpy())
    (folder / "meta.json").write_text(json.dumps({"shape": list(train.x.shape), "class_names": ["a", "b"]}))
    return one_line_error(*cli("forget", "--model", str(store), "--classes", "1", "--method", "examples",
                               "--embeddings", str(folder), "--trust-embeddings")[::2], "another dataset")


@probe("8", "dkvb run --force over a served store refuses before changing anything")
def _run_force(store: Path) -> str | None:
    from dkvb.config import load_config

    sets = [f"output_dir={store.parent / 'runs'}", f"cache_dir={store.parent / 'cache'}"]
    yaml = str(ROOT / "experiments/tiny_synthetic.yaml")
    served = load_config(yaml, sets).run_dir / "models" / "dkvb"
    shutil.copytree(store, served)
    cli("forget", "--model", str(served), "--classes", "1")
    before = (served / "audit.jsonl").read_bytes()
    argv = ["run", yaml, "--force"] + [a for s_ in sets for a in ("--set", s_)]
    failure = one_line_error(*cli(*argv)[::2], "serves deletion requests", "dkvb train --force")
    return failure or (None if (served / "audit.jsonl").read_bytes() == before else "the log changed")


@probe("8", "erase_values then prune: no file in the store holds the erased values; replay still exact")
def _erase_prune(store: Path) -> str | None:
    from safetensors.torch import load_file

    cli("forget", "--model", str(store), "--classes", "1", "--param", "erase_values=true")
    rows = torch.as_tensor(logged(store)[-1]["mask_delta"])
    code, out, err = cli("prune", "--model", str(store))
    if code or "erased the values of" not in out:
        return f"prune: exit {code}: {out.strip()} {err.strip()}"
    for f in store.rglob("*.safetensors"):
        values = load_file(str(f)).get("bottleneck.values")
        if values is not None and values.reshape(-1, values.shape[-1])[rows].any():
            return f"{f.relative_to(store)} still holds erased values"
    code, out, err = cli("replay", "--model", str(store))
    return None if code == 0 and "bit for bit" in out else f"replay: {err.strip()}"


@probe("8", "prune stopped by a symlinked version folder deletes nothing; a killed prune has logged what it deletes")
def _prune_link(store: Path) -> str | None:
    import dkvb.store.prune  # noqa: F401

    prune_module = sys.modules["dkvb.store.prune"]
    cli("forget", "--model", str(store), "--classes", "1")
    cli("restore", "--model", str(store), "--to", "origin")
    shutil.copytree(store / "versions" / "000001", store.parent / "elsewhere")
    (store / "versions" / "000009").symlink_to(store.parent / "elsewhere")
    versions = list_versions(store)
    failure = one_line_error(*cli("prune", "--model", str(store))[::2], "symbolic link")
    if failure or list_versions(store) != versions:
        return failure or "versions deleted"
    (store / "versions" / "000009").unlink()
    real = prune_module.shutil.rmtree
    prune_module.shutil.rmtree = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    try:
        cli("prune", "--model", str(store))
    except KeyboardInterrupt:
        pass
    finally:
        prune_module.shutil.rmtree = real
    named = {v for r in logged(store) if r["op"] == "prune" for v in r["removed"]}
    gone = set(versions) - {"000009"} - set(list_versions(store))
    return None if gone <= named and named else f"deleted {sorted(gone)}, logged {sorted(named)}"


@probe("8", "a committed request whose HEAD cannot be moved (ENOSPC) reports success with a warning")
def _committed(store: Path) -> str | None:
    import errno

    import dkvb.served as served_module

    real = served_module.atomic_write_text

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    served_module.atomic_write_text = full
    try:
        code, out, err = cli("forget", "--model", str(store), "--classes", "1")
    finally:
        served_module.atomic_write_text = real
    ok = code == 0 and "committed and served" in err and "forgot 1" in out
    return (None if ok else f"exit {code}: {err.strip()}") or served_matches_log(store)


@probe("8", "model.num_codebooks=abc and DKVB_JOBS=abc are refused before any work")
def _early(store: Path) -> str | None:
    sets = ["--set", f"output_dir={store.parent / 'runs'}", "--set", f"cache_dir={store.parent / 'cache'}"]
    yaml = str(ROOT / "experiments/tiny_synthetic.yaml")
    failure = one_line_error(*cli("run", yaml, *sets, "--set", "model.num_codebooks=abc")[::2],
                             "model.num_codebooks must be an integer or 'auto'")
    os.environ["DKVB_JOBS"] = "abc"
    try:
        failure = failure or one_line_error(*cli("run", yaml, *sets)[::2], "DKVB_JOBS")
    finally:
        del os.environ["DKVB_JOBS"]
    return failure or ("work started" if (store.parent / "cache").exists() else None)


@probe("8", "--seed 2**66 names the option")
def _seed(store: Path) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(["forget", "--model", str(store), "--classes", "1", "--seed", str(2**66)])
    except SystemExit as e:
        return None if e.code == 2 and "--seed" in err.getvalue() else f"exit {e.code}: {err.getvalue()}"
    return "accepted"


@probe("8", "a version counter at 999999 is refused before any folder is written")
def _counter(store: Path) -> str | None:
    (store / "versions" / ".issued").write_text("999999\n")
    entries = sorted(p.name for p in (store / "versions").iterdir())
    failure = one_line_error(*cli("forget", "--model", str(store), "--classes", "1")[::2], "used up")
    return failure or (None if sorted(p.name for p in (store / "versions").iterdir()) == entries else "folders left")


# ------------------------------------------------------------------ run
def make_train() -> EmbeddingSet:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(len(NAMES), 32, generator=g) * 3
    y = torch.arange(600) % len(NAMES)
    return EmbeddingSet(centers[y] + torch.randn(600, 32, generator=g), y, NAMES)


def make_model(train: EmbeddingSet, seed: int = 0) -> torch.nn.Module:
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4), 32, len(NAMES), seed=seed)
    fit(model, train, TrainConfig(epochs=2, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    return model


def make_store(path: Path) -> None:
    save_model(make_model(make_train()), path, class_names=NAMES, encoder="synthetic")


def run(out: Path | None) -> dict:
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template"
        make_store(template)
        for i, (item, name, fn) in enumerate(PROBES):
            work = Path(tmp) / f"p{i}"
            shutil.copytree(template, work / "model")
            start = time.perf_counter()
            try:
                failure = fn(work / "model")
            except Exception as e:  # noqa: BLE001 - a crashing probe is a failed probe
                failure = f"{type(e).__name__}: {e}"
            results.append({"item": item, "probe": name, "passed": failure is None, "detail": failure,
                            "seconds": round(time.perf_counter() - start, 3)})
            print(f"[{'PASS' if failure is None else 'FAIL'}] {item}. {name}" + (f": {failure}" if failure else ""))
    passed = sum(r["passed"] for r in results)
    summary = {"passed": passed, "total": len(results), "probes": results}
    print(f"{passed}/{len(results)} probes passed")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON result here")
    args = p.parse_args()
    sys.exit(0 if run(args.out)["passed"] == len(PROBES) else 1)
