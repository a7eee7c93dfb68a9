"""Latency of one ``dkvb-activations`` forget request (the default rule; masking on cached counts, and
on a count- or ridge-valued model the recount or ridge solve too).

The target: such a request stays under 10 ms and reports its FLOPs. ``--params`` times other
settings of the method, such as the solve alone (``{"mask_keys": false}``). Loads the DKVB an
experiment trained (``dkvb run``/``dkvb train``: its run folder; trained here if missing), then
times one request per class (each from the trained model, as a single request), a few rounds
over the classes, on ``--threads`` threads, after one untimed-in-the-stats first request (the
process's cold start, reported as ``first_request_ms``), and one request per class on the model
that forgot the class before it (``second_request_median_ms``: a sequence's next step). Prints a
table and writes JSON.

    python benchmarks/bench_request.py experiments/cifar100_effnet_lite0.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dkvb.config import load_config
from dkvb.data import EmbeddingSet
from dkvb.experiment import load_embeddings, train_models
from dkvb.io import atomic_write_json
from dkvb.provenance import code_version, run_date
from dkvb.request import make_request
from dkvb.unlearn import create_unlearner


def one_request(unlearner, model, c: int, train: EmbeddingSet, forgotten: Sequence[int] = ()) -> tuple[float, int, Any]:
    """Seconds, FLOPs and the unlearned model of one request forgetting class ``c`` from ``model``
    (which forgot the classes ``forgotten``; ``train``: its training embeddings, read only by a
    request that needs them, such as a ridge solve)."""
    request, _ = make_request(unlearner, model, [c], train, 0, forgotten)
    start = time.perf_counter()
    report = unlearner.unlearn(model, request)
    return time.perf_counter() - start, report.flops, report.model


def time_requests(model, train: EmbeddingSet, rounds: int, params: dict[str, Any]) -> dict[str, Any]:
    """Seconds and FLOPs of one request per class, ``rounds`` times over the classes."""
    unlearner = create_unlearner("dkvb-activations", **params)
    # the first request of a process also loads compiled kernels (numba's cache: ~0.5 s), which a
    # serving process pays once; it is reported apart from the steady-state latency below
    first, _, _ = one_request(unlearner, model, 0, train)
    n, timed, forgot = model.num_classes, [], []  # forgot[c]: the first round's model without class c
    for r in range(rounds):
        for c in range(n):
            seconds, flops, out = one_request(unlearner, model, c, train)
            timed.append((seconds, flops))
            if r == 0:
                forgot.append(out)
    ms = sorted(1000 * s for s, _ in timed)
    # the request after one other (class c + 1 from the model that forgot c): a sequence's next step
    after = sorted(1000 * one_request(unlearner, forgot[c], (c + 1) % n, train, (c,))[0] for c in range(n))
    return {"params": params, "first_request_ms": 1000 * first, "requests": len(ms), "median_ms": statistics.median(ms),
            "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1], "flops": sorted({f for _, f in timed}),
            "second_request_median_ms": statistics.median(after)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="experiment YAMLs (their trained DKVB is loaded)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the classes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/request_latency.json"))
    p.add_argument("--params", type=json.loads, action="append", default=None, metavar="JSON",
                   help="dkvb-activations parameters to time (repeatable; default: the method's defaults), "
                        "e.g. '{\"mask_keys\": false}'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every config, e.g. train.value_init=counts")
    args = p.parse_args(argv)
    code = code_version()  # the code that runs, named before anything can change it
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.configs:
        cfg = load_config(path, args.overrides)
        train, _ = load_embeddings(cfg, progress=False)
        model, _ = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"]
        b = model.bottleneck
        for params in args.params or [{}]:
            row = {"config": cfg.name, "codebooks": b.num_codebooks, "keys": b.codebook_size,
                   "classes": model.num_classes, "threads": args.threads, "load_avg_1min": os.getloadavg()[0],
                   **time_requests(model, train, args.rounds, params)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| config | parameters | C x K, classes | first request ms | median ms | p90 ms | max ms | "
          "second request median ms | FLOPs per request |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {json.dumps(r['params'])} | {r['codebooks']} x {r['keys']}, {r['classes']} | "
              f"{r['first_request_ms']:.1f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['max_ms']:.2f} | "
              f"{r['second_request_median_ms']:.2f} | {', '.join(f'{f:.3g}' for f in r['flops'])} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"runs": rows, "argv": sys.argv[1:] if argv is None else list(argv), "commit": code,
                                 "date": run_date()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
