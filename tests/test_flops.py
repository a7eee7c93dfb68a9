import pytest
import torch
from torch import nn

from dkvb import ForgetRequest, ModelConfig, build_model, create_unlearner
from dkvb.evaluate import METRICS
from dkvb.flops import (count_images, encoder_flops_per_image, flop_analysis, forward_flops, lookup_flops,
                        note_images, search_flops, train_step_flops)
from dkvb.report import summarize, write_report


def test_bottleneck_has_no_unsupported_ops(trained_dkvb):
    analysis = flop_analysis(trained_dkvb, (torch.randn(8, 32),))
    analysis.total()
    assert analysis.unsupported_ops() == {}
    ops = analysis.by_operator()
    assert ops["bmm"] > 0 and ops["argmin"] > 0  # distance matmul and selection are both counted


def test_faiss_lookup_is_counted(clusters):
    train, _ = clusters
    model = build_model(ModelConfig(num_codebooks=4, codebook_size=16, key_dim=4, projection="random", search="faiss"), 32, 5)
    model.prepare(train.x, train.y)
    analysis = flop_analysis(model, (torch.randn(8, 32),))
    analysis.total()
    assert analysis.unsupported_ops() == {}
    assert analysis.total() >= 8 * 4 * 16 * 4


@pytest.mark.parametrize("projection, search", [("whitened", "torch"), ("random", "torch"), ("random", "faiss")])
def test_search_flops_are_fvcores_count_of_a_lookup(clusters, projection, search):
    train, _ = clusters
    config = ModelConfig(num_codebooks=4, codebook_size=16, key_dim=4, topk=2, projection=projection, whiten_dim=8,
                         search=search)
    model = build_model(config, 32, 5)
    model.prepare(train.x)
    for rows in (1, 37, 8200):
        assert search_flops(model.bottleneck, rows) == lookup_flops(model, rows)


def test_a_pair_searchs_count_follows_fvcores_conventions():
    """The count refresh gives a codebook's re-searched rows (dkvb.selection._search_pairs) is
    fvcore's count of those operations: a row slab of the projection, distances as a matrix
    product, one comparison per distance."""
    rows, in_dim, width, key_dim, size = 9, 12, 16, 4, 20
    slab, keys = torch.randn(in_dim, width), torch.randn(size, key_dim)

    class PairSearch(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return torch.addmm(keys.pow(2).sum(-1), (w @ slab)[:, 4:8], keys.T, alpha=-2).argmin(1)

    counted = flop_analysis(PairSearch(), (torch.randn(rows, in_dim),)).total()
    assert counted == rows * (in_dim * width + key_dim * size) + rows * size


def test_flops_scale_with_batch_and_backward_is_twice_forward(trained_linear):
    f1, f2 = forward_flops(trained_linear, torch.randn(10, 32)), forward_flops(trained_linear, torch.randn(20, 32))
    assert f1 == 10 * 32 * 5 and f2 == 2 * f1
    assert train_step_flops(trained_linear, torch.randn(10, 32)) == 3 * f1


def test_encoder_flops_match_the_published_counts():
    # fvcore multiply-adds of one 224-px image: ResNet-50 4.1 G, CLIP ViT-B/32 4.4 G (attention included)
    assert 4.0e9 < encoder_flops_per_image("torchvision:resnet50") < 4.2e9
    assert 4.3e9 < encoder_flops_per_image("clip:ViT-B-32/openai") < 4.5e9
    small, large = encoder_flops_per_image("torchvision:resnet18", 32), encoder_flops_per_image("torchvision:resnet18", 64)
    assert 3.5 < large / small < 4.5  # convolutions scale with the pixel count


def test_native_attention_is_counted_as_its_matrix_products():
    b, length, e = 2, 7, 16
    attn = nn.MultiheadAttention(e, 4, batch_first=True).eval()
    x = torch.randn(b, length, e)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    with torch.no_grad():
        analysis = flop_analysis(Self(), (x,))
        total = analysis.total()
    assert analysis.unsupported_ops() == {}
    assert total == b * (4 * length * e * e + 2 * length * length * e)


def test_image_tally_counts_every_pass_over_an_image(clusters, trained_linear, trained_dkvb):
    train, _ = clusters
    request = ForgetRequest((1,), train)
    nf, nr = len(request.forget), len(request.retain)

    def images(model, name, **params):
        with count_images() as tally:
            create_unlearner(name, **params).unlearn(model, request)
        return tally.images

    # the teacher's forward runs on the student's batch: not a second image
    assert images(trained_linear, "scrub", epochs=2, msteps=1) == nf + 2 * nr
    assert images(trained_linear, "finetune", epochs=3) == 3 * nr
    assert images(trained_linear, "ssd") == nf + len(train)
    assert images(trained_dkvb, "dkvb-examples", num_examples=7) == 7
    assert images(trained_dkvb, "dkvb-activations", rule="paper", use_cached_counts=False) == nf
    trained_dkvb.compute_activation_counts(train.x, train.y)
    assert images(trained_dkvb, "dkvb-activations") == 0  # counts cached at training time
    with count_images() as outer:
        note_images(3)
        with count_images() as inner:
            note_images(5)
    assert (outer.images, inner.images) == (3, 5)
    note_images(11)  # outside any tally: ignored


def record(method, flops, images_flops, forget=0.0, **params):
    metrics = {m: 0.5 for m in METRICS} | {"forget_test_acc": forget}
    return {"method": method, "model": "dkvb", "forget_classes": ["a"], "forget_class_ids": [0], "metrics": metrics,
            "flops": flops, "flops_from_images": images_flops, "seconds": 0.0, "params": params, "details": {}}


def test_report_divides_both_accountings_by_dkvb_from_scratch(tmp_path):
    records = [
        record("dkvb-activations[rule=paper,use_cached_counts=False]", 10, 1000, rule="paper", use_cached_counts=False),
        record("dkvb-activations[use_cached_counts=False]", 40, 4000, rule="share", use_cached_counts=False),
        record("dkvb-activations", 1, 1, rule="share", use_cached_counts=True),
        record("scrub", 200, 50_000),
    ]
    rows = {r["method"]: r for r in summarize(records)}
    assert rows["scrub"]["flops_ratio"] == 20 and rows["scrub"]["images_flops_ratio"] == 50  # the paper's rule
    assert rows["dkvb-activations"]["images_flops_ratio"] == 0.001
    rows = {r["method"]: r for r in summarize(records[1:])}  # without it: the default rule from scratch
    assert rows["scrub"]["flops_ratio"] == 5 and rows["scrub"]["images_flops_ratio"] == 12.5
    write_report(records, tmp_path, title="t")
    table = (tmp_path / "table.md").read_text()
    assert "FLOPs ÷ DKVB (cached) | FLOPs from images | FLOPs ÷ DKVB (from images)" in table
    assert "| scrub | dkvb |" in table and "| 20 | 5e+04 | 50 |" in table
    assert "`dkvb-activations[rule=paper,use_cached_counts=False]`" in table
