"""The one small interface every frozen image encoder has, and its preprocessing."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite weights are converted from the TensorFlow checkpoints, which scale
# pixels as (x - 127) / 128 (MEAN_RGB / STDDEV_RGB in tpu/models/official/efficientnet/lite).
EFFNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_STD = (128.0 / 255.0,) * 3


class ToRGB:
    """Convert a PIL image of any mode (grayscale, palette, RGBA) to RGB; picklable."""

    def __call__(self, image: Any) -> Any:
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


def make_preprocess(
    image_size: int,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize_size: int | None = None,
    interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC,
) -> T.Compose:
    """PIL image -> normalised (3, image_size, image_size) float tensor."""
    return T.Compose(
        [
            ToRGB(),
            T.Resize(resize_size or image_size, interpolation=interpolation, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class Encoder(nn.Module):
    """A frozen feature extractor: ``encode((B, 3, H, W)) -> (B, embed_dim)`` float32.

    Subclasses (or callers passing ``backbone``) only provide ``forward``; ``encode`` adds
    eval mode, ``no_grad``, the device move and the float32 cast.

    Attributes:
        name: canonical registry name, e.g. ``"effnet-lite0"``.
        embed_dim: size of one embedding.
        image_size: side of the square input ``preprocess`` produces.
        preprocess: PIL image -> (3, image_size, image_size) tensor.
        pretrained: False when built with random weights (part of the cache key).
    """

    def __init__(
        self,
        backbone: nn.Module | None,
        *,
        name: str,
        embed_dim: int,
        image_size: int,
        preprocess: Callable[[Any], Tensor],
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.backbone = backbone
        self.name = name
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.preprocess = preprocess
        self.pretrained = pretrained
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        if self.backbone is None:
            raise NotImplementedError("Encoder subclasses without a backbone must override forward()")
        return self.backbone(images)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, embed_dim) float32 features (no grad, eval mode)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        if self.training:
            self.eval()
        feats = self(images.to(self.device, non_blocking=True))
        if feats.ndim != 2 or feats.shape[1] != self.embed_dim:
            raise ValueError(
                f"encoder {self.name} returned shape {tuple(feats.shape)}, expected (B, {self.embed_dim})"
            )
        return feats.float()

    def config(self) -> dict[str, Any]:
        """What identifies this encoder's outputs (used in cache keys and metadata)."""
        return {
            "name": self.name,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "pretrained": self.pretrained,
            "preprocess": repr(self.preprocess),
        }
