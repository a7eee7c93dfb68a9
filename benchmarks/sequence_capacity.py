"""How many single-class requests can masking alone serve before a codebook runs out of keys?

Trains (or loads, ``--models``) one DKVB setting (the config's own model and training settings,
``--setting`` over them; runs before commit 658e9af, 2026-11-28, started from CIFAR-100's
zero-start setting instead, and each records its setting) on the validation sweep's split of the
training set (:mod:`dkvb_sweep`), then forgets classes one at a time in a seeded order with
``dkvb-activations`` under each rule given, from the cached counts, until a mask is refused
(every key of some codebook masked). Per step: the share of keys masked, the fewest free keys in
any codebook, the worst forget-validation accuracy over the classes forgotten so far and the
retain-validation accuracy. Validation split only; no test numbers. ``--retrain`` also retrains
the linear head on what remains at every step (the config's ``linear_train`` recipe), the
reference a series must stay within 3 points of; a rule with ``release_keys`` masks nothing, so
its series never runs out of keys.

    python benchmarks/sequence_capacity.py experiments/cifar100_effnet_lite0.yaml \\
        --setting '{"num_codebooks": 1024}' --rules '[{"min_share": 0.01}]' --steps 50
    python benchmarks/sequence_capacity.py experiments/cifar100_effnet_lite0.yaml \\
        --rules '[{"refit_epochs": 2, "release_keys": true}]' --retrain
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dkvb_sweep import config_base, load_data, train_setting  # noqa: E402

from dkvb import ModelConfig, TrainConfig, build_model, fit  # noqa: E402
from dkvb.config import load_config  # noqa: E402
from dkvb.evaluate import accuracy  # noqa: E402
from dkvb.io import atomic_write_json  # noqa: E402
from dkvb.unlearn import ForgetRequest, create_unlearner  # noqa: E402


def sequence(model, fit_part, val, cands, rule: dict[str, Any], order: list[int], seed: int,
             linear: TrainConfig | None = None) -> list[dict[str, Any]]:
    """Forget ``order`` one class at a time under ``rule``; one row per step (the last may be a
    refusal). ``cands``: ``model.bottleneck.candidates(val.x)``, shared by every rule; ``linear``:
    also retrain a linear head on the retained classes at every step with this recipe."""
    b = model.bottleneck
    unlearner, current, gone, rows = create_unlearner("dkvb-activations", **rule), model, [], []
    for step, c in enumerate(order, 1):
        try:
            # the classes forgotten before are no retain data: a re-fitting rule must not train them back
            request = ForgetRequest((c,), fit_part, seed=seed, forgotten=tuple(gone))
            current = unlearner.unlearn(current, request).model
        except ValueError as e:  # the mask would empty a codebook
            rows.append({"step": step, "class": val.class_names[c], "refused": str(e)})
            break
        gone.append(c)
        logits = current.predict_from(val.x, cands)
        forgotten = torch.isin(val.y, torch.tensor(gone))
        free = (~current.key_mask.view(b.num_codebooks, b.codebook_size)).sum(1)
        rows.append({"step": step, "class": val.class_names[c], "keys_masked": float(current.key_mask.float().mean()),
                     "min_free_keys": int(free.min()),
                     "forget_val_worst": max(accuracy(logits[val.y == g], val.y[val.y == g]) for g in gone),
                     "retain_val": accuracy(logits[~forgotten], val.y[~forgotten])})
        if linear is not None:
            head = fit(build_model(ModelConfig(kind="linear"), fit_part.dim, fit_part.num_classes, seed=seed),
                       fit_part.subset(request.retain_mask), replace(linear, seed=seed + step))
            with torch.no_grad():
                rows[-1]["retain_val_retrain"] = accuracy(head(val.x[~forgotten]), val.y[~forgotten])
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="experiment YAML whose embedding cache is used")
    p.add_argument("--setting", default="{}", help="JSON over the config's own model/train settings")
    p.add_argument("--rules", default="[{}]", help="JSON list of dkvb-activations parameters")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retrain", action="store_true", help="retrain the linear head at every step (reference)")
    p.add_argument("--models", type=Path, help="folder of trained models shared with dkvb_sweep.py")
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/sequence_capacity.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, _ = load_data(args.config, None, args.seed)
    fit_part, val = train.holdout(args.val_fraction, args.seed)
    setting = {**config_base(load_config(args.config, [])), **json.loads(args.setting)}
    model, _ = train_setting(setting, fit_part, args.seed, args.models)
    b = model.bottleneck
    cands = b.candidates(val.x)
    val_acc = accuracy(model.predict_from(val.x, cands), val.y)
    print(f"{args.config}: {b.num_codebooks} x {b.codebook_size} keys, validation {100 * val_acc:.2f}%", flush=True)
    order = torch.randperm(train.num_classes, generator=torch.Generator().manual_seed(args.seed)).tolist()[:args.steps]
    linear = load_config(args.config, []).linear_train if args.retrain else None
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    for rule in json.loads(args.rules):
        print(f"rule {json.dumps(rule)}", flush=True)
        results["runs"].append({"config": args.config, "setting": setting, "val_acc": val_acc, "rule": rule,
                                "steps": sequence(model, fit_part, val, cands, rule, order, args.seed, linear)})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
