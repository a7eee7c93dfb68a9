"""Choose SCRUB's hyperparameters on a validation split carved from the training set, never the test split.

For every config: hold out a seeded, class-stratified ``--val-fraction`` of the training
embeddings, train the linear head (the config's ``linear_train``) on the rest, run every
candidate of the grid on the config's first ``--requests`` forget requests and keep the
candidate whose mean forget-validation accuracy is at most ``--max-forget`` with the highest
mean retain-validation accuracy (ties: fewer FLOPs). ``common`` is the candidate that forgets on
every config's validation split with the best mean retain accuracy over them; it is what configs
without cached embeddings (CLIP, ResNet-50) ship.

Only after every config has been chosen is the test split touched, once per config: the
setting that config ships (``common`` if there is one, else its own choice) is run as the
experiment runs it (head trained on the full training set, every forget request of the config)
and its test accuracies (mean, worst forget, worst/best retain) and seconds per request are
reported: they play no part in the choice. ``--no-test`` stops after the validation phase.

The grid (ours): learning rates (``--lrs``) x presets (``--presets``) of the other settings, or
any list of settings (``--grid``, each laid over a preset),
the repository's two (``large_scale_unlearning.ipynb``: 3 epochs, msteps 2, alpha 0.001,
gamma 0.99, T 4; ``small_scale_unlearning.ipynb``: alpha 0.5, gamma 1, T 2, msteps 3, with 5
epochs instead of its 10), SGD with the repository's momentum and weight decay. Torch uses
``$DKVB_THREADS`` threads (else the free cores, :mod:`dkvb.threads`).

Only configs whose embeddings are already cached are tuned (this script never encodes)::

    python benchmarks/tune_scrub.py experiments/fashion_mnist_effnet_lite0.yaml \\
        experiments/cifar10_effnet_lite0.yaml --out benchmarks/results/tune_scrub.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkvb import EmbeddingSet, ForgetRequest, build_model, create_unlearner, evaluate, fit  # noqa: E402
from dkvb.config import ExperimentConfig, load_config  # noqa: E402
from dkvb.experiment import forget_requests, load_embeddings  # noqa: E402
from dkvb.threads import set_threads  # noqa: E402

LRS = (5e-4, 0.01, 0.05, 0.1, 0.5, 1.0)  # 5e-4: the repository's
PRESETS = {  # meghdadk/SCRUB notebooks: large_scale_unlearning (3 epochs) and small_scale_unlearning (10 epochs)
    "large": {"epochs": 3, "msteps": 2, "alpha": 0.001, "gamma": 0.99, "temperature": 4.0},
    "small": {"epochs": 5, "msteps": 3, "alpha": 0.5, "gamma": 1.0, "temperature": 2.0},
}


def grid(lrs: tuple[float, ...] = LRS, presets: tuple[str, ...] = tuple(PRESETS)) -> list[dict[str, Any]]:
    """Every candidate: a preset with one learning rate."""
    return [{"lr": lr, **PRESETS[p]} for p, lr in itertools.product(presets, lrs)]


def linear_head(cfg: ExperimentConfig, data: EmbeddingSet) -> torch.nn.Module:
    """The linear head the experiment trains (its config, its seed) on ``data``."""
    model = build_model({"kind": "linear"}, data.dim, data.num_classes, seed=cfg.seed)
    return fit(model, data, cfg.linear_train)


def run_requests(cfg: ExperimentConfig, params: dict[str, Any], model: torch.nn.Module, train: EmbeddingSet,
                 held_out: EmbeddingSet, requests: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    """SCRUB with ``params`` on every request: forget / retain accuracy on ``held_out``, FLOPs, seconds."""
    rows = []
    for classes in requests:
        start = time.perf_counter()
        report = create_unlearner("scrub", **params).unlearn(model, ForgetRequest(classes, train, seed=cfg.seed))
        seconds = time.perf_counter() - start
        m = evaluate(report.model, train, held_out, list(classes), seed=cfg.seed)
        rows.append({"classes": list(classes), "forget": m["forget_test_acc"], "retain": m["retain_test_acc"],
                     "flops": report.flops, "seconds": seconds})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over requests (``forget``, ``retain``, ``flops``, ``seconds``) plus the worst forget and
    the worst / best retain accuracy."""
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("forget", "retain", "flops", "seconds")}
    return {**out, "forget_max": max(r["forget"] for r in rows), "retain_min": min(r["retain"] for r in rows),
            "retain_max": max(r["retain"] for r in rows)}


def score(cfg: ExperimentConfig, params: dict[str, Any], model: torch.nn.Module, train: EmbeddingSet,
          held_out: EmbeddingSet, requests: list[tuple[int, ...]]) -> dict[str, float]:
    """Mean forget / retain accuracy on ``held_out`` and mean FLOPs of SCRUB with ``params`` (:func:`summary`)."""
    return summary(run_requests(cfg, params, model, train, held_out, requests))


def cached(cfg: ExperimentConfig) -> bool:
    """Whether both splits of the config's dataset have a finished embedding cache (``meta.json``)."""
    root = Path(cfg.cache_dir).expanduser()
    return all(any(root.glob(f"**/{cfg.dataset.name}/{split}-*/meta.json")) for split in ("train", "test"))


def choose(results: list[dict[str, Any]], max_forget: float) -> dict[str, Any] | None:
    """The forgetting candidate (mean forget <= ``max_forget``) with the best retain accuracy, then fewest FLOPs."""
    ok = [r for r in results if r["val"]["forget"] <= max_forget]
    return max(ok, key=lambda r: (r["val"]["retain"], -r["val"]["flops"]), default=None)


def key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def select(cfg: ExperimentConfig, train: EmbeddingSet, candidates: list[dict[str, Any]], *, val_fraction: float,
           num_requests: int, max_forget: float, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every candidate on a validation split of ``train`` and choose (no test data involved).

    ``previous``: this config's record from an earlier run; its scores are reused for candidates
    it holds when it used the same validation split and requests (the split, the head and SCRUB
    are seeded, so a rerun would give the same numbers)."""
    requests = forget_requests(cfg, train.class_names)[:num_requests]
    fit_set, val = train.holdout(val_fraction, cfg.seed)
    head = linear_head(cfg, fit_set)
    same = previous and previous["val_fraction"] == val_fraction and previous["train_size"] == len(train) \
        and [tuple(r) for r in previous["val_requests"]] == requests
    done = {key(r["params"]): r for r in previous["candidates"]} if same else {}
    results = []
    for params in candidates:
        if key(params) in done:
            results.append(done[key(params)])
            continue
        start = time.perf_counter()
        results.append({"params": params, "val": score(cfg, params, head, fit_set, val, requests)})
        logging.info("%s %s: %s (%.1fs)", cfg.name, params, results[-1]["val"], time.perf_counter() - start)
    best = choose(results, max_forget)
    return {"config": cfg.name, "train_size": len(train), "val_fraction": val_fraction, "val_requests": requests,
            "original_val": original(head, fit_set, val, requests, cfg.seed), "candidates": results,
            "reused": sum(key(c) in done for c in candidates),
            "chosen": best and best["params"], "chosen_val": best and best["val"]}


def original(head: torch.nn.Module, train: EmbeddingSet, held_out: EmbeddingSet,
             requests: list[tuple[int, ...]], seed: int) -> dict[str, float]:
    """Mean forget / retain accuracy of the head before unlearning, over ``requests``."""
    before = [evaluate(head, train, held_out, list(c), seed=seed) for c in requests]
    return {k: sum(m[f"{k}_test_acc"] for m in before) / len(before) for k in ("forget", "retain")}


def on_test(cfg: ExperimentConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as the experiment runs SCRUB (head trained on the full training set, every forget
    request of the config) on the test split: reported only, never used for a choice."""
    train, test_set = load_embeddings(cfg, progress=False)
    requests = forget_requests(cfg, train.class_names)
    head = linear_head(cfg, train)
    rows = run_requests(cfg, params, head, train, test_set, requests)
    return {"tested": params, "test_requests": len(requests),
            "original_test": original(head, train, test_set, requests, cfg.seed), "test": summary(rows),
            "test_per_request": rows}


def common(tuned: list[dict[str, Any]], max_forget: float) -> dict[str, Any] | None:
    """The candidate that forgets on every tuned config's validation split, best mean retain accuracy."""
    if not tuned:
        return None
    by_params: dict[str, list[dict[str, float]]] = {}
    for t in tuned:
        for r in t["candidates"]:
            by_params.setdefault(key(r["params"]), []).append(r["val"])
    ok = {k: v for k, v in by_params.items() if len(v) == len(tuned) and all(x["forget"] <= max_forget for x in v)}
    if not ok:
        return None
    best = max(ok, key=lambda k: sum(x["retain"] for x in ok[k]) / len(ok[k]))
    return json.loads(best)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="experiment YAML files")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each training class held out")
    p.add_argument("--requests", type=int, default=3, help="forget requests (the config's first) used for the choice")
    p.add_argument("--max-forget", type=float, default=0.05, help="mean forget-validation accuracy to reach")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS), help="learning rates of the grid")
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                   help="presets of the other settings in the grid")
    p.add_argument("--grid", metavar="JSON", help="the grid as a JSON list of SCRUB settings (or a file holding one); "
                   "each is laid over the --presets' first preset; replaces --lrs x --presets")
    p.add_argument("--reuse", type=Path, metavar="JSON", help="an earlier run's output: its validation scores are "
                   "reused for candidates it holds (same split and requests); only new candidates are run")
    p.add_argument("--no-test", action="store_true", help="stop after the validation phase (no test split touched)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, for every config")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/tune_scrub.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.info("torch threads: %d", set_threads())
    torch.manual_seed(0)
    candidates = grid(tuple(args.lrs), tuple(args.presets))
    if args.grid:
        text = Path(args.grid).read_text() if Path(args.grid).is_file() else args.grid
        candidates = [{**PRESETS[args.presets[0]], **c} for c in json.loads(text)]
    tuned, skipped, configs = [], [], []
    result: dict[str, Any] = {"max_forget": args.max_forget, "grid": candidates, "configs": tuned, "skipped": skipped}
    previous = {t["config"]: t for t in json.loads(args.reuse.read_text())["configs"]} if args.reuse else {}
    if args.reuse:
        result["reused_from"] = str(args.reuse)

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    start = time.perf_counter()
    for path in args.configs:
        cfg = load_config(path, args.set)
        if not cached(cfg):
            skipped.append(cfg.name)
            logging.warning("%s: embeddings not cached, skipped (run `dkvb embed %s` first)", cfg.name, path)
            continue
        train, _ = load_embeddings(cfg, progress=False)
        tuned.append(select(cfg, train, candidates, val_fraction=args.val_fraction, num_requests=args.requests,
                            max_forget=args.max_forget, previous=previous.get(cfg.name)))
        configs.append(cfg)
        print(f"{cfg.name}: chosen {tuned[-1]['chosen']}; val {tuned[-1]['chosen_val']}")
    result["common"] = common(tuned, args.max_forget)
    result["validation_seconds"] = time.perf_counter() - start
    print(f"common: {result['common']}")
    write()
    if not args.no_test:  # the test split, once per config, after every choice is made
        for cfg, t in zip(configs, tuned):
            params = result["common"] or t["chosen"]
            if params is None:
                continue
            t.update(on_test(cfg, params))
            print(f"{cfg.name}: test with {params}: {t['test']}")
            write()
    return 0 if tuned and all(t["chosen"] for t in tuned) else 1


if __name__ == "__main__":
    raise SystemExit(main())
