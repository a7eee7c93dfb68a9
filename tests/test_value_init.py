import pytest
import torch
from conftest import SMALL_DKVB, make_clusters

from dkvb import ModelConfig, TrainConfig, build_model, fit
from dkvb.evaluate import accuracy
from dkvb.flops import FlopCounter
from dkvb.value_init import PROBE_GRID, linear_start, probe_logits


def test_linear_values_reproduce_logits_that_are_linear_in_the_code():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 10, 3, generator=g)
    codes = torch.randint(0, 10, (400, 6, 2), generator=g)
    code = keys[torch.arange(6).view(1, -1, 1), codes].mean(2).reshape(400, -1)
    weight, bias = torch.randn(18, 4, generator=g), torch.randn(4, generator=g)
    w, b = linear_start(keys, codes, code @ weight + bias, ridge=1e-9)
    values = 6 * torch.einsum("ckd,cdv->ckv", keys, w) + b
    pooled = values[torch.arange(6).view(1, -1, 1), codes].mean((1, 2))  # what the mean decoder reads
    assert torch.allclose(pooled, code @ weight + bias, atol=1e-3)


def test_probe_logits_choose_c_on_a_holdout_and_are_counted():
    train = make_clusters(600, num_classes=4, spread=1.0, seed=0)
    counter, chosen = FlopCounter(), {}
    logits = probe_logits(train, flops=counter, chosen=chosen)
    assert logits.shape == (600, 4) and accuracy(logits, train.y) > 0.9
    assert counter.total > 0
    tried = {float(c): acc for c, acc in chosen["probe_holdout_acc"].items()}
    assert list(tried) == list(PROBE_GRID) and chosen["probe_c"] == max(tried, key=tried.get)
    fixed = probe_logits(train, probe_c=0.01)
    assert not torch.allclose(fixed, logits)  # a different C, a different fit
    two = make_clusters(200, num_classes=2, seed=0)
    assert probe_logits(two, probe_c=1.0).shape == (200, 2)  # one margin spread over two classes


def test_probe_start_is_the_probe_through_the_keys_and_training_refines_it():
    train = make_clusters(1500, num_classes=5, spread=1.5, seed=0)
    test = make_clusters(500, num_classes=5, spread=1.5, seed=1)
    start = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train,
                TrainConfig(epochs=0, value_init="probe", probe_c=0.1))
    probe = probe_logits(train, probe_c=0.1)
    with torch.no_grad():
        agree = (start(train.x).argmax(1) == probe.argmax(1)).float().mean()
    assert agree > 0.9  # before any step the DKVB predicts what the probe does
    counter, info = FlopCounter(), {}
    trained = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train,
                  TrainConfig(epochs=5, lr=1e-2, value_init="probe", probe_c=0.1), flops=counter, info=info)
    assert info == {"probe_c": 0.1}  # what the start used, handed back to the caller
    zeros = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train, TrainConfig(epochs=5, lr=1e-2), flops=FlopCounter())
    with torch.no_grad():
        assert accuracy(trained(test.x), test.y) >= accuracy(zeros(test.x), test.y) - 0.02
    again = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train,
                TrainConfig(epochs=5, lr=1e-2, value_init="probe", probe_c=0.1))
    assert torch.equal(trained.bottleneck.values, again.bottleneck.values)  # same seed, same values


def test_value_starts_need_the_mean_decoder_and_a_valid_c():
    train = make_clusters(300, num_classes=3, seed=0)
    mlp = ModelConfig(num_codebooks=8, codebook_size=16, key_dim=4, projection="random", decoder="mlp", value_dim=8)
    with pytest.raises(ValueError, match="value_init='probe' needs the mean decoder"):
        fit(build_model(mlp, train.dim, 3, seed=0), train, TrainConfig(epochs=1, value_init="probe"))
    with pytest.raises(ValueError, match="probe_c"):
        TrainConfig(value_init="probe", probe_c=0)
    with pytest.raises(ValueError, match="value_init"):
        TrainConfig(value_init="linear")


@pytest.fixture(scope="module")
def probe_started():
    train = make_clusters(1500, num_classes=5, spread=1.5, seed=0)
    test = make_clusters(500, num_classes=5, spread=1.5, seed=1)
    model = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train,
                TrainConfig(epochs=5, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    return model, train, test


def test_start_scores_at_some_keys_are_the_start_table_there(probe_started):
    b = probe_started[0].bottleneck
    rows = torch.tensor([0, 5, b.codebook_size + 3, b.num_codebooks * b.codebook_size - 1])
    table = b.start.values(b.keys).view(-1, b.value_dim)[rows]
    assert torch.allclose(b.start.scores(b.keys, rows), table, atol=1e-5)
    from dkvb.value_start import gathered_start_scores  # the path of other devices, chunked
    gathered = gathered_start_scores(b.keys.reshape(-1, b.key_dim), b.start.weight, rows, b.codebook_size, chunk=3)
    assert torch.allclose(b.num_codebooks * gathered + b.start.bias, table, atol=1e-5)
    assert b.start.scores(b.keys, rows[:0]).shape == (0, b.value_dim)
    for bad in (torch.tensor([-1]), torch.tensor([b.num_codebooks * b.codebook_size])):
        with pytest.raises(ValueError, match="key rows must lie in"):
            b.start.scores(b.keys, bad)


@pytest.mark.parametrize("params", [{}, {"refit_epochs": 1}, {"refit_epochs": 1, "release_keys": True}])
def test_a_request_takes_the_forget_class_share_of_the_start_out_of_every_value(probe_started, params):
    from dkvb.evaluate import evaluate
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, test = probe_started
    b = model.bottleneck
    assert b.start.is_set
    values, start = b.values.detach().clone(), b.start.weight.clone()
    report = create_unlearner("dkvb-activations", **params).unlearn(model, ForgetRequest((2,), train))
    out = report.model.bottleneck
    assert torch.equal(b.values, values) and torch.equal(b.start.weight, start)  # the input model is untouched
    assert out.start.weight[..., 2].abs().sum() == 0 and out.start.bias[2] == 0
    assert torch.equal(out.start.weight[..., [0, 1, 3, 4]], start[..., [0, 1, 3, 4]])
    if not params.get("refit_epochs"):  # masking only: the class's start is swapped for each key's lowest
        start = b.start.values(b.keys)
        floor = start[..., [0, 1, 3, 4]].amin(-1)
        assert torch.allclose(out.value_table()[..., 2], values[..., 2] - start[..., 2] + floor, atol=1e-5)
        assert torch.equal(out.value_table()[..., [0, 1, 3, 4]], values[..., [0, 1, 3, 4]])
        assert out.values is b.values and out.corrections.classes.tolist() == [2]  # kept apart: values shared
    assert evaluate(report.model, train, test, [2])["forget_test_acc"] <= 0.01
    assert report.flops > 0
    if params.get("release_keys"):  # a released key no retain row selects is back at its (class-free) start
        codes = b.lookup(train.x[train.y != 2])
        used = torch.zeros(b.num_codebooks * b.codebook_size, dtype=torch.bool)
        used[b.flat_indices(codes).flatten()] = True
        idle = (report.details["mask"].flatten() & ~used).nonzero().flatten()
        assert len(idle) > 0
        assert torch.allclose(out.value_table().view(-1, 5)[idle], out.start.restart(out.keys, idle), atol=1e-5)
        assert torch.allclose(out.value_table().view(-1, 5)[idle][:, 2], out.start.floor.view(-1)[idle], atol=1e-5)
    again = create_unlearner("dkvb-activations").unlearn(report.model, ForgetRequest((3,), train, forgotten=(2,)))
    assert torch.equal(again.model.bottleneck.value_table()[..., 2], out.value_table()[..., 2])  # not taken out twice
    if not params.get("refit_epochs"):  # the second request's floor leaves out both removed classes
        start = b.start.values(b.keys)
        assert torch.allclose(again.model.bottleneck.value_table()[..., 3],
                              values[..., 3] - start[..., 3] + start[..., [0, 1, 4]].amin(-1), atol=1e-5)
        assert torch.allclose(again.model.bottleneck.start.floor, start[..., [0, 1, 4]].amin(-1), atol=1e-5)


def test_a_probe_started_model_masks_where_the_class_holds_a_uniform_share_unless_releasing():
    from dkvb.unlearn import ForgetRequest, create_unlearner
    from dkvb.unlearn.activations import SHARE_FACTOR, START_SHARE_FACTOR, default_share

    train = make_clusters(1500, num_classes=5, spread=1.5, seed=0)
    config = ModelConfig(num_codebooks=16, codebook_size=32, key_dim=4, projection="discriminant", whiten_dim=16)
    model = fit(build_model(config, train.dim, 5, seed=0), train,
                TrainConfig(epochs=3, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    request = ForgetRequest((2,), train)
    factor = SHARE_FACTOR[model.bottleneck.projection_kind]
    assert START_SHARE_FACTOR == 1.0 and factor < START_SHARE_FACTOR
    assert default_share(model, 1) == START_SHARE_FACTOR / 5
    assert default_share(model, 1, start_factor=False) == factor / 5  # released keys cost no capacity
    default = create_unlearner("dkvb-activations").unlearn(model, request)
    explicit = create_unlearner("dkvb-activations", min_share=START_SHARE_FACTOR / 5).unlearn(model, request)
    assert torch.equal(default.model.key_mask, explicit.model.key_mask)
    released = create_unlearner("dkvb-activations", refit_epochs=1, release_keys=True).unlearn(model, request)
    lower = create_unlearner("dkvb-activations", min_share=factor / 5).unlearn(model, request)
    assert torch.equal(released.details["mask"], lower.details["mask"])
    assert int(lower.model.key_mask.sum()) > int(default.model.key_mask.sum())


def test_the_start_survives_the_store_and_older_models_load_without_it(probe_started, tmp_path):
    from dkvb.store import load_model, save_model

    model, train, _ = probe_started
    save_model(model, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(loaded.bottleneck.start.weight, model.bottleneck.start.weight)
    assert torch.equal(loaded.bottleneck.start.bias, model.bottleneck.start.bias)
    state = {k: v for k, v in model.state_dict().items()  # saved before the start and its delta
             if not any(n in k for n in ("value_start", "value_delta", "delta_classes"))}
    older = build_model(SMALL_DKVB, train.dim, 5, seed=0)
    older.activation_counts = torch.zeros_like(model.activation_counts)  # as the store does
    older.load_state_dict(state)
    assert not older.bottleneck.start.is_set
    assert torch.equal(older(train.x[:50]), model(train.x[:50]))  # the start only matters to unlearning


def test_a_forgotten_class_delta_survives_the_store(probe_started, tmp_path):
    from dkvb.store import load_model, save_model
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, _ = probe_started
    out = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((1,), train)).model
    version = save_model(out, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    loaded, _ = load_model(tmp_path / "m", version)
    assert loaded.bottleneck.corrections.classes.tolist() == [1]
    assert torch.equal(loaded.bottleneck.corrections.delta, out.bottleneck.corrections.delta)
    assert torch.equal(loaded(train.x[:100]), out(train.x[:100]))


def test_a_start_stored_without_its_floor_gets_it_on_loading(probe_started, tmp_path):
    from safetensors.torch import load_file, save_file

    from dkvb.store import load_model, save_model

    model, train, _ = probe_started
    save_model(model, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(loaded.bottleneck.start.floor, model.bottleneck.start.floor)
    floor = model.bottleneck.start.floor
    model.bottleneck.start.floor = torch.zeros(0)  # as a model trained before the floor was kept
    try:
        save_model(model, tmp_path / "old", class_names=list(train.class_names), encoder="test")
    finally:
        model.bottleneck.start.floor = floor
    older, _ = load_model(tmp_path / "old")
    assert torch.allclose(older.bottleneck.start.floor, floor)


def test_the_kept_correction_serves_what_folding_it_into_the_values_gives(probe_started):
    import copy

    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, test = probe_started
    kept = model.keep_logits(test.x)
    out = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((0, 3), train)).model
    folded = copy.deepcopy(out)
    folded.bottleneck.corrections.fold_into(folded.bottleneck.values)
    assert not folded.bottleneck.corrections.classes.numel() and out.bottleneck.corrections.classes.tolist() == [0, 3]
    assert torch.allclose(out(test.x), folded(test.x), atol=1e-5)
    assert torch.allclose(out.bottleneck.value_table(), folded.bottleneck.values, atol=1e-6)
    assert torch.allclose(out.predict_from(test.x, kept), out(test.x), atol=1e-5)  # kept logits see the change
    assert torch.equal(model.bottleneck.values, out.bottleneck.values)  # shared, never written


def test_a_run_records_the_probe_start_c_with_its_training_info(tmp_path):
    from dkvb.config import load_config
    from dkvb.experiment import train_models

    train = make_clusters(600, num_classes=4, spread=1.0, seed=0)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", "encoder.name=synthetic", "train.epochs=1",
                             "train.value_init=probe", "model={num_codebooks: 8, codebook_size: 16, key_dim: 4}"])
    _, info = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"]
    assert info["probe_c"] in PROBE_GRID and str(info["probe_c"]) in info["probe_holdout_acc"]
    _, again = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"]  # loaded from the store
    assert again["probe_c"] == info["probe_c"]


def test_a_stored_correction_that_does_not_fit_is_refused_by_name(probe_started, tmp_path):
    from dkvb.store import StoreError, load_model, save_model
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, _ = probe_started
    out = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((1,), train)).model
    out.bottleneck.corrections.classes = torch.tensor([1, 1])  # two columns named, one stored
    save_model(out, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    with pytest.raises(StoreError, match="value_delta"):
        load_model(tmp_path / "m")
    out.bottleneck.corrections.delta = torch.cat([out.bottleneck.corrections.delta] * 2, -1)  # two, the same class
    save_model(out, tmp_path / "n", class_names=list(train.class_names), encoder="test")
    with pytest.raises(StoreError, match="delta_classes"):
        load_model(tmp_path / "n")


def test_fvcore_counts_the_pooled_correction_of_a_forgotten_class(probe_started):
    from dkvb.flops import forward_flops
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, _ = probe_started
    out = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((1,), train)).model
    b, x = model.bottleneck, train.x[:64]
    assert forward_flops(out, x) - forward_flops(model, x) == 64 * b.num_codebooks * b.topk  # one add per key


def test_with_many_classes_a_probe_started_model_masks_where_the_class_holds_a_tenth():
    """Above 10 classes a uniform share is below a tenth of the activations; the default then
    masks only keys where the class holds a tenth (CIFAR-100: 50 requests served instead of 7)."""
    from dkvb.unlearn import ForgetRequest, create_unlearner
    from dkvb.unlearn.activations import START_MIN_SHARE, default_share

    train = make_clusters(3000, num_classes=20, spread=1.5, seed=0)
    config = ModelConfig(num_codebooks=16, codebook_size=32, key_dim=4, projection="discriminant", whiten_dim=24)
    model = fit(build_model(config, train.dim, 20, seed=0), train,
                TrainConfig(epochs=2, lr=1e-2, value_init="probe", probe_c=0.1))
    model.compute_activation_counts(train.x, train.y)
    assert START_MIN_SHARE == 0.1 and default_share(model, 1) == 0.1 and default_share(model, 3) == pytest.approx(0.3)
    assert default_share(model, 20) == 1.0  # every class: the keys only they use
    request = ForgetRequest((4,), train)
    default = create_unlearner("dkvb-activations").unlearn(model, request)
    explicit = create_unlearner("dkvb-activations", min_share=0.1).unlearn(model, request)
    uniform = create_unlearner("dkvb-activations", min_share=1 / 20).unlearn(model, request)
    assert torch.equal(default.model.key_mask, explicit.model.key_mask)
    assert 0 < int(default.model.key_mask.sum()) < int(uniform.model.key_mask.sum())


def test_a_model_retrained_without_a_class_fits_its_probe_start_on_the_others():
    """The gold reference of a probe-started DKVB: its own recipe on the retain set, where one class
    has no rows; the absent class starts at each row's lowest logit and is never predicted."""
    from dkvb.evaluate import predict_logits
    from dkvb.value_init import probe_logits

    train = make_clusters(1500, num_classes=5, spread=1.5, seed=0)
    retain = train.subset(train.y != 2)
    logits = probe_logits(retain, probe_c=0.1)
    assert logits.shape == (len(retain), 5)
    assert torch.equal(logits[:, 2], logits.min(1).values)
    model = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), retain,
                TrainConfig(epochs=3, lr=1e-2, value_init="probe", probe_c=0.1))
    test = make_clusters(500, num_classes=5, spread=1.5, seed=1)
    assert not bool((predict_logits(model, test.x).argmax(1) == 2).any())


def test_the_ablations_change_only_their_part(probe_started):
    """mask_keys=False only takes the class out of the start; drop_start=False only masks."""
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, _ = probe_started
    request = ForgetRequest((1,), train)
    full = create_unlearner("dkvb-activations").unlearn(model, request).model
    mask_alone = create_unlearner("dkvb-activations", drop_start=False).unlearn(model, request).model
    start_alone = create_unlearner("dkvb-activations", mask_keys=False).unlearn(model, request).model
    assert torch.equal(mask_alone.key_mask, full.key_mask) and bool(full.key_mask.any())
    assert torch.equal(mask_alone.bottleneck.value_table(), model.bottleneck.value_table())
    assert not bool(start_alone.key_mask.any())
    assert torch.equal(start_alone.bottleneck.value_table(), full.bottleneck.value_table())
    with pytest.raises(ValueError, match="drop_start"):
        create_unlearner("dkvb-activations", mask_keys=False, drop_start=False)
    with pytest.raises(ValueError, match="mask_keys"):
        create_unlearner("dkvb-activations", mask_keys=False, refit_epochs=1, release_keys=True)


def test_floor_scores_moves_the_class_towards_each_keys_lowest_served_score(probe_started):
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train, _ = probe_started
    request = ForgetRequest((1,), train)
    plain = create_unlearner("dkvb-activations").unlearn(model, request).model.bottleneck.value_table()
    full = create_unlearner("dkvb-activations", floor_scores=1.0).unlearn(model, request).model.bottleneck
    half = create_unlearner("dkvb-activations", floor_scores=0.5).unlearn(model, request).model.bottleneck
    served = [0, 2, 3, 4]
    assert torch.allclose(full.value_table()[..., 1], plain[..., served].amin(-1), atol=1e-5)
    assert torch.allclose(half.value_table()[..., 1], (plain[..., 1] + plain[..., served].amin(-1)) / 2, atol=1e-5)
    assert torch.equal(full.value_table()[..., served], plain[..., served])
    assert full.corrections.classes.tolist() == [1]  # one correction per class, the start's and the floor's summed
    full.start.check()
    full.corrections.check()
    with pytest.raises(ValueError, match="floor_scores"):
        create_unlearner("dkvb-activations", floor_scores=1.5)


# ------------------------------------------------------------------ count-valued models


@pytest.fixture(scope="module")
def count_valued():
    train = make_clusters(1500, num_classes=5, spread=1.0, seed=0)
    model = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train, TrainConfig(epochs=0, value_init="counts"))
    model.compute_activation_counts(train.x, train.y)
    return model, train


def _counted_on(model, data):
    """The count start of ``model``'s keys on ``data`` alone: the values retraining them there gives."""
    from dkvb.value_init import count_values

    b = model.bottleneck
    return count_values(b.flat_indices(b.lookup(data.x)), data.y, b.num_codebooks * b.codebook_size, b.value_dim)


def test_a_request_recounts_a_count_valued_model_as_if_built_without_the_class(count_valued, tmp_path):
    from dkvb.store import load_model, save_model
    from dkvb.unlearn import ForgetRequest, create_unlearner
    from dkvb.value_init import values_are_counts

    model, train = count_valued
    before = model.bottleneck.values.clone()
    assert values_are_counts(model) and not values_are_counts(model, (2,))
    first = create_unlearner("dkvb-activations").unlearn(model, ForgetRequest((2,), train))
    values = first.model.bottleneck.values.view(-1, 5)
    retain = train.subset(~train.class_mask((2,)))
    assert torch.allclose(values, _counted_on(model, retain), atol=1e-6)  # exact: no step, no data read
    assert torch.equal(model.bottleneck.values, before)  # the served model is untouched
    assert 0 < first.flops < 10 * values.numel()
    with torch.no_grad():
        assert accuracy(first.model(train.x[train.y == 2]), train.y[train.y == 2]) == 0.0
    assert values_are_counts(first.model, (2,))  # so the next request recounts as well
    second = create_unlearner("dkvb-activations").unlearn(first.model, ForgetRequest((4,), train, forgotten=(2,)))
    assert torch.allclose(second.model.bottleneck.values.view(-1, 5),
                          _counted_on(model, train.subset(~train.class_mask((2, 4)))), atol=1e-6)
    save_model(second.model, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    loaded, _ = load_model(tmp_path / "m")
    assert values_are_counts(loaded, (2, 4))  # the stored model is still recounted by later requests


def test_the_key_mask_alone_and_the_recount_alone_are_ablations(count_valued):
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train = count_valued
    request = ForgetRequest((1,), train)
    default = create_unlearner("dkvb-activations").unlearn(model, request).model
    mask_only = create_unlearner("dkvb-activations", recount_values=False).unlearn(model, request).model
    values_only = create_unlearner("dkvb-activations", mask_keys=False).unlearn(model, request).model
    assert torch.equal(mask_only.key_mask, default.key_mask)
    assert torch.equal(mask_only.bottleneck.values, model.bottleneck.values)
    assert not values_only.key_mask.any()
    assert torch.equal(values_only.bottleneck.values, default.bottleneck.values)


def test_recounting_is_refused_where_the_values_are_not_counts(count_valued):
    from dkvb.unlearn import ForgetRequest, create_unlearner

    model, train = count_valued
    trained = fit(build_model(SMALL_DKVB, train.dim, 5, seed=0), train, TrainConfig(epochs=1, lr=1e-2))
    trained.compute_activation_counts(train.x, train.y)
    request = ForgetRequest((1,), train)
    kept = create_unlearner("dkvb-activations").unlearn(trained, request).model
    assert kept.bottleneck.values is trained.bottleneck.values  # trained values: the mask alone, values shared
    with pytest.raises(ValueError, match="recount_values needs a model whose values are its cached key counts"):
        create_unlearner("dkvb-activations", recount_values=True).unlearn(trained, request)
    with pytest.raises(ValueError, match="recount_values"):
        create_unlearner("dkvb-activations", recount_values=True, refit_epochs=2)
    refit = create_unlearner("dkvb-activations", refit_epochs=1).unlearn(model, request).model
    assert not torch.allclose(refit.bottleneck.values.view(-1, 5), _counted_on(model, request.retain))


# ------------------------------------------------------------------ ridge-valued models


def _ridge_fit(train, epochs=0, shards=1):
    """A ridge-valued DKVB whose keys come from a fixed pool (what ``key_pool`` does), so a model
    retrained on fewer rows gets the same keys."""
    model = build_model(SMALL_DKVB, train.dim, train.num_classes, seed=0)
    pool = make_clusters(1200, num_classes=train.num_classes, spread=1.0, seed=7)
    model.prepare(pool.x)
    fit(model, train, TrainConfig(epochs=epochs, lr=1e-2, value_init="ridge", ridge_shards=shards))
    model.compute_activation_counts(train.x, train.y)
    return model


def test_ridge_values_are_the_closed_form_ridge_fit_of_the_labels_on_the_code():
    from dkvb.value_init import ridge_values

    g = torch.Generator().manual_seed(0)
    flat = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(50)])  # 50 rows, 6 of 40 keys each
    y = torch.randint(0, 3, (50,), generator=g)
    x = torch.zeros(50, 40, dtype=torch.float64)
    x[torch.arange(50).unsqueeze(1), flat] = 1.0
    targets = torch.nn.functional.one_hot(y, 4).double()  # class 3 has no row
    w = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(40, dtype=torch.float64), x.T @ targets)  # primal
    values = ridge_values(flat, y, 40, 4, 2.0)
    assert torch.allclose(values.double() / 6, w, atol=1e-5)
    assert torch.equal(values[:, 3], torch.zeros(40))  # a class no row has scores 0 everywhere
    assert torch.allclose(values[flat].mean(1).double(), x @ w, atol=1e-5)  # what the mean decoder reads


def test_a_ridge_system_holds_the_inverse_of_the_dual_matrix_of_its_rows_sorted_by_class():
    from dkvb.value_init import DualInverse

    g = torch.Generator().manual_seed(1)
    flat = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(60)]).int()
    y = torch.randint(0, 3, (60,), generator=g)
    order = torch.argsort(y, stable=True)
    x = torch.zeros(60, 40, dtype=torch.float64)
    x[torch.arange(60).unsqueeze(1), flat[order].long()] = 1.0
    part = DualInverse.of(flat, y, 40, 3, 2.0)
    inverse = torch.from_numpy(part.inverse)
    assert torch.allclose(inverse, inverse.T, atol=1e-12)
    assert torch.allclose(inverse @ (x @ x.T + 2.0 * torch.eye(60, dtype=torch.float64)),
                          torch.eye(60, dtype=torch.float64), atol=1e-10)
    assert list(part.bounds) == [0, *torch.cumsum(torch.bincount(y, minlength=3), 0).tolist()]


def test_the_ridge_systems_codes_are_the_lookup_searched_by_chunks():
    from dkvb.data import fingerprint
    from dkvb.value_init import _ridge_codes

    train = make_clusters(300, num_classes=3, spread=1.0, seed=0)
    model = _ridge_fit(train)
    b = model.bottleneck
    whole = b.flat_indices(b.lookup(train.x)).reshape(len(train), -1)
    cached = _ridge_codes(model, train.x, fingerprint(train.x))  # from the kept search of the training rows
    model.code_cache = None
    b.chunk_rows = 64
    b.key_mask[0, 0] = True  # the system's codes are searched with no key masked
    searched = _ridge_codes(model, train.x, fingerprint(train.x))
    assert cached.dtype == searched.dtype == torch.int32
    assert torch.equal(cached.long(), whole) and torch.equal(searched.long(), whole)


@pytest.mark.parametrize("shards", [1, 3])
def test_a_request_solves_a_ridge_valued_model_again_as_if_trained_without_the_class(tmp_path, shards):
    from dkvb.store import load_model, save_model
    from dkvb.unlearn import ForgetRequest, create_unlearner

    train = make_clusters(900, num_classes=5, spread=1.0, seed=0)
    model = _ridge_fit(train, shards=shards)
    assert int(model.value_ridge_shards) == shards
    assert float(model.value_ridge) == SMALL_DKVB.num_codebooks * SMALL_DKVB.topk
    with torch.no_grad():
        assert accuracy(model(train.x), train.y) > 0.9
    before = model.bottleneck.values.clone()
    exact = create_unlearner("dkvb-activations", mask_keys=False)
    first = exact.unlearn(model, ForgetRequest((2,), train))
    assert len(model.ridge_system.parts) == shards and first.model.ridge_system is model.ridge_system
    assert torch.allclose(first.model.bottleneck.values,
                          _ridge_fit(train.subset(~train.class_mask((2,))), shards=shards).bottleneck.values, atol=1e-5)
    assert torch.equal(model.bottleneck.values, before) and first.flops > 0
    with torch.no_grad():
        assert accuracy(first.model(train.x[train.y == 2]), train.y[train.y == 2]) == 0.0
    second = exact.unlearn(first.model, ForgetRequest((4,), train, forgotten=(2,)))  # a sequence stays exact
    retrained = _ridge_fit(train.subset(~train.class_mask((2, 4))), shards=shards)
    assert torch.allclose(second.model.bottleneck.values, retrained.bottleneck.values, atol=1e-5)
    save_model(second.model, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    loaded, _ = load_model(tmp_path / "m")
    assert float(loaded.value_ridge) == float(model.value_ridge) and int(loaded.value_ridge_shards) == shards
    third = exact.unlearn(loaded, ForgetRequest((0,), train, forgotten=(2, 4)))
    assert torch.allclose(third.model.bottleneck.values,
                          _ridge_fit(train.subset(~train.class_mask((0, 2, 4))), shards=shards).bottleneck.values,
                          atol=1e-5)


def test_ridge_shards_deal_each_class_round_robin_so_dropping_a_class_moves_no_other_row():
    from dkvb.value_init import ridge_shards

    y = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0])
    shard = ridge_shards(y, 3)
    assert shard.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 1]  # the i-th row of a class: shard i mod 3
    kept = y != 1
    assert torch.equal(ridge_shards(y[kept], 3), shard[kept])


def test_a_ridge_start_that_was_trained_on_is_not_solved_again():
    from dkvb.unlearn import ForgetRequest, create_unlearner

    train = make_clusters(600, num_classes=4, seed=0)
    trained = _ridge_fit(train, epochs=1)
    assert float(trained.value_ridge) == 0.0
    with pytest.raises(ValueError, match="neither"):
        create_unlearner("dkvb-activations", recount_values=True).unlearn(trained, ForgetRequest((1,), train))
    model = _ridge_fit(train)
    with torch.no_grad():  # values changed behind the marker's back fail the ridge equations
        model.bottleneck.values.add_(0.01 * torch.randn_like(model.bottleneck.values))
    with pytest.raises(ValueError, match="neither"):
        create_unlearner("dkvb-activations", recount_values=True).unlearn(model, ForgetRequest((1,), train))
    with pytest.raises(ValueError, match="value_ridge"):
        TrainConfig(value_init="ridge", value_ridge=0)


def test_ridge_values_refuse_a_training_set_too_large_for_the_dual_system(monkeypatch):
    import dkvb.value_init as vi

    monkeypatch.setattr(vi, "RIDGE_MAX_ROWS", 100)
    flat, y = torch.arange(600).remainder(10).view(200, 3), torch.arange(200).remainder(2)
    with pytest.raises(ValueError, match="N x N system per shard: 200 rows.*ridge_shards"):
        vi.ridge_values(flat, y, 10, 2, 1.0)
    assert vi.ridge_values(flat, y, 10, 2, 1.0, shards=2).shape == (10, 2)  # two shards of 100 rows


def test_the_ridge_system_is_made_once_per_model_and_training_set(tmp_path):
    from dkvb.store import load_model, save_model
    from dkvb.unlearn import ForgetRequest, create_unlearner
    from dkvb.value_init import keep_ridge_system

    train = make_clusters(600, num_classes=4, seed=0)
    model = _ridge_fit(train)
    assert model.ridge_system is None and keep_ridge_system(model, train)
    system = model.ridge_system
    first = create_unlearner("dkvb-activations", mask_keys=False).unlearn(model, ForgetRequest((1,), train)).model
    assert first.ridge_system is system  # the unlearned copy shares it: a sequence needs no new inverse
    save_model(model, tmp_path / "m", class_names=list(train.class_names), encoder="test")
    loaded, _ = load_model(tmp_path / "m")
    again = create_unlearner("dkvb-activations", mask_keys=False).unlearn(loaded, ForgetRequest((1,), train)).model
    assert loaded.ridge_system is system  # a reloaded model finds the process's last system
    assert torch.equal(again.bottleneck.values, first.bottleneck.values)
    other = make_clusters(600, num_classes=4, seed=3)
    assert not keep_ridge_system(_ridge_fit(train, epochs=1), train)  # trained values: nothing to keep
    keep_ridge_system(_ridge_fit(other), other)
    assert _ridge_fit(other).ridge_system is None and model.ridge_system is system


def test_a_ridge_request_with_other_training_embeddings_is_refused_not_left_unsolved():
    from dkvb.unlearn import ForgetRequest, create_unlearner

    train = make_clusters(600, num_classes=4, seed=0)
    model = _ridge_fit(train)
    before = model.bottleneck.values.clone()
    other = train.subset(torch.arange(len(train)) < 400)  # two thirds of the rows the values were fitted on
    for params in ({}, {"mask_keys": False}):
        with pytest.raises(ValueError, match="do not solve the ridge equations on the given training embeddings"):
            create_unlearner("dkvb-activations", **params).unlearn(model, ForgetRequest((1,), other))
    assert torch.equal(model.bottleneck.values, before)
    kept = create_unlearner("dkvb-activations", recount_values=False).unlearn(model, ForgetRequest((1,), other))
    assert kept.model.key_mask.any()  # the key mask alone reads no values: still served


def test_values_the_system_solved_are_not_checked_again_and_changed_ones_are(monkeypatch):
    import dkvb.value_init as vi
    from dkvb.unlearn import ForgetRequest, create_unlearner

    checks = []
    check = vi._is_solution
    monkeypatch.setattr(vi, "_is_solution", lambda *a: checks.append(check(*a)) or checks[-1])
    monkeypatch.setattr(vi, "AHEAD_BYTES", 0)  # every table solved on request, its FLOPs counted there
    train = make_clusters(600, num_classes=4, seed=0)
    model = _ridge_fit(train)
    vi.keep_ridge_system(model, train)
    exact = create_unlearner("dkvb-activations", mask_keys=False)
    checked = exact.unlearn(model, ForgetRequest((1,), train))  # the model's values: checked, then known
    known = exact.unlearn(model, ForgetRequest((1,), train))
    assert torch.equal(known.model.bottleneck.values, checked.model.bottleneck.values)
    assert 0 < known.flops < checked.flops and checks == [True]  # the check's solve is left out
    exact.unlearn(checked.model, ForgetRequest((2,), train, forgotten=(1,)))  # values solved here: known
    assert checks == [True]
    with pytest.raises(ValueError, match="do not solve the ridge equations"):  # known, but without class 1
        exact.unlearn(checked.model, ForgetRequest((2,), train))
    with torch.no_grad():  # changed in place: no longer known, and checked again
        checked.model.bottleneck.values.add_(0.01)
    with pytest.raises(ValueError, match="do not solve the ridge equations"):
        exact.unlearn(checked.model, ForgetRequest((2,), train, forgotten=(1,)))
    assert checks == [True, False, False]


@pytest.mark.parametrize("shards", [1, 3])
def test_tables_solved_ahead_are_the_tables_a_request_solves(monkeypatch, shards):
    import dkvb.value_init as vi
    from dkvb.data import _sha256
    from dkvb.unlearn import ForgetRequest, create_unlearner

    monkeypatch.setattr(vi, "_RECENT_SYSTEM", [])  # a system made here, not one another test kept
    train = make_clusters(600, num_classes=4, seed=0)
    model = _ridge_fit(train, shards=shards)
    vi.keep_ridge_system(model, train)
    system = model.ridge_system
    assert set(system.ahead) == {frozenset(c) for c in [(), (0,), (1,), (2,), (3,)]}
    exact = create_unlearner("dkvb-activations", mask_keys=False)
    read = exact.unlearn(model, ForgetRequest((2,), train))  # a copy of the table solved ahead
    values = read.model.bottleneck.values
    assert vi.fingerprint(values) == _sha256(values)  # its digest, known from the table, is its own
    system.ahead.clear()
    solved = exact.unlearn(model, ForgetRequest((2,), train))
    assert read.flops < solved.flops and torch.equal(read.model.bottleneck.values, solved.model.bottleneck.values)
    later = exact.unlearn(read.model, ForgetRequest((1,), train, forgotten=(2,)))  # a sequence solves
    assert later.flops > read.flops
    monkeypatch.setattr(vi, "AHEAD_BYTES", 4 * 5 * model.bottleneck.values.numel() - 1)  # one table short
    system.ahead.clear()
    system.solve_ahead(model.bottleneck.values.shape)
    assert not system.ahead


def test_a_ridge_system_remembers_only_the_last_solved_tables(monkeypatch):
    import dkvb.value_init as vi

    monkeypatch.setattr(vi, "SOLVED_KEPT", 2)
    train = make_clusters(300, num_classes=3, seed=0)
    model = _ridge_fit(train)
    vi.keep_ridge_system(model, train)
    system, tables = model.ridge_system, [torch.full((4, 3), float(i)) for i in range(3)]
    for i, table in enumerate(tables):
        system.remember(table, (i,))
    assert len(system.solved) == 2 and not system.solves(tables[0], (0,))
    assert system.solves(tables[2], (2,)) and not system.solves(tables[2], (1,))
