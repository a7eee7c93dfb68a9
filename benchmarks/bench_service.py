"""Service benchmark: many sequential forget/restore requests against one stored model.

Builds (or, with ``--config``, loads) a CIFAR-100-sized DKVB model (100 classes), saves it to a
fresh model store and sends ``--requests`` requests through :class:`dkvb.service.ModelService`:
mostly ``activations`` forget requests on random classes (some of them already forgotten, i.e.
no-ops; some refused because they would mask every key of a codebook), some ``examples``
requests with forget embeddings (without the optional metrics, which cost a forward pass over
the embeddings), and restores to random earlier requests. Reports
requests/s, latency, audit-log and store size, and whether replaying the log from the original
model reproduces the final key mask bit for bit; prints a table and writes JSON to
``results/benchmarks/``.

    python benchmarks/bench_service.py                       # synthetic 100-class embeddings
    python benchmarks/bench_service.py --requests 100        # quick
    python benchmarks/bench_service.py --config experiments/clip_vit_b32_cifar100.yaml

The default runs torch on one thread: a request is a handful of small tensor operations plus
file writes, and extra threads only contend on a shared CPU.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit
from dkvb.io import atomic_write_json
from dkvb.service import LOG, ModelService
from dkvb.store import save_model


def synthetic(num_classes: int, per_class: int, dim: int, seed: int) -> EmbeddingSet:
    """Gaussian clusters, one per class (CIFAR-100-like: 100 classes, CLIP-sized 512-d)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 2.0
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return EmbeddingSet(x, y, [f"class{i:03d}" for i in range(num_classes)])


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, EmbeddingSet, str, dict[str, Any]]:
    """(trained DKVB model with cached counts, training embeddings, encoder name, description)."""
    if args.config:
        from dkvb.config import load_config
        from dkvb.experiment import load_embeddings, train_models

        cfg = load_config(args.config, args.overrides)
        train, _ = load_embeddings(cfg, progress=False)
        model = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"][0]
        return model, train, cfg.encoder.name, {"config": args.config, "name": cfg.name}
    train = synthetic(100, args.per_class, args.dim, args.seed)
    model = build_model(ModelConfig(num_codebooks=args.codebooks, codebook_size=args.codebook_size, key_dim=8,
                                    kmeans_iters=10), train.dim, train.num_classes, seed=args.seed)
    fit(model, train, TrainConfig(epochs=args.epochs, lr=1e-2, seed=args.seed))
    model.compute_activation_counts(train.x, train.y)
    return model, train, "synthetic", {"synthetic": {"classes": 100, "per_class": args.per_class, "dim": args.dim}}


def bench(model, train: EmbeddingSet, encoder: str, store: Path, *, requests: int, restore_share: float,
          examples_share: float, seed: int) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    save_model(model, store, class_names=list(train.class_names), encoder=encoder)
    full_bytes = _size(store)
    service = ModelService(store)
    rng = random.Random(seed)
    n = train.num_classes
    ids: list[str] = []
    latency: dict[str, list[float]] = {"forget": [], "noop": [], "restore": [], "refused": []}
    forgotten = 0
    start = time.perf_counter()
    for i in range(requests):
        if ids and (rng.random() < restore_share or forgotten >= n // 2):
            t = time.perf_counter()
            rec = service.restore(rng.choice(ids + ["origin"]))
            latency["restore"].append(time.perf_counter() - t)
        else:
            c = rng.randrange(n)
            examples = rng.random() < examples_share
            t = time.perf_counter()
            try:
                rec = service.forget([c], "examples" if examples else "activations",
                                     {"num_examples": 10} if examples else None,
                                     data=train if examples else None, seed=i, metrics=False)
            except ValueError:  # it would mask a whole codebook: refused, the store is unchanged
                latency["refused"].append(time.perf_counter() - t)
                continue
            latency["noop" if rec["noop"] else "forget"].append(time.perf_counter() - t)
            ids.append(rec["request_id"])
        forgotten = len(rec["forgotten"])
    seconds = time.perf_counter() - start
    t = time.perf_counter()
    replayed = service.replay(train)
    replay_seconds = time.perf_counter() - t
    versions = sorted((store / "versions").iterdir())
    return {
        "requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
        "counts": {k: len(v) for k, v in latency.items()},
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in latency.items() if v},
        "p95_ms": {k: 1e3 * sorted(v)[int(0.95 * (len(v) - 1))] for k, v in latency.items() if v},
        "log_bytes": (store / LOG).stat().st_size, "log_records": len(service.log()),
        "store_bytes": _size(store), "full_version_bytes": full_bytes, "versions": len(versions),
        "mask_version_bytes": statistics.median(_size(v) for v in versions[1:]) if len(versions) > 1 else 0,
        "replay_seconds": replay_seconds, "replay_recomputed": replayed.recomputed,
        "replay_matches_head": replayed.matches_head, "keys_masked_final": int(replayed.mask.sum()),
        "forgotten_final": forgotten,
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def table(r: dict[str, Any]) -> str:
    rows = [
        ("requests", f"{r['requests']} ({', '.join(f'{v} {k}' for k, v in r['counts'].items())})"),
        ("requests/s", f"{r['requests_per_s']:.1f}"),
        ("median latency (ms)", ", ".join(f"{k} {v:.1f}" for k, v in r["median_ms"].items())),
        ("p95 latency (ms)", ", ".join(f"{k} {v:.1f}" for k, v in r["p95_ms"].items())),
        ("audit log", f"{r['log_bytes'] / 1e6:.2f} MB, {r['log_records']} records "
                      f"({r['log_bytes'] / max(r['log_records'], 1):.0f} B each)"),
        ("store", f"{r['store_bytes'] / 1e6:.1f} MB in {r['versions']} versions: full "
                  f"{r['full_version_bytes'] / 1e6:.1f} MB, key-mask version {r['mask_version_bytes'] / 1e3:.1f} kB"),
        ("replay", f"{r['replay_seconds']:.1f} s, {r['replay_recomputed']} requests recomputed"),
        ("final mask == replay", "yes, bit for bit" if r["replay_matches_head"] else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:{width}s} | {v} |" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--config", help="experiment YAML: use its cached embeddings and trained DKVB model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--restore-share", type=float, default=0.2, help="share of requests that are restores")
    p.add_argument("--examples-share", type=float, default=0.1, help="share of forgets using the examples method")
    p.add_argument("--codebooks", type=int, default=64, help="synthetic model: codebooks")
    p.add_argument("--codebook-size", type=int, default=256, help="synthetic model: keys per codebook")
    p.add_argument("--per-class", type=int, default=100, help="synthetic embeddings per class")
    p.add_argument("--dim", type=int, default=512, help="synthetic embedding size")
    p.add_argument("--epochs", type=int, default=2, help="synthetic model: training epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--store", type=Path, help="store folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model, train, encoder, source = build(args)
    print(f"model ready in {time.perf_counter() - t:.1f} s: {model.num_classes} classes, "
          f"{model.bottleneck.num_codebooks} x {model.bottleneck.codebook_size} keys", flush=True)
    tmp = None if args.store else tempfile.mkdtemp(prefix="dkvb-bench-")
    store = args.store or Path(tmp) / "model"
    try:
        result = bench(model, train, encoder, store, requests=args.requests, restore_share=args.restore_share,
                       examples_share=args.examples_share, seed=args.seed)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"source": source, "model": model.config, "threads": args.threads, **result}
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"service_{args.requests}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return 0 if result["replay_matches_head"] else 1


if __name__ == "__main__":
    sys.exit(main())
