"""Experiment configuration: typed dataclasses, YAML files that hold only differences from the
defaults, and ``key.sub=value`` command-line overrides (defaults < file < command line)."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from .models import ModelConfig
from .train import DKVB_TRAIN, LINEAR_TRAIN, TrainConfig
from .validate import check_type, invalid, require


@dataclass
class DatasetConfig:
    """Attributes:
        name: registered dataset name (``fashion-mnist``, ``cifar10``, ``imagefolder:<path>``, ...).
        root: data folder; ``None`` uses the dataset's default location.
        train_limit: use a seeded subset of this many training images (``None`` = all).
        test_limit: the same for the test split.
        download: let torchvision download the data when it is missing (needs internet).
    """

    name: str = "fashion-mnist"
    root: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    download: bool = False


@dataclass
class EncoderConfig:
    """Attributes:
        name: encoder name for :func:`dkvb.encoders.create_encoder`.
        image_size: input resolution (``None`` = the encoder's default).
        batch_size: images per encoder forward pass.
        num_workers: DataLoader workers.
        device: ``cpu`` or ``cuda``.
        amp: ``None``, ``bf16`` or ``fp16`` autocast while encoding (GPU).
        dtype: storage dtype of the cached embeddings, ``float32`` or ``float16``.
        pretrained: False builds the encoder with seeded random weights (tests; no download).
    """

    name: str = "effnet-lite0"
    image_size: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    device: str = "cpu"
    amp: str | None = None
    dtype: str = "float32"
    pretrained: bool = True


@dataclass
class MethodConfig:
    """One unlearning method in a comparison.

    Attributes:
        name: registered unlearner name (see ``dkvb.unlearn.UNLEARNERS``).
        model: which trained model it acts on: ``dkvb``, ``linear`` or ``sharded``
            (``None`` = the method's own kind, else ``linear``).
        params: hyperparameters; a list value is a sweep (one run per value).
    """

    name: str
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """A full comparison: embed, train the models, forget each request with each method, report.

    Attributes:
        name: run name; results go to ``<output_dir>/<name>``.
        seed: seeds keys, training, subsets, unlearning and evaluation.
        dataset, encoder: where embeddings come from.
        model: the DKVB model.
        train: training of the DKVB values/decoder (default :data:`dkvb.train.DKVB_TRAIN`).
        linear_train: training of the linear head, the baselines' model (default
            :data:`dkvb.train.LINEAR_TRAIN`). A section in a file or override changes only the
            fields it names: the others keep the section's default, not ``TrainConfig``'s.
        sharded: number of shards and assignment for the sharded exact-unlearning model
            (empty = no sharded model).
        forget: forget requests: a list of class lists (names or indices), or ``"each"`` for one
            request per class.
        methods: the unlearning methods to compare.
        verify: relearning probe for every result (:class:`dkvb.verify.ProbeConfig` fields, e.g.
            ``{examples: 10, lr: 1.0, max_steps: 100}``); empty = no probe. Its step count is the
            ``relearn_steps`` metric; compare each method with the ``retrain`` row.
        key_pool: a dataset the DKVB's keys and projection are fitted on instead of the training
            set (its training split, ``train_limit`` images of it), encoded by the same encoder;
            ``None`` fits them on the training set. Either another dataset than ``dataset``, or
            ``dataset`` itself when that is a subset (``dataset.train_limit``): then the pool is
            drawn from the training split's rows outside the subset (images of the task's own
            kind that no model trains on). No forget request touches the pool, so a retrained
            DKVB gets the same keys, and a request on count or ridge values (``train.value_init:
            counts`` or ``ridge``, ``train.epochs: 0``) reproduces retraining exactly.
        forgetting: forgetting quality against retraining after the run
            (:class:`dkvb.forgetting_eval.ForgettingConfig` fields, e.g. ``{num_models: 8,
            requests: 3}``; ``methods`` as in ``methods``); empty = not measured. Written to
            ``<run>/forgetting/forgetting.json``.
        cache_dir: embedding cache folder.
        output_dir: results folder.
    """

    name: str = "experiment"
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: replace(DKVB_TRAIN))
    linear_train: TrainConfig = field(default_factory=lambda: replace(LINEAR_TRAIN))
    sharded: dict[str, Any] = field(default_factory=dict)
    forget: Any = "each"
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig("dkvb-activations")])
    verify: dict[str, Any] = field(default_factory=dict)
    forgetting: dict[str, Any] = field(default_factory=dict)
    key_pool: DatasetConfig | None = None
    cache_dir: str = field(default_factory=lambda: os.environ.get("DKVB_CACHE", "~/.cache/dkvb/embeddings"))
    output_dir: str = "results"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls: type, data: Any, path: str, base: Any = None) -> Any:
    """Recursively build dataclass ``cls`` from a dict, rejecting unknown keys by their full path;
    fields the dict does not name come from ``base`` (an instance) when given, else ``cls``'s defaults."""
    if not dataclasses.is_dataclass(cls):
        return data
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise invalid("config", path.rstrip(".") or "<root>", "a mapping", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {[f'{path}{k}' for k in unknown]}; known: {sorted(fields)}")
    if base is not None:
        data = {**asdict(base), **data}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get((cls, key))
        if sub is list:
            if not isinstance(value, list):
                raise invalid("config", f"{path}{key}", "a list", value)
            kwargs[key] = [method_config(v, f"{path}{key}[{i}]") for i, v in enumerate(value)]
        elif sub is not None and value is None and fields[key].default is None:
            kwargs[key] = None  # an optional section left out
        elif sub is not None:
            default = fields[key].default_factory  # a section's own default (e.g. the DKVB's training)
            kwargs[key] = _build(sub, value, f"{path}{key}.", None if default is dataclasses.MISSING else default())
        else:
            kwargs[key] = _check_field(f"{path}{key}", value, hints[key])
    return cls(**kwargs)


def _check_field(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a field's type; a union of several types (``int | "auto"``, ``float
    | "auto"``) is checked against each arm, so a bad value fails here, before any work."""
    arms = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) not in (typing.Union, types.UnionType) or len(arms) < 2:
        return check_type("config", name, value, hint)
    if value is None and len(arms) < len(typing.get_args(hint)):
        return None
    for arm in arms:
        try:
            return check_type("config", name, value, arm)
        except ValueError:
            continue
    rules = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    spelled = [" or ".join(map(repr, typing.get_args(a))) if typing.get_origin(a) is typing.Literal
               else rules.get(a, getattr(a, "__name__", str(a))) for a in arms]
    raise invalid("config", name, " or ".join(spelled), value)


def check_run_name(name: str) -> str:
    """A run name must be one folder name (it becomes ``<output_dir>/<name>``): no path separators,
    not ``.`` or ``..``, at most 100 characters."""
    ok = bool(name) and not any(c in name for c in "/\\\0") and name not in (".", "..") and len(name.encode()) <= 100
    require(ok, "config", "name", "one folder name of at most 100 bytes without '/'", name)
    return name


def method_config(value: Any, path: str = "method") -> MethodConfig:
    """A :class:`MethodConfig` from a config's entry: a registered name, or a mapping of its
    fields (``{name: rbm, params: {...}}``); ``path`` names the entry in errors."""
    if isinstance(value, str):
        return MethodConfig(value)
    return _build(MethodConfig, value, path + ".")


_NESTED: dict[tuple[type, str], Any] = {
    (ExperimentConfig, "dataset"): DatasetConfig,
    (ExperimentConfig, "encoder"): EncoderConfig,
    (ExperimentConfig, "key_pool"): DatasetConfig,
    (ExperimentConfig, "model"): ModelConfig,
    (ExperimentConfig, "train"): TrainConfig,
    (ExperimentConfig, "linear_train"): TrainConfig,
    (ExperimentConfig, "methods"): list,
}


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a mapping")
    tree[keys[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides (YAML-parsed values)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"experiment config not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: an experiment config must be a YAML mapping")
        data = loaded
        data.setdefault("name", p.stem)
    for key, value in parse_assignments(overrides or [], what="override", form="key.sub=value"):
        upd: dict[str, Any] = {}
        _set_path(upd, key, value)
        data = _merge(data, upd)
    config = _build(ExperimentConfig, data, "")
    check_run_name(config.name)
    prefix, colon, arg = config.dataset.name.partition(":")
    if prefix == "imagefolder" and not arg.strip():
        raise invalid("config", "dataset.name", "'imagefolder:<path>' with a folder", config.dataset.name)
    check_key_pool(config)
    return config


def check_key_pool(config: ExperimentConfig) -> None:
    """ValueError unless ``config.key_pool`` (when set) is another dataset, or the training dataset
    itself with ``dataset.train_limit`` set, so that the pool is drawn from rows no model trains on."""
    if config.key_pool is not None and config.key_pool.name == config.dataset.name and not config.dataset.train_limit:
        raise invalid("config", "key_pool.name", "another dataset than dataset.name, or dataset.train_limit set so "
                      "that the pool is drawn from the rows outside the training subset (a pool of training "
                      "rows would be touched by forget requests)", config.key_pool.name)


def parse_assignments(items: Sequence[str], *, what: str = "parameter", form: str = "key=value"
                      ) -> list[tuple[str, Any]]:
    """``["lr=0.5", "epochs=3"]`` -> ``[("lr", 0.5), ("epochs", 3)]``, values parsed as YAML.

    The one parser of command-line ``key=value`` items (config overrides, method parameters);
    ``ValueError`` names an item without ``=``, calling it ``what``.
    """
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} {item!r} must look like {form}")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {item!r}: malformed YAML value ({getattr(e, 'problem', None) or e})") from None
    return out


def save_config(config: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
