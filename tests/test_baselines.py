"""The baselines on a linear head: reports, forgetting, FLOPs, validation, divergence, determinism."""
import copy
import json
import math

import pytest
import torch

from dkvb import EmbeddingSet, ForgetRequest, create_unlearner, evaluate
from dkvb.experiment import _json_safe
from dkvb.flops import FlopCounter
from dkvb.train import DivergenceError
from dkvb.unlearn import UNLEARNERS
from dkvb.unlearn.ssd import ssd_importances

GRADIENT = ["scrub", "finetune", "neggrad", "rbm", "salun", "potion"]
LINEAR_METHODS = ["retrain", *GRADIENT, "ssd"]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def request1(clusters):
    return ForgetRequest((1,), clusters[0])


def test_every_baseline_is_registered():
    assert set(LINEAR_METHODS) | {"sharded"} <= set(UNLEARNERS)


@pytest.mark.parametrize("name", LINEAR_METHODS)
def test_method_returns_a_proper_report_and_leaves_the_input_alone(trained_linear, request1, name):
    before = state(trained_linear)
    report = create_unlearner(name).unlearn(trained_linear, request1)
    assert report.method == name and report.model is not trained_linear
    assert report.params == create_unlearner(name).params and report.params  # hyperparameters recorded
    assert isinstance(report.flops, int) and report.flops > 0
    assert report.seconds >= 0 and not report.model.training
    assert all(torch.isfinite(p).all() for p in report.model.parameters())
    assert same_state(state(trained_linear), before)
    json.dumps(_json_safe(report.details))  # what the experiment writes to results.json


def test_retrain_forgets_and_retains(clusters, trained_linear, request1):
    train, test = clusters
    report = create_unlearner("retrain").unlearn(trained_linear, request1)
    m = evaluate(report.model, train, test, [1])
    assert m["forget_train_acc"] == 0 and m["forget_test_acc"] == 0
    assert m["retain_train_acc"] >= 0.98 and m["retain_test_acc"] >= 0.98
    # exact: the same as training the seed's fresh model on the retain set
    again = create_unlearner("retrain").unlearn(trained_linear, ForgetRequest((1,), train))
    assert same_state(state(report.model), state(again.model))


@pytest.mark.parametrize("classes", [(1,), (2, 4)])
def test_scrub_forgets_and_retains_with_a_large_enough_lr(clusters, trained_linear, classes):
    # the repository's lr 5e-4 does not move a linear head on these clusters; 0.5 does
    train, test = clusters
    request = ForgetRequest(classes, train)
    m = evaluate(create_unlearner("scrub", lr=0.5).unlearn(trained_linear, request).model, train, test, classes)
    assert m["forget_train_acc"] <= 0.02 and m["forget_test_acc"] <= 0.02
    assert m["retain_train_acc"] >= 0.97 and m["retain_test_acc"] >= 0.97
    repository = create_unlearner("scrub", lr=5e-4).unlearn(trained_linear, request).model
    assert evaluate(repository, train, test, classes)["forget_test_acc"] >= 0.9  # the repository's lr does not forget


def test_salun_forgets_and_masks_half_the_weights(clusters, trained_linear, request1):
    train, test = clusters
    report = create_unlearner("salun").unlearn(trained_linear, request1)
    m = evaluate(report.model, train, test, [1])
    assert m["forget_test_acc"] <= 0.05 and m["retain_test_acc"] >= 0.97
    mask = report.details["mask"]
    assert report.details["weights_updated"] == round(0.5 * report.details["weights_total"])
    for p_new, p_old, keep in zip(report.model.trainable_parameters(), trained_linear.trainable_parameters(), mask):
        assert torch.equal(p_new[~keep], p_old[~keep])  # unmasked weights untouched, weight decay included


def test_rbm_zeroes_the_weights_the_retain_set_needs_least(trained_linear, request1):
    report = create_unlearner("rbm", sparsity=0.3).unlearn(trained_linear, request1)
    mask = report.details["mask"]
    assert report.details["weights_updated"] == round(0.7 * 165)
    for p, keep in zip(report.model.trainable_parameters(), mask):
        assert (p[~keep] == 0).all()


@pytest.mark.parametrize("alpha, lam", [(10.0, 1.0), (30.0, 0.5)])
def test_ssd_dampens_exactly_the_weights_whose_forget_importance_dominates(clusters, trained_linear, alpha, lam):
    request = ForgetRequest((0,), clusters[0])  # (class 1's forget gradients are too small for any selection)
    report = create_unlearner("ssd", alpha=alpha, dampening=lam).unlearn(trained_linear, request)
    imp_f, imp_d = ssd_importances(copy.deepcopy(trained_linear), request, batch_size=256, flops=FlopCounter())
    changed_any = 0
    for p_new, p_old, f, d, sel in zip(report.model.trainable_parameters(), trained_linear.trainable_parameters(),
                                       imp_f, imp_d, report.details["mask"]):
        assert torch.equal(sel, f > alpha * d)
        assert torch.equal(p_new[~sel], p_old[~sel])
        torch.testing.assert_close(p_new[sel], p_old[sel] * (lam * d[sel] / f[sel]).clamp(max=1))
        changed_any += int((p_new != p_old).sum())
    assert 0 < changed_any <= report.details["weights_dampened"]
    # FLOPs: forward + backward over the forget set and the full training set, plus 3 per weight
    assert report.flops == 3 * 32 * 5 * (400 + 2000) + 3 * 165


def test_flops_count_every_step_and_scale_with_epochs(trained_linear, request1):
    def flops(name, epochs, **kw):
        return create_unlearner(name, epochs=epochs, **kw).unlearn(trained_linear, request1).flops

    per_example_step = 3 * 32 * 5  # linear 32 -> 5: forward D*C multiply-adds, backward twice that
    one = flops("finetune", 1)
    assert one == len(request1.retain) * per_example_step
    assert flops("finetune", 2) == 2 * one
    for name in ("neggrad", "retrain"):
        assert flops(name, 2) == 2 * flops(name, 1), name
    assert flops("scrub", 2, msteps=2) == 2 * flops("scrub", 1, msteps=1)
    for name in ("salun", "rbm"):  # a fixed saliency pass plus steps that scale
        f1, f2, f3 = flops(name, 1), flops(name, 2), flops(name, 3)
        assert f3 - f1 == 2 * (f2 - f1) > 0 and f1 < f2 < 2 * f1, name


def test_scrub_counts_teacher_forwards_and_max_steps(trained_linear, request1):
    report = create_unlearner("scrub", epochs=1, msteps=1).unlearn(trained_linear, request1)
    n = len(request1.train)  # one max pass over forget + one min pass over retain
    assert report.details == {"max_steps": 1, "min_steps": math.ceil(len(request1.retain) / 256)}
    assert report.flops == n * (3 + 1) * 32 * 5


def test_bad_requests_raise(clusters):
    train, _ = clusters
    with pytest.raises(ValueError, match="every class"):
        ForgetRequest(tuple(range(5)), train)
    sparse = train.subset(train.y != 3)
    with pytest.raises(ValueError, match="no training examples"):
        ForgetRequest((3,), sparse)
    with pytest.raises(ValueError, match="unknown class"):
        ForgetRequest((7,), train)


@pytest.mark.parametrize("name, params, field", [
    ("retrain", {"lr": 0}, "lr"), ("retrain", {"epochs": 0}, "epochs"), ("retrain", {"batch_size": 2.5}, "batch_size"),
    ("finetune", {"lr": float("nan")}, "lr"), ("finetune", {"momentum": 1.0}, "momentum"),
    ("finetune", {"optimizer": "lbfgs"}, "optimizer"), ("finetune", {"epochs": 1.5}, "epochs"),
    ("scrub", {"msteps": 4}, "msteps"), ("scrub", {"temperature": 0}, "temperature"),
    ("scrub", {"alpha": -1}, "alpha"), ("neggrad", {"alpha": 0}, "alpha"), ("neggrad", {"alpha": 1.5}, "alpha"),
    ("rbm", {"sparsity": 1.0}, "sparsity"), ("salun", {"sparsity": -0.1}, "sparsity"),
    ("ssd", {"alpha": 0}, "alpha"), ("ssd", {"dampening": -1}, "dampening"), ("ssd", {"batch_size": 0}, "batch_size"),
    ("potion", {"rho": 1.0}, "rho"), ("potion", {"step": 1.0}, "step"), ("potion", {"max_tries": 0}, "max_tries"),
    ("potion", {"share": 0.0}, "share"), ("potion", {"epochs": 0}, "epochs"),
    ("dkvb-activations", {"num_keys": 0}, "num_keys"), ("dkvb-activations", {"min_count": 0}, "min_count"),
    ("dkvb-examples", {"num_examples": 0}, "num_examples"), ("dkvb-examples", {"rounds": 0}, "rounds"),
])
def test_out_of_range_hyperparameters_raise(name, params, field):
    with pytest.raises(ValueError, match=f"^{name}: {field} must be .*, got "):
        create_unlearner(name, **params)


def test_unknown_hyperparameter_raises():
    with pytest.raises(ValueError, match="unknown parameter"):
        create_unlearner("scrub", learning_rate=0.1)


def test_wrong_embedding_size_raises(trained_linear):
    other = EmbeddingSet(torch.randn(20, 16), torch.arange(20) % 5, [f"class{i}" for i in range(5)])
    with pytest.raises(ValueError, match="embedding size"):
        create_unlearner("finetune").unlearn(trained_linear, ForgetRequest((0,), other))


@pytest.mark.parametrize("name", GRADIENT)
def test_divergence_raises_and_leaves_the_model_unchanged(trained_linear, request1, name):
    before = state(trained_linear)
    with pytest.raises(DivergenceError, match=rf"^{name}: .* step \d+"):
        create_unlearner(name, lr=1e30).unlearn(trained_linear, request1)
    assert same_state(state(trained_linear), before)


def test_retrain_divergence_raises(trained_linear, request1):
    from dkvb.unlearn import UNLEARNERS

    with pytest.raises(ValueError, match=r"^retrain: lr must be a finite number, got inf$"):
        create_unlearner("retrain", lr=float("inf"))  # refused up front from a config or --param
    before = state(trained_linear)
    with pytest.raises(DivergenceError, match="^retrain"):  # built directly, it diverges and says so
        UNLEARNERS["retrain"](lr=float("inf")).unlearn(trained_linear, request1)
    assert same_state(state(trained_linear), before)


@pytest.mark.parametrize("name", ["ssd", "rbm", "salun", "potion"])
def test_nan_model_raises_in_the_saliency_pass(trained_linear, request1, name):
    broken = copy.deepcopy(trained_linear)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    before = state(broken)
    with pytest.raises(DivergenceError, match=rf"^{name}: saliency loss became nan at step 0"):
        create_unlearner(name).unlearn(broken, request1)
    after = state(broken)
    assert all(torch.equal(after[k].nan_to_num(7.0), before[k].nan_to_num(7.0)) for k in before)


@pytest.mark.parametrize("name", LINEAR_METHODS)
def test_same_seed_same_result(clusters, trained_linear, name):
    train, _ = clusters
    params = {} if name == "ssd" else {"epochs": 1, "msteps": 1} if name == "scrub" else {"epochs": 1}
    a = create_unlearner(name, **params).unlearn(trained_linear, ForgetRequest((2,), train, seed=3))
    b = create_unlearner(name, **params).unlearn(trained_linear, ForgetRequest((2,), train, seed=3))
    assert same_state(state(a.model), state(b.model)) and a.flops == b.flops


def test_another_seed_shuffles_differently(clusters, trained_linear):
    train, _ = clusters
    a = create_unlearner("finetune", epochs=1).unlearn(trained_linear, ForgetRequest((2,), train, seed=0))
    b = create_unlearner("finetune", epochs=1).unlearn(trained_linear, ForgetRequest((2,), train, seed=1))
    assert not same_state(state(a.model), state(b.model))


@pytest.mark.parametrize("name", ["finetune", "retrain"])
def test_baselines_also_act_on_a_dkvb_model(clusters, trained_dkvb, name):
    train, _ = clusters
    before = state(trained_dkvb)
    report = create_unlearner(name, epochs=1).unlearn(trained_dkvb, ForgetRequest((0,), train))
    assert report.flops > 0 and torch.equal(report.model.bottleneck.keys, trained_dkvb.bottleneck.keys)
    now = state(trained_dkvb)
    assert all(torch.equal(now[k], before[k]) for k in before if k != "activation_counts")


def test_scrub_runs_max_steps_only_in_the_first_msteps_epochs(clusters, trained_linear, request1, monkeypatch):
    from dkvb.unlearn import scrub

    phases = []
    real = scrub.distill_kl

    # tag every KL term by the set its batch came from: one forget batch of 400, retain batches of <= 256
    def tag(student_logits, teacher_logits, temperature):
        phases.append("forget" if len(student_logits) == len(request1.forget) else "retain")
        return real(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(scrub, "distill_kl", tag)
    report = create_unlearner("scrub", epochs=3, msteps=2, forget_batch_size=400).unlearn(trained_linear, request1)
    per_pass = math.ceil(len(request1.retain) / 256)
    expected = (["forget"] + ["retain"] * per_pass) * 2 + ["retain"] * per_pass
    assert phases == expected
    assert report.details == {"max_steps": 2, "min_steps": 3 * per_pass}


def load_tune_scrub():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tune_scrub.py"
    spec = importlib.util.spec_from_file_location("tune_scrub", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_holdout_validation_split_is_stratified_and_disjoint_from_the_fit_set(clusters):
    train, _ = clusters
    fit_set, val = train.holdout(0.1, seed=0)
    assert len(fit_set) + len(val) == len(train)
    assert torch.equal(torch.bincount(val.y), torch.full((5,), 40))
    rows = {tuple(r.tolist()) for r in fit_set.x}
    assert not any(tuple(r.tolist()) in rows for r in val.x)


def test_scrub_choice_keeps_the_best_retain_among_candidates_that_forget():
    tune = load_tune_scrub()
    results = [{"params": {"lr": lr}, "val": {"forget": f, "retain": r, "flops": fl}}
               for lr, f, r, fl in [(1, 0.0, 0.80, 5), (2, 0.2, 0.99, 1), (3, 0.04, 0.90, 9), (4, 0.05, 0.90, 3)]]
    assert tune.choose(results, 0.05)["params"] == {"lr": 4}  # 0.2 does not forget; the tie goes to fewer FLOPs
    assert tune.choose(results, 0.01)["params"] == {"lr": 1}
    assert tune.choose(results[1:2], 0.05) is None


def test_tune_scrub_end_to_end_on_a_tiny_config(tiny_config, tmp_path):
    from dkvb.config import load_config
    from dkvb.experiment import load_embeddings

    tune = load_tune_scrub()
    out = tmp_path / "tune.json"
    assert tune.main([str(tiny_config), "--lrs", "0.5", "--out", str(out)]) == 1  # nothing cached yet: skipped
    assert json.loads(out.read_text())["skipped"] == ["tiny"]
    load_embeddings(load_config(tiny_config), progress=False)
    tune.main([str(tiny_config), "--lrs", "0.5", "5.0", "--requests", "1", "--set", "forget=[[class0],[class1]]",
               "--out", str(out)])
    result = json.loads(out.read_text())
    (tuned,) = result["configs"]
    assert len(tuned["candidates"]) == len(result["grid"]) == 4 and tuned["val_requests"] == [[0]]
    chosen = tune.choose(tuned["candidates"], 0.05)
    assert (chosen and chosen["params"]) == tuned["chosen"]
    if chosen:  # one config: the common choice is its own, tested on every request of the config
        assert result["common"] == tuned["chosen"] == tuned["tested"]
        assert tuned["test_requests"] == len(tuned["test_per_request"]) == 2
        assert {"forget", "retain", "forget_max", "retain_min", "seconds"} <= set(tuned["test"])
        assert tuned["test"]["forget_max"] == max(r["forget"] for r in tuned["test_per_request"])
    # a grid from the command line; --no-test never touches the test split
    tune.main([str(tiny_config), "--lrs", "0.5", "--presets", "small", "--requests", "1", "--no-test",
               "--out", str(out)])
    (tuned,) = json.loads(out.read_text())["configs"]
    assert [c["params"] for c in tuned["candidates"]] == [{"lr": 0.5, **tune.PRESETS["small"]}]
    assert "test" not in tuned
    tune.main([str(tiny_config), "--grid", '[{"lr": 0.5, "forget_batch_size": 8}]', "--presets", "large",
               "--requests", "1", "--no-test", "--out", str(out)])
    (tuned,) = json.loads(out.read_text())["configs"]
    assert [c["params"] for c in tuned["candidates"]] == [{**tune.PRESETS["large"], "lr": 0.5, "forget_batch_size": 8}]
    # --reuse: candidates already scored on the same split are taken over, only new ones run
    first = tuned["candidates"][0]
    first["val"]["retain"] = -1.0  # a marker: a rerun would overwrite it
    out.write_text(json.dumps({"configs": [tuned]}))
    tune.main([str(tiny_config), "--grid", '[{"lr": 0.5, "forget_batch_size": 8}, {"lr": 0.1}]', "--presets", "large",
               "--requests", "1", "--no-test", "--reuse", str(out), "--out", str(out)])
    (again,) = json.loads(out.read_text())["configs"]
    assert again["candidates"][0] == first and again["reused"] == 1 and len(again["candidates"]) == 2
    tune.main([str(tiny_config), "--grid", '[{"lr": 0.5, "forget_batch_size": 8}]', "--presets", "large",
               "--requests", "2", "--no-test", "--reuse", str(out), "--out", str(out)])  # other requests: rerun
    assert json.loads(out.read_text())["configs"][0]["reused"] == 0


@pytest.fixture(scope="module")
def overlapping():
    """Clusters close enough that one dampening step does not forget: Potion has to search."""
    from conftest import make_clusters
    from dkvb import TrainConfig, build_model, fit

    train, test = make_clusters(2000, spread=0.5), make_clusters(500, seed=1, spread=0.5)
    return train, test, fit(build_model({"kind": "linear"}, 32, 5, seed=0), train, TrainConfig(epochs=5, lr=1e-2))


def test_potion_searches_ssd_strength_until_the_forget_set_is_forgotten(overlapping):
    from dkvb.unlearn.potion import Potion

    train, test, model = overlapping
    request = ForgetRequest((1,), train)
    before = evaluate(model, train, test, [1])
    dampened = copy.deepcopy(model)
    _, details = Potion(rho=0.5).prepare(dampened, request, FlopCounter())
    assert details["forgotten"] and details["tries"] > 1
    assert details["forget_train_acc_before_ft"] <= 0.5 * before["forget_train_acc"]
    # each try is SSD (dampening 1) at the try's alpha, from the original weights
    ssd = create_unlearner("ssd", alpha=details["alpha"], dampening=1.0).unlearn(model, request).model
    assert same_state(state(dampened), state(ssd))
    # one try fewer does not forget: the search stops at the first try that does
    _, short = Potion(rho=0.5, max_tries=details["tries"] - 1).prepare(copy.deepcopy(model), request, FlopCounter())
    assert not short["forgotten"] and short["alpha"] > details["alpha"]
    # then the retain fine-tuning: forgotten on the test split too, retain accuracy kept
    after = evaluate(create_unlearner("potion", rho=0.5).unlearn(model, request).model, train, test, [1])
    assert before["forget_test_acc"] >= 0.9 and after["forget_test_acc"] <= 0.15
    assert after["retain_test_acc"] >= before["retain_test_acc"] - 0.01


def test_potion_flops_count_importances_tries_and_fine_tuning(trained_linear, request1):
    report = create_unlearner("potion", epochs=2, max_tries=3, rho=0.0).unlearn(trained_linear, request1)
    d = report.details
    # a linear head on separated clusters is not dampened away; its first try already has alpha <= 1
    assert d["tries"] == 1 and not d["forgotten"] and d["saturated"]
    nf, n, nr, w = len(request1.forget), len(request1.train), len(request1.retain), 165
    ratios = w  # every importance ratio of these weights is finite
    forward = 32 * 5  # per example
    assert report.flops == (3 * forward * (nf + n)  # importance passes
                            + forward * nf  # the original's forget accuracy
                            + 1 * (ratios + 3 * w + forward * nf)  # per try: percentile, dampening, forget accuracy
                            + 2 * 3 * forward * nr)  # fine-tuning steps


def test_potion_search_stops_once_every_later_try_gives_the_same_weights(trained_linear, request1):
    """From the first try with alpha <= 1 on, the dampened weights no longer change: the search
    ends there with the weights the repository's last try (max_tries) would have given."""
    import math

    import numpy as np

    from dkvb.unlearn.potion import Potion
    from dkvb.unlearn.ssd import dampen, ssd_importances

    searched = copy.deepcopy(trained_linear)
    _, d = Potion(rho=0.0, max_tries=40).prepare(searched, request1, FlopCounter())
    assert d["saturated"] and d["tries"] < 40 and d["alpha"] <= 1
    last = copy.deepcopy(trained_linear)
    imp_f, imp_d = ssd_importances(last, request1, batch_size=256, flops=FlopCounter())
    ratios = torch.cat([(f / dd).flatten() for f, dd in zip(imp_f, imp_d)]).double()
    share = len(request1.forget) / len(request1.train) / 25 * 1.1 ** 39
    alpha = float(np.percentile(ratios[torch.isfinite(ratios)].numpy(), max(0.0, 100 - math.log(1 + 100 * share))))
    assert alpha < d["alpha"]
    dampen(last, imp_f, imp_d, alpha=alpha, dampening=1.0, flops=FlopCounter())
    assert same_state(state(searched), state(last))
