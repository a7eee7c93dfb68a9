"""`dkvb serve`: the real server (uvicorn in a subprocess on an ephemeral loopback port) spoken to
with httpx. Authentication, every endpoint, one clear 4xx for bad input, versions written by the
CLI picked up within a second, a kill -9 during a forget, and a bounded fuzz from /openapi.json."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dkvb import ModelConfig, TrainConfig, build_model, fit  # noqa: E402
from dkvb.audit import read_log  # noqa: E402
from dkvb.cli import main  # noqa: E402
from dkvb.service import replay  # noqa: E402
from dkvb.store import save_model, served_version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def stored(clusters, tmp_path_factory):
    """A trained DKVB model with cached activation counts, saved once; tests copy it."""
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=32, key_dim=4, projection="random"), train.dim,
                        train.num_classes)
    fit(model, train, TrainConfig(epochs=2, lr=1e-2))
    model.compute_activation_counts(train.x, train.y)
    path = tmp_path_factory.mktemp("stored") / "model"
    save_model(model, path, class_names=list(train.class_names), encoder="synthetic")
    return path


class Server:
    """``dkvb serve`` in a subprocess (one torch thread) on a free loopback port."""

    def __init__(self, store: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.store = store
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dkvb", "--threads", "1", "serve", "--model", str(store), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=ROOT)
        self.url = ""
        if wait:
            self.url = self._address()
            self.client = httpx.Client(base_url=self.url, timeout=30)

    def _address(self, timeout: float = 60) -> str:
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = found[0] if found else ""
        if "http://" not in line:
            self.proc.kill()
            raise AssertionError(f"dkvb serve did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        return line.split(" on ")[1].split()[0]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        if self.url:
            self.client.close()


@pytest.fixture(scope="module")
def server(stored, tmp_path_factory):
    """One server with a token over a copy of the stored model (tests that write restore what they did)."""
    path = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(stored, path)
    token_file = path.parent / "token"
    token_file.write_text(TOKEN + "\n")
    srv = Server(path, "--token-file", str(token_file))
    yield srv
    srv.stop()


def rows(n: int, dim: int = 32, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32).tolist()


# ------------------------------------------------------------------ starting
def test_without_a_token_the_server_refuses_to_start_unless_local_and_told(stored, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DKVB_SERVE_TOKEN", raising=False)
    short = tmp_path / "short"
    short.write_text("abc")
    for args, message in [((), "no token"), (("--insecure-local", "--host", "0.0.0.0"), "loopback address only"),
                          (("--token-file", str(short)), "at least 16 characters"),
                          (("--token-file", str(tmp_path / "missing")), "cannot read the token")]:
        assert main(["serve", "--model", str(stored), "--port", "0", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dkvb serve: error:") and message in err, err
    monkeypatch.setenv("DKVB_SERVE_TOKEN", "x" * 15)
    assert main(["serve", "--model", str(stored), "--port", "0"]) == 2
    assert "DKVB_SERVE_TOKEN: the token must be at least 16" in capsys.readouterr().err


# ------------------------------------------------------------------ endpoints
def test_predict_names_the_version_and_matches_the_model(server, clusters):
    from dkvb.store import load_model

    model, _ = load_model(server.store)
    x = clusters[1].x[:20]
    r = server.client.post("/predict", json={"embeddings": x.tolist(), "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == served_version(server.store)
    expected = model(x).argmax(-1).tolist()
    assert body["classes"] == [f"class{i}" for i in expected]
    assert len(body["top_classes"][0]) == 3 and body["top_classes"][0][0] == body["classes"][0]
    assert all(0 < s <= 1 for s in body["scores"])
    buf = io.BytesIO()
    np.save(buf, x.numpy())
    r = server.client.post("/predict/npy", files={"file": ("x.npy", buf.getvalue())})
    assert r.status_code == 200 and r.json()["classes"] == body["classes"] and "top_classes" not in r.json()


def test_health_metrics_docs_and_schema(server):
    health = server.client.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == 5 and health["version"] == served_version(server.store)
    assert server.client.get("/docs").status_code == 200
    paths = server.client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/predict/npy", "/forget", "/restore", "/log", "/verify", "/health", "/metrics"} <= set(paths)
    server.client.post("/predict", json={"embeddings": rows(2)})
    text = server.client.get("/metrics").text
    for line in ('dkvb_http_requests_total{endpoint="/predict",method="POST",status="200"}',
                 'dkvb_http_request_seconds_bucket{endpoint="/predict",le="0.05"}', "dkvb_served_version ",
                 "dkvb_keys_masked ", "dkvb_classes_forgotten ", "dkvb_predicted_rows_total "):
        assert line in text, line


def test_writes_and_the_audit_log_need_the_token(server):
    versions = served_version(server.store)
    for headers, message in [({}, "missing bearer token"), ({"Authorization": "Bearer " + "x" * len(TOKEN)},
                                                            "wrong bearer token"),
                             ({"Authorization": "Basic abc"}, "missing bearer token")]:
        for method, path, body in [("POST", "/forget", {"classes": ["class1"]}), ("POST", "/restore", {"to": "origin"}),
                                   ("GET", "/log", None), ("GET", "/verify", None)]:
            r = server.client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["detail"].startswith(message), (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert served_version(server.store) == versions
    assert server.client.post("/predict", json={"embeddings": rows(1)}).status_code == 200  # reads are open


def test_forget_log_verify_restore_over_http(server):
    before = server.client.get("/health").json()
    r = server.client.post("/forget", json={"classes": ["class2"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    rec = out["record"]
    assert rec["op"] == "forget" and rec["classes"] == ["class2"] and rec["keys_masked"] > 0
    assert out["version"] == rec["version_after"] == served_version(server.store) != before["version"]
    # the answer comes after the swap: the next prediction already names the new version
    assert server.client.post("/predict", json={"embeddings": rows(1)}).json()["version"] == rec["version_after"]
    health = server.client.get("/health").json()
    assert health["forgotten"] == 1 and health["keys_masked"] == rec["keys_masked_total"]
    records = server.client.get("/log", headers=AUTH).json()["records"]
    assert records == read_log(server.store) and records[-1]["request_id"] == rec["request_id"]
    verify = server.client.get("/verify", headers=AUTH).json()
    assert verify["matches"] and verify["served_matches_log"] and verify["version"] == rec["version_after"]
    again = server.client.post("/forget", json={"classes": ["class2"]}, headers=AUTH).json()
    assert again["record"]["noop"] and again["version"] == rec["version_after"]
    back = server.client.post("/restore", json={"to": "origin"}, headers=AUTH)
    assert back.status_code == 200 and back.json()["version"] == before["version"]
    assert server.client.get("/health").json()["forgotten"] == 0
    assert 'dkvb_http_requests_total{endpoint="/forget",method="POST",status="200"}' in server.client.get("/metrics").text


def test_images_are_embedded_by_the_stores_encoder(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image

    from dkvb.encoders import create_encoder, encoder_config
    from conftest import make_clusters

    train = make_clusters(500, dim=1280)
    model = build_model(ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random"), train.dim,
                        train.num_classes)
    fit(model, train, TrainConfig(epochs=1, lr=1e-2))
    setting = encoder_config("effnet-lite0", image_size=32)
    save_model(model, tmp_path / "model", class_names=list(train.class_names), encoder="effnet-lite0",
               encoder_config=setting)
    pngs = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    encoder = create_encoder("effnet-lite0", image_size=32)
    with torch.no_grad():
        x = encoder.encode(torch.stack([encoder.preprocess(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]))
        expected = [f"class{i}" for i in model(x).argmax(-1).tolist()]
    srv = Server(tmp_path / "model", env={"DKVB_SERVE_TOKEN": TOKEN})
    try:
        r = srv.client.post("/predict/images", files=[("files", ("a.png", pngs[0])), ("files", ("b.png", pngs[1]))])
        assert r.status_code == 200, r.text
        assert r.json()["classes"] == expected and r.json()["version"] == "000001"
        r = srv.client.post("/predict/images", files=[("files", ("a.png", pngs[0])), ("files", ("c.png", b"GIF8"))])
        assert r.status_code == 422 and r.json()["detail"].startswith("files[1]: not a readable image"), r.text
    finally:
        srv.stop()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("path,kwargs,status,message", [
    ("/predict", {"content": b'{"embeddings": [[1, 2', "headers": {"content-type": "application/json"}}, 422,
     "malformed JSON body"),
    ("/predict", {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 422, "must be a JSON object"),
    ("/predict", {"content": b"embeddings=1"}, 422, "malformed JSON body"),
    ("/predict", {"content": b""}, 422, "malformed JSON body"),
    ("/predict", {"json": {"embeddings": [[0.0] * 31]}}, 422, "embeddings[0]: must have 32 numbers"),
    ("/predict", {"json": {"embeddings": [[0.0] * 32, [0.0] * 33]}}, 422, "embeddings[1]: must have 32 numbers"),
    ("/predict", {"json": {"embeddings": []}}, 422, "embeddings: List should have at least 1 item"),
    ("/predict", {"json": {"embeddings": [["a"] * 32]}}, 422, "embeddings[0][0]: Input should be a valid number"),
    ("/predict", {"content": b'{"embeddings": [[NaN' + b", 0" * 31 + b"]]}",
                  "headers": {"content-type": "application/json"}}, 422, "embeddings[0][0]: must be a finite number"),
    ("/predict", {"content": b'{"embeddings": [[0' + b", 0" * 30 + b", Infinity]]}",
                  "headers": {"content-type": "application/json"}}, 422, "embeddings[0][31]: must be a finite"),
    ("/predict", {"json": {"embeddings": [[1e39] * 32]}}, 422, "within float32's range"),
    ("/predict", {"json": {"embeddings": [[0.0] * 32] * 65}}, 413, "at most 64 rows per request, got 65"),
    ("/predict", {"content": b"0" * 300_001, "headers": {"content-type": "application/json"}}, 413,
     "over the limit of 300000 bytes"),
    ("/predict", {"json": {"embeddings": [[0.0] * 32], "extra": 1}}, 422, "extra: Extra inputs are not permitted"),
    ("/predict", {"json": {"embeddings": [[0.0] * 32], "top_k": 0}}, 422, "top_k: Input should be greater than"),
    ("/predict/npy", {"files": {"file": ("x.npy", b"not numpy")}}, 422, "file: not a .npy array"),
    ("/predict/npy", {"files": {"file": ("x.npy", np.zeros((2, 3, 4)).tobytes())}}, 422, "file: not a .npy array"),
    ("/predict/images", {"files": {"files": ("x.png", b"\x89PNG")}}, 422, "records no encoder configuration"),
    ("/forget", {"json": {"classes": ["nope"]}}, 422, "unknown class name 'nope'"),
    ("/forget", {"json": {"classes": ["0"]}}, 422, "unknown class name '0'"),
    ("/forget", {"json": {"classes": [3]}}, 422, "classes[0]: Input should be a valid string"),
    ("/forget", {"json": {"classes": []}}, 422, "classes: List should have at least 1 item"),
    ("/forget", {"json": {"classes": ["class1"], "method": "retrain"}}, 422, "masking methods only"),
    ("/forget", {"json": {"classes": ["class1"], "params": {"nope": 1}}}, 422, "unknown parameter"),
    ("/forget", {"json": {"classes": ["class1"], "method": "examples"}}, 422, "reads training embeddings"),
    ("/forget", {"json": {"classes": ["class0", "class1", "class2", "class3", "class4"]}}, 422, "every class"),
    ("/restore", {"json": {"to": "req-999999"}}, 422, "unknown request id 'req-999999'"),
    ("/restore", {"json": {"to": "../../etc/passwd"}}, 422, "unknown request id"),
])
def test_bad_input_gets_one_clear_4xx(limited, path, kwargs, status, message):
    r = limited.client.post(path, headers=AUTH, **kwargs) if "headers" not in kwargs else limited.client.post(
        path, **{**kwargs, "headers": {**kwargs["headers"], **AUTH}})
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["detail"] and message in body["detail"], body
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"] and str(limited.store) not in body["detail"]


@pytest.fixture(scope="module")
def limited(stored, tmp_path_factory):
    """A server with small limits (64 rows, 300 kB bodies, 0.5 s lock wait), its token in the environment."""
    path = tmp_path_factory.mktemp("limited") / "model"
    shutil.copytree(stored, path)
    srv = Server(path, "--max-rows", "64", "--max-body-bytes", "300000", "--lock-wait", "0.5",
                 env={"DKVB_SERVE_TOKEN": TOKEN})
    yield srv
    srv.stop()


def test_bad_requests_change_nothing(limited):
    assert not (limited.store / "audit.jsonl").exists() or all(
        r["op"] == "origin" for r in read_log(limited.store))
    assert limited.client.get("/health").json()["status"] == "ok"


def test_a_write_waits_for_another_writer_then_answers_409(limited):
    from dkvb.store import writer_lock

    held = threading.Event()
    release = threading.Event()

    def hold(seconds: float) -> None:
        with writer_lock(limited.store):
            held.set()
            release.wait(seconds)

    holder = threading.Thread(target=hold, args=(5,))
    holder.start()
    held.wait(10)
    try:
        r = limited.client.post("/forget", json={"classes": ["class1"]}, headers=AUTH)
        assert r.status_code == 409 and "another writer holds the store lock" in r.json()["detail"], r.text
    finally:
        release.set()
        holder.join()
    held.clear()
    release.clear()
    holder = threading.Thread(target=hold, args=(0.2,))
    holder.start()
    held.wait(10)
    r = limited.client.post("/forget", json={"classes": ["class1"]}, headers=AUTH)  # waits 0.2 s, then writes
    holder.join()
    assert r.status_code == 200, r.text
    assert limited.client.post("/restore", json={"to": "origin"}, headers=AUTH).status_code == 200


def test_a_damaged_log_keeps_the_last_verified_version_served(limited):
    served = limited.client.get("/health").json()["version"]
    log = limited.store / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"op":"restore"', b'"op":"forget"'))
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = limited.client.get("/health")
            if r.status_code == 503:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["version"] == served
        assert "audit.jsonl" in r.json()["error"] and str(limited.store) not in r.json()["error"]
        assert limited.client.post("/predict", json={"embeddings": rows(1)}).json()["version"] == served
        assert "dkvb_store_error 1.0" in limited.client.get("/metrics").text
        r = limited.client.post("/forget", json={"classes": ["class1"]}, headers=AUTH)
        assert r.status_code == 503 and "fails verification" in r.json()["detail"], r.text
    finally:
        log.write_bytes(b"".join(lines))
    deadline = time.monotonic() + 5
    while limited.client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert limited.client.get("/health").json()["status"] == "ok"


# ------------------------------------------------------------------ other writers, crashes
def test_a_cli_forget_is_served_within_a_second(server, capsys):
    before = server.client.get("/health").json()["version"]
    assert main(["forget", "--model", str(server.store), "--classes", "class3"]) == 0
    logged = read_log(server.store)[-1]["version_after"]
    assert logged != before
    start, seen = time.monotonic(), None
    while time.monotonic() - start < 1.0:
        seen = server.client.post("/predict", json={"embeddings": rows(1)}).json()["version"]
        if seen == logged:
            break
        time.sleep(0.02)
    assert seen == logged, f"still serving {seen} a second after the CLI committed {logged}"
    assert server.client.post("/restore", json={"to": "origin"}, headers=AUTH).status_code == 200


def test_kill_9_during_forget_then_restart_serves_a_logged_version(stored, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(stored, path)
    env = {"DKVB_SERVE_TOKEN": TOKEN}
    rng = random.Random(0)
    srv = Server(path, env=env)
    try:
        for attempt in range(2):
            cls = f"class{attempt % 4}"
            sent = threading.Thread(target=_post_quietly, args=(srv.url + "/forget", {"classes": [cls]}), daemon=True)
            sent.start()
            time.sleep(rng.uniform(0.0, 0.15))
            srv.proc.kill()
            srv.proc.wait(timeout=20)
            srv.client.close()
            sent.join(timeout=30)
            srv = Server(path, env=env)
            logged = served_version(path)
            assert srv.client.get("/health").json()["version"] == logged
            verify = srv.client.get("/verify", headers=AUTH).json()
            assert verify["matches"] and verify["served_matches_log"], verify
            if (path / "audit.jsonl").exists():
                replay(path)
            # the next write after the crash succeeds and is served, and the store reads back clean
            r = srv.client.post("/forget", json={"classes": ["class4"]}, headers=AUTH)
            assert r.status_code == 200 and r.json()["version"] == served_version(path), r.text
            assert srv.client.get("/verify", headers=AUTH).json()["matches"]
            assert srv.client.post("/restore", json={"to": "origin"}, headers=AUTH).status_code == 200
    finally:
        srv.stop()


def _post_quietly(url: str, body: dict) -> None:
    try:
        httpx.post(url, json=body, headers=AUTH, timeout=30)
    except httpx.HTTPError:
        pass  # the server was killed mid-request


# ------------------------------------------------------------------ fuzzing from the schema
def test_fuzz_from_the_openapi_schema(stored, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    path = tmp_path / "model"
    shutil.copytree(stored, path)
    key = "audit-key-never-sent-0123456789"
    srv = Server(path, env={"DKVB_SERVE_TOKEN": TOKEN, "DKVB_AUDIT_KEY": key})
    try:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert len(operations) >= 8
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(base_url=srv.url, headers=AUTH, timeout=30)
                case.validate_response(response, checks=[not_a_server_error])
                assert response.status_code < 500 and "Traceback" not in response.text
                assert key not in response.text and str(path) not in response.text

            run()
        # whatever the fuzzer did, the store still takes a request and its log replays to the served model
        assert srv.client.post("/forget", json={"classes": ["class4"]}, headers=AUTH).status_code == 200
        assert srv.client.get("/verify", headers=AUTH).json()["matches"]
        records = srv.client.get("/log", headers=AUTH).json()["records"]
        assert len(records) >= 2 and key not in json.dumps(records)
        assert all(b'"mac":' in line for line in (path / "audit.jsonl").read_bytes().splitlines())  # signed
    finally:
        srv.stop()
    os.environ["DKVB_AUDIT_KEY"] = key  # the test process checks the signed log with the same key
    try:
        replay(path)
    finally:
        del os.environ["DKVB_AUDIT_KEY"]


# ------------------------------------------------------------------ the benchmark script
@pytest.mark.slow
def test_bench_serve_runs_end_to_end(tmp_path, tiny_config):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_serve.py"), str(tiny_config), "--workdir", str(tmp_path / "w"),
         "--out", str(out), "--phases", "json1", "--clients", "2", "--forgets", "3", "--forget-gap", "0.01",
         "--min-requests", "5", "--max-requests", "40", "--phase-seconds", "20", "--crashes", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["phases"]
    assert row["errors"] == 0 and row["forgets"] == 3 and row["requests"] >= 5
    assert row["unlogged_versions"] == row["stale_or_ahead_versions"] == 0 and row["replay_matches"]
    assert result["crashes"]["served_logged_version"] == result["crashes"]["rounds"] == 1
    assert "| json | 1 |" in proc.stdout
