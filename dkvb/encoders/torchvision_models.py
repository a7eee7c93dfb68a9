"""torchvision classification models as encoders (``torchvision:<model>`` and ``<model>@<stage>``):
the final pooled feature, or a stage's average-pooled output. Weights are fetched into
``torch.hub``'s cache on first use."""
from __future__ import annotations

import itertools
import os

import torch
from torch import Tensor, nn

from . import weights
from .base import Encoder, make_preprocess


def _strip_classifier(model: nn.Module, arch: str) -> int:
    """Replace the last linear layer by ``nn.Identity`` in place; return its input size."""
    for attr in ("fc", "classifier", "heads", "head"):
        layer = getattr(model, attr, None)
        if layer is None:
            continue
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return layer.in_features
        if isinstance(layer, nn.Sequential):
            for i in range(len(layer) - 1, -1, -1):
                if isinstance(layer[i], nn.Linear):
                    in_features = layer[i].in_features
                    layer[i] = nn.Identity()
                    return in_features
    raise ValueError(
        f"torchvision model {arch!r} has no final linear layer under fc / classifier / heads; "
        "only classification models are supported"
    )


class _PooledStage(nn.Module):
    """A network's top-level children up to ``stage``, run in order, then a global average pool:
    the intermediate feature ResNets offer (``layer1`` .. ``layer4``; ``layer4`` is the default
    final pooled feature)."""

    def __init__(self, model: nn.Module, stage: str, arch: str) -> None:
        super().__init__()
        names = [n for n, _ in model.named_children()]
        if stage not in names:
            raise ValueError(f"torchvision model {arch!r} has no stage {stage!r}; its top-level modules: {names}")
        self.trunk = nn.Sequential(*[m for _, m in itertools.takewhile(lambda c: c[0] != stage, model.named_children())],
                                   getattr(model, stage))

    def forward(self, images: Tensor) -> Tensor:
        feats = self.trunk(images)
        if feats.ndim != 4:
            raise ValueError(f"stage output has shape {tuple(feats.shape)}, expected (B, C, H, W) feature maps")
        return feats.mean(dim=(2, 3))


def build_torchvision(arg: str | None, *, image_size: int | None, pretrained: bool) -> Encoder:
    import torchvision

    arch, _, stage = (arg or "resnet50").partition("@")
    try:
        default = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as exc:
        known = torchvision.models.list_models(module=torchvision.models)
        raise ValueError(f"unknown torchvision classification model {arch!r}; known: {known}") from exc
    name = f"torchvision:{arch}" + (f"@{stage}" if stage else "")
    if pretrained:
        try:
            if not os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(default.url))):
                weights.check_reachable(default.url)
            model = torchvision.models.get_model(arch, weights=default)
        except weights.network_errors() as exc:
            target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(default.url))
            raise weights.missing_weights(
                name, f"Download {default.url}\nand save it as {target} (the torch hub cache; set TORCH_HOME to move it).", exc
            ) from exc
    else:
        model = weights.seeded(lambda: torchvision.models.get_model(arch, weights=None))
    tf = default.transforms()
    crop = int(tf.crop_size[0])
    size = image_size or crop
    if stage:
        model = _PooledStage(model, stage, arch).eval()  # eval: the probe must not touch BatchNorm statistics
        with torch.no_grad():
            embed_dim = int(model(torch.zeros(1, 3, size, size)).shape[1])  # shapes only (meta in encoder_config)
    else:
        embed_dim = _strip_classifier(model, arch)
    resize = int(tf.resize_size[0]) if image_size is None else size
    preprocess = make_preprocess(size, mean=tuple(tf.mean), std=tuple(tf.std), resize_size=resize, interpolation=tf.interpolation)
    return Encoder(model, name=name, embed_dim=embed_dim, image_size=size, preprocess=preprocess, pretrained=pretrained)
