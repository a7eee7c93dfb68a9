"""The forgetting frontier as a figure: forgetting quality against accuracy before unlearning.

Reads forgetting benchmarks' JSON (``benchmarks/forgetting_quality.py``), each named
``SET|MODEL=PATH``, and plots one point per (set, model, request) with the original models'
retain-test accuracy on x and F at the ceiling's N as a share of that ceiling on y: one panel for
the forget classes' training images (the competition's forget set), one for their test images.
Prints the points as a markdown table and writes them as JSON beside the PNG.

    python benchmarks/forgetting_frontier.py \\
        "digits|trained values=benchmarks/results/forgetting_digits.json" \\
        "digits|count values=benchmarks/results/frontier/forgetting_digits_counts.json" \\
        --out docs/results/figures/forgetting_frontier.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from dkvb.io import atomic_write_json
from dkvb.report import pyplot, save_figure

# (method label in the JSON, shown as, marker)
REQUESTS: tuple[tuple[str, str, str], ...] = (
    ("dkvb-activations", "default request", "o"),
    ("dkvb-activations[mask_keys=False]", "without the mask", "s"),
    ("dkvb-drop-output", "output deleted", "x"),
)


def frontier_points(sources: Sequence[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One point per (set, model, request) present in the JSON: retain-test accuracy before
    unlearning (%) and F at the ceiling's N over the ceiling, on training and test images."""
    points = []
    for name, model, data in sources:
        mean = data["mean"]
        before = 100 * mean["original (dkvb)"]["retain_test_acc"]
        for label, shown, _ in REQUESTS:
            row = mean.get(label)
            if row is None:
                continue
            points.append({"set": name, "model": model, "request": shown, "retain_test_before": before,
                           "F_train": row["F_at_ceiling_n"], "ceiling_train": row["ceiling"],
                           "F_test": row["F_test_at_ceiling_n"], "ceiling_test": row["ceiling_test"],
                           "share_train": row["F_at_ceiling_n"] / row["ceiling"],
                           "share_test": row["F_test_at_ceiling_n"] / row["ceiling_test"],
                           "num_models": data["num_models"], "commit": data.get("commit", "?")})
    return points


def markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| set | model | request | retain-test before | F train (share of ceiling) | F test (share of ceiling) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['set']} | {p['model']} | {p['request']} | {p['retain_test_before']:.2f} | "
                     f"{p['F_train']:.3f} ({100 * p['share_train']:.0f}%) | {p['F_test']:.3f} ({100 * p['share_test']:.0f}%) |")
    return "\n".join(lines) + "\n"


# Accuracy points (x axis) one label spans at the figure's size and font
LABEL_SPAN = 10.0


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Two panels (training / test images); colour = set, marker = request, text = model (above zero)."""
    plt = pyplot()
    sets = list(dict.fromkeys(p["set"] for p in points))
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(sets)}
    markers = {shown: marker for _, shown, marker in REQUESTS}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, part, title in ((axes[0], "train", "forget classes' training images"),
                            (axes[1], "test", "forget classes' test images")):
        placed: list[tuple[float, float]] = []
        for p in points:
            x, y = p["retain_test_before"], 100 * p[f"share_{part}"]
            ax.scatter(x, y, color=colours[p["set"]], marker=markers[p["request"]], s=45)
            if p[f"share_{part}"] >= 0.005:  # the points at zero would bury each other's labels
                # a label that would overlap an earlier one (close in both axes) goes a line lower
                line = sum(abs(x - a) < LABEL_SPAN and abs(y - b) < 3 for a, b in placed)
                placed.append((x, y))
                ax.annotate(p["model"], (x, y), fontsize=6, xytext=(3, 3 - 7 * line), textcoords="offset points")
        ax.axhline(90, color="grey", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("retain-test accuracy before unlearning (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("F at the ceiling's N, % of the retrained ceiling")
    handles = ([plt.Line2D([], [], color=colours[s], marker="o", ls="", label=s) for s in sets]
               + [plt.Line2D([], [], color="k", marker=m, ls="", label=shown) for _, shown, m in REQUESTS])
    axes[1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Forgetting against retraining vs accuracy (dashed: 90% of the ceiling)")
    save_figure(fig, path)


def parse_source(text: str) -> tuple[str, str, dict[str, Any]]:
    """``SET|MODEL=PATH`` -> (set, model, the JSON at PATH)."""
    names, sep, path = text.partition("=")
    name, bar, model = names.partition("|")
    if not sep or not bar or not name or not model:
        raise argparse.ArgumentTypeError(f"expected SET|MODEL=PATH, got {text!r}")
    return name, model, json.loads(Path(path).read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=parse_source, metavar="SET|MODEL=PATH")
    parser.add_argument("--out", type=Path, required=True, help="the PNG; the points go to the same name .json")
    args = parser.parse_args(argv)
    points = frontier_points(args.sources)
    if not points:
        parser.error("no DKVB request found in the given JSON")
    plot(points, args.out)
    atomic_write_json(args.out.with_suffix(".json"), {"points": points, "argv": sys.argv[1:]})
    print(markdown(points), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
