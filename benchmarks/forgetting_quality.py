"""Forgetting quality against retraining, as the NeurIPS 2023 unlearning competition scores it
(:mod:`dkvb.forgetting_eval`): N seeds of the whole pipeline per family, every method against
models of the same family retrained without the forget set.

    python benchmarks/forgetting_quality.py experiments/digits_effnet_lite0.yaml --num-models 8 \
        --out benchmarks/results/forgetting_digits.json

``--train-limit`` takes a seeded subset of the training set (the 4k sets); ``--set`` overrides
config fields (``--set train.value_init=zeros``); ``--methods`` names the runs (comma separated
labels as in the JSON, any registered method with any parameters). Per-seed outputs are kept in
``--work`` so an interrupted run resumes, and a method added later runs on the saved seeds
without retraining their reference models.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from dkvb.cache import subset_indices
from dkvb.config import load_config
from dkvb.experiment import load_embeddings, method_from_label
from dkvb.forgetting_eval import DEFAULT_METHODS, ForgettingConfig, measure_forgetting
from dkvb.io import atomic_write_json
from dkvb.provenance import code_version, run_date
from dkvb.threads import set_threads

COLUMNS = ("F", "F_at_ceiling_n", "ceiling", "final_score", "agreement", "js", "forget_test_acc", "retain_test_acc",
           "mia", "mia_gap")


def table(result: dict) -> str:
    """Markdown table of the means over requests."""
    lines = ["| method | family | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for label, row in result["mean"].items():
        lines.append(f"| {label} | {row['family']} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--num-models", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="score the first N forget requests (default: all)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", default=None,
                   help="comma-separated method labels to run, any registered method with any parameters, e.g. "
                        "'dkvb-activations[min_share=0],drop-output' (default: the package's DEFAULT_METHODS)")
    p.add_argument("--validation", action="store_true",
                   help="score on a seeded 10%% holdout of the training set instead of the test split (for tuning)")
    p.add_argument("--seeds", default=None, metavar="A:B",
                   help="run only seed offsets A..B-1 (processes with disjoint ranges share --work); scores once all are done")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for per-seed outputs (default: next to --out)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    set_threads(args.threads)
    cfg = load_config(args.config, args.set)
    train, test = load_embeddings(cfg, progress=False)
    if args.train_limit and args.train_limit < len(train):
        train = train.subset(torch.from_numpy(subset_indices(len(train), args.train_limit, cfg.seed)))
    if args.validation:
        train, test = train.holdout(0.1, cfg.seed)
    methods = list(DEFAULT_METHODS)
    if args.methods:  # commas inside a label's [...] stay
        methods = [method_from_label(label) for label in re.split(r",(?![^\[]*\])", args.methods)]
    fcfg = ForgettingConfig(num_models=args.num_models, requests=args.requests, methods=methods)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix("")
    start, code = time.perf_counter(), code_version()  # the code that runs, named before anything can change it
    only = range(*map(int, args.seeds.split(":"))) if args.seeds else None
    result = measure_forgetting(cfg, train, test, fcfg, work, only=only)
    if result is None:
        print(f"seeds {args.seeds} done; scoring waits for the others")
        return 0
    result.update({"argv": sys.argv[1:] if argv is None else argv, "commit": code, "date": run_date(),
                   "train_rows": len(train), "test_rows": len(test),
                   "wall_seconds": time.perf_counter() - start, "threads": args.threads,
                   "scored_on": "validation (10% of the training set)" if args.validation else "test split"})
    atomic_write_json(out, result)
    print(table(result))
    print(f"N = {fcfg.num_models}, {len(result['requests'])} requests, {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
