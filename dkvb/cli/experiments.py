"""Experiment commands: ``embed``, ``train``, ``evaluate``, ``unlearn`` and ``run``, thin layers over
:mod:`dkvb.experiment`."""
from __future__ import annotations

import argparse
import json

from ..config import MethodConfig
from ..report import markdown_table, summarize
from .common import add_config, command, config_of, method_params, request_args, request_classes


def cmd_embed(args: argparse.Namespace) -> int:
    from ..distributed import process_group, rank_and_world
    from ..experiment import load_embeddings

    cfg = config_of(args)
    with process_group(cfg.encoder.device) as device:  # torchrun: one shard of chunks per rank
        cfg.encoder.device = device
        train, test = load_embeddings(cfg)
        if rank_and_world()[0] == 0:
            print(f"train {tuple(train.x.shape)}  test {tuple(test.x.shape)}  classes {train.num_classes}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..evaluate import accuracy, predict_logits
    from ..experiment import load_embeddings, train_models

    cfg = config_of(args)
    train, test = load_embeddings(cfg)
    for kind, (model, info) in train_models(cfg, train, force=args.force).items():
        acc = accuracy(predict_logits(model, test.x), test.y)
        print(f"{kind:8s} test accuracy {100 * acc:.2f}%  trained in {info['train_seconds']:.1f}s  "
              f"-> {cfg.run_dir / 'models' / kind}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate
    from ..experiment import forget_requests, load_embeddings, train_models

    cfg = config_of(args)
    train, test = load_embeddings(cfg)
    requests = forget_requests(cfg, train.class_names)
    for kind, (model, _) in train_models(cfg, train).items():
        for classes in requests:
            metrics = evaluate(model, train, test, classes, seed=cfg.seed)
            print(json.dumps({"model": kind, "forget_classes": [train.class_names[c] for c in classes], **metrics}))
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    from ..experiment import unlearn_once

    method = MethodConfig(args.method, params=method_params(args.param))
    before, after, report = unlearn_once(config_of(args), request_classes(args), method)
    print(f"{report.method}: {report.flops:.3g} FLOPs, {report.seconds * 1e3:.2f} ms")
    for key in before:
        print(f"  {key:17s} {100 * before[key]:6.2f} -> {100 * after[key]:6.2f}")
    return 0


def _check_methods(cfg) -> None:
    """Create every configured unlearner once, so an unknown method or parameter fails before any work."""
    from ..experiment import expand_methods, method_model
    from ..unlearn import create_unlearner

    for label, method, params in expand_methods(cfg):
        method_model(method)
        try:
            create_unlearner(method.name, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"methods: {label}: {e}") from None


def _check_run_stores(cfg, force: bool) -> None:
    """A comparison run unlearns from the trained model; a model store of the run folder that serves
    deletion requests no longer holds it (its served model has forgotten classes), so the run is
    refused before any work, with or without ``--force``."""
    from ..experiment import needed_models
    from ..store import has_served

    for kind in sorted(needed_models(cfg)):
        path = cfg.run_dir / "models" / kind
        if path.is_dir() and has_served(path):
            how = ("`dkvb train --force` replaces its model with the logged forget requests re-applied; " if force
                   else "")
            raise ValueError(f"{path} serves deletion requests: a comparison run needs the trained model, which this "
                             f"store no longer serves; {how}run the comparison with another output_dir or name")


def cmd_run(args: argparse.Namespace) -> int:
    from ..experiment import run_experiment

    cfg = config_of(args)
    _check_methods(cfg)
    _check_run_stores(cfg, args.force)
    if args.jobs is None:
        from ..workers import default_jobs

        default_jobs()  # a bad $DKVB_JOBS fails here, before any work
    elif args.jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {args.jobs}")
    records = run_experiment(cfg, fresh=args.fresh, force=args.force, jobs=args.jobs)
    print(markdown_table(summarize(records)))
    if cfg.forgetting:
        _forgetting(cfg)
    print(f"\nWhere the time went:\n{(cfg.run_dir / 'phases.md').read_text()}")
    print(f"results: {cfg.run_dir / 'results.json'}  table: {cfg.run_dir / 'table.md'}  "
          f"plot: {cfg.run_dir / 'tradeoff.png'}  phases: {cfg.run_dir / 'phases.md'}")
    return 0


def _forgetting(cfg) -> None:
    """Forgetting quality against retraining (the config's ``forgetting`` section), printed and saved."""
    from ..config import method_config
    from ..experiment import load_embeddings
    from ..forgetting_eval import ForgettingConfig, measure_forgetting

    section = dict(cfg.forgetting)
    section["methods"] = [method_config(m, "forgetting.methods") for m in section.get("methods", [])]
    train, test = load_embeddings(cfg, progress=False)
    result = measure_forgetting(cfg, train, test, ForgettingConfig(**section), cfg.run_dir / "forgetting")
    print("\nForgetting quality against retraining (F at the ceiling's N; ceiling):")
    for label, row in result["mean"].items():
        print(f"  {label:60s} {row['F_at_ceiling_n']:.3f} ({row['ceiling']:.3f})")
    print(f"forgetting: {cfg.run_dir / 'forgetting' / 'forgetting.json'}")


def _unlearn_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    request_args(p, method="dkvb-activations", method_help="registered unlearning method")


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace a trained model even where it serves deletion "
                   "requests: the forget requests in effect there are re-applied to the new model (same method, "
                   "parameters and seed) and logged, so it forgets what the log says is forgotten")


def _train_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    _force_arg(p)


def _run_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--fresh", action="store_true", help="ignore results already in the run folder")
    p.add_argument("--jobs", type=int, default=None,
                   help="forget requests run side by side in this many forked workers, one thread each "
                        "(default: $DKVB_JOBS, else one per core, at most 4); the results do not depend on it")


command("embed", "encode the dataset's splits into the embedding cache")(cmd_embed)
command("train", "train the models the experiment's methods act on", _train_args)(cmd_train)
command("evaluate", "evaluate the trained models on every forget request")(cmd_evaluate)
command("unlearn", "forget classes with one method and print before/after metrics", _unlearn_args)(cmd_unlearn)
command("run", "embed, train, unlearn every request with every method, write the report", _run_args)(cmd_run)
