"""Checking a served model store: ``replay`` (recompute the log's key masks) and ``verify`` (forgetting
measured against the origin model and a retrained one)."""
from __future__ import annotations

import argparse
import json
import sys

from .common import command, data_args, seed_int, service_data, store_args


def cmd_replay(args: argparse.Namespace) -> int:
    from collections import Counter

    from ..service import ServedStore

    train, _ = service_data(args)
    result = ServedStore(args.model).replay(train)
    hows = Counter(s["how"] for s in result.steps)
    print(f"replayed {len(result.steps)} records: " + ", ".join(f"{n} {how}" for how, n in sorted(hows.items())))
    print(f"keys masked: {int(result.mask.sum())} of {result.mask.numel()}")
    if result.matches_head:
        print("the replayed key mask equals HEAD's bit for bit")
        return 0
    print("MISMATCH: the replayed key mask differs from HEAD's", file=sys.stderr)
    return 1


def _replay_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    data_args(p)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..service import ServedStore
    from ..verify import ProbeConfig, format_columns, verify

    svc = ServedStore(args.model)
    if not (args.config or (args.embeddings and args.test_embeddings)):
        raise ValueError("verify needs training and test embeddings: --config, or --embeddings and --test-embeddings")
    records = svc.check()  # a cut, emptied or edited log is refused before any work
    train, test = service_data(args)
    version, origin = _verify_target(records, args.request)
    unlearned, manifest = svc.load(version)
    original, _ = svc.load(origin)
    forgotten = svc.forgotten_of(manifest)
    if not forgotten:
        raise ValueError(f"nothing is forgotten in version {version}: run `dkvb forget` first")
    ids = [list(manifest["class_names"]).index(c) for c in forgotten]
    retrain = {}
    if args.config:
        t = load_config(args.config, args.overrides).train
        retrain = {"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size}
    retrain.update({k: v for k, v in (("epochs", args.retrain_epochs), ("lr", args.retrain_lr)) if v is not None})
    probe = ProbeConfig(**{k: v for k, v in (("examples", args.probe_examples), ("lr", args.probe_lr),
                                              ("max_steps", args.max_steps)) if v is not None})
    row = verify(unlearned, original, train, test, ids, retrain_params=retrain, probe=probe, seed=args.seed)
    if args.json:
        print(json.dumps({"version": version, "origin": origin, "forgotten": forgotten, **row}))
        return 0
    print(f"version {version} (forgotten: {', '.join(forgotten)}) against origin {origin} and a retrained model")
    print(format_columns(row))
    print("note: for DKVB the probe fine-tunes the values of the masked model; masked keys stay masked. "
          "forget_test_acc_unmasked shows what clearing the mask gives back.")
    return 0


def _verify_target(records: list, request: str | None) -> tuple[str, str]:
    """(version to verify, origin version it descends from) for a request id (default: the latest)."""
    if not records:
        raise ValueError("no requests logged yet: run `dkvb forget` first")
    origin_of: dict[str, str] = {}
    origin = None
    for r in records:
        if r["op"] == "origin":
            origin = r["version"]
        elif r["op"] == "restore":
            origin = origin_of[r["to"]]
        origin_of[r["request_id"]] = origin
    target = records[-1] if request is None else next((r for r in records if r["request_id"] == request), None)
    if target is None:
        raise ValueError(f"unknown request id {request!r}; see `dkvb log`")
    return target["version_after"], origin_of[target["request_id"]]


def _verify_args(p: argparse.ArgumentParser) -> None:
    from ..verify import ProbeConfig

    store_args(p)
    p.add_argument("--request", metavar="REQUEST_ID", help="verify the model after this request (default: the latest)")
    data_args(p)
    p.add_argument("--retrain-epochs", type=int, help="epochs of the retrain-from-scratch reference")
    p.add_argument("--retrain-lr", type=float, help="learning rate of the retrain-from-scratch reference")
    p.add_argument("--probe-examples", type=int, help="forget examples the relearning probe tunes on "
                   f"(default {ProbeConfig.examples})")
    p.add_argument("--probe-lr", type=float, help=f"SGD learning rate of the relearning probe (default {ProbeConfig.lr})")
    p.add_argument("--max-steps", type=int, help=f"relearning probe step budget (default {ProbeConfig.max_steps})")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


command("replay", "replay the audit log from the original model and compare the key mask", _replay_args)(cmd_replay)
command("verify", "forget/retain accuracy, membership inference and relearning probe vs retraining",
        _verify_args)(cmd_verify)
