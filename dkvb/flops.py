"""FLOP counting with fvcore, shared by every unlearning method.

Conventions (fvcore's): one fused multiply-add counts as one FLOP. fvcore has no handles for
selection ops, so we register ours:

- ``aten::argmin`` / ``aten::argmax`` / ``aten::topk`` / ``aten::sort``: one comparison per input
  element (``numel`` of the input);
- ``aten::cdist``: ``n * m * d`` (one multiply-add per coordinate pair);
- ``prim::PythonOp._FaissLookup``: ``N * C * K * key_dim`` (exhaustive L2 search per codebook);
- attention (``aten::scaled_dot_product_attention``, ``aten::_native_multi_head_attention``):
  its matrix products (the latter's in/out projections included);
- ``aten::embedding_bag`` (the DKVB's pooling of selected values): one add per pooled element;
- indexing/gather and elementwise ops count zero (memory traffic, not arithmetic), as in fvcore.

Backward passes are counted as ``BACKWARD_FACTOR`` (= 2) times the forward FLOPs of the same
batch, the usual convention (one product for input gradients, one for weight gradients).

Two accountings (``docs/flops.md``): ``flops`` counts what a method spends on cached
embeddings; ``flops_from_images`` adds one encoder forward pass (:func:`encoder_flops_per_image`)
for every image whose embedding a pass of the method consumes, as tallied by
:func:`count_images` (every :class:`FlopCounter` pass notes its batch; DKVB lookups note theirs).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

BACKWARD_FACTOR = 2

_ZERO_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::pow", "aten::sum", "aten::mean", "aten::unsqueeze", "aten::expand", "aten::index", "aten::gather",
    "aten::eq", "aten::ne", "aten::isfinite", "aten::all", "aten::any", "aten::relu", "aten::relu_",
    "aten::softmax", "aten::log_softmax", "aten::clamp", "aten::clamp_min", "aten::exp", "aten::log",
    "aten::neg", "aten::rsub", "aten::copy_", "aten::fill_", "aten::zeros_like", "aten::ones_like",
    "aten::where", "aten::max", "aten::min", "aten::abs", "aten::sqrt", "aten::reshape", "aten::view",
    "aten::flatten", "aten::permute", "aten::transpose", "aten::select", "aten::slice", "aten::arange",
    "aten::scalar_tensor", "aten::to", "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::isin",
    "aten::bitwise_not", "aten::logical_not", "aten::masked_fill", "aten::index_put_", "aten::scatter_add_",
    "aten::unbind", "aten::numel", "aten::stack", "aten::cat", "aten::contiguous", "aten::clone", "aten::detach",
    "aten::nonzero", "aten::lift_fresh", "aten::item", "aten::ScalarImplicit", "aten::Int",
)


def _numel_of_first_input(inputs: list[Any], outputs: list[Any]) -> int:
    shape = inputs[0].type().sizes()
    return int(math.prod(shape)) if shape else 0


def _cdist_flops(inputs: list[Any], outputs: list[Any]) -> int:
    a, b = inputs[0].type().sizes(), inputs[1].type().sizes()
    return int(math.prod(a[:-1]) * b[-2] * a[-1])


def _faiss_lookup_flops(inputs: list[Any], outputs: list[Any]) -> int:
    n, c, k_dim = inputs[0].type().sizes()
    num_keys = inputs[1].type().sizes()[1]
    return int(n * c * num_keys * k_dim)


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """``scaled_dot_product_attention(q, k, v)``: ``q k^T`` and ``attn v``, each ``L * S * D`` per head."""
    q, k = inputs[0].type().sizes(), inputs[1].type().sizes()
    return int(2 * math.prod(q[:-1]) * k[-2] * q[-1])


def _native_mha_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """``nn.MultiheadAttention``'s inference fast path (``batch_first``: (B, L, E) query, (B, S, E)
    key/value): the q, k, v and output projections plus ``q k^T`` and ``attn v``."""
    (b, length, e), s = inputs[0].type().sizes(), inputs[1].type().sizes()[1]
    return int(b * (2 * length * e * e + 2 * s * e * e + 2 * length * s * e))


def _embedding_bag_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """One add per pooled element: bag rows (N x L) times the row width D."""
    rows = inputs[1].type().sizes()
    return int(math.prod(rows) * inputs[0].type().sizes()[-1])


def _zero(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::argmin": _numel_of_first_input,
    "aten::argmax": _numel_of_first_input,
    "aten::topk": _numel_of_first_input,
    "aten::sort": _numel_of_first_input,
    "aten::cdist": _cdist_flops,
    "aten::embedding_bag": _embedding_bag_flops,
    "prim::PythonOp._FaissLookup": _faiss_lookup_flops,
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::_native_multi_head_attention": _native_mha_flops,
    "aten::sigmoid": _zero,
    **{op: _zero for op in _ZERO_OPS},
}


def flop_analysis(module: nn.Module, inputs: Tensor | tuple[Tensor, ...]) -> FlopCountAnalysis:
    """fvcore analysis of ``module(*inputs)`` with this package's op handles registered."""
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


_CACHE: dict[tuple, int] = {}


def forward_flops(module: nn.Module, x: Tensor) -> int:
    """fvcore FLOPs of one forward pass of ``module`` on a batch shaped like ``x``.

    Memoised on the module's class, its config, the batch shape and (a DKVB) how many forgotten
    classes' start corrections its pooling adds, since unlearning loops call it once per step.
    """
    bottleneck = getattr(module, "bottleneck", None)
    corrected = len(bottleneck.corrections.classes) if bottleneck is not None else 0
    key = (type(module).__name__, repr(getattr(module, "config", id(module))), tuple(x.shape), corrected)
    if key not in _CACHE:
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                _CACHE[key] = int(flop_analysis(module, (x,)).total())
        finally:
            module.train(was_training)
    return _CACHE[key]


def train_step_flops(module: nn.Module, x: Tensor) -> int:
    """Forward plus backward FLOPs of one gradient step on batch ``x`` (backward = 2 x forward)."""
    return (1 + BACKWARD_FACTOR) * forward_flops(module, x)


class _Lookup(nn.Module):
    """A DKVB classifier's nearest-key search as a module, so fvcore can trace and count it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.bottleneck = model.bottleneck
        self.config = ("lookup", model.config)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck.lookup(x)


def lookup_flops(model: nn.Module, num_rows: int, *, batch_size: int = 8192) -> int:
    """fvcore FLOPs of looking up ``num_rows`` embeddings in a DKVB classifier ``model``'s
    bottleneck, in batches of ``batch_size`` (training and both DKVB unlearners count it)."""
    full, rest = divmod(num_rows, batch_size)
    probe = _Lookup(model)
    total = full * forward_flops(probe, torch.zeros(batch_size, model.input_dim)) if full else 0
    if rest:
        total += forward_flops(probe, torch.zeros(rest, model.input_dim))
    return total


def search_flops(bottleneck: nn.Module, num_rows: int, *, whitened: bool = False) -> int:
    """FLOPs of a nearest-key search of ``num_rows`` embeddings in a DKVB ``bottleneck``, as
    fvcore counts its ``lookup`` (:func:`lookup_flops`, tested equal) but without tracing one: the
    whitening (left out when the rows are ``whitened`` already), the projection and distance
    products, and one comparison per distance (the faiss handle counts the distances only)."""
    b = bottleneck
    in_dim, codebooks, size = b.projection.shape[0], b.num_codebooks, b.codebook_size
    per_row = (0 if whitened else b.dim * in_dim * (b.whitening.numel() > 0)) + in_dim * codebooks * b.key_dim
    per_row += codebooks * size * b.key_dim + (codebooks * size if b.search == "torch" else 0)
    return num_rows * per_row


@dataclass
class ImageTally:
    """How many images' embeddings the passes inside a :func:`count_images` block consumed."""

    images: int = 0


_TALLY: ContextVar[ImageTally | None] = ContextVar("dkvb_image_tally", default=None)


@contextmanager
def count_images() -> Iterator[ImageTally]:
    """Tally, inside the block, the embeddings that FLOP-counted passes consume (one per row and
    pass: a method that passes over the same image in several epochs consumes it every epoch)."""
    tally = ImageTally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)


def note_images(n: int) -> None:
    """Add ``n`` consumed embeddings to the innermost :func:`count_images` tally, if any."""
    tally = _TALLY.get()
    if tally is not None:
        tally.images += int(n)


@lru_cache(maxsize=None)
def encoder_flops_per_image(name: str, image_size: int | None = None) -> int:
    """fvcore FLOPs of one forward pass of encoder ``name`` on one ``image_size`` image.

    The architecture is built with random weights (``pretrained=False``: no download; the
    weights do not change the count), once per (name, size) and process.
    """
    from .encoders import create_encoder

    encoder = create_encoder(name, image_size=image_size, pretrained=False)
    x = torch.zeros(1, 3, encoder.image_size, encoder.image_size)
    with torch.no_grad():
        return int(flop_analysis(encoder, (x,)).total())


class FlopCounter:
    """Accumulates FLOPs of the passes an unlearning method runs, and notes the embeddings
    they consume in the active :func:`count_images` tally."""

    def __init__(self) -> None:
        self.total = 0

    def forward(self, module: nn.Module, x: Tensor, *, new_images: bool = True) -> None:
        """One forward pass on batch ``x``; ``new_images=False`` when the same batch was already
        noted in this step (e.g. a frozen teacher run on the student's batch)."""
        self.total += forward_flops(module, x)
        if new_images:
            note_images(len(x))

    def step(self, module: nn.Module, x: Tensor) -> None:
        self.total += train_step_flops(module, x)
        note_images(len(x))

    def add(self, flops: int) -> None:
        self.total += int(flops)
