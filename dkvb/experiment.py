"""Run a comparison: embed once, train the models once, then every method on every forget request.

Every stage is resumable: embeddings come from the cache, trained models from the run's
model store, and results already in ``results.json`` are not run again.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from .audit import is_served
from .config import DatasetConfig, ExperimentConfig, MethodConfig, save_config
from .data import EmbeddingSet, resolve_classes
from .flops import count_images, encoder_flops_per_image
from .evaluate import METRICS, accuracies_from_logits, accuracy, evaluate, mia_from_logits, predict_logits
from .io import atomic_write_json, atomic_write_text
from .selection import Candidates
from .models import KeptLogits, build_model, resolve_config
from .provenance import code_version, run_date
from .store import StoreError, load_model, save_model
from .timing import PhaseTimer
from .train import DivergenceError, fit
from .verify import ProbeConfig, probe_relearning
from .unlearn import UNLEARNERS, ForgetRequest, create_unlearner
from .validate import require
from .value_init import keep_ridge_system
from .workers import default_jobs, fork_map

log = logging.getLogger("dkvb")


# ------------------------------------------------------------------ stages
def _embed(cfg: ExperimentConfig, data: DatasetConfig, split: str, limit: int | None, progress: bool) -> EmbeddingSet:
    """One split of ``data`` encoded with the config's encoder setting, from the cache when present."""
    from .cache import embed_split

    return embed_split(
        cfg.encoder.name, data.name, split, cache_dir=cfg.cache_dir, image_size=cfg.encoder.image_size,
        dataset_kwargs={"root": data.root, "download": data.download}, batch_size=cfg.encoder.batch_size,
        num_workers=cfg.encoder.num_workers, dtype=cfg.encoder.dtype, limit=limit, seed=cfg.seed,
        device=cfg.encoder.device, amp=cfg.encoder.amp, pretrained=cfg.encoder.pretrained, progress=progress,
    )


def load_embeddings(cfg: ExperimentConfig, *, progress: bool = True) -> tuple[EmbeddingSet, EmbeddingSet]:
    """(train, test) embeddings of the configured dataset and encoder, from the cache when present."""
    return (_embed(cfg, cfg.dataset, "train", cfg.dataset.train_limit, progress),
            _embed(cfg, cfg.dataset, "test", cfg.dataset.test_limit, progress))


def load_key_pool(cfg: ExperimentConfig, *, progress: bool = True) -> EmbeddingSet | None:
    """Embeddings of the config's ``key_pool`` (training split, same encoder), from the cache when
    present; ``None`` when the keys are fitted on the training set. A pool of the training dataset
    itself is a seeded sample of ``key_pool.train_limit`` rows (all when ``None``) of the training
    split outside the training subset (``dataset.train_limit`` rows, the ones
    :func:`load_embeddings` reads), so it needs the whole split encoded."""
    pool = cfg.key_pool
    if pool is None:
        return None
    if pool.name != cfg.dataset.name:
        return _embed(cfg, pool, "train", pool.train_limit, progress)
    from .cache import subset_indices

    full = _embed(cfg, pool, "train", None, progress)
    rest = np.setdiff1d(np.arange(len(full)), subset_indices(len(full), cfg.dataset.train_limit, cfg.seed))
    if not len(rest):
        raise ValueError(f"key_pool {pool.name!r}: dataset.train_limit={cfg.dataset.train_limit} takes all {len(full)} "
                         "training rows, so none is left for the key pool; lower train_limit or pool another dataset")
    rows = rest[subset_indices(len(rest), pool.train_limit, cfg.seed)]
    return full.subset(torch.from_numpy(rows))


def _fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of everything that determines the trained models (not the methods or requests)."""
    keys = ("seed", "dataset", "encoder", "model", "train", "linear_train", "sharded", "key_pool")
    blob = json.dumps({k: cfg.to_dict()[k] for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _trained_on(train: EmbeddingSet) -> str:
    """Digest of a training set's embeddings and labels: a stored model is reused only for the rows
    it was trained on (a ridge-valued model fitted on other rows would refuse every request)."""
    from .data import fingerprint

    return hashlib.sha256(f"{fingerprint(train.x)}|{fingerprint(train.y)}".encode()).hexdigest()[:16]


def _make_ridge_system(model: nn.Module, train: EmbeddingSet, timer: PhaseTimer, kind: str) -> float | None:
    """Make a ridge-valued ``model``'s dual system now, so that its requests solve in milliseconds
    (kept in memory only: made again for a loaded model); its seconds, or ``None`` for another model."""
    if not float(getattr(model, "value_ridge", 0)) > 0:
        return None
    start = time.perf_counter()
    with timer.track("ridge system", kind):
        keep_ridge_system(model, train)
    return time.perf_counter() - start


def train_models(
    cfg: ExperimentConfig, train: EmbeddingSet, *, kinds: set[str] | None = None, progress: bool = True,
    force: bool = False,
    timer: PhaseTimer | None = None,
    candidates: dict[str, Candidates] | None = None,
) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """Train (or load from ``<run_dir>/models``) the models the methods act on (timed into ``timer``).

    Returns ``{kind: (model, info)}`` where info holds training seconds and FLOPs. A stored model
    is loaded when it was trained with this config on these rows (``train``). A model store
    that serves deletion requests is not replaced unless ``force``; then the forget requests in
    effect there are re-applied to the new model and logged (:func:`dkvb.service.replace_model`),
    and the returned model is the one served, with them applied.
    A DKVB's training set is searched once, for its nearest ``topk + 8`` keys: the first
    ``topk`` are the training codes and the activation counts, and the whole lists are put in
    ``candidates[kind]`` (when given) for evaluating masked copies.
    """
    from .flops import FlopCounter

    kinds = kinds or needed_models(cfg)
    timer = timer or PhaseTimer()
    out: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    setting = _encoder_setting(cfg)
    for kind in sorted(kinds):
        path = cfg.run_dir / "models" / kind
        try:
            model, manifest = load_model(path, expect_encoder=cfg.encoder.name, expect_dim=train.dim)
            extra = manifest.get("extra", {})
            if extra.get("fingerprint") == _fingerprint(cfg) and extra.get("train_rows") == _trained_on(train):
                out[kind] = (model, manifest["extra"]["train_info"])
                log.info("loaded trained %s model from %s", kind, path)
                _make_ridge_system(model, train, timer, kind)
                continue
            log.info("stored %s model was trained with another config or on other rows; retraining", kind)
        except StoreError:
            pass
        counter, start = FlopCounter(), time.perf_counter()
        chosen: dict = {}  # what training chose itself: the probe start's C, when it has one
        if kind == "sharded":
            from .shards import train_sharded

            with timer.track("train", kind):
                model = train_sharded({"kind": "linear"}, train, cfg.linear_train,
                                      seed=cfg.seed, flops=counter, **cfg.sharded)
        else:
            model = build_model(resolve_config(cfg.model, len(train)) if kind == "dkvb" else {"kind": "linear"},
                                train.dim, train.num_classes, seed=cfg.seed)
            pool = load_key_pool(cfg, progress=progress) if kind == "dkvb" else None  # only when a DKVB is trained
            keys_on = train if pool is None else pool
            with timer.track("k-means", kind):
                model.prepare(keys_on.x, keys_on.y)
            start = time.perf_counter()
            codes = found = None
            if hasattr(model, "bottleneck"):  # one search: training codes, activation counts, candidates
                with timer.track("nearest-key search (train set)", kind):
                    found = model.bottleneck.candidates(train.x)
                    codes = model.bottleneck.codes(found)
                if candidates is not None:
                    candidates[kind] = found
            with timer.track("train", kind):
                fit(model, train, cfg.train if kind == "dkvb" else cfg.linear_train, flops=counter,
                    progress=progress, desc=f"train {kind}", indices=codes, info=chosen)
            codes = None  # (N, C, topk) int64, not needed past training: its memory is the ridge system's
        info = {"train_seconds": time.perf_counter() - start, "train_flops": counter.total, **chosen}
        if kind == "dkvb":
            start = time.perf_counter()
            with timer.track("activation counts", kind):
                model.compute_activation_counts(train.x, train.y, candidates=found)
            info["count_seconds"] = time.perf_counter() - start
            if (seconds := _make_ridge_system(model, train, timer, kind)) is not None:
                info["ridge_system_seconds"] = seconds
        saved = dict(class_names=list(train.class_names), encoder=cfg.encoder.name,
                     encoder_config=setting,  # so the service refuses embeddings of another setting
                     extra={"fingerprint": _fingerprint(cfg), "train_rows": _trained_on(train), "train_info": info})
        if force and is_served(path):
            from .service import replace_model

            rec = replace_model(path, model, data=train, **saved)
            log.warning("%s: replaced the served model by the retrained one (%s); forget requests re-applied: %s",
                        path, rec["request_id"], ", ".join(rec["forgotten"]) or "none")
            model, _ = load_model(path)
        else:
            save_model(model, path, **saved)
        out[kind] = (model, info)
    return out


def method_model(method: MethodConfig) -> str:
    """The trained model a method acts on."""
    if method.model is not None:
        return method.model
    if method.name not in UNLEARNERS:
        raise ValueError(f"unknown unlearning method {method.name!r}; choose from {sorted(UNLEARNERS)}")
    return UNLEARNERS[method.name].model_kind or "linear"


def _encoder_setting(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The encoder's full description (image size, preprocessing, weights) for a model's manifest,
    or None for embeddings no registered encoder made (the tests' ``synthetic`` encoder name)."""
    from .encoders import encoder_config

    try:
        return encoder_config(cfg.encoder.name, image_size=cfg.encoder.image_size, pretrained=cfg.encoder.pretrained)
    except (ValueError, KeyError):
        return None


def needed_models(cfg: ExperimentConfig) -> set[str]:
    return {method_model(m) for m in cfg.methods}


def expand_methods(cfg: ExperimentConfig) -> Iterator[tuple[str, MethodConfig, dict[str, Any]]]:
    """(label, method, params) for every run of the config; list-valued params are swept."""
    return expand_method_list(cfg.methods)


def expand_method_list(methods: Iterable[MethodConfig]) -> Iterator[tuple[str, MethodConfig, dict[str, Any]]]:
    """(label, method, params) for every run of ``methods``; list-valued params are swept."""
    for m in methods:
        sweep = {k: v for k, v in m.params.items() if isinstance(v, list)}
        fixed = {k: v for k, v in m.params.items() if not isinstance(v, list)}
        for values in itertools.product(*sweep.values()) if sweep else [()]:
            swept = dict(zip(sweep, values))
            yield method_label(m.name, swept), m, {**fixed, **swept}


def method_label(name: str, params: dict[str, Any]) -> str:
    """How results name a method run: ``name[key=value,...]``, or ``name`` without parameters."""
    return name + ("[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]" if params else "")


def method_from_label(label: str) -> MethodConfig:
    """The method run a label names (the inverse of :func:`method_label`): ``name[key=value,...]``,
    each value read as YAML (``min_share=0`` is a number, ``release_keys=True`` a bool) and kept as a
    one-value sweep, so :func:`expand_method_list` gives the run this label back."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", label.strip())
    if not match:
        raise ValueError(f"method label {label!r} is not of the form name or name[key=value,...]")
    params: dict[str, Any] = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method label {label!r}: {item!r} is not key=value")
        params[key.strip()] = [yaml.safe_load(raw)]
    return MethodConfig(match.group(1), params=params)


def forget_requests(cfg: ExperimentConfig, class_names: tuple[str, ...]) -> list[tuple[int, ...]]:
    """The configured forget requests as tuples of class indices."""
    if cfg.forget == "each":
        return [(c,) for c in range(len(class_names))]
    if not isinstance(cfg.forget, list) or not cfg.forget:
        raise ValueError(f"forget must be 'each' or a non-empty list of class lists, got {cfg.forget!r}")
    return [resolve_classes(r if isinstance(r, (list, str)) else [r], class_names) for r in cfg.forget]


# ------------------------------------------------------------------ run
def _json_safe(details: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in details.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, fresh: bool = False,
                   force: bool = False, jobs: int | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the whole comparison; returns all result records and writes the report
    (``force``: see :func:`train_models`). The forget requests run in ``jobs`` forked workers
    (default :func:`dkvb.workers.default_jobs`: one per core, at most 4), each on one thread; the
    records are the same, in the same order, whatever ``jobs`` is. The phase table then sums
    each phase over the workers (seconds of work), next to the run's wall time."""
    from .report import write_report

    if jobs is not None:
        require(jobs >= 1, "run_experiment", "jobs", ">= 1", jobs)
    code = code_version()  # the code that runs, named before anything can change it
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    results_path = run_dir / "results.json"
    records: list[dict[str, Any]] = []
    if results_path.is_file() and not fresh:
        prior = json.loads(results_path.read_text())
        if prior.get("fingerprint") == _fingerprint(cfg):
            records = prior["records"]
            log.info("resuming: %d results already in %s", len(records), results_path)
    done = {(r["method"], r["model"], tuple(r["forget_class_ids"])) for r in records}

    timer = PhaseTimer()
    with timer.track("embed (or load the cache)"):
        train, test = load_embeddings(cfg, progress=progress)
    searched: dict[str, Candidates] = {}
    models = train_models(cfg, train, progress=progress, force=force, timer=timer, candidates=searched)
    # A DKVB's nearest keys are searched once (the training set's while training it); its logits
    # are kept with them, and every masked copy recomputes only the rows its mask reaches.
    kept: dict[str, tuple[KeptLogits, KeptLogits]] = {}
    with timer.track("nearest-key candidates", "dkvb"):
        for kind, (m, _) in models.items():
            if hasattr(m, "bottleneck"):
                kept[kind] = (m.keep_logits(train.x, searched.get(kind)), m.keep_logits(test.x))
                if m.code_cache is None:  # a stored model: the training set's candidates serve re-fitting too
                    m.keep_codes(train.x, kept[kind][0].candidates)
    searched.clear()

    def shares_keys(model: nn.Module, kind: str) -> bool:
        return model.bottleneck.keys.data_ptr() == models[kind][0].bottleneck.keys.data_ptr()

    def predict(model: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) logits, from the kept ones when ``model`` shares the original's keys."""
        if kind in kept and shares_keys(model, kind):
            return model.predict_from(train.x, kept[kind][0]), model.predict_from(test.x, kept[kind][1])
        return predict_logits(model, train.x), predict_logits(model, test.x)

    with timer.track("evaluate", "original"):
        logits = {k: predict(m, k) for k, (m, _) in models.items()}
    runs = list(expand_methods(cfg))
    requests = forget_requests(cfg, train.class_names)
    # each record names the code and day that produced it, so a resumed run's page shows every version
    base = {"dataset": cfg.dataset.name, "encoder": cfg.encoder.name, "seed": cfg.seed,
            "code": code, "date": run_date()}

    def save() -> None:
        atomic_write_json(results_path, {"fingerprint": _fingerprint(cfg), "records": records})
        atomic_write_json(run_dir / "phases.json", {"rows": timer.rows()})  # so far, for a run still going

    probe = ProbeConfig(**cfg.verify) if cfg.verify else None

    def relearn(model: nn.Module, kind: str, classes: tuple[int, ...]) -> dict[str, float]:
        """Relearning probe: steps until forget-test accuracy is back to ``probe.target`` x the original's."""
        if probe is None:
            return {}
        forget = test.class_mask(list(classes))  # the original's forget-test accuracy, from its cached logits
        original = accuracy(logits[kind][1][forget], test.y[forget])
        cands = kept[kind][1].candidates if kind in kept and shares_keys(model, kind) else None
        return {"relearn_steps": probe_relearning(model, train, test, classes, probe.target * original, probe, cands)}

    def measure(model: nn.Module, kind: str, label: str, classes: tuple[int, ...], clock: PhaseTimer,
                given: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Accuracies, MIA and relearning probe of ``model``, each phase timed under ``label``."""
        with clock.track("evaluate", label):
            tr, te = given if given is not None else predict(model, kind)
            metrics = accuracies_from_logits(tr, te, train, test, classes)
        with clock.track("MIA", label):
            metrics["mia"] = mia_from_logits(tr, te, train, test, classes, seed=cfg.seed)
        with clock.track("relearning probe", label):
            metrics.update(relearn(model, kind, classes))
        return metrics

    per_image = encoder_flops_per_image(cfg.encoder.name, cfg.encoder.image_size)

    def record(method: str, kind: str, classes: tuple[int, ...], metrics: dict[str, float], flops: float,
               seconds: float, params: dict[str, Any], details: dict[str, Any], images: float = 0,
               **extra: Any) -> dict[str, Any]:
        """A result record; ``images`` = encoder passes the method needs without an embedding cache."""
        names = [train.class_names[c] for c in classes]
        return {**base, "method": method, "model": kind, "forget_classes": names,
                "forget_class_ids": list(classes), "metrics": metrics, "flops": flops,
                "flops_from_images": flops + per_image * images, "encoder_images": images,
                "seconds": seconds, "params": params, "details": details, **extra}

    def run_request(classes: tuple[int, ...]) -> tuple[list[dict[str, Any]], PhaseTimer]:
        """Every model's original metrics and every method's result on one request, not yet done."""
        out, clock = [], PhaseTimer()
        names = [train.class_names[c] for c in classes]
        for kind, (model, info) in models.items():
            if ("original", kind, classes) not in done:
                out.append(record("original", kind, classes,
                                  measure(model, kind, f"original {kind}", classes, clock, logits[kind]), 0, 0.0, {}, info))
        request = ForgetRequest(classes, train, seed=cfg.seed)
        for label, method, params in runs:
            kind = method_model(method)
            if (label, kind, classes) in done:
                continue
            try:
                with count_images() as tally, clock.track("unlearn", label):
                    report = create_unlearner(method.name, **params).unlearn(models[kind][0], request)
            except (ValueError, DivergenceError) as e:  # e.g. a mask that empties a codebook, a NaN loss
                log.warning("%s on %s failed: %s", label, names, e)
                out.append(record(label, kind, classes, {m: float("nan") for m in METRICS}, float("nan"), float("nan"),
                                  dict(params), {}, float("nan"), error=str(e)))
                continue
            metrics = measure(report.model, kind, label, classes, clock)
            out.append(record(label, kind, classes, metrics, report.flops, report.seconds, report.params,
                              _json_safe(report.details), tally.images))
        return out, clock

    labels = [("original", kind) for kind in models] + [(label, method_model(m)) for label, m, _ in runs]
    pending = [c for c in requests if any((label, kind, c) not in done for label, kind in labels)]
    jobs = default_jobs() if jobs is None else jobs
    bar = tqdm(total=len(pending), desc=f"requests ({jobs} jobs)", disable=not progress)
    for new, clock in fork_map(run_request, pending, jobs=jobs):
        records.extend(new)
        timer.merge(clock)
        bar.update()
        save()
    bar.close()
    save()
    with timer.track("report"):
        write_report(records, run_dir, title=cfg.name)
    atomic_write_json(run_dir / "phases.json", {"rows": timer.rows()})
    atomic_write_text(run_dir / "phases.md", timer.table() + "\n")
    return records


def unlearn_once(
    cfg: ExperimentConfig, classes: str | list, method: MethodConfig
) -> tuple[dict[str, float], dict[str, float], Any]:
    """One request with one method on the run's trained model: (metrics before, metrics after, report).
    The method and its parameters are checked before any embedding or training work."""
    unlearner = create_unlearner(method.name, **method.params)
    kind = method_model(method)
    train, test = load_embeddings(cfg, progress=False)
    model = train_models(cfg, train, kinds={kind}, progress=False)[kind][0]
    ids = resolve_classes(classes, train.class_names)
    report = unlearner.unlearn(model, ForgetRequest(ids, train, seed=cfg.seed))
    return (evaluate(model, train, test, ids, seed=cfg.seed), evaluate(report.model, train, test, ids, seed=cfg.seed),
            report)


__all__ = ["load_embeddings", "train_models", "run_experiment", "unlearn_once", "expand_methods", "method_label",
           "forget_requests"]
