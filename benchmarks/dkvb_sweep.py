"""Which bottleneck settings make a DKVB as good as a logistic-regression probe, and forget cleanly?

Every choice is made on a validation split carved from the training set (stratified, seeded),
never on the test split:

* the probe: scikit-learn logistic regression on standardised embeddings, its ``C`` chosen on
  the validation split, then refit on the whole training set (its test accuracy is the bar);
* each DKVB setting (bottleneck size, projection, top-k, decoder, epochs, lr, label smoothing,
  weight decay) is trained on the rest of the training set and scored on the validation split:
  accuracy, then one forget request per class with the default ``dkvb-activations`` rule
  (forget-validation accuracy, retain-validation drop), training seconds and training-state
  memory (values, Adam moments, gradient buffer and codes).

Settings are given as JSON objects of :class:`dkvb.ModelConfig` / :class:`dkvb.TrainConfig`
fields over a base (``--base``), e.g. ``--grid '[{"num_codebooks": 256}, {"topk": 4}]'``.
Results are appended to a JSON file so a sweep can be extended run by run.

    python benchmarks/dkvb_sweep.py experiments/fashion_mnist_effnet_lite0.yaml --grid '[{}]'
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit
from dkvb.config import load_config
from dkvb.evaluate import accuracy
from dkvb.io import atomic_write_json
from dkvb.unlearn import ForgetRequest, create_unlearner

MODEL_FIELDS = set(ModelConfig.__dataclass_fields__)
TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__)


def load_data(config: str, train_limit: int | None, seed: int) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(train, test) embeddings of an experiment config; ``train_limit`` takes a seeded subset
    of the cached training set (the cache of the full set is reused, never re-encoded)."""
    from dkvb.cache import subset_indices
    from dkvb.experiment import load_embeddings

    cfg = load_config(config, [])
    train, test = load_embeddings(cfg, progress=False)
    if train_limit is not None and train_limit < len(train):
        train = train.subset(torch.from_numpy(subset_indices(len(train), train_limit, seed)))
    return train, test


def validation_split(train: EmbeddingSet, fraction: float, seed: int) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(fit part, validation part): ``fraction`` of every class, seeded."""
    g = torch.Generator().manual_seed(seed)
    val = torch.zeros(len(train), dtype=torch.bool)
    for c in train.y.unique():
        idx = (train.y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val[idx[: max(1, round(fraction * len(idx)))]] = True
    return train.subset(~val), train.subset(val)


def probe(fit_part: EmbeddingSet, val: EmbeddingSet, train: EmbeddingSet, test: EmbeddingSet,
          grid: Sequence[float]) -> dict[str, Any]:
    """Logistic regression on standardised embeddings: C chosen on ``val``, refit on ``train``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def run(a: EmbeddingSet, b: EmbeddingSet, c: float) -> float:
        scaler = StandardScaler().fit(a.x.numpy())
        clf = LogisticRegression(C=c, max_iter=300, tol=1e-3)
        clf.fit(scaler.transform(a.x.numpy()), a.y.numpy())
        return float((clf.predict(scaler.transform(b.x.numpy())) == b.y.numpy()).mean())

    start = time.perf_counter()
    val_acc = {c: run(fit_part, val, c) for c in grid}
    best = max(val_acc, key=val_acc.get)
    return {"C": best, "val_acc": val_acc[best], "val_acc_by_C": {str(k): v for k, v in val_acc.items()},
            "test_acc": run(train, test, best), "seconds": time.perf_counter() - start}


def evaluate_setting(setting: dict[str, Any], fit_part: EmbeddingSet, val: EmbeddingSet, seed: int,
                     rule: dict[str, Any]) -> dict[str, Any]:
    """Train one DKVB setting on ``fit_part``; validation accuracy and one forget request per class."""
    model_cfg = ModelConfig(**{k: v for k, v in setting.items() if k in MODEL_FIELDS})
    train_cfg = TrainConfig(**{k: v for k, v in setting.items() if k in TRAIN_FIELDS}, seed=seed)
    model = build_model(model_cfg, fit_part.dim, fit_part.num_classes, seed=seed)
    start = time.perf_counter()
    model.prepare(fit_part.x)
    kmeans_s = time.perf_counter() - start
    start = time.perf_counter()
    fit(model, fit_part, train_cfg)
    train_s = time.perf_counter() - start
    model.compute_activation_counts(fit_part.x, fit_part.y)
    b = model.bottleneck
    cands = b.candidates(val.x)
    before = model.predict_from(val.x, cands)
    out: dict[str, Any] = {
        "setting": setting, "val_acc": accuracy(before, val.y), "kmeans_seconds": kmeans_s,
        "train_seconds": train_s,
        "state_mib": (4 * b.values.numel() * 4 + 8 * len(fit_part) * b.num_codebooks * b.topk) / 2**20,
    }
    forget, drops, masked = [], [], []
    unlearner = create_unlearner("dkvb-activations", **rule)
    for c in range(val.num_classes):
        try:
            report = unlearner.unlearn(model, ForgetRequest((c,), fit_part, seed=seed))
        except ValueError as e:  # a mask that empties a codebook
            out.setdefault("refused", []).append(f"{val.class_names[c]}: {e}")
            continue
        logits = report.model.predict_from(val.x, cands)
        f = val.y == c
        forget.append(accuracy(logits[f], val.y[f]))
        drops.append(accuracy(before[~f], val.y[~f]) - accuracy(logits[~f], val.y[~f]))
        masked.append(report.details["keys_masked"] / report.details["keys_total"])
    out.update({"forget_val_mean": float(np.mean(forget)) if forget else float("nan"),
                "forget_val_max": float(np.max(forget)) if forget else float("nan"),
                "retain_drop_mean": float(np.mean(drops)) if drops else float("nan"),
                "retain_drop_max": float(np.max(drops)) if drops else float("nan"),
                "keys_masked_share_mean": float(np.mean(masked)) if masked else float("nan")})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="experiment YAML whose embedding cache is used")
    p.add_argument("--name", help="dataset label in the results (default: the config's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override (dataset.name=...)")
    p.add_argument("--train-limit", type=int, default=None, help="seeded subset of the training set")
    p.add_argument("--base", default="{}", help="JSON: settings every grid point starts from")
    p.add_argument("--grid", default="[{}]", help="JSON list of settings over --base")
    p.add_argument("--rule", default="{}", help="JSON: dkvb-activations parameters of the forget requests")
    p.add_argument("--probe-grid", default="0.001,0.01,0.1,1", help="logistic-regression C values")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/benchmarks/dkvb_sweep.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg_path = args.config
    if args.overrides:  # a config with overrides, e.g. another dataset on the same encoder
        cfg = load_config(args.config, args.overrides)
        from dkvb.config import save_config

        cfg_path = str(Path(args.out).with_suffix(".config.yaml"))
        Path(cfg_path).parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg_path))
    name = args.name or load_config(args.config, args.overrides).name
    if args.train_limit:
        name += f"@{args.train_limit}"
    train, test = load_data(cfg_path, args.train_limit, args.seed)
    fit_part, val = validation_split(train, args.val_fraction, args.seed)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"datasets": {}}
    entry = results["datasets"].setdefault(name, {"train": len(train), "val": len(val), "test": len(test),
                                                  "dim": train.dim, "classes": train.num_classes, "runs": []})
    if not args.no_probe and "probe" not in entry:
        entry["probe"] = probe(fit_part, val, train, test, [float(c) for c in args.probe_grid.split(",")])
        print(f"{name}: probe {json.dumps(entry['probe'])}", flush=True)
        atomic_write_json(out_path, results)
    base, rule = json.loads(args.base), json.loads(args.rule)
    for point in json.loads(args.grid):
        setting = {**base, **point}
        r = evaluate_setting(setting, fit_part, val, args.seed, rule)
        r["rule"] = rule
        r["load_avg_1min"] = os.getloadavg()[0]
        entry["runs"].append(r)
        atomic_write_json(out_path, results)
        gap = 100 * (entry.get("probe", {}).get("val_acc", float("nan")) - r["val_acc"])
        print(f"{name} {json.dumps(setting)}: val {100 * r['val_acc']:.2f} (probe gap {gap:.2f}) "
              f"forget {100 * r['forget_val_mean']:.2f}/{100 * r['forget_val_max']:.2f} "
              f"drop {100 * r['retain_drop_mean']:.2f}/{100 * r['retain_drop_max']:.2f} "
              f"masked {100 * r['keys_masked_share_mean']:.1f}% train {r['train_seconds']:.1f}s "
              f"kmeans {r['kmeans_seconds']:.1f}s{' REFUSED ' + str(len(r['refused'])) if 'refused' in r else ''}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
