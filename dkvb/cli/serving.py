"""Serving deletion requests: ``forget``, ``restore``, ``log`` and ``prune`` on a model store
(:mod:`dkvb.service`), and ``serve``, the same over HTTP with predictions (:mod:`dkvb.serve`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    command, data_args, method_params, print_metrics, request_args, request_classes, seed_int, service_data, shown,
    store_args,
)


def cmd_forget(args: argparse.Namespace) -> int:
    from ..service import ModelService

    classes = request_classes(args)
    train, test = service_data(args)
    svc = ModelService(args.model)
    rec = svc.forget(classes, args.method, method_params(args.param), data=train, test=test, seed=args.seed)
    _warn(svc)
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


def _warn(svc) -> None:
    """A committed request that could not bring the store fully in line says so (it is served)."""
    if svc.warning:
        print(f"warning: {shown(svc.warning)}", file=sys.stderr)


def _forget_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    request_args(p, method="activations", method_help="activations or examples (default: activations)")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds the draw of forget examples")
    data_args(p)


def cmd_restore(args: argparse.Namespace) -> int:
    from ..service import ModelService

    svc = ModelService(args.model)
    rec = svc.restore(args.to)
    _warn(svc)
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
    from ..store import current_version

    if not (Path(args.model) / "versions").is_dir() and current_version(args.model) is None:
        raise FileNotFoundError(f"no stored model at {args.model}")
    records = read_log(args.model)  # a store that lost its log is refused, naming what is missing
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
        elif r["op"] == "recover":
            what = r.get("note", "")
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

    svc = ModelService(args.model)
    removed = svc.prune(dry_run=args.dry_run)
    _warn(svc)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))
    for version, keys in svc.erased_now.items():
        print(f"{'would erase' if args.dry_run else 'erased'} the values of {keys} key(s) in kept version {version} "
              "(erase_values requests in effect; the version is rewritten in place, logged)")
    for version, keys in ({} if args.dry_run else svc.erased_kept).items():
        print(f"notice: version {version} still holds the values of {keys} erased key(s)")
    return 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")


def cmd_recover(args: argparse.Namespace) -> int:
    from ..service import ModelService

    svc = ModelService(args.model)
    rec = svc.recover()
    _warn(svc)
    if rec is None:
        print("the audit log verifies: nothing to recover")
    else:
        print(f"{rec['request_id']}: {shown(rec['note'])}; serving version {rec['version_after']} again")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import Limits, load_token, serve
    except ImportError as e:
        raise RuntimeError(f"dkvb serve needs the serve extra ({e}): pip install 'dkvb[serve]'") from None

    train, _ = service_data(args)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_rows=args.max_rows, lock_wait_s=args.lock_wait)
    serve(args.model, host=args.host, port=args.port, token=load_token(args.token_file),
          insecure_local=args.insecure_local, limits=limits, data=train)
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    store_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port, printed)")
    p.add_argument("--token-file", metavar="FILE", help="bearer token for writes and the audit log (default: "
                   "$DKVB_SERVE_TOKEN)")
    p.add_argument("--insecure-local", action="store_true", help="serve without a token (loopback addresses only)")
    p.add_argument("--max-rows", type=int, default=1024, help="embedding rows per prediction request")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="largest request body")
    p.add_argument("--lock-wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long a write waits for another writer of the store before answering 409")
    data_args(p)


command("forget", "forget classes from a stored model (logged, idempotent)", _forget_args)(cmd_forget)
command("restore", "roll a stored model back to the model after a logged request", _restore_args)(cmd_restore)
command("log", "print a stored model's audit log", _log_args)(cmd_log)
command("prune", "delete the versions that neither the served model nor the audit log's replay needs",
        _prune_args)(cmd_prune)
command("recover", "serve the last verified record again: move a tail of the audit log that does not verify "
        "aside (logged)", store_args)(cmd_recover)
command("serve", "serve predictions and forget/restore requests over HTTP (FastAPI on uvicorn)",
        _serve_args)(cmd_serve)
