"""How strict should unlearning via activations be? Sweep ``min_share`` for single requests.

``dkvb-activations`` masks the keys on which the forget class makes up at least ``min_share`` of
the activations; the default is the class's share of a uniform mix (1/num_classes). This script
forgets each of the experiment's classes (or ``--classes``) alone, for ``min_share`` = factor /
num_classes over a range of factors, from the model's cached counts, and reports the mean and
worst retain-test drop and forget-test accuracy plus the share of keys masked. Test-split numbers:
a sweep for choosing the rule, so a factor picked from it is tuned on the test split.

    python benchmarks/share_sweep.py experiments/cifar10_effnet_lite0.yaml --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from dkvb.config import load_config
from dkvb.evaluate import predict_logits
from dkvb.experiment import load_embeddings, train_models
from dkvb.io import atomic_write_json
from dkvb.unlearn import ForgetRequest, create_unlearner
from dkvb.data import resolve_classes


def run(config: str, *, factors: Sequence[float] = (1.0, 1.25, 1.5, 2.0), classes: str | None = None,
        out: Path = Path("results/benchmarks")) -> dict[str, Any]:
    """Run the sweep; returns (and writes) the result dictionary."""
    cfg = load_config(config)
    train, test = load_embeddings(cfg, progress=False)
    model = train_models(cfg, train, kinds={"dkvb"}, progress=False)["dkvb"][0]
    n = train.num_classes
    ids = list(resolve_classes(classes, train.class_names)) if classes else list(range(n))
    correct0 = predict_logits(model, test.x).argmax(1) == test.y
    rows = []
    for factor in factors:
        drops, forgets, masked = [], [], []
        unlearner = create_unlearner("dkvb-activations", min_share=min(1.0, factor / n))
        for c in ids:
            after = unlearner.unlearn(model, ForgetRequest((c,), train)).model
            correct = predict_logits(after, test.x).argmax(1) == test.y
            retain = test.y != c
            drops.append(100 * (correct0[retain].float().mean() - correct[retain].float().mean()).item())
            forgets.append(100 * correct[~retain].float().mean().item())
            masked.append(100 * after.key_mask.float().mean().item())
        row = {"factor": factor, "min_share": min(1.0, factor / n),
               "retain_drop_mean": sum(drops) / len(drops), "retain_drop_max": max(drops),
               "forget_test_mean": sum(forgets) / len(forgets), "forget_test_max": max(forgets),
               "keys_masked_pct": sum(masked) / len(masked)}
        rows.append(row)
        print(f"{cfg.name}  factor {factor:4.2f}  min_share {row['min_share']:.4f}  retain-test drop "
              f"{row['retain_drop_mean']:5.2f} (worst {row['retain_drop_max']:5.2f})  forget-test "
              f"{row['forget_test_mean']:5.2f}% (worst {row['forget_test_max']:5.2f})  keys masked "
              f"{row['keys_masked_pct']:4.1f}%", flush=True)
    result = {"config": cfg.name, "classes": [train.class_names[c] for c in ids], "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"share_sweep_{cfg.name}.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="experiment YAML (embeddings and the trained DKVB come from its cache/run folder)")
    p.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0],
                   help="min_share = factor / num_classes")
    p.add_argument("--classes", help="comma-separated class names (default: every class)")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks"), help="output folder")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.config, factors=args.factors, classes=args.classes, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
