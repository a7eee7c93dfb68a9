"""Benchmark scripts run end to end on tiny inputs (the sequential-forgetting one: tests/test_service.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_share_sweep_masks_fewer_keys_the_stricter_the_rule(tmp_path, tiny_config):
    out = tmp_path / "bench"
    proc = _run("share_sweep.py", str(tiny_config), "--factors", "1", "2", "4", "--classes", "class0,class1", "--out", str(out),
                "--threads", "1")
    result = json.loads((out / "share_sweep_tiny.json").read_text())
    rows = result["rows"]
    assert [r["factor"] for r in rows] == [1, 2, 4] and len(result["classes"]) == 2
    assert [r["min_share"] for r in rows] == [0.25, 0.5, 1.0]  # 4 classes
    masked = [r["keys_masked_pct"] for r in rows]
    assert masked[0] >= masked[1] >= masked[2] and masked[0] > 0
    for r in rows:
        assert 0 <= r["forget_test_mean"] <= r["forget_test_max"] <= 100
    assert "factor 1.00" in proc.stdout


@pytest.mark.slow
def test_sequence_capacity_masks_more_keys_at_every_step(tmp_path, tiny_config):
    out = tmp_path / "capacity.json"
    proc = _run("sequence_capacity.py", str(tiny_config), "--setting",
                '{"num_codebooks": 16, "whiten_dim": 32, "epochs": 2}', "--rules", '[{}, {"min_share": 0.9}]',
                "--steps", "3", "--out", str(out), "--val-fraction", "0.25")
    runs = json.loads(out.read_text())["runs"]
    assert [r["rule"] for r in runs] == [{}, {"min_share": 0.9}] and "validation" in proc.stdout
    for run in runs:
        steps = [s for s in run["steps"] if "refused" not in s]
        assert 1 <= len(run["steps"]) <= 3 and [s["step"] for s in run["steps"]] == list(range(1, len(run["steps"]) + 1))
        masked = [s["keys_masked"] for s in steps]
        assert masked == sorted(masked) and all(0 < m < 1 for m in masked)
        assert all(s["min_free_keys"] >= 1 and 0 <= s["forget_val_worst"] <= 1 for s in steps)
    # the stricter rule (a key must be 90% the forget class's) masks fewer keys
    assert runs[1]["steps"][0]["keys_masked"] < runs[0]["steps"][0]["keys_masked"]


@pytest.mark.slow
def test_sequence_capacity_release_keys_masks_nothing_and_retrain_gives_the_reference(tmp_path, tiny_config):
    out = tmp_path / "capacity.json"
    _run("sequence_capacity.py", str(tiny_config), "--setting", '{"num_codebooks": 16, "whiten_dim": 32, "epochs": 2}',
         "--rules", '[{"refit_epochs": 1, "release_keys": true}]', "--steps", "3", "--out", str(out),
         "--val-fraction", "0.25", "--retrain")
    steps = json.loads(out.read_text())["runs"][0]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]  # never refused: nothing stays masked
    assert all(s["keys_masked"] == 0 and 0 <= s["forget_val_worst"] <= 1 for s in steps)
    assert all(0 < s["retain_val_retrain"] <= 1 for s in steps)


@pytest.mark.slow
def test_bench_lookup_agrees_across_backends(tmp_path):
    _run("bench_lookup.py", "--shapes", "64x256", "--embeddings", "256", "--repeats", "1", "--threads", "1",
         "--methods", "dkvb-torch", "dkvb-faiss", "torch-cdist", "matmul", "--out", str(tmp_path / "lookup.json"))
    runs = json.loads((tmp_path / "lookup.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"dkvb-torch", "dkvb-faiss", "torch-cdist", "matmul"}
    for r in runs:  # every backend finds the same nearest keys, at a positive measured rate
        assert r["embeddings_per_s"] > 0 and r["gflops_per_s"] > 0
        assert r["agreement"] == (None if r["method"] == "matmul" else 1.0)
    assert next(r for r in runs if r["method"] == "matmul")["time_over_matmul"] == 1.0


@pytest.mark.slow
def test_bench_service_counts_refusals_and_replays(tmp_path):
    # 8 x 16 keys for 100 classes: some requests would mask a whole codebook and must be refused
    _run("bench_service.py", "--requests", "30", "--per-class", "10", "--dim", "32", "--codebooks", "8",
         "--codebook-size", "16", "--epochs", "1", "--out", str(tmp_path))
    r = json.loads((tmp_path / "service_30.json").read_text())
    assert sum(r["counts"].values()) == 30
    assert r["log_records"] == 30 - r["counts"]["refused"] + 1  # + the origin record
    assert r["replay_matches_head"]


@pytest.mark.slow
def test_bench_embedding_reports_the_full_path_against_the_forward_pass(tmp_path):
    _run("bench_embedding.py", "--dataset", "synthetic", "--encoder", "torchvision:resnet18", "--random-weights",
         "--image-size", "32", "--images", "32", "--batch-size", "16", "--repeats", "1", "--threads", "1",
         "--out", str(tmp_path / "embedding.json"))
    (run,) = json.loads((tmp_path / "embedding.json").read_text())["runs"]
    assert run["images"] == 32 and run["forward_images_per_s"] > 0 and run["full_images_per_s"] > 0
    # the full path (dataset, decode, preprocess, forward, cache write) includes the forward pass
    assert run["median_ratio"] == pytest.approx(run["forward_images_per_s"] / run["full_images_per_s"], rel=0.5)


@pytest.mark.slow
def test_bench_train_reports_epoch_cost_against_the_linear_head(tmp_path):
    out = tmp_path / "train.json"
    proc = _run("bench_train.py", "--shapes", "64x256", "--embeddings", "1024", "--epochs", "1", "--reference",
                "--out", str(out))
    (row,) = json.loads(out.read_text())["runs"]
    assert row["dkvb_s_per_epoch"] >= 0 and row["linear_s_per_epoch"] > 0 and row["dkvb_lookup_s"] > 0
    assert row["ratio_dkvb_to_linear"] == row["dkvb_s_per_epoch"] / row["linear_s_per_epoch"]
    assert 0 <= row["reference_acc"] <= 1 and "| 64x256 |" in proc.stdout


@pytest.mark.slow
def test_dkvb_sweep_chooses_on_a_validation_split_and_summarises(tmp_path, tiny_config):
    out = tmp_path / "sweep.json"
    _run("dkvb_sweep.py", str(tiny_config), "--out", str(out), "--probe-grid", "0.1,1",
         "--base", '{"num_codebooks": 8, "codebook_size": "auto", "key_dim": 4, "epochs": 2, "lr": 0.01}',
         "--grid", '[{}, {"projection": "random"}]', "--rules", '[{}, {"rule": "paper", "num_keys": 2}]',
         "--input-probe")
    entry = json.loads(out.read_text())["datasets"]["tiny"]
    assert 0 < entry["val"] < entry["train"] / 5  # about 10% of each class
    assert entry["probe"]["C"] in (0.1, 1.0) and 0 <= entry["probe"]["test_acc"] <= 1
    assert len(entry["runs"]) == 2 and all(len(r["rules"]) == 2 for r in entry["runs"])
    assert entry["runs"][0]["codebook_size"] == 16  # auto: 232 examples -> the floor of 16 keys
    # a random projection's codebooks read the embeddings themselves: its input probe is the probe
    assert entry["runs"][1]["input_probe_val_acc"] == entry["probe"]["val_acc"]
    assert 0 < entry["runs"][0]["input_probe_val_acc"] <= 1
    summary = _run("dkvb_sweep.py", "--summary", str(out)).stdout
    assert "### tiny" in summary and summary.count("| `{") == 4


def test_dkvb_sweep_reuses_saved_models_for_new_rules(tmp_path, tiny_config):
    out, models = tmp_path / "sweep.json", tmp_path / "models"
    args = ["dkvb_sweep.py", str(tiny_config), "--out", str(out), "--no-probe", "--models", str(models),
            "--base", '{"num_codebooks": 8, "codebook_size": "auto", "key_dim": 4, "epochs": 2, "lr": 0.01, '
                      '"value_init": "probe"}']
    _run(*args, "--rules", '[{}]')
    _run(*args, "--rules", '[{"min_share": 0.5}]')
    first, second = json.loads(out.read_text())["datasets"]["tiny"]["runs"]
    assert len(list(models.iterdir())) == 1  # trained once, loaded the second time
    assert first["val_acc"] == second["val_acc"] and first["train_seconds"] == second["train_seconds"]
    assert first["probe_c"] == second["probe_c"] and "probe_holdout_acc" in second  # saved with the model
    assert second["rules"][0]["rule"] == {"min_share": 0.5}


def test_dkvb_sweep_fits_keys_on_a_key_pool_the_values_never_train_on(tmp_path, tiny_config):
    out = tmp_path / "sweep.json"
    _run("dkvb_sweep.py", str(tiny_config), "--out", str(out), "--no-probe",
         "--base", '{"num_codebooks": 8, "codebook_size": 16, "key_dim": 4, "epochs": 0, "value_init": "counts"}',
         "--grid", '[{}, {"key_pool": {"holdout": 100}}, {"key_pool": {"name": "sklearn-digits", "train_limit": 64}}]')
    entry = json.loads(out.read_text())["datasets"]["tiny"]
    own, held, other = entry["runs"]
    fit_rows = entry["train"] - entry["val"]
    assert "key_rows" not in own
    assert (held["key_rows"], held["value_rows"]) == (100, fit_rows - 100)  # carved out of the training part
    assert (other["key_rows"], other["value_rows"]) == (64, fit_rows)  # another set's images
    assert held["setting"]["key_pool"] == {"holdout": 100} and all(0 <= r["val_acc"] <= 1 for r in entry["runs"])


def test_dkvb_sweep_pools_the_training_dataset_only_outside_its_subset(tmp_path, tiny_config):
    """A pool naming the training dataset follows the experiment's rule: allowed when the config's
    training set is a subset (the pool is the rows outside it), refused otherwise."""
    grid = '[{"key_pool": {"name": "synthetic", "train_limit": 40}}]'
    base = '{"num_codebooks": 8, "codebook_size": 16, "key_dim": 4, "epochs": 0, "value_init": "counts"}'
    out = tmp_path / "sweep.json"
    _run("dkvb_sweep.py", str(tiny_config), "--set", "dataset.train_limit=150", "--out", str(out), "--no-probe",
         "--base", base, "--grid", grid)
    (run,) = json.loads(out.read_text())["datasets"]["tiny"]["runs"]
    assert run["key_rows"] == 40
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dkvb_sweep.py"), str(tiny_config),
                              "--out", str(tmp_path / "refused.json"), "--no-probe", "--base", base, "--grid", grid],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "key_pool.name" in refused.stderr and "dataset.train_limit" in refused.stderr


def test_bench_request_times_one_cached_count_request_per_class(tmp_path, tiny_config):
    out = tmp_path / "latency.json"
    proc = _run("bench_request.py", str(tiny_config), "--rounds", "2", "--out", str(out))
    row = json.loads(out.read_text())["runs"][0]
    assert row["requests"] == 2 * row["classes"] and 0 < row["median_ms"] <= row["p90_ms"] <= row["max_ms"]
    assert row["first_request_ms"] > 0  # the cold start, apart from the timed requests
    assert row["flops"] and all(f > 0 for f in row["flops"])
    assert "| tiny |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["commit"] and result["date"] and "--rounds" in result["argv"]


def test_bench_request_recounts_a_count_valued_model(tmp_path, tiny_config):
    out = tmp_path / "latency.json"
    _run("bench_request.py", str(tiny_config), "--rounds", "1", "--set", "train.value_init=counts",
         "--set", "train.epochs=0", "--set", "name=tiny_counts", "--out", str(out))
    row = json.loads(out.read_text())["runs"][0]
    assert row["config"] == "tiny_counts" and row["requests"] == row["classes"]
    # the recount's operations on top of the mask's (the same share rule on the same counts)
    assert all(f > 6 * row["codebooks"] * row["keys"] * row["classes"] for f in row["flops"])


def test_bench_request_times_the_ridge_solve_with_and_without_the_mask(tmp_path, tiny_config):
    out = tmp_path / "latency.json"
    proc = _run("bench_request.py", str(tiny_config), "--rounds", "1", "--set", "train.value_init=ridge",
                "--set", "train.epochs=0", "--params", "{}", "--params", '{"mask_keys": false}', "--out", str(out))
    both, alone = json.loads(out.read_text())["runs"]
    assert both["params"] == {} and alone["params"] == {"mask_keys": False}
    assert all(r["requests"] == r["classes"] and r["median_ms"] > 0 for r in (both, alone))
    assert all(r["second_request_median_ms"] > 0 for r in (both, alone))  # a sequence's next step solves
    assert '| tiny | {"mask_keys": false} |' in proc.stdout


def _forgetting_json(path: Path, before: float, f_train: float, f_test: float) -> Path:
    row = {"F_at_ceiling_n": f_train, "ceiling": 0.3, "F_test_at_ceiling_n": f_test, "ceiling_test": 0.25}
    path.write_text(json.dumps({"num_models": 12, "commit": "abc1234", "mean": {
        "original (dkvb)": {**row, "F_at_ceiling_n": 0.0, "F_test_at_ceiling_n": 0.0, "retain_test_acc": before},
        "dkvb-activations": row, "dkvb-drop-output": {**row, "F_at_ceiling_n": 0.0, "F_test_at_ceiling_n": 0.0}}}))
    return path


def test_forgetting_frontier_plots_each_request_as_a_share_of_its_ceiling(tmp_path):
    a = _forgetting_json(tmp_path / "a.json", 0.9, 0.15, 0.2)
    b = _forgetting_json(tmp_path / "b.json", 0.8, 0.3, 0.25)
    out = tmp_path / "fig" / "frontier.png"
    proc = _run("forgetting_frontier.py", f"set A|trained={a}", f"set A|counts={b}", "--out", str(out))
    assert out.stat().st_size > 0
    points = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [(p["model"], p["request"]) for p in points] == [("trained", "default request"), ("trained", "output deleted"),
                                                            ("counts", "default request"), ("counts", "output deleted")]
    assert points[0]["share_train"] == pytest.approx(0.5) and points[0]["share_test"] == pytest.approx(0.8)
    assert points[2]["retain_test_before"] == pytest.approx(80.0) and points[2]["share_train"] == pytest.approx(1.0)
    assert "| set A | counts | default request | 80.00 | 0.300 (100%) | 0.250 (100%) |" in proc.stdout


def test_forgetting_frontier_refuses_an_unnamed_source(tmp_path):
    a = _forgetting_json(tmp_path / "a.json", 0.9, 0.15, 0.2)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forgetting_frontier.py"), str(a), "--out",
                           str(tmp_path / "f.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "SET|MODEL=PATH" in proc.stderr
