"""Results table (markdown) and plots from result records."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .evaluate import METRICS
from .io import atomic_write, atomic_write_text

REFERENCE_METHOD = "dkvb-activations[use_cached_counts=False]"


def reference_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs FLOPs are divided by ("FLOPs ÷ DKVB"): DKVB via activations from scratch
    (``use_cached_counts=False``: one lookup of the training embeddings it counts), the paper's
    rule when it was run (it looks up the forget class only), else the default rule; with no
    run from scratch, every ``dkvb-activations`` run."""
    act = [r for r in records if method_name(r["method"]) == "dkvb-activations" and "error" not in r]
    scratch = [r for r in act if r["params"].get("use_cached_counts") is False]
    paper = [r for r in scratch if r["params"].get("rule") == "paper"]
    return paper or scratch or act


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, model): metrics, FLOPs (on cached embeddings and from images) and
    seconds averaged over forget requests, each FLOP count's ratio to DKVB via activations
    (:func:`reference_runs`, same accounting) and the mean absolute gap to retraining."""
    records = list(records)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["model"])].append(r)
    retrain = {(r["model"], tuple(r["forget_class_ids"])): r for r in records if r["method"] == "retrain"}
    ref = reference_runs(records)
    ref_flops = {k: _mean(r.get(k, float("nan")) for r in ref) for k in ("flops", "flops_from_images")}
    rows = []
    for (method, model), runs in groups.items():
        row: dict[str, Any] = {"method": method, "model": model, "requests": len(runs),
                               "failed": sum("error" in r for r in runs)}
        for m in METRICS:
            row[m] = _mean(r["metrics"][m] for r in runs)
        steps = sorted(r["metrics"]["relearn_steps"] for r in runs if "relearn_steps" in r["metrics"])
        row["relearn_steps"] = steps[len(steps) // 2] if steps else float("nan")  # median: inf = never relearned
        row["seconds"] = _mean(r["seconds"] for r in runs)
        for key, ratio in (("flops", "flops_ratio"), ("flops_from_images", "images_flops_ratio")):
            row[key] = _mean(r.get(key, float("nan")) for r in runs)
            row[ratio] = row[key] / ref_flops[key] if ref_flops[key] else float("nan")
        gaps = []
        for r in runs:
            key = tuple(r["forget_class_ids"])
            gold = retrain.get((model, key)) or retrain.get(("linear", key))
            if gold is not None:
                gaps.append(_mean(abs(r["metrics"][m] - gold["metrics"][m]) for m in METRICS))
        row["gap_to_retrain"] = _mean(gaps)
        rows.append(row)
    order = {"original": 0}
    return sorted(rows, key=lambda r: (order.get(r["method"], 1), r["model"] != "dkvb", r["method"]))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Accuracies and MIA in percent, FLOPs in scientific notation: on cached embeddings, then
    with the encoder passes the method would need without a cache (``docs/flops.md``)."""
    head = ("| method | model | forget-train | forget-test | retain-train | retain-test | MIA | relearn steps | "
            "FLOPs (cached) | FLOPs ÷ DKVB (cached) | FLOPs from images | FLOPs ÷ DKVB (from images) | seconds | "
            "gap to retrain |")
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in rows:
        steps = r.get("relearn_steps", float("nan"))
        name = r["method"] + (f" ({r['failed']}/{r['requests']} failed)" if r.get("failed") else "")
        cells = [name, r["model"], *(_pct(r[m]) for m in METRICS),
                 "" if math.isnan(steps) else ("never" if math.isinf(steps) else f"{steps:g}"),
                 *(cell for key in ("flops", "flops_from_images") for cell in
                   (_sci(r[key]), _sci(r[_RATIO[key]]) if r["method"] != "original" else "")),
                 f"{r['seconds']:.4f}", _pct(r["gap_to_retrain"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_RATIO = {"flops": "flops_ratio", "flops_from_images": "images_flops_ratio"}


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend: plots are only written to files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG (atomically) and free it."""
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    pyplot().close(fig)


def tradeoff_plot(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Forget-test vs retain-test accuracy, marker size = log10 FLOPs, one marker per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        size = 20 + 25 * max(0.0, math.log10(max(r["flops"], 1.0)))
        ax.scatter(100 * r["forget_test_acc"], 100 * r["retain_test_acc"], s=size, alpha=0.7,
                   label=f"{r['method']} ({r['model']})")
    ax.set_xlabel("forget-test accuracy (%)  ← better")
    ax.set_ylabel("retain-test accuracy (%)  ↑ better")
    ax.set_title(title + "\nmarker size ∝ log10 FLOPs of unlearning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def headline(rows: list[dict[str, Any]]) -> str:
    """DKVB before unlearning vs the linear head, and what unlearning via activations cost."""
    by = {(r["method"], r["model"]): r for r in rows}
    dkvb, linear = by.get(("original", "dkvb")), by.get(("original", "linear"))
    lines = []
    if dkvb and linear:
        lines.append(f"- Before unlearning, retain-test accuracy: DKVB {_pct(dkvb['retain_test_acc'])}%, linear head "
                     f"(the baselines' model, `linear_train`; not the tuned logistic probe) {_pct(linear['retain_test_acc'])}% "
                     f"(gap {100 * (linear['retain_test_acc'] - dkvb['retain_test_acc']):.2f} points).")
    for method in ("dkvb-activations", "dkvb-activations[use_cached_counts=True]", REFERENCE_METHOD):
        r = by.get((method, "dkvb"))
        if r and dkvb:
            lines.append(f"- `{method}`: forget-test {_pct(r['forget_test_acc'])}%, retain-test drop "
                         f"{100 * (dkvb['retain_test_acc'] - r['retain_test_acc']):.2f} points, "
                         f"{1e3 * r['seconds']:.2f} ms and {_sci(r['flops'])} FLOPs per request (mean).")
    return "\n".join(lines) + ("\n" if lines else "")


def paper_table(rows: list[dict[str, Any]]) -> str:
    """The layout of the paper's tables: retain-test and forget-test accuracy before -> after, FLOPs."""
    before = {r["model"]: r for r in rows if r["method"] == "original"}
    lines = ["| method | model | retain-test before → after | forget-test before → after | FLOPs from images "
             "(the paper's accounting) |", "|---|---|---|---|---|"]
    for r in rows:
        b = before.get(r["model"])
        if r["method"] == "original" or b is None:
            continue
        lines.append(f"| {r['method']} | {r['model']} | {_pct(b['retain_test_acc'])} → {_pct(r['retain_test_acc'])} | "
                     f"{_pct(b['forget_test_acc'])} → {_pct(r['forget_test_acc'])} | {_sci(r['flops_from_images'])} |")
    return "\n".join(lines) + "\n"


def method_name(label: str) -> str:
    """The registered method of a result label: ``"dkvb-examples[num_examples=5]"`` -> ``"dkvb-examples"``."""
    return label.split("[", 1)[0]


# params that change a run's cost, not its result: runs differing only there are one point
_COST_ONLY = ("use_cached_counts",)


def sweep_plot(records: list[dict[str, Any]], method: str, param: str, path: Path, *, xlabel: str,
               title: str = "", panel_by: str | None = None) -> bool:
    """Forget-test and retain-test accuracy against a swept hyperparameter of ``method``, as the
    paper's figures draw them against N_A and N_E: one line per setting of the other parameters
    (e.g. one per rule), one row of panels per value of ``panel_by`` (e.g. ``scope``). A value of
    ``None`` ("all") is drawn at the run's own ``details[param]`` when it recorded one. Returns
    False (and writes nothing) when no line has two points."""
    series: dict[tuple, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if method_name(r["method"]) != method or "error" in r:
            continue
        x = r["params"].get(param)
        x = r.get("details", {}).get(param) if x is None else x
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        rest = tuple(sorted((k, str(v)) for k, v in r["params"].items() if k != param and k not in _COST_ONLY))
        series[rest][float(x)].append(r)
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return False
    settings = [dict(s) for s in series]
    varying = {k for k in set().union(*settings) if k != panel_by and len({d.get(k) for d in settings}) > 1}
    panels = sorted({d.get(panel_by, "") for d in settings})
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    for rest, points in sorted(series.items()):
        row = panels.index(dict(rest).get(panel_by, ""))
        label = ", ".join(f"{k}={v}" for k, v in rest if k in varying) or method
        xs = sorted(points)
        for ax, metric in zip(axes[row], ("forget_test_acc", "retain_test_acc")):
            ax.plot(xs, [100 * _mean(r["metrics"][metric] for r in points[x]) for x in xs], "o-", label=label)
    for row, panel in enumerate(panels):
        for ax, name in zip(axes[row], ("forget-test", "retain-test")):
            ax.set_xscale("log")
            ax.set_xlabel(xlabel + (f" ({panel_by}={panel})" if panel else ""))
            ax.set_ylabel(f"{name} accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}\n{method}: accuracy vs {param}")
    save_figure(fig, path)
    return True


def flops_plot(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Retain-test and forget-test accuracy vs unlearning FLOPs (log), one point per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for r in rows:
        if r["method"] == "original":
            continue
        x = max(r["flops"], 1.0)
        for ax, metric in zip(axes, ("retain_test_acc", "forget_test_acc")):
            ax.scatter(x, 100 * r[metric], label=f"{r['method']} ({r['model']})", alpha=0.75)
    for ax, name in zip(axes, ("retain-test accuracy (%)", "forget-test accuracy (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("unlearning FLOPs (fvcore, log)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    save_figure(fig, path)


def results_page(records: list[dict[str, Any]], *, title: str = "") -> str:
    """The markdown page of a run's records: headline, the full per-method table, the paper's
    layout and the failed runs (a run's ``table.md``, and the pages under ``docs/results/``)."""
    rows = summarize(records)
    errors = sorted({f"- `{r['method']}` on {r['forget_classes']}: {r['error']}" for r in records if "error" in r})
    failed = "\n## Failed runs\n\n" + "\n".join(errors) + "\n" if errors else ""
    ref = sorted({f"`{r['method']}`" for r in reference_runs(records)})
    return (f"# {title}\n\nMeans over {max(r['requests'] for r in rows)} forget "
            f"requests; accuracies and MIA in %; relearn steps = median SGD steps of the relearning "
            f"probe (compare with retrain). FLOPs ÷ DKVB divides by the mean FLOPs of "
            f"{', '.join(ref) or 'no DKVB run'} in the same accounting: on cached embeddings, or from "
            f"images (plus the encoder passes a method needs without an embedding cache; docs/flops.md)."
            f"\n\n{headline(rows)}\n{markdown_table(rows)}\n## As in the paper's tables\n\n"
            f"{paper_table(rows)}{failed}")


def write_report(records: list[dict[str, Any]], run_dir: Path, *, title: str = "") -> str:
    """Write ``table.md`` (:func:`results_page`) and the plots (``tradeoff.png``,
    ``accuracy_vs_flops.png``, ``forget_vs_examples.png`` against N_E and ``forget_vs_keys.png``
    against N_A, when swept) into ``run_dir``; returns the main table."""
    rows = summarize(records)
    atomic_write_text(run_dir / "table.md", results_page(records, title=title))
    tradeoff_plot(rows, run_dir / "tradeoff.png", title=title)
    flops_plot(rows, run_dir / "accuracy_vs_flops.png", title=title)
    sweep_plot(records, "dkvb-examples", "num_examples", run_dir / "forget_vs_examples.png", title=title,
               xlabel="unlearning examples N_E (log)")
    sweep_plot(records, "dkvb-activations", "num_keys", run_dir / "forget_vs_keys.png", title=title,
               xlabel="masked keys N_A (log)", panel_by="scope")
    return markdown_table(rows)


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _pct(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _sci(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
