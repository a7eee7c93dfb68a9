"""Serving deletion requests: ``forget``, ``restore``, ``log`` and ``prune`` on a model store
(:mod:`dkvb.service`)."""
from __future__ import annotations

import argparse
import json

from .common import (
    command, data_args, method_params, print_metrics, request_args, request_classes, service_data, shown, store_args,
)


def cmd_forget(args: argparse.Namespace) -> int:
    from ..service import ModelService

    classes = request_classes(args)
    train, test = service_data(args)
    rec = ModelService(args.model).forget(classes, args.method, method_params(args.param), data=train, test=test,
                                          seed=args.seed)
    if rec["already_forgotten"]:
        print(f"notice: already forgotten, skipped: {shown(', '.join(rec['already_forgotten']))}")
    if rec["noop"]:
        print(f"{rec['request_id']}: nothing to do; logged as a no-op (HEAD stays {rec['version_after']})")
        return 0
    print(f"{rec['request_id']}: forgot {shown(', '.join(rec['new_classes']))} with {rec['method']}: "
          f"{rec['keys_masked']} keys masked ({rec['keys_masked_total']} in all), "
          f"version {rec['version_before']} -> {rec['version_after']}, {rec['seconds'] * 1e3:.2f} ms")
    print(f"forgotten now: {shown(', '.join(rec['forgotten']))}")
    if "metrics" in rec:
        print("metrics after (over all forgotten classes):")
        print_metrics(rec["metrics"])
    return 0


def _forget_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    request_args(p, method="activations", method_help="activations or examples (default: activations)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of forget examples")
    data_args(p)


def cmd_restore(args: argparse.Namespace) -> int:
    from ..service import ModelService

    rec = ModelService(args.model).restore(args.to)
    if rec["noop"]:
        print(f"{rec['request_id']}: HEAD already is the model after {rec['to']}; logged as a no-op")
    else:
        print(f"{rec['request_id']}: restored the model after {rec['to']}: HEAD {rec['version_before']} -> "
              f"{rec['version_after']}; forgotten: {shown(', '.join(rec['forgotten'])) or 'none'}")
    return 0


def _restore_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    p.add_argument("--to", required=True, metavar="REQUEST_ID", help="request id from `dkvb log`, or 'origin'")


def cmd_log(args: argparse.Namespace) -> int:
    from ..service import read_log
    from ..store import served_version

    if served_version(args.model) is None:
        raise FileNotFoundError(f"no stored model at {args.model}")
    records = read_log(args.model)
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    print(f"{'request':11s} {'time (UTC)':19s} {'op':8s} {'version':15s} {'keys':>5s}  what")
    for r in records:
        if r["op"] == "forget":
            what = (f"{r['method']} {','.join(r['classes'])}" + (" (no-op: already forgotten)" if r["noop"] else "")
                    + (f" (skipped {','.join(r['already_forgotten'])})" if r["already_forgotten"] and not r["noop"]
                       else ""))
        elif r["op"] == "restore":
            what = f"to {r['to']}"
        elif r["op"] == "prune":
            what = f"deleted versions {','.join(r['removed'])}"
        else:
            what = r.get("note", "")
        versions = f"{r['version_before']}->{r['version_after']}" if "version_before" in r else r["version_after"]
        print(shown(f"{r['request_id']:11s} {r['time'][:19].replace('T', ' '):19s} {r['op']:8s} {versions:15s} "
                     f"{r.get('keys_masked', ''):>5}  {what}"))
    return 0


def _log_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON records")


def cmd_prune(args: argparse.Namespace) -> int:
    from ..service import ModelService

    removed = ModelService(args.model).prune(dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")


command("forget", "forget classes from a stored model (logged, idempotent)", _forget_args)(cmd_forget)
command("restore", "roll a stored model back to the model after a logged request", _restore_args)(cmd_restore)
command("log", "print a stored model's audit log", _log_args)(cmd_log)
command("prune", "delete the versions that neither the served model nor the audit log's replay needs",
        _prune_args)(cmd_prune)
