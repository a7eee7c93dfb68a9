"""End to end through ``dkvb.cli.main``: ``run`` on the tiny config writes the report and resumes;
errors exit with code 2 and a message that names the culprit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dkvb.experiment
from dkvb.cli import main
from dkvb.evaluate import METRICS

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "tiny_synthetic.yaml"
RECORD_FIELDS = {"dataset", "encoder", "method", "forget_classes", "seed", "metrics", "flops", "seconds", "params"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("cli")
    return ["--set", f"cache_dir={root / 'cache'}", "--set", f"output_dir={root / 'out'}"]


@pytest.fixture(scope="module")
def run_dir(dirs) -> Path:
    assert main(["run", str(CONFIG), *dirs]) == 0
    return Path(dirs[-1].split("=", 1)[1]) / "tiny_synthetic"


def _records(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["records"]


def test_run_writes_results_table_and_plot(run_dir, capsys):
    records = _records(run_dir)
    requests = [["class0"], ["class2"]]
    labels = {"dkvb-activations", "dkvb-examples[num_examples=1]", "dkvb-examples[num_examples=10]", "retrain",
              "finetune"}
    for r in records:
        assert RECORD_FIELDS <= set(r), sorted(RECORD_FIELDS - set(r))
        assert set(r["metrics"]) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
        assert (r["dataset"], r["encoder"], r["seed"]) == ("synthetic", "effnet-lite0", 0)
        assert isinstance(r["flops"], int) and r["flops"] >= 0 and r["seconds"] >= 0
    for names in requests:
        mine = [r for r in records if r["forget_classes"] == names]
        assert {r["method"] for r in mine} == labels | {"original"}
        originals = [r for r in mine if r["method"] == "original"]
        assert {r["model"] for r in originals} == {"dkvb", "linear"}  # one per trained model and request
        assert all(r["flops"] == 0 for r in originals)
        act = next(r for r in mine if r["method"] == "dkvb-activations")
        assert act["model"] == "dkvb" and act["flops"] > 0
        assert act["metrics"]["forget_test_acc"] < next(o for o in originals if o["model"] == "dkvb")["metrics"][
            "forget_test_acc"]
    assert len(records) == len(requests) * (len(labels) + 2)

    table = (run_dir / "table.md").read_text()
    assert table.startswith("# tiny_synthetic") and "| dkvb-activations | dkvb |" in table and "| retrain |" in table
    assert (run_dir / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file()


def test_run_reports_where_the_time_went(run_dir):
    rows = json.loads((run_dir / "phases.json").read_text())["rows"]
    phases = {(r["phase"], r["label"].split("[")[0]) for r in rows}
    for phase in ("unlearn", "evaluate", "MIA", "relearning probe"):
        assert (phase, "retrain") in phases and (phase, "dkvb-activations") in phases
    assert ("train", "dkvb") in phases and ("k-means", "dkvb") in phases
    assert "| total (wall) |" in (run_dir / "phases.md").read_text()


def test_rerun_resumes_without_recomputing(run_dir, dirs, monkeypatch, capsys):
    before = _records(run_dir)

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} ran again on a resumed run")
        return fail

    monkeypatch.setattr(dkvb.experiment, "create_unlearner", forbidden("an unlearner"))
    monkeypatch.setattr(dkvb.experiment, "fit", forbidden("training"))
    monkeypatch.setattr("dkvb.encoders.Encoder.encode", forbidden("the encoder"))
    assert main(["run", str(CONFIG), *dirs]) == 0
    assert _records(run_dir) == before  # same timings too: nothing was redone
    assert "| dkvb-activations | dkvb |" in capsys.readouterr().out


def test_rerun_after_a_partial_run_computes_only_the_missing_results(run_dir, dirs, monkeypatch):
    data = json.loads((run_dir / "results.json").read_text())
    full = data["records"]
    data["records"] = full[:-3]  # as if interrupted before the last three results were saved
    (run_dir / "results.json").write_text(json.dumps(data))
    calls: list[str] = []
    real = dkvb.experiment.create_unlearner

    def counting(name, **params):
        calls.append(name)
        return real(name, **params)

    monkeypatch.setattr(dkvb.experiment, "create_unlearner", counting)
    assert main(["run", str(CONFIG), *dirs]) == 0
    assert calls == [r["method"].split("[")[0] for r in full[-3:]]
    after = _records(run_dir)
    assert after[:-3] == full[:-3] and len(after) == len(full)
    assert [(r["method"], r["forget_classes"]) for r in after] == [(r["method"], r["forget_classes"]) for r in full]


def test_evaluation_from_candidates_equals_a_fresh_search(run_dir):
    from dkvb.evaluate import predict_logits
    from dkvb.store import load_model
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model = load_model(run_dir / "models" / "dkvb")[0]
    x = torch.randn(64, model.input_dim)
    train = dkvb.EmbeddingSet(torch.randn(80, model.input_dim), torch.arange(80) % model.num_classes,
                              [f"class{i}" for i in range(model.num_classes)])
    cands = model.bottleneck.candidates(x)
    masked = create_unlearner("dkvb-examples", num_examples=5).unlearn(model, ForgetRequest((0,), train)).model
    assert torch.equal(masked.predict_from(x, cands), predict_logits(masked, x))


def test_train_evaluate_and_unlearn_commands(run_dir, dirs, capsys):
    assert main(["train", str(CONFIG), *dirs]) == 0
    assert "dkvb     test accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(CONFIG), *dirs]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["model"], tuple(r["forget_classes"])) for r in lines} >= {("dkvb", ("class0",)), ("linear", ("class2",))}
    assert main(["unlearn", str(CONFIG), *dirs, "--classes", "class1", "--method", "dkvb-activations"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dkvb-activations:") and "forget_test_acc" in out


def test_unlearn_unknown_class_exits_2_naming_it(run_dir, dirs, capsys):
    assert main(["unlearn", str(CONFIG), *dirs, "--classes", "zebra"]) == 2
    err = capsys.readouterr().err
    assert "zebra" in err and "unknown class name" in err and "class0" in err  # lists the known classes


def test_unknown_method_exits_2(dirs, capsys):
    assert main(["unlearn", str(CONFIG), *dirs, "--classes", "class1", "--method", "forget-harder"]) == 2
    assert "forget-harder" in capsys.readouterr().err


def test_unlearn_param_without_value_exits_2_naming_it(dirs, capsys):
    assert main(["unlearn", str(CONFIG), *dirs, "--classes", "class1", "--param", "num_keys"]) == 2
    assert "--param 'num_keys' must look like key=value" in capsys.readouterr().err


def test_missing_dataset_path_is_a_clear_error(tmp_path, dirs, capsys):
    missing = tmp_path / "no" / "such" / "folder"
    code = main(["embed", str(CONFIG), *dirs, "--set", f"dataset.name=imagefolder:{missing}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dkvb embed: error:") and str(missing) in err and "Traceback" not in err


def test_config_errors_exit_2(tmp_path, dirs, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "experiment config not found" in capsys.readouterr().err
    assert main(["run", str(CONFIG), *dirs, "--set", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "embed" in capsys.readouterr().out


def test_a_bad_job_count_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dkvb.experiment, "load_embeddings", lambda *a, **k: pytest.fail("work started"))
    assert main(["run", str(CONFIG), "--set", f"output_dir={tmp_path}", "--jobs", "0"]) == 2
    assert "--jobs must be a positive integer, got 0" in capsys.readouterr().err


def test_a_failing_method_is_recorded_and_the_run_goes_on(dirs, tmp_path):
    """A method that cannot apply (here: masking every key of a codebook) becomes an error record."""
    out = ["--set", f"output_dir={tmp_path}", "--set", "name=failing"]
    methods = '[{name: dkvb-examples, params: {num_examples: null, rounds: 1000}}, dkvb-activations]'
    assert main(["run", str(CONFIG), *dirs[:2], *out, "--set", f"methods={methods}"]) == 0
    records = _records(tmp_path / "failing")
    failed = [r for r in records if "error" in r]
    assert failed and all("every key masked" in r["error"] for r in failed)
    assert all(r["method"].startswith("dkvb-examples") for r in failed)
    assert any(r["method"] == "dkvb-activations" and "error" not in r for r in records)
    table = (tmp_path / "failing" / "table.md").read_text()
    assert "failed" in table and "## Failed runs" in table


def test_trained_models_record_the_full_encoder_setting_and_refuse_another(run_dir, dirs):
    from dkvb.embeddings_io import check_encoder
    from dkvb.store import read_manifest

    assert main(["train", str(CONFIG), *dirs]) == 0
    manifest = read_manifest(run_dir / "models" / "dkvb")
    setting = manifest["encoder_config"]
    assert setting["name"] == manifest["encoder"] and "image_size" in setting
    check_encoder(dict(setting), manifest, "same")  # the setting that made the cache passes
    with pytest.raises(ValueError, match="another encoder setting"):
        check_encoder({**setting, "image_size": setting["image_size"] + 32}, manifest, "other")


def test_parallel_workers_of_a_multithreaded_parent_finish(tmp_path, run_dir):
    """``dkvb run --jobs 2`` with 4 torch threads in the parent. Forked workers run on one thread
    each: with more, GNU OpenMP (which does not survive a fork) hangs in their first parallel op."""
    dirs = ["--set", f"cache_dir={run_dir.parent.parent / 'cache'}", "--set", f"output_dir={tmp_path}"]
    env = {**os.environ, "DKVB_THREADS": "4"}
    done = subprocess.run([sys.executable, "-m", "dkvb", "run", str(CONFIG), *dirs, "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(_records(tmp_path / "tiny_synthetic")) == len(_records(run_dir))


def test_requests_in_parallel_workers_give_the_same_records(tmp_path, run_dir):
    """``--jobs 2`` forks two workers for the two requests; every record is the same as the
    one-process run's (timings aside), in the same order."""
    dirs = ["--set", f"cache_dir={run_dir.parent.parent / 'cache'}", "--set", f"output_dir={tmp_path}"]
    assert main(["run", str(CONFIG), *dirs, "--jobs", "2"]) == 0
    def strip(value):  # timings (a record's and its model's training seconds) differ run to run
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("seconds")}
        return [strip(v) for v in value] if isinstance(value, list) else value

    parallel, serial = _records(tmp_path / "tiny_synthetic"), _records(run_dir)
    assert strip(parallel) == strip(serial)
    phases = json.loads((tmp_path / "tiny_synthetic" / "phases.json").read_text())["rows"]
    assert {r["phase"] for r in phases} >= {"unlearn", "evaluate", "MIA", "total (wall)"}


def test_run_scores_forgetting_quality_when_the_config_asks(run_dir, dirs, capsys):
    """The config's forgetting section runs the competition's F after the comparison (resuming the run)."""
    section = "forgetting={num_models: 4, requests: 1, methods: [dkvb-activations, drop-output]}"
    assert main(["run", str(CONFIG), *dirs, "--set", section]) == 0
    out = capsys.readouterr().out
    assert "Forgetting quality against retraining" in out and "drop-output" in out
    result = json.loads((run_dir / "forgetting" / "forgetting.json").read_text())
    assert result["num_models"] == 4 and set(result["mean"]) == {"original (dkvb)", "original (linear)",
                                                                  "dkvb-activations", "drop-output"}


def test_a_key_pool_of_the_training_dataset_is_drawn_from_the_rows_outside_the_subset(tiny_config):
    """A pool of the training dataset itself (allowed when the training set is a subset) holds only
    rows of the training split that the subset leaves out: no training image, no forget request's."""
    from dkvb.cache import subset_indices
    from dkvb.config import load_config
    from dkvb.experiment import load_embeddings, load_key_pool

    full, _ = load_embeddings(load_config(tiny_config), progress=False)
    cfg = load_config(tiny_config, ["dataset.train_limit=150", "key_pool.name=synthetic", "key_pool.train_limit=60"])
    train, _ = load_embeddings(cfg, progress=False)
    pool = load_key_pool(cfg, progress=False)
    assert len(train) == 150 and len(pool) == 60
    inside = set(subset_indices(len(full), 150, cfg.seed).tolist())
    rows = [i for i in range(len(full)) if any(torch.allclose(full.x[i], p, atol=1e-5) for p in pool.x)]
    assert len(rows) == 60 and not inside & set(rows)
    assert torch.equal(load_key_pool(cfg, progress=False).x, pool.x)  # seeded: the same rows every time
    everything = load_key_pool(load_config(tiny_config, ["dataset.train_limit=150", "key_pool.name=synthetic"]),
                               progress=False)
    assert len(everything) == len(full) - 150
    with pytest.raises(ValueError, match=f"takes all {len(full)} training rows, so none is left for the key pool"):
        load_key_pool(load_config(tiny_config, [f"dataset.train_limit={len(full)}", "key_pool.name=synthetic"]),
                      progress=False)


def test_a_stored_model_is_reused_only_for_the_rows_it_was_trained_on(tiny_config):
    """The same config trained on other rows (a subset, say) is retrained, not loaded from the run folder."""
    from dkvb.config import load_config
    from dkvb.experiment import load_embeddings, train_models

    cfg = load_config(tiny_config)
    train, _ = load_embeddings(cfg, progress=False)
    whole = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"][0]
    b = whole.bottleneck
    assert int(whole.activation_counts.sum()) == len(train) * b.num_codebooks * b.topk
    part = train.subset(torch.arange(len(train)) >= 20)
    retrained = train_models(cfg, part, kinds={"dkvb"}, progress=False)["dkvb"][0]
    assert int(retrained.activation_counts.sum()) == len(part) * b.num_codebooks * b.topk
    loaded = train_models(cfg, part, kinds={"dkvb"}, progress=False)["dkvb"][0]
    assert torch.equal(loaded.bottleneck.values, retrained.bottleneck.values)


def test_a_key_pool_is_what_the_keys_are_fitted_on(tiny_config):
    """``key_pool``: the DKVB's keys come from k-means on the pool's embeddings (same encoder), not the
    training set's; the stored model is retrained when the pool changes."""
    from dkvb.config import load_config
    from dkvb.experiment import load_embeddings, load_key_pool, train_models
    from dkvb.models import build_model, resolve_config

    cfg = load_config(tiny_config, ["key_pool.name=sklearn-digits", "key_pool.train_limit=200"])
    train, _ = load_embeddings(cfg, progress=False)
    pool = load_key_pool(cfg, progress=False)
    assert len(pool) == 200 and pool.dim == train.dim
    model = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"][0]
    expected = build_model(resolve_config(cfg.model, len(train)), train.dim, train.num_classes, seed=cfg.seed)
    expected.prepare(pool.x, pool.y)
    assert torch.equal(model.bottleneck.keys, expected.bottleneck.keys)
    own = train_models(load_config(tiny_config), train, kinds={"dkvb"}, progress=False)["dkvb"][0]
    assert not torch.equal(own.bottleneck.keys, model.bottleneck.keys)
