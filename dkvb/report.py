"""Results table (markdown) and plots from result records."""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .evaluate import METRICS
from .io import atomic_write, atomic_write_text

REFERENCE_METHOD = "dkvb-activations[use_cached_counts=False]"


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, model): metrics, FLOPs and seconds averaged over forget requests,
    plus the FLOP ratio to DKVB via activations and the mean absolute gap to retraining."""
    records = list(records)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["model"])].append(r)
    retrain = {(r["model"], tuple(r["forget_class_ids"])): r for r in records if r["method"] == "retrain"}
    ref_runs = [r for r in records if r["method"] in (REFERENCE_METHOD, "dkvb-activations")]
    ref_flops = _mean(r["flops"] for r in ref_runs if r["method"] == REFERENCE_METHOD) or _mean(
        r["flops"] for r in ref_runs)
    rows = []
    for (method, model), runs in groups.items():
        row: dict[str, Any] = {"method": method, "model": model, "requests": len(runs),
                               "failed": sum("error" in r for r in runs)}
        for m in METRICS:
            row[m] = _mean(r["metrics"][m] for r in runs)
        steps = sorted(r["metrics"]["relearn_steps"] for r in runs if "relearn_steps" in r["metrics"])
        row["relearn_steps"] = steps[len(steps) // 2] if steps else float("nan")  # median: inf = never relearned
        row["flops"] = _mean(r["flops"] for r in runs)
        row["seconds"] = _mean(r["seconds"] for r in runs)
        row["flops_ratio"] = row["flops"] / ref_flops if ref_flops else float("nan")
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
    """Accuracies and MIA in percent, FLOPs in scientific notation."""
    head = ("| method | model | forget-train | forget-test | retain-train | retain-test | MIA | relearn steps | "
            "FLOPs | seconds | FLOPs ÷ DKVB-act | gap to retrain |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        steps = r.get("relearn_steps", float("nan"))
        name = r["method"] + (f" ({r['failed']}/{r['requests']} failed)" if r.get("failed") else "")
        cells = [name, r["model"], *(_pct(r[m]) for m in METRICS),
                 "" if math.isnan(steps) else ("never" if math.isinf(steps) else f"{steps:g}"),
                 _sci(r["flops"]), f"{r['seconds']:.4f}",
                 _sci(r["flops_ratio"]) if r["method"] != "original" else "", _pct(r["gap_to_retrain"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    """DKVB before unlearning vs the linear probe, and what unlearning via activations cost."""
    by = {(r["method"], r["model"]): r for r in rows}
    dkvb, linear = by.get(("original", "dkvb")), by.get(("original", "linear"))
    lines = []
    if dkvb and linear:
        lines.append(f"- Before unlearning, retain-test accuracy: DKVB {_pct(dkvb['retain_test_acc'])}%, linear probe "
                     f"(logistic regression on the same embeddings) {_pct(linear['retain_test_acc'])}% "
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
    lines = ["| method | model | retain-test before → after | forget-test before → after | FLOPs |",
             "|---|---|---|---|---|"]
    for r in rows:
        b = before.get(r["model"])
        if r["method"] == "original" or b is None:
            continue
        lines.append(f"| {r['method']} | {r['model']} | {_pct(b['retain_test_acc'])} → {_pct(r['retain_test_acc'])} | "
                     f"{_pct(b['forget_test_acc'])} → {_pct(r['forget_test_acc'])} | {_sci(r['flops'])} |")
    return "\n".join(lines) + "\n"


_EXAMPLES = re.compile(r"^dkvb-examples\[num_examples=(\w+)\]$")


def examples_plot(records: list[dict[str, Any]], path: Path, *, title: str = "") -> bool:
    """Forget-test and retain-test accuracy vs the number of unlearning examples (Algorithm 2);
    ``num_examples=None`` (all) is plotted at the mean size of the forget-train set."""
    points: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        m = _EXAMPLES.match(r["method"])
        if m and "error" not in r:
            n = r.get("details", {}).get("num_examples") if m.group(1) == "None" else float(m.group(1))
            points[float(n)].append(r)
    if len(points) < 2:
        return False
    plt = pyplot()
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, label in (("forget_test_acc", "forget-test"), ("retain_test_acc", "retain-test")):
        ax.plot(xs, [100 * _mean(r["metrics"][metric] for r in points[x]) for x in xs], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("unlearning examples N_E (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title + "\nDKVB unlearning via examples")
    ax.grid(alpha=0.3)
    ax.legend()
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


def write_report(records: list[dict[str, Any]], run_dir: Path, *, title: str = "") -> str:
    """Write ``table.md`` and the plots (``tradeoff.png``, ``accuracy_vs_flops.png``,
    ``forget_vs_examples.png``) into ``run_dir``; returns the main table."""
    rows = summarize(records)
    table = markdown_table(rows)
    errors = sorted({f"- `{r['method']}` on {r['forget_classes']}: {r['error']}" for r in records if "error" in r})
    failed = "\n## Failed runs\n\n" + "\n".join(errors) + "\n" if errors else ""
    atomic_write_text(run_dir / "table.md", f"# {title}\n\nMeans over {max(r['requests'] for r in rows)} forget "
                      f"requests; accuracies and MIA in %; relearn steps = median SGD steps of the relearning "
                      f"probe (compare with retrain).\n\n{headline(rows)}\n{table}\n## As in the paper's tables\n\n"
                      f"{paper_table(rows)}{failed}")
    tradeoff_plot(rows, run_dir / "tradeoff.png", title=title)
    flops_plot(rows, run_dir / "accuracy_vs_flops.png", title=title)
    examples_plot(records, run_dir / "forget_vs_examples.png", title=title)
    return table


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _pct(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _sci(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
