"""Command line: a thin layer over :mod:`dkvb.experiment`. ``main(argv)`` is testable."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .config import MethodConfig, load_config, parse_assignments
from .threads import set_threads
from .report import markdown_table, summarize


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 (repeatable)")


def _config(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def cmd_embed(args: argparse.Namespace) -> int:
    from .distributed import process_group, rank_and_world
    from .experiment import load_embeddings

    cfg = _config(args)
    with process_group(cfg.encoder.device) as device:  # torchrun: one shard of chunks per rank
        cfg.encoder.device = device
        train, test = load_embeddings(cfg)
        if rank_and_world()[0] == 0:
            print(f"train {tuple(train.x.shape)}  test {tuple(test.x.shape)}  classes {train.num_classes}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluate import accuracy, predict_logits
    from .experiment import load_embeddings, train_models

    cfg = _config(args)
    train, test = load_embeddings(cfg)
    for kind, (model, info) in train_models(cfg, train, force=args.force).items():
        acc = accuracy(predict_logits(model, test.x), test.y)
        print(f"{kind:8s} test accuracy {100 * acc:.2f}%  trained in {info['train_seconds']:.1f}s  "
              f"-> {cfg.run_dir / 'models' / kind}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .experiment import forget_requests, load_embeddings, train_models

    cfg = _config(args)
    train, test = load_embeddings(cfg)
    requests = forget_requests(cfg, train.class_names)
    for kind, (model, _) in train_models(cfg, train).items():
        for classes in requests:
            metrics = evaluate(model, train, test, classes, seed=cfg.seed)
            print(json.dumps({"model": kind, "forget_classes": [train.class_names[c] for c in classes], **metrics}))
    return 0


def _params(items: list[str]) -> dict:
    return dict(parse_assignments(items, what="--param"))


def _classes(args: argparse.Namespace) -> list[int | str]:
    """The classes a request names: ``--classes`` (comma-separated names), ``--class`` (one exact
    name), ``--classes-file`` (one exact name per line) and ``--class-ids`` (indices)."""
    names: list[int | str] = [n.strip() for v in args.classes for n in v.split(",") if n.strip()]
    names += args.class_names
    if args.classes_file:
        try:
            lines = Path(args.classes_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--classes-file {args.classes_file}: unreadable ({e})") from None
        names += [line for line in lines if line]
    for value in args.class_ids:
        for item in (i.strip() for i in value.split(",") if i.strip()):
            try:
                names.append(int(item))
            except ValueError:
                raise ValueError(f"--class-ids: {item!r} is not an integer class index") from None
    if not names:
        raise ValueError("name the classes: --classes NAME[,NAME], --class NAME, --classes-file FILE or "
                         "--class-ids INDEX[,INDEX]")
    return names


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .experiment import unlearn_once

    method = MethodConfig(args.method, params=_params(args.param))
    before, after, report = unlearn_once(_config(args), _classes(args), method)
    print(f"{report.method}: {report.flops:.3g} FLOPs, {report.seconds * 1e3:.2f} ms")
    for key in before:
        print(f"  {key:17s} {100 * before[key]:6.2f} -> {100 * after[key]:6.2f}")
    return 0


def _check_methods(cfg) -> None:
    """Create every configured unlearner once, so an unknown method or parameter fails before any work."""
    from .experiment import expand_methods, method_model
    from .unlearn import create_unlearner

    for label, method, params in expand_methods(cfg):
        method_model(method)
        try:
            create_unlearner(method.name, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"methods: {label}: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment

    cfg = _config(args)
    _check_methods(cfg)
    records = run_experiment(cfg, fresh=args.fresh, force=args.force)
    print(markdown_table(summarize(records)))
    print(f"\nWhere the time went:\n{(cfg.run_dir / 'phases.md').read_text()}")
    print(f"results: {cfg.run_dir / 'results.json'}  table: {cfg.run_dir / 'table.md'}  "
          f"plot: {cfg.run_dir / 'tradeoff.png'}  phases: {cfg.run_dir / 'phases.md'}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = _add_config):
    """Register a subcommand: ``configure`` adds its arguments, the decorated function runs it."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, configure, fn)
        return fn

    return wrap


def _request_args(p: argparse.ArgumentParser, *, method: str, method_help: str) -> None:
    """The classes, --method and --param of a forget request (``dkvb unlearn`` and ``dkvb forget``)."""
    p.add_argument("--classes", action="append", default=[], metavar="NAMES",
                   help="comma-separated class names (repeatable); a name is never read as an index")
    p.add_argument("--class", dest="class_names", action="append", default=[], metavar="NAME",
                   help="one class name taken exactly, commas, spaces and a leading '-' kept (repeatable; "
                   "write --class=-1 for names starting with '-')")
    p.add_argument("--classes-file", metavar="FILE", help="class names, one per line, taken exactly")
    p.add_argument("--class-ids", action="append", default=[], metavar="IDS",
                   help="comma-separated class indices (0-based, in the model's class order)")
    p.add_argument("--method", default=method, help=method_help)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter")


def _unlearn_args(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    _request_args(p, method="dkvb-activations", method_help="registered unlearning method")


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace a trained model even where it serves deletion "
                   "requests (logged; the classes forgotten there are not forgotten in the new model)")


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    _force_arg(p)


def _run_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--fresh", action="store_true", help="ignore results already in the run folder")


command("embed", "encode the dataset's splits into the embedding cache")(cmd_embed)
command("train", "train the models the experiment's methods act on", _train_args)(cmd_train)
command("evaluate", "evaluate the trained models on every forget request")(cmd_evaluate)
command("unlearn", "forget classes with one method and print before/after metrics", _unlearn_args)(cmd_unlearn)
command("run", "embed, train, unlearn every request with every method, write the report", _run_args)(cmd_run)


# ------------------------------------------------------------------ service: forget / restore / log / replay / verify
def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="model store folder (see dkvb.store)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", metavar="FILE", help="training embeddings with labels: .pt/.safetensors/.npz "
                   "holding x and y, .npy (+ labels), or an embedding-cache folder")
    p.add_argument("--test-embeddings", metavar="FILE", help="test embeddings with labels (for test metrics)")
    p.add_argument("--config", metavar="YAML", help="experiment config whose cached embeddings to use instead")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --config (repeatable)")


def _service_data(args: argparse.Namespace):
    """(train, test) embeddings from --config or --embeddings/--test-embeddings, checked against the
    served model's class names and encoder; ``None`` where not given."""
    from .embeddings_io import embeddings_from_config, load_embeddings_file
    from .store import read_manifest

    if args.config and (args.embeddings or args.test_embeddings):
        raise ValueError("give either --config or --embeddings/--test-embeddings, not both")
    if args.test_embeddings and not args.embeddings:
        raise ValueError("--test-embeddings needs --embeddings (the training embeddings) too")
    if not (args.config or args.embeddings):
        return None, None
    manifest = read_manifest(args.model)
    if args.config:
        return embeddings_from_config(args.config, args.overrides, manifest)
    names = list(manifest["class_names"])
    test = load_embeddings_file(args.test_embeddings, names, manifest) if args.test_embeddings else None
    return load_embeddings_file(args.embeddings, names, manifest), test


def _print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        print(f"  {key:17s} {100 * value:6.2f}%")


def cmd_forget(args: argparse.Namespace) -> int:
    from .service import ModelService

    classes = _classes(args)
    train, test = _service_data(args)
    rec = ModelService(args.model).forget(classes, args.method, _params(args.param), data=train, test=test,
                                          seed=args.seed)
    if rec["already_forgotten"]:
        print(f"notice: already forgotten, skipped: {_shown(', '.join(rec['already_forgotten']))}")
    if rec["noop"]:
        print(f"{rec['request_id']}: nothing to do; logged as a no-op (HEAD stays {rec['version_after']})")
        return 0
    print(f"{rec['request_id']}: forgot {_shown(', '.join(rec['new_classes']))} with {rec['method']}: "
          f"{rec['keys_masked']} keys masked ({rec['keys_masked_total']} in all), "
          f"version {rec['version_before']} -> {rec['version_after']}, {rec['seconds'] * 1e3:.2f} ms")
    print(f"forgotten now: {_shown(', '.join(rec['forgotten']))}")
    if "metrics" in rec:
        print("metrics after (over all forgotten classes):")
        _print_metrics(rec["metrics"])
    return 0


def _forget_args(p: argparse.ArgumentParser) -> None:
    _store_args(p)
    _request_args(p, method="activations", method_help="activations or examples (default: activations)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of forget examples")
    _data_args(p)


def cmd_restore(args: argparse.Namespace) -> int:
    from .service import ModelService

    rec = ModelService(args.model).restore(args.to)
    if rec["noop"]:
        print(f"{rec['request_id']}: HEAD already is the model after {rec['to']}; logged as a no-op")
    else:
        print(f"{rec['request_id']}: restored the model after {rec['to']}: HEAD {rec['version_before']} -> "
              f"{rec['version_after']}; forgotten: {_shown(', '.join(rec['forgotten'])) or 'none'}")
    return 0


def _restore_args(p: argparse.ArgumentParser) -> None:
    _store_args(p)
    p.add_argument("--to", required=True, metavar="REQUEST_ID", help="request id from `dkvb log`, or 'origin'")


def _shown(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (class names come from folder
    names and files: they must not move the cursor or recolour the terminal)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def cmd_log(args: argparse.Namespace) -> int:
    from .service import read_log
    from .store import served_version

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
        print(_shown(f"{r['request_id']:11s} {r['time'][:19].replace('T', ' '):19s} {r['op']:8s} {versions:15s} "
                     f"{r.get('keys_masked', ''):>5}  {what}"))
    return 0


def _log_args(p: argparse.ArgumentParser) -> None:
    _store_args(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON records")


def cmd_replay(args: argparse.Namespace) -> int:
    from collections import Counter

    from .service import ServedStore

    train, _ = _service_data(args)
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
    _store_args(p)
    _data_args(p)


def cmd_verify(args: argparse.Namespace) -> int:
    from .config import load_config
    from .service import ServedStore
    from .verify import ProbeConfig, format_columns, verify

    svc = ServedStore(args.model)
    if not (args.config or (args.embeddings and args.test_embeddings)):
        raise ValueError("verify needs training and test embeddings: --config, or --embeddings and --test-embeddings")
    records = svc.check()  # a cut, emptied or edited log is refused before any work
    train, test = _service_data(args)
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
    from .verify import ProbeConfig

    _store_args(p)
    p.add_argument("--request", metavar="REQUEST_ID", help="verify the model after this request (default: the latest)")
    _data_args(p)
    p.add_argument("--retrain-epochs", type=int, help="epochs of the retrain-from-scratch reference")
    p.add_argument("--retrain-lr", type=float, help="learning rate of the retrain-from-scratch reference")
    p.add_argument("--probe-examples", type=int, help="forget examples the relearning probe tunes on "
                   f"(default {ProbeConfig.examples})")
    p.add_argument("--probe-lr", type=float, help=f"SGD learning rate of the relearning probe (default {ProbeConfig.lr})")
    p.add_argument("--max-steps", type=int, help=f"relearning probe step budget (default {ProbeConfig.max_steps})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


command("forget", "forget classes from a stored model (logged, idempotent)", _forget_args)(cmd_forget)
command("restore", "roll a stored model back to the model after a logged request", _restore_args)(cmd_restore)
command("log", "print a stored model's audit log", _log_args)(cmd_log)
command("replay", "replay the audit log from the original model and compare the key mask", _replay_args)(cmd_replay)
command("verify", "forget/retain accuracy, membership inference and relearning probe vs retraining",
        _verify_args)(cmd_verify)


def cmd_prune(args: argparse.Namespace) -> int:
    from .service import ModelService

    removed = ModelService(args.model).prune(dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    _store_args(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")


command("prune", "delete the versions that neither the served model nor the audit log's replay needs",
        _prune_args)(cmd_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dkvb", description="Low-compute class unlearning with discrete "
                                     "key-value bottlenecks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details; show tracebacks")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch/faiss (default: $DKVB_THREADS, else the cores free to this "
                             "process: its affinity mask minus the current load)")
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command too, without overriding one before
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress details; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, parents=[verbose])
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        set_threads(args.threads)
        return args.func(args)
    except Exception as e:  # one line naming the file or field; the traceback with -v
        if args.verbose:
            raise
        expected = isinstance(e, (ValueError, OSError, TypeError, RuntimeError))
        text = " ".join(str(e).split()) if expected else f"{type(e).__name__}: {e} (run with -v for the traceback)"
        print(f"dkvb {args.command}: error: {_shown(text)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
