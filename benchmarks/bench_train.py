"""Training cost per epoch: DKVB values vs the linear head, on the same embeddings.

For each bottleneck shape, times one epoch of :func:`dkvb.fit` (cached-code values training
with lazy Adam) and of the linear head on the same synthetic embeddings, and reports the
ratio (goal: DKVB <= 2x the linear head). ``--reference`` also times the trainer this
replaced (codes looked up once, then autograd through a gather and dense Adam over every value
each step) and compares its test accuracy with the fast path on the same seed.

Keys come from 4 iterations of k-means on the data (not timed). Labels come from a random linear teacher with
noise, so accuracy is informative. Prints a table and writes JSON.

    python benchmarks/bench_train.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

SHAPES = {  # name: (C, K, key_dim, topk, embedding dim)
    "64x256": (64, 256, 8, 4, 1280),     # the offline demo's bottleneck (EfficientNet-Lite0 features)
    "256x4096": (256, 4096, 14, 1, 512),  # the paper's bottleneck (CLIP ViT-B/32 features)
}


def teacher_data(n: int, dim: int, num_classes: int, seed: int):
    """(train, test) embedding sets labelled by a noisy random linear teacher that looks at the 32
    highest-variance directions (as a class signal lives in an encoder's leading components)."""
    import torch

    from dkvb import EmbeddingSet

    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(dim, num_classes)
    w[:32] = torch.randn(32, num_classes, generator=g)
    x = torch.randn(n + n // 4, dim, generator=g)
    x[:, :32] *= 4
    y = (x @ w + 0.5 * torch.randn(len(x), num_classes, generator=g) * w.norm(dim=0)).argmax(1)
    names = [f"c{i}" for i in range(num_classes)]
    return EmbeddingSet(x[:n], y[:n], names), EmbeddingSet(x[n:], y[n:], names)


def reference_fit(model, data, config) -> None:
    """The DKVB trainer before lazy Adam: cached codes, gather + mean, dense Adam over all values."""
    import torch
    import torch.nn.functional as F

    from dkvb.train import batches

    b = model.bottleneck
    idx_all = b.lookup(data.x)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        for idx in batches(len(data), config.batch_size, g):
            loss = F.cross_entropy(model.decoder(b.get_output_from_indices(idx_all[idx]).mean(1)), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    from dkvb import ModelConfig, TrainConfig, build_model, fit
    from dkvb.evaluate import accuracy, predict_logits

    c, k, key_dim, topk, dim = SHAPES[shape]
    train, test = teacher_data(args.embeddings, dim, args.classes, args.seed)
    cfg = TrainConfig(epochs=args.epochs, lr=0.01, batch_size=args.batch_size, seed=args.seed)
    lin_cfg = TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=args.batch_size, seed=args.seed)

    def timed(model, config, trainer=fit) -> tuple[float, float]:
        """Seconds per epoch, without the one-off work every run does first (a DKVB's single lookup
        of its training codes, reported as ``lookup_s``), and test accuracy."""
        import copy

        setup = 0.0
        if hasattr(model, "bottleneck"):
            start = time.perf_counter()
            trainer(copy.deepcopy(model), train, TrainConfig(**{**config.__dict__, "epochs": 0}))
            setup = time.perf_counter() - start
        start = time.perf_counter()
        trainer(model, train, config)
        per_epoch = max(0.0, time.perf_counter() - start - setup) / config.epochs
        timed.setup = setup
        return per_epoch, accuracy(predict_logits(model, test.x), test.y)

    def dkvb():
        m = build_model(ModelConfig(num_codebooks=c, codebook_size=k, key_dim=key_dim, topk=topk, kmeans_iters=4), dim,
                        args.classes, seed=args.seed)
        m.prepare(train.x, train.y)
        return m

    row: dict[str, Any] = {"shape": shape, "embeddings": len(train), "epochs": args.epochs,
                           "batch_size": args.batch_size}
    row["linear_s_per_epoch"], row["linear_acc"] = timed(build_model({"kind": "linear"}, dim, args.classes), lin_cfg)
    row["dkvb_s_per_epoch"], row["dkvb_acc"] = timed(dkvb(), cfg)
    row["dkvb_lookup_s"] = timed.setup  # once per training run: the codes of every training embedding
    row["ratio_dkvb_to_linear"] = row["dkvb_s_per_epoch"] / row["linear_s_per_epoch"]
    if args.reference:
        ref_cfg = TrainConfig(epochs=args.reference_epochs, lr=0.01, batch_size=args.batch_size, seed=args.seed)
        fast_cfg = TrainConfig(**{**ref_cfg.__dict__})
        row["reference_epochs"] = args.reference_epochs
        row["reference_s_per_epoch"], row["reference_acc"] = timed(dkvb(), ref_cfg, reference_fit)
        row["fast_s_per_epoch_same_epochs"], row["fast_acc_same_epochs"] = timed(dkvb(), fast_cfg)
        row["speedup_vs_reference"] = row["reference_s_per_epoch"] / max(row["fast_s_per_epoch_same_epochs"], 1e-9)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| C x K | embeddings | linear s/epoch | DKVB s/epoch (+ one lookup of all codes, s) | DKVB ÷ linear (goal ≤ 2) | linear acc | DKVB acc |"
             " dense-Adam reference s/epoch | speed-up | reference acc | fast acc (same epochs) |",
             "|" + "---|" * 11]
    for r in rows:
        ref = (f"{r['reference_s_per_epoch']:.3f} | {r['speedup_vs_reference']:.1f}x | {100 * r['reference_acc']:.2f} | "
               f"{100 * r['fast_acc_same_epochs']:.2f}") if "reference_acc" in r else " | | | "
        lines.append(f"| {r['shape']} | {r['embeddings']} | {r['linear_s_per_epoch']:.3f} | "
                     f"{r['dkvb_s_per_epoch']:.3f} (+ {r['dkvb_lookup_s']:.1f}) | "
                     f"{r['ratio_dkvb_to_linear']:.2f} | {100 * r['linear_acc']:.2f} | {100 * r['dkvb_acc']:.2f} | {ref} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--embeddings", type=int, default=20000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reference", action="store_true", help="also time the dense-Adam generic loop")
    p.add_argument("--reference-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8,192 embeddings, 1 epoch")
    p.add_argument("--out", default="results/benchmarks/train.json")
    args = p.parse_args(argv)
    if args.quick:
        args.embeddings, args.epochs = min(args.embeddings, 8192), 1
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        rows.append(run_shape(shape, args))
        print(f"  {shape}: {json.dumps(rows[-1])}", file=sys.stderr)
    print(table(rows))
    from dkvb.io import atomic_write_json

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "platform": platform.platform()}
    atomic_write_json(Path(args.out), {"benchmark": "train", "environment": env, "runs": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
