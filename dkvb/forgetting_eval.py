"""How close each unlearning method comes to retraining, as the NeurIPS 2023 unlearning competition
measures it (:mod:`dkvb.forgetting_quality`).

For each of N seeds the whole pipeline runs again: the model of each family is trained (a DKVB:
keys, value start, values; a linear head: its weights), every method acts on it for every forget
request, and a model of the same family is retrained with the same seed on the retain set with its
own recipe (a DKVB's keys included). The methods' outputs over the N seeds are then scored against
the N retrained models: on the forget set as the competition defines it (the forget classes'
training images, at most :data:`MEMBER_ROWS`) the per-example epsilon, the forgetting score F, its
ceiling (retrained against retrained) and floor (the original model against retrained) and the
competition's final score; on the forget classes' test images F again (``F_test``), top-1 agreement
and JS divergence with the retrained models; and the membership-inference gap.

Each seed's outputs are saved as they are computed (``<out>/seed-<s>.pt``, written atomically), so
an interrupted run resumes from the seeds it finished.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cache import subset_indices
from .config import ExperimentConfig, MethodConfig
from .data import EmbeddingSet
from .evaluate import accuracy, membership_attack, predict_logits
from .experiment import expand_method_list, forget_requests, load_key_pool, method_model
from .forgetting_quality import final_score, forgetting_report
from .io import atomic_write_json
from .models import build_model, resolve_config
from .train import fit
from .unlearn import ForgetRequest, create_unlearner
from .validate import require, require_count

log = logging.getLogger("dkvb")

# The methods scored when a config names none: the default DKVB request and its parts alone (the
# key mask without the start removal or the recount, each of those without the mask), each
# family's output deletion, and the linear-head baselines with their default settings.
DEFAULT_METHODS: tuple[MethodConfig, ...] = (
    MethodConfig("dkvb-activations"),
    MethodConfig("dkvb-activations", params={"drop_start": [False]}),
    MethodConfig("dkvb-activations", params={"recount_values": [False]}),
    MethodConfig("dkvb-activations", params={"mask_keys": [False]}),
    MethodConfig("dkvb-activations", params={"floor_scores": [0.3, 0.5, 1.0]}),
    MethodConfig("dkvb-activations", params={"refit_epochs": [2]}),
    MethodConfig("dkvb-activations", params={"refit_epochs": [2], "release_keys": [True]}),
    MethodConfig("dkvb-drop-output"),
    MethodConfig("drop-output"),
    MethodConfig("finetune"),
    MethodConfig("neggrad"),
    MethodConfig("scrub", params={"lr": [0.002], "epochs": [3], "msteps": [2], "alpha": [0.001], "gamma": [0.99],
                           "temperature": [4.0]}),
    MethodConfig("rbm"),
    MethodConfig("salun"),
    MethodConfig("ssd"),
    MethodConfig("potion"),
)
ORIGINAL = "original"  # the floor: the trained model, unchanged
MEMBER_ROWS = 4000  # rows per group for utility and the membership attack (the attack's own cap)


@dataclass
class ForgettingConfig:
    """What :func:`measure_forgetting` runs.

    Attributes:
        num_models: N, seeds of the whole pipeline per family (at least 4: the ceiling splits the
            retrained models into halves).
        requests: how many of the config's forget requests are scored (the first ones), ``None``
            for all.
        methods: the methods scored (``dkvb-drop-output`` is ``drop-output`` on the DKVB);
            empty: :data:`DEFAULT_METHODS`.
    """

    num_models: int = 8
    requests: int | None = None
    methods: list[MethodConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_count("ForgettingConfig", "num_models", self.num_models, low=4)
        if self.requests is not None:
            require_count("ForgettingConfig", "requests", self.requests)


def _expand(methods: list[MethodConfig] | tuple[MethodConfig, ...]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, family, registered name, params) of every setting (``dkvb-drop-output``: ``drop-output``
    on the DKVB)."""
    return [(label, "dkvb", "drop-output", params) if m.name == "dkvb-drop-output"
            else (label, method_model(m), m.name, params) for label, m, params in expand_method_list(methods)]


def train_family(cfg: ExperimentConfig, kind: str, data: EmbeddingSet, seed: int, *,
                 size_from: int | None = None, key_pool: EmbeddingSet | None = None) -> nn.Module:
    """A model of ``kind`` (``"dkvb"`` or ``"linear"``) trained on ``data`` with the config's recipe and
    ``seed`` for everything (a DKVB's keys fitted on ``data``, so a retrained DKVB never saw the forget
    set, or on ``key_pool``, the config's :func:`~dkvb.experiment.load_key_pool`, when it has one).
    ``size_from``: the training set size that resolves ``"auto"`` codebook sizes (default ``len(data)``);
    a retrained model passes the original's, so both have the same architecture."""
    if kind == "dkvb":
        model = build_model(resolve_config(cfg.model, size_from or len(data)), data.dim, data.num_classes,
                            seed=seed)
    else:
        model = build_model({"kind": "linear"}, data.dim, data.num_classes, seed=seed)
    keys_on = data if key_pool is None or kind != "dkvb" else key_pool
    model.prepare(keys_on.x, keys_on.y)
    recipe = cfg.train if kind == "dkvb" else cfg.linear_train
    fit(model, data, replace(recipe, seed=seed))
    if kind == "dkvb":
        model.compute_activation_counts(data.x, data.y)
    return model


def _outputs(model: nn.Module, views: dict[str, EmbeddingSet]) -> dict[str, torch.Tensor]:
    return {name: predict_logits(model, v.x).half() for name, v in views.items()}


def _views(train: EmbeddingSet, test: EmbeddingSet, classes: tuple[int, ...], seed: int) -> dict[str, EmbeddingSet]:
    """The rows every model is evaluated on for one request: the forget classes' test images (scored),
    and at most :data:`MEMBER_ROWS` (seeded) of the retain test images (utility) and of the retain and
    forget training rows (utility and the membership attack)."""
    f_tr, f_te = train.class_mask(classes), test.class_mask(classes)

    def capped(data: EmbeddingSet) -> EmbeddingSet:
        if len(data) <= MEMBER_ROWS:
            return data
        return data.subset(torch.from_numpy(subset_indices(len(data), MEMBER_ROWS, seed)))

    return {"forget_test": test.subset(f_te), "retain_test": capped(test.subset(~f_te)),
            "retain_train": capped(train.subset(~f_tr)), "forget_train": capped(train.subset(f_tr))}


def run_seed(cfg: ExperimentConfig, train: EmbeddingSet, test: EmbeddingSet, requests: list[tuple[int, ...]],
             methods: list[tuple[str, str, str, dict[str, Any]]], seed: int, *, retrain: bool = True,
             key_pool: EmbeddingSet | None = None) -> dict[str, Any]:
    """Every family's original, unlearned and (unless ``retrain`` is False) retrained outputs for
    one seed: ``{"outputs": {request: {method: {view: logits}}}, "seconds": {...}, "flops": {...}}``;
    ``key_pool``: what DKVB keys are fitted on (:func:`train_family`)."""
    outputs: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    seconds: dict[str, float] = {}
    flops: dict[str, dict[str, int]] = {}
    for kind in sorted({fam for _, fam, _, _ in methods}):
        start = time.perf_counter()
        model = train_family(cfg, kind, train, seed, key_pool=key_pool)
        seconds[f"train {kind}"] = time.perf_counter() - start
        for classes in requests:
            key = ",".join(map(str, classes))
            views = _views(train, test, classes, cfg.seed)
            out = outputs.setdefault(key, {})
            out[f"{ORIGINAL} ({kind})"] = _outputs(model, views)
            request = ForgetRequest(classes, train, seed=seed)
            for label, fam, name, params in methods:
                if fam != kind:
                    continue
                report = create_unlearner(name, **params).unlearn(model, request)
                out[label] = _outputs(report.model, views)
                seconds[label] = seconds.get(label, 0.0) + report.seconds
                flops.setdefault(label, {})[key] = report.flops
            if not retrain:
                continue
            start = time.perf_counter()
            retrained = train_family(cfg, kind, request.retain, seed, size_from=len(train), key_pool=key_pool)
            out[f"retrained ({kind})"] = _outputs(retrained, views)
            seconds[f"retrain {kind}"] = seconds.get(f"retrain {kind}", 0.0) + time.perf_counter() - start
    return {"outputs": outputs, "seconds": seconds, "flops": flops}


def _family(label: str, methods: list[tuple[str, str, str, dict[str, Any]]]) -> str:
    for lab, fam, _, _ in methods:
        if lab == label:
            return fam
    return label.rsplit("(", 1)[1].rstrip(")")


def score(runs: list[dict[str, Any]], test: EmbeddingSet, train: EmbeddingSet,
          methods: list[tuple[str, str, str, dict[str, Any]]], seed: int = 0) -> dict[str, Any]:
    """Per request and method, the competition's scores against the same family's retrained
    models, from the seeds' outputs (:func:`run_seed`); then their means over the requests."""
    per_request: dict[str, dict[str, Any]] = {}
    wanted = {label for label, *_ in methods}
    for key in runs[0]["outputs"]:
        classes, rows = tuple(int(c) for c in key.split(",")), {}
        views = _views(train, test, classes, seed)
        ys = {v: views[v].y.numpy() for v in views}
        for label in runs[0]["outputs"][key]:
            if label.startswith("retrained") or not (label in wanted or label.startswith(ORIGINAL)):
                continue  # the references, and methods saved by another run of the same seeds
            fam = _family(label, methods)
            stack, ref = ({v: np.stack([r["outputs"][key][name][v].float().numpy() for r in runs]) for v in views}
                          for name in (label, f"retrained ({fam})"))
            # F on the forget set as the competition defines it (the class's training images), and
            # on its unseen test images; agreement and JS on the test images
            rep = forgetting_report(stack["forget_train"], ref["forget_train"], ys["forget_train"], rng_seed=seed,
                                    paired=True)
            rep_test = forgetting_report(stack["forget_test"], ref["forget_test"], ys["forget_test"], rng_seed=seed,
                                         paired=True)
            acc = {f"{v}{suffix}": [float((s.argmax(1) == ys[v]).mean()) for s in arr[v]]
                   for v in ("retain_train", "retain_test") for suffix, arr in (("", stack), ("_retrained", ref))}
            mia = [_mia(s, ref_) for s, ref_ in zip(_triples(stack), _triples(ref))]
            rows[label] = {
                "family": fam,
                "F": rep["forgetting_score"],
                "ceiling": rep["ceiling"],
                "F_at_ceiling_n": rep["forgetting_score_at_ceiling_n"],
                "final_score": final_score(rep["forgetting_score"], acc["retain_train"], acc["retain_test"],
                                           acc["retain_train_retrained"], acc["retain_test_retrained"]),
                "epsilon_mean": rep["epsilon_mean"],
                "F_test": rep_test["forgetting_score"],
                "ceiling_test": rep_test["ceiling"],
                "F_test_at_ceiling_n": rep_test["forgetting_score_at_ceiling_n"],
                "agreement": rep_test["top1_agreement"],
                "js": rep_test["js_divergence"],
                "forget_test_acc": float(np.mean([(s.argmax(1) == ys["forget_test"]).mean()
                                                  for s in stack["forget_test"]])),
                "retain_test_acc": float(np.mean(acc["retain_test"])),
                "mia": float(np.mean([m[0] for m in mia])),
                "mia_gap": float(np.mean([abs(m[0] - m[1]) for m in mia])),
            }
        per_request[key] = rows
    labels_all = list(next(iter(per_request.values())))
    mean = {lab: {k: float(np.mean([per_request[r][lab][k] for r in per_request]))
                  for k in per_request[next(iter(per_request))][lab] if k != "family"}
            | {"family": per_request[next(iter(per_request))][lab]["family"]} for lab in labels_all}
    return {"per_request": per_request, "mean": mean}


def _triples(stack: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return list(zip(stack["retain_train"], stack["retain_test"], stack["forget_train"]))


def _mia(unlearned: tuple[np.ndarray, ...], retrained: tuple[np.ndarray, ...]) -> tuple[float, float]:
    """The membership attack's score (forget-train read as members) of a model and its retrained twin."""
    return tuple(membership_attack(*(torch.from_numpy(a) for a in t)) for t in (unlearned, retrained))


def _save(run: dict[str, Any], path: Path) -> None:
    """Write a seed's outputs atomically (a killed run leaves the previous file or none)."""
    tmp = path.with_suffix(".tmp")
    torch.save(run, tmp)
    tmp.replace(path)


def measure_forgetting(cfg: ExperimentConfig, train: EmbeddingSet, test: EmbeddingSet, fcfg: ForgettingConfig,
                       out_dir: str | Path, *, only: range | None = None) -> dict[str, Any] | None:
    """Run :func:`run_seed` for seeds ``cfg.seed .. cfg.seed + N - 1`` (resuming from ``out_dir``),
    score every method (:func:`score`) and write ``out_dir/forgetting.json``; returns its content.
    ``only`` (offsets into the N seeds) runs just those seeds and scores nothing (returns ``None``)
    unless every seed is then done: processes given disjoint ranges share the work."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requests = forget_requests(cfg, train.class_names)[: fcfg.requests]
    methods = _expand(fcfg.methods or DEFAULT_METHODS)
    require(bool(requests), "measure_forgetting", "requests", "at least one forget request", fcfg.requests)
    pool = load_key_pool(cfg, progress=False)
    runs, start = [], time.perf_counter()
    for offset in range(fcfg.num_models):
        s = cfg.seed + offset
        path = out / f"seed-{s}.pt"
        run = torch.load(path, weights_only=False) if path.exists() else None
        if run is not None and run.get("requests") == requests:
            missing = [m for m in methods if m[0] not in run["methods"]]
            if not missing:
                runs.append(run)
                continue
            if only is not None and offset not in only:
                continue
            # the seed's retrained models are saved: only the methods it lacks run (on the same originals)
            log.info("forgetting quality: seed %d, adding %s", s, ", ".join(m[0] for m in missing))
            extra = run_seed(cfg, train, test, requests, missing, s, retrain=False, key_pool=pool)
            for key, outs in extra["outputs"].items():
                run["outputs"][key].update(outs)
            run["seconds"].update(extra["seconds"])
            run["flops"].update(extra["flops"])
            run["methods"] += [m[0] for m in missing]
            _save(run, path)
            runs.append(run)
            continue
        if only is not None and offset not in only:
            continue
        log.info("forgetting quality: seed %d of %d", s - cfg.seed + 1, fcfg.num_models)
        run = {**run_seed(cfg, train, test, requests, methods, s, key_pool=pool), "methods": [m[0] for m in methods],
               "requests": requests}
        _save(run, path)
        runs.append(run)
    if len(runs) < fcfg.num_models:
        return None
    result = score(runs, test, train, methods, seed=cfg.seed)
    result.update({
        "config": cfg.name, "num_models": fcfg.num_models, "requests": [list(r) for r in requests],
        "seconds_total": time.perf_counter() - start,
        "seconds": {k: float(np.mean([r["seconds"].get(k, 0.0) for r in runs])) for k in runs[0]["seconds"]},
        # training, unlearning and retraining, summed over the seeds (evaluating the models excluded)
        "compute_seconds": float(sum(sum(r["seconds"].values()) for r in runs)),
        "flops": {k: float(np.mean([np.mean(list(r["flops"][k].values())) for r in runs])) for k in runs[0]["flops"]},
    })
    atomic_write_json(out / "forgetting.json", result)
    return result


__all__ = ["ForgettingConfig", "DEFAULT_METHODS", "measure_forgetting", "run_seed", "score", "train_family"]
