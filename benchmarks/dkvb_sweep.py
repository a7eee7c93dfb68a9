"""Which bottleneck settings make a DKVB as good as a logistic-regression probe, and forget cleanly?

Every choice is made on a validation split carved from the training set (stratified, seeded),
never on the test split:

* the probe: scikit-learn logistic regression on standardised embeddings, its ``C`` chosen on
  the validation split, then refit on the whole training set (its test accuracy is the bar);
* each DKVB setting (bottleneck size, projection, top-k, decoder, value start, epochs, lr, label
  smoothing, weight decay) is trained on the rest of the training set and scored on the validation split:
  accuracy, then one forget request per class with the default ``dkvb-activations`` rule
  per rule given (forget-validation accuracy, retain-validation drop), training seconds and training-state
  memory (values, Adam moments, gradient buffer and codes).

Settings are given as JSON objects of :class:`dkvb.ModelConfig` / :class:`dkvb.TrainConfig`
fields, and ``key_pool`` (where the keys are fitted: ``{"name": "cifar100", "train_limit": 10000}``,
another dataset's training images with the config's encoder, as an experiment's ``key_pool``;
or ``{"holdout": 10000}``, that many seeded rows of the training part that the values never
train on: unlabelled images of the training set's own kind), over a base, e.g. ``--grid '[{"num_codebooks": 256}, {"topk": 4}]'``. The base is the
config's own ``model`` and ``train`` sections (the fields where they differ from the dataclass
defaults), then ``--base``; ``--no-config-base`` starts from the dataclass defaults instead
(``TrainConfig``'s are the linear head's: 10 epochs at lr 1e-3). Each result records its whole
setting over those defaults (runs before commit 22992f5, 2026-11-28, started from the dataclass
defaults, so a recorded setting without ``epochs`` means 10 epochs at lr 1e-3 in every row).
Results are appended to a JSON file so a sweep can be extended run by run.

    python benchmarks/dkvb_sweep.py experiments/fashion_mnist_effnet_lite0.yaml --grid '[{}]'
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from dkvb import EmbeddingSet, ModelConfig, TrainConfig, build_model, fit
from dkvb.config import DatasetConfig, check_key_pool, load_config
from dkvb.evaluate import accuracy
from dkvb.io import atomic_write_json
from dkvb.models import resolve_config
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


def probe_accuracy(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], c: float) -> float:
    """Accuracy on ``b`` (features, labels) of logistic regression (``C=c``) fitted on standardised ``a``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(a[0].numpy())
    clf = LogisticRegression(C=c, max_iter=300, tol=1e-3).fit(scaler.transform(a[0].numpy()), a[1].numpy())
    return float((clf.predict(scaler.transform(b[0].numpy())) == b[1].numpy()).mean())


def probe(fit_part: EmbeddingSet, val: EmbeddingSet, train: EmbeddingSet, test: EmbeddingSet,
          grid: Sequence[float]) -> dict[str, Any]:
    """Logistic regression on standardised embeddings: C chosen on ``val``, refit on ``train``."""
    start = time.perf_counter()
    val_acc = {c: probe_accuracy((fit_part.x, fit_part.y), (val.x, val.y), c) for c in grid}
    best = max(val_acc, key=val_acc.get)
    return {"C": best, "val_acc": val_acc[best], "val_acc_by_C": {str(k): v for k, v in val_acc.items()},
            "test_acc": probe_accuracy((train.x, train.y), (test.x, test.y), best), "seconds": time.perf_counter() - start}


def input_probe(model, fit_part: EmbeddingSet, val: EmbeddingSet, grid: Sequence[float]) -> float:
    """Best validation accuracy over ``grid`` of the probe on what the codebooks read (the
    bottleneck's whitened or discriminant input, ``bottleneck.whiten``): the linear ceiling of the
    bottleneck's input, which separates what the projection loses from what quantising it loses."""
    b = model.bottleneck
    with torch.no_grad():
        a, v = b.whiten(fit_part.x), b.whiten(val.x)
    return max(probe_accuracy((a, fit_part.y), (v, val.y), c) for c in grid)


def forget_each_class(model, fit_part: EmbeddingSet, val: EmbeddingSet, cands, before, seed: int,
                      rule: dict[str, Any]) -> dict[str, Any]:
    """One ``dkvb-activations`` request (parameters ``rule``) per class: forget-val accuracy,
    retain-val drop and the share of keys masked, mean and worst class."""
    forget, drops, masked, refused = [], [], [], []
    unlearner = create_unlearner("dkvb-activations", **rule)
    for c in range(val.num_classes):
        try:
            report = unlearner.unlearn(model, ForgetRequest((c,), fit_part, seed=seed))
        except ValueError as e:  # a mask that empties a codebook
            refused.append(f"{val.class_names[c]}: {e}")
            continue
        logits = report.model.predict_from(val.x, cands)
        f = val.y == c
        forget.append(accuracy(logits[f], val.y[f]))
        drops.append(accuracy(before[~f], val.y[~f]) - accuracy(logits[~f], val.y[~f]))
        masked.append(report.details["keys_masked"] / report.details["keys_total"])

    def stat(values: list[float], fn) -> float:
        return float(fn(values)) if values else float("nan")

    out = {"rule": rule, "forget_val_mean": stat(forget, np.mean), "forget_val_max": stat(forget, np.max),
           "retain_drop_mean": stat(drops, np.mean), "retain_drop_max": stat(drops, np.max),
           "keys_masked_share_mean": stat(masked, np.mean)}
    if refused:
        out["refused"] = refused
    return out


def config_base(cfg) -> dict[str, Any]:
    """The fields of ``cfg.model`` and ``cfg.train`` that differ from the dataclass defaults (seed
    aside: the sweep's ``--seed`` seeds every run), and the config's ``key_pool``: the setting a
    config ships."""
    out: dict[str, Any] = {}
    for given, default in ((cfg.model, ModelConfig()), (cfg.train, TrainConfig())):
        out.update({k: v for k, v in asdict(given).items() if k != "seed" and v != getattr(default, k)})
    if cfg.key_pool is not None:
        out["key_pool"] = {k: v for k, v in asdict(cfg.key_pool).items() if v != getattr(DatasetConfig(), k)}
    return out


def key_rows(setting: dict[str, Any], fit_part: EmbeddingSet, cfg, seed: int) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(rows the keys are fitted on, rows the values train on) under the setting's ``key_pool``
    (the module docstring); without one, ``fit_part`` for both."""
    pool = setting.get("key_pool")
    if pool is None:
        return fit_part, fit_part
    if set(pool) == {"holdout"}:
        n = int(pool["holdout"])
        if not 0 < n < len(fit_part):
            raise ValueError(f"key_pool holdout: {n} rows of a {len(fit_part)}-row training part")
        perm = torch.randperm(len(fit_part), generator=torch.Generator().manual_seed(seed))
        return fit_part.subset(perm[:n]), fit_part.subset(perm[n:])
    from dkvb.experiment import load_key_pool

    cfg = replace(cfg, key_pool=DatasetConfig(**pool))
    check_key_pool(cfg)
    return load_key_pool(cfg, progress=False), fit_part


def train_setting(setting: dict[str, Any], fit_part: EmbeddingSet, seed: int,
                  models: Path | None = None, keys_on: EmbeddingSet | None = None) -> tuple[Any, dict[str, Any]]:
    """(model, training info) of one setting trained on ``fit_part``, its keys fitted on
    ``keys_on`` (default ``fit_part``): k-means and training seconds
    and what training chose itself (a probe start's C and holdout accuracies). With a ``models``
    folder, a model trained before on the same rows, setting and seed is loaded from it (with its
    training info) and a new one is saved there, so rule sweeps reuse it."""
    from dkvb.data import fingerprint
    from dkvb.store import load_model, save_model

    key = json.dumps({"setting": setting, "seed": seed, "data": fingerprint(fit_part.x)}, sort_keys=True)
    path = None if models is None else models / hashlib.sha256(key.encode()).hexdigest()[:16]
    if path is not None and path.is_dir():
        model, manifest = load_model(path)
        return model, {k: v for k, v in manifest["extra"].items() if k != "key"}
    model_cfg = resolve_config(ModelConfig(**{k: v for k, v in setting.items() if k in MODEL_FIELDS}), len(fit_part))
    train_cfg = TrainConfig(**{k: v for k, v in setting.items() if k in TRAIN_FIELDS}, seed=seed)
    model = build_model(model_cfg, fit_part.dim, fit_part.num_classes, seed=seed)
    start = time.perf_counter()
    keys_on = fit_part if keys_on is None else keys_on
    model.prepare(keys_on.x, keys_on.y)
    kmeans_s = time.perf_counter() - start
    start, chosen = time.perf_counter(), {}
    fit(model, fit_part, train_cfg, info=chosen)
    info = {"kmeans_seconds": kmeans_s, "train_seconds": time.perf_counter() - start, **chosen}
    model.compute_activation_counts(fit_part.x, fit_part.y)
    if path is not None:
        save_model(model, path, class_names=list(fit_part.class_names), encoder="dkvb_sweep",
                   extra={**info, "key": key})
    return model, info


def evaluate_setting(setting: dict[str, Any], fit_part: EmbeddingSet, val: EmbeddingSet, seed: int,
                     rules: list[dict[str, Any]], models: Path | None = None,
                     input_grid: Sequence[float] = (), cfg=None) -> dict[str, Any]:
    """Train (or load, see :func:`train_setting`) one DKVB setting on ``fit_part`` (less a
    ``key_pool`` holdout, :func:`key_rows`; ``cfg``: the experiment config a pool dataset is
    read with); validation accuracy, per forget rule one forget request per class, and with
    ``input_grid`` (probe C values) the :func:`input_probe` accuracy."""
    keys_on, fit_part = key_rows(setting, fit_part, cfg, seed)
    model, info = train_setting(setting, fit_part, seed, models, keys_on)
    b = model.bottleneck
    cands = b.candidates(val.x)
    before = model.predict_from(val.x, cands)
    out: dict[str, Any] = {
        "setting": setting, "codebook_size": b.codebook_size, "val_acc": accuracy(before, val.y), **info,
        "state_mib": (4 * b.values.numel() * 4 + 8 * len(fit_part) * b.num_codebooks * b.topk) / 2**20,
    }
    if keys_on is not fit_part:
        out.update(key_rows=len(keys_on), value_rows=len(fit_part))
    if input_grid:
        out["input_probe_val_acc"] = input_probe(model, fit_part, val, input_grid)
    out["rules"] = [forget_each_class(model, fit_part, val, cands, before, seed, rule) for rule in rules]
    out.update({k: v for k, v in out["rules"][0].items() if k != "rule"})  # the first rule's numbers, flat
    return out


def summary(results: dict[str, Any]) -> str:
    """Markdown: per dataset, the probe and one row per setting (validation split, percent)."""
    lines = []
    for name, entry in results["datasets"].items():
        p = entry.get("probe", {})
        lines += [f"### {name} ({entry['train']} train / {entry['val']} of them for validation, {entry['classes']} classes)",
                  "", f"Probe: C = {p.get('C')}, validation {100 * p.get('val_acc', float('nan')):.2f}%, "
                  f"test {100 * p.get('test_acc', float('nan')):.2f}% (refit on the whole training set).", "",
                  "| setting | K | val acc | gap to probe | probe on its input | forget-val mean / max |"
                  " retain drop mean / max | keys masked | train s | k-means s | state MiB |", "|" + "---|" * 11]
        for r in entry["runs"]:
            for q in r.get("rules", [r]):
                rule = f" rule `{json.dumps(q['rule'])}`" if q.get("rule") else ""
                refused = f" ({len(q['refused'])} refused)" if q.get("refused") else ""
                lines.append(
                    f"| `{json.dumps(r['setting'])}`{rule}{refused} | {r.get('codebook_size', '')} | "
                    f"{100 * r['val_acc']:.2f} | {100 * (p.get('val_acc', float('nan')) - r['val_acc']):.2f} | "
                    f"{format(100 * r['input_probe_val_acc'], '.2f') if 'input_probe_val_acc' in r else ''} | "
                    f"{100 * q['forget_val_mean']:.2f} / {100 * q['forget_val_max']:.2f} | "
                    f"{100 * q['retain_drop_mean']:.2f} / {100 * q['retain_drop_max']:.2f} | "
                    f"{100 * q['keys_masked_share_mean']:.1f}% | {r['train_seconds']:.1f} | {r['kmeans_seconds']:.1f} | "
                    f"{r['state_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="experiment YAML whose embedding cache is used")
    p.add_argument("--name", help="dataset label in the results (default: the config's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override (dataset.name=...)")
    p.add_argument("--train-limit", type=int, default=None, help="seeded subset of the training set")
    p.add_argument("--base", default="{}", help="JSON: settings over the config's own (see --no-config-base)")
    p.add_argument("--no-config-base", action="store_true",
                   help="start settings from the dataclass defaults, not the config's model/train sections")
    p.add_argument("--grid", default="[{}]", help="JSON list of settings over --base")
    p.add_argument("--rules", default="[{}]", help="JSON list: dkvb-activations parameters of the forget requests")
    p.add_argument("--probe-grid", default="0.001,0.01,0.1,1", help="logistic-regression C values")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--input-probe", action="store_true",
                   help="also fit the probe on each setting's bottleneck input (its linear ceiling)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/benchmarks/dkvb_sweep.json")
    p.add_argument("--models", type=Path, help="folder of trained models to reuse across runs (e.g. to add rules)")
    p.add_argument("--summary", nargs="+", metavar="JSON", help="print the markdown summary of these result files")
    args = p.parse_args(argv)
    if args.summary:
        for path in args.summary:
            print(summary(json.loads(Path(path).read_text())))
        return 0
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
    fit_part, val = train.holdout(args.val_fraction, args.seed)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"datasets": {}}
    entry = results["datasets"].setdefault(name, {"train": len(train), "val": len(val), "test": len(test),
                                                  "dim": train.dim, "classes": train.num_classes, "runs": []})
    grid = [float(c) for c in args.probe_grid.split(",")]
    if not args.no_probe and "probe" not in entry:
        entry["probe"] = probe(fit_part, val, train, test, grid)
        print(f"{name}: probe {json.dumps(entry['probe'])}", flush=True)
        atomic_write_json(out_path, results)
    cfg = load_config(cfg_path, [])
    base = {} if args.no_config_base else config_base(cfg)
    base, rules = {**base, **json.loads(args.base)}, json.loads(args.rules)
    for point in json.loads(args.grid):
        setting = {**base, **point}
        r = evaluate_setting(setting, fit_part, val, args.seed, rules, args.models, grid if args.input_probe else (),
                             cfg=cfg)
        r["load_avg_1min"] = os.getloadavg()[0]
        entry["runs"].append(r)
        atomic_write_json(out_path, results)
        gap = 100 * (entry.get("probe", {}).get("val_acc", float("nan")) - r["val_acc"])
        ceiling = f" input probe {100 * r['input_probe_val_acc']:.2f}" if "input_probe_val_acc" in r else ""
        print(f"{name} {json.dumps(setting)}: val {100 * r['val_acc']:.2f} (probe gap {gap:.2f}){ceiling} "
              f"train {r['train_seconds']:.1f}s kmeans {r['kmeans_seconds']:.1f}s", flush=True)
        for q in r["rules"]:
            print(f"    rule {json.dumps(q['rule'])}: forget {100 * q['forget_val_mean']:.2f}/"
                  f"{100 * q['forget_val_max']:.2f} drop {100 * q['retain_drop_mean']:.2f}/"
                  f"{100 * q['retain_drop_max']:.2f} masked {100 * q['keys_masked_share_mean']:.1f}%"
                  f"{' REFUSED ' + str(len(q['refused'])) if 'refused' in q else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
