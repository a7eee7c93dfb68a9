"""The one interface every unlearning method implements, and the registry that names them."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any, Callable, ClassVar, TypeVar, get_type_hints

from torch import Tensor, nn

from ..data import EmbeddingSet
from ..validate import check_type


@dataclass(frozen=True)
class ForgetRequest:
    """Forget ``forget_classes``, given the training embeddings the model was trained on.

    ``forgotten`` names the classes earlier requests already removed from the model: they are
    not part of :attr:`retain`, so nothing that trains on the retain set (re-fitting, the
    gradient baselines) brings them back.

    Raises ``ValueError`` for an empty request, unknown class indices, a request to forget
    every class, or a forget class with no training examples.
    """

    forget_classes: tuple[int, ...]
    train: EmbeddingSet
    seed: int = 0
    forgotten: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        classes = tuple(sorted(set(int(c) for c in self.forget_classes)))
        earlier = tuple(sorted(set(int(c) for c in self.forgotten) - set(classes)))
        object.__setattr__(self, "forget_classes", classes)
        object.__setattr__(self, "forgotten", earlier)
        n = self.train.num_classes
        if not classes:
            raise ValueError("empty forget set: name at least one class to forget")
        bad = [c for c in classes + earlier if not 0 <= c < n]
        if bad:
            raise ValueError(f"unknown class index {bad}: the model has classes 0..{n - 1}")
        if len(classes) + len(earlier) >= n:
            raise ValueError(f"cannot forget every class ({len(classes) + len(earlier)} of {n}): nothing would be retained")
        present = set(self.train.y.unique().tolist())
        missing = [self.train.class_names[c] for c in classes if c not in present]
        if missing:
            raise ValueError(f"forget class(es) {missing} have no training examples")

    @cached_property
    def forget(self) -> EmbeddingSet:
        return self.train.subset(self.train.class_mask(self.forget_classes))

    @cached_property
    def retain_mask(self) -> Tensor:
        """Bool per training row: the classes still served (neither forgotten now nor before)."""
        return ~self.train.class_mask(self.forget_classes + self.forgotten)

    @cached_property
    def retain(self) -> EmbeddingSet:
        return self.train.subset(self.retain_mask)

    @property
    def class_names(self) -> list[str]:
        return [self.train.class_names[c] for c in self.forget_classes]


@dataclass
class UnlearnReport:
    """What an unlearner returns: the new model (the input is never modified) and its cost."""

    method: str
    model: nn.Module
    flops: int
    seconds: float
    params: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)


class Unlearner(ABC):
    """Base class: subclasses are dataclasses whose fields are the method's hyperparameters.

    ``unlearn`` validates the request against the model, times ``_unlearn`` and wraps the
    result; ``_unlearn`` must leave its input model untouched and count its FLOPs.
    """

    name: ClassVar[str] = "unlearner"
    model_kind: ClassVar[str | None] = None  # "dkvb", "linear" or None for any classifier

    @property
    def params(self) -> dict[str, Any]:
        return asdict(self) if hasattr(self, "__dataclass_fields__") else {}

    def unlearn(self, model: nn.Module, request: ForgetRequest) -> UnlearnReport:
        kind = getattr(model, "config", {}).get("kind")
        if self.model_kind is not None and kind != self.model_kind:
            raise TypeError(f"{self.name} acts on '{self.model_kind}' models, got '{kind}'")
        if request.train.dim != model.input_dim:
            raise ValueError(f"wrong embedding size: model expects {model.input_dim}, got {request.train.dim}")
        if request.train.num_classes != model.num_classes:
            raise ValueError(
                f"request has {request.train.num_classes} classes but the model has {model.num_classes}"
            )
        start = time.perf_counter()
        new_model, flops, details = self._unlearn(model, request)
        seconds = time.perf_counter() - start
        new_model.eval()
        # a default resolved against the model (``details["resolved_params"]``) is reported as the
        # value used, so a logged request replays the same whatever later code makes the default
        params = {**self.params, **details.pop("resolved_params", {})}
        return UnlearnReport(self.name, new_model, int(flops), seconds, params, details)

    @abstractmethod
    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        """Return (unlearned copy of the model, FLOPs spent, method-specific details)."""


UNLEARNERS: dict[str, type[Unlearner]] = {}
U = TypeVar("U", bound=type[Unlearner])


def register(name: str) -> Callable[[U], U]:
    """Class decorator adding an unlearner to :data:`UNLEARNERS` under ``name``."""

    def wrap(cls: U) -> U:
        if name in UNLEARNERS:
            raise ValueError(f"unlearner {name!r} registered twice")
        cls.name = name
        UNLEARNERS[name] = cls
        return cls

    return wrap


def create_unlearner(name: str, **params: Any) -> Unlearner:
    """Build a registered unlearner from its name and hyperparameters.

    Every value is first checked against its field's declared type (:func:`dkvb.validate.check_type`),
    then the method's own ranges (``__post_init__``), so a bad value from a config or ``--param``
    fails here, before any work, as ``<name>: <parameter> must be <rule>, got <value>``.
    """
    if name not in UNLEARNERS:
        raise ValueError(f"unknown unlearning method {name!r}; choose from {sorted(UNLEARNERS)}")
    cls = UNLEARNERS[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(cls)
    return cls(**{k: check_type(name, k, v, hints[k]) for k, v in params.items()})

