"""Sequential forgetting: forget 1, 2, ..., half of the classes one request at a time.

DKVB requests go through the service (:mod:`dkvb.service`: a model store with an audit log, one
key-mask version per request), one store per DKVB series (``--dkvb``: method and parameters, e.g.
two ``min_share`` rules side by side); a request the service refuses ends its series. The
baseline acts on the linear head with the cumulative forget set at every step (``retrain`` by
default: retraining from scratch on what remains, the exact-unlearning reference). After every
step all models are evaluated on the retain and forget classes; the result is a JSON file and a
plot of retain-test and forget-test accuracy against the number of classes forgotten.
``seconds``/``flops`` are those of the unlearning computation (for DKVB also
``request_seconds``: the whole logged request, file writes included; in result files written
before commit 1d91211, 2026-11-28, it also included the step's evaluation of the model).

    python benchmarks/sequential_forgetting.py experiments/fashion_mnist_effnet_lite0.yaml
    python benchmarks/sequential_forgetting.py experiments/cifar100_effnet_lite0.yaml \
        --dkvb activations --dkvb activations:min_share=0.03
    python benchmarks/sequential_forgetting.py experiments/clip_vit_b32_cifar100.yaml --limit 10 --baseline scrub

Embeddings come from the experiment's cache and the trained models from its run folder
(``dkvb run``/``dkvb train`` fill both; this script trains what is missing).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dkvb.config import load_config, parse_assignments
from dkvb.evaluate import accuracy, evaluate, predict_logits
from dkvb.experiment import load_embeddings, method_label, train_models
from dkvb.io import atomic_write_json
from dkvb.provenance import code_version, run_date
from dkvb.report import pyplot, save_figure
from dkvb.request import needs_data
from dkvb.service import ModelService, method_name
from dkvb.store import save_model
from dkvb.unlearn import ForgetRequest, create_unlearner


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"activations"`` or ``"activations:min_share=0.03,erase_values=true"`` -> (method, params)."""
    method, _, rest = spec.partition(":")
    return method_name(method), dict(parse_assignments([p for p in rest.split(",") if p]))


def run(config: str, *, overrides: Sequence[str] = (), limit: int | None = None,
        variants: Sequence[tuple[str, dict[str, Any]]] = (("dkvb-activations", {}),), baseline: str = "retrain",
        baseline_params: dict[str, Any] | None = None, out: Path = Path("results/sequential")) -> dict[str, Any]:
    """Run the benchmark; returns (and writes) the result dictionary.

    Every DKVB variant (method, params) serves the same request order from its own store. A
    request the service refuses (it would mask every key of a codebook) ends that variant's
    series; the refusal is recorded and the other series go on.
    """
    code = code_version()  # the code that runs, named before anything can change it
    cfg = load_config(config, list(overrides))
    if baseline == "retrain" and not baseline_params:
        t = cfg.linear_train  # retrain with the recipe the linear head was trained with
        baseline_params = {"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size}
    # unknown methods or parameters fail here, before any work, not later as refused requests
    unlearner = create_unlearner(baseline, **(baseline_params or {}))
    for method, params in variants:
        create_unlearner(method, **params)
    train, test = load_embeddings(cfg, progress=False)
    models = train_models(cfg, train, kinds={"dkvb", "linear"}, progress=False)
    n = train.num_classes
    steps = n // 2 if limit is None else min(limit, n // 2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:steps].tolist()

    def row(model, forgotten: list[int], seconds: float, flops: int) -> dict[str, Any]:
        if forgotten:
            metrics = evaluate(model, train, test, forgotten, seed=cfg.seed)
        else:  # nothing forgotten yet: every class is retained
            metrics = {"forget_train_acc": None, "forget_test_acc": None, "mia": None,
                       "retain_train_acc": accuracy(predict_logits(model, train.x), train.y),
                       "retain_test_acc": accuracy(predict_logits(model, test.x), test.y)}
        return {"forgotten": len(forgotten), "classes": [train.class_names[c] for c in forgotten], **metrics,
                "seconds": seconds, "flops": flops}

    out.mkdir(parents=True, exist_ok=True)
    dkvb_model = models["dkvb"][0]
    start_row = row(dkvb_model, [], 0.0, 0)
    series = []
    for i, (method, params) in enumerate(variants):
        store = out / f"{cfg.name}-store-{i}"
        shutil.rmtree(store, ignore_errors=True)
        save_model(dkvb_model, store, class_names=list(train.class_names), encoder=cfg.encoder.name)
        # "store" is a folder of ``out``, where the results file is written too; "service" and
        # "data" (examples draws forget embeddings, re-fitting reads the retain set; activations
        # alone runs on the cached counts) are dropped before the result is written
        series.append({"method": method, "params": params, "label": method_label(method, params),
                       "store": store.name, "rows": [dict(start_row)], "refused": None,
                       "service": ModelService(store),
                       "data": train if needs_data(create_unlearner(method, **params), dkvb_model) else None})
    base_rows = [row(models["linear"][0], [], 0.0, 0)]
    base_model = models["linear"][0]
    for k in range(1, steps + 1):
        forgotten = order[:k]
        for s in series:
            if s["refused"] is not None:
                continue
            start = time.perf_counter()
            try:
                rec = s["service"].forget([order[k - 1]], s["method"], s["params"],
                                          data=s["data"], metrics=False)
            except ValueError as e:  # the request would empty a codebook: the service refuses it
                s["refused"] = {"forgotten": k, "class": train.class_names[order[k - 1]], "error": str(e)}
                print(f"{k:3d} {s['label']}: request refused: {e}", flush=True)
                continue
            request_seconds = time.perf_counter() - start  # load, mask, save, log (not the evaluation below)
            s["rows"].append({**row(s["service"].load()[0], forgotten, rec["seconds"], rec["flops"]),
                              "request_seconds": request_seconds})
        report = unlearner.unlearn(base_model, ForgetRequest(tuple(forgotten), train, seed=cfg.seed))
        base_model = report.model
        base_rows.append(row(base_model, forgotten, report.seconds, report.flops))
        cells = [f"{s['label']} {_pct(s['rows'][-1], k)}" for s in series]
        print(f"{k:3d} forgotten  retain/forget-test accuracy: " + "   ".join(cells)
              + f"   {baseline} {_pct(base_rows[-1], k)}", flush=True)
    for s in series:  # None: the first request was refused, nothing to replay
        service, data = s.pop("service"), s.pop("data")
        s["replay_matches"] = service.replay(data).matches_head if len(s["rows"]) > 1 else None
    result = {
        "config": cfg.to_dict(), "order": [train.class_names[c] for c in order], "dkvb": series,
        "baseline_name": baseline, "baseline_params": baseline_params or {}, "baseline": base_rows,
        "replay_matches": all(s["replay_matches"] is not False for s in series), "code": code, "date": run_date(),
    }
    atomic_write_json(out / f"{cfg.name}.json", result)
    plot(result, out / f"{cfg.name}.png", title=cfg.name)
    return result


def _pct(r: dict[str, Any], k: int) -> str:
    if r["forgotten"] != k:
        return "   refused"
    return f"{100 * r['retain_test_acc']:6.2f} / {100 * r['forget_test_acc']:6.2f}"


def table(result: dict[str, Any]) -> str:
    """Markdown: retain-test / forget-test accuracy (%) per step for every series."""
    names = [s["label"] for s in result["dkvb"]] + [f"{result['baseline_name']} (linear head)"]
    series = [s["rows"] for s in result["dkvb"]] + [result["baseline"]]
    lines = ["| forgotten | " + " | ".join(f"{n} retain / forget" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for k in range(len(result["baseline"])):
        cells = []
        for rows in series:
            r = rows[k] if k < len(rows) else None
            cells.append("refused" if r is None else f"{100 * r['retain_test_acc']:.2f} / "
                         + ("–" if r["forget_test_acc"] is None else f"{100 * r['forget_test_acc']:.2f}"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path, *, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4), sharex=True)
    lines = [(s["rows"], s["label"] + (f" (refused at {s['refused']['forgotten']})" if s["refused"] else ""),
              "o-") for s in result["dkvb"]]
    for rows, name, style in lines + [(result["baseline"], f"{result['baseline_name']} (linear head)", "s--")]:
        xs = [r["forgotten"] for r in rows]
        axes[0].plot(xs, [100 * r["retain_test_acc"] for r in rows], style, label=name)
        axes[1].plot(xs[1:], [100 * r["forget_test_acc"] for r in rows[1:]], style, label=name)
    axes[0].set_title("retain-test accuracy (%)  ↑ better")
    axes[1].set_title("forget-test accuracy (%)  ↓ better")
    for ax in axes:
        ax.set_xlabel("classes forgotten (one request each)")
        ax.set_ylim(-2, 102)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="experiment YAML (embeddings and trained models come from its cache/run folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, help="forget at most this many classes (default: half of them)")
    p.add_argument("--dkvb", dest="variants", action="append", metavar="METHOD[:KEY=VALUE,...]",
                   help="a DKVB series: activations or examples with parameters, e.g. "
                        "'activations:min_share=0.03' (repeatable; default: activations)")
    p.add_argument("--baseline", default="retrain", help="registered unlearner acting on the linear head")
    p.add_argument("--baseline-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("results/sequential"), help="output folder")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variants = [parse_variant(v) for v in args.variants or ["activations"]]
        baseline_params = dict(parse_assignments(args.baseline_param, what="--baseline-param"))
    except ValueError as e:  # a malformed --dkvb / --baseline-param: name it, no traceback
        p.error(str(e))
    result = run(args.config, overrides=args.overrides, limit=args.limit, variants=variants,
                 baseline=args.baseline, baseline_params=baseline_params, out=args.out)
    name = result["config"]["name"]
    print(table(result))
    print(f"replay from the audit log reproduces the final mask: {result['replay_matches']}")
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")
    return 0 if result["replay_matches"] else 1


if __name__ == "__main__":
    sys.exit(main())
