"""Selective Synaptic Dampening (SSD), Foster et al. (AAAI 2024): no gradient steps, one rescaling."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..flops import FlopCounter
from ..validate import require, require_count
from .base import ForgetRequest, Unlearner, register
from .gradient import accumulate_gradients


def ssd_importances(model: nn.Module, request: ForgetRequest, *, batch_size: int, flops: FlopCounter,
                    method: str = "ssd") -> tuple[list[Tensor], list[Tensor]]:
    """(I_Df, I_D): mean over mini-batches of the squared mini-batch gradient of the cross-entropy
    (a diagonal Fisher estimate) on the forget set and on the full training set, per trainable
    parameter, at the model's current weights."""
    f_sum, nf = accumulate_gradients(model, request.forget, method=method, batch_size=batch_size, flops=flops,
                                     reduce="square")
    d_sum, nd = accumulate_gradients(model, request.train, method=method, batch_size=batch_size, flops=flops,
                                     reduce="square")
    return [s / nf for s in f_sum], [s / nd for s in d_sum]


def dampen(model: nn.Module, imp_f: list[Tensor], imp_d: list[Tensor], *, alpha: float, dampening: float,
           flops: FlopCounter) -> list[Tensor]:
    """SSD's update, in place: multiply every trainable weight with ``I_Df > alpha * I_D`` by
    ``min(dampening * I_D / I_Df, 1)`` and leave the others exactly as they are. Returns the
    selection masks; counts 3 FLOPs per weight (compare, divide, multiply)."""
    selected = []
    with torch.no_grad():
        for p, f, d in zip(model.trainable_parameters(), imp_f, imp_d):
            sel = f > alpha * d
            factor = (dampening * d / f).clamp(max=1.0)
            p[sel] = p[sel] * factor[sel]
            selected.append(sel)
            flops.add(3 * p.numel())
    return selected


@register("ssd")
@dataclass
class SSD(Unlearner):
    """Dampen the weights far more important to the forget set than to the whole training set.

    With the importances ``I_Df`` (forget set) and ``I_D`` (full training set) of
    :func:`ssd_importances`, the weights with ``I_Df > alpha * I_D`` are multiplied by
    ``min(lambda * I_D / I_Df, 1)``; every other weight is left exactly as it was. Source:
    ``ParameterPerturber`` in ``ssd.py`` of if-loops/selective-synaptic-dampening (exponent 1,
    lower bound 1, importances from batch gradients divided by the number of batches).

    FLOPs: the importance passes are one forward + backward pass per mini-batch of the forget
    set and of the full training set (no optimiser step is taken); the rescaling counts 3 FLOPs
    per weight (compare, divide, multiply).

    Attributes:
        alpha: selection weighting, > 0 (default 10, the repo's ResNet18 setting).
        dampening: lambda, the dampening constant, > 0 (default 1, repo).
        batch_size: mini-batch size of both importance passes (default 256, ours; both use the
            same size so that their ratio is comparable).
    """

    alpha: float = 10.0
    dampening: float = 1.0
    batch_size: int = 256

    def __post_init__(self) -> None:
        require(self.alpha > 0, self.name, "alpha", "> 0", self.alpha)
        require(self.dampening > 0, self.name, "dampening", "> 0", self.dampening)
        require_count(self.name, "batch_size", self.batch_size)

    def _unlearn(self, model: nn.Module, request: ForgetRequest) -> tuple[nn.Module, int, dict[str, Any]]:
        out, flops = copy.deepcopy(model), FlopCounter()
        imp_f, imp_d = ssd_importances(out, request, batch_size=self.batch_size, flops=flops, method=self.name)
        selected = dampen(out, imp_f, imp_d, alpha=self.alpha, dampening=self.dampening, flops=flops)
        n_sel, n_all = sum(int(s.sum()) for s in selected), sum(s.numel() for s in selected)
        # a tuple, not a list: tensors stay out of the JSON-safe details
        return out, flops.total, {"weights_dampened": n_sel, "weights_total": n_all, "mask": tuple(selected)}
