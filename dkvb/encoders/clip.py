"""open_clip image towers as encoders (``clip:<model>/<tag>``, or ``<tag>`` = a local checkpoint file).
Weights are fetched into the Hugging Face / open_clip cache on first use."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import transforms as T

from . import weights
from .base import Encoder, ToRGB


class _ClipImageTower(nn.Module):
    """open_clip's ``visual`` tower: the same output as ``model.encode_image(x, normalize=False)``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


def cached_checkpoint(cfg: dict[str, Any]) -> str | None:
    """Local path of an open_clip checkpoint already in the Hugging Face cache (no network)."""
    hub = cfg.get("hf_hub")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    if not hub:
        return None
    repo, filename = os.path.split(hub)
    if not filename:
        names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    elif filename.endswith((".bin", ".pth")):
        names = [filename[:-4] + ".safetensors", filename]
    else:
        names = [filename]
    for fname in names:
        path = try_to_load_from_cache(repo, fname)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def build_clip(arg: str | None, *, image_size: int | None, pretrained: bool) -> Encoder:
    open_clip = weights.require_package("open_clip", "open_clip_torch", "clip")
    model_name, _, tag = (arg or "ViT-B-32/openai").partition("/")
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()}")
    tag = tag or "openai"
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    checkpoint = None
    if pretrained:
        if cfg:
            try:
                checkpoint = cached_checkpoint(cfg)
                if not checkpoint:
                    if cfg.get("hf_hub") and not os.environ.get("HF_HUB_OFFLINE"):
                        weights.check_reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
                    elif cfg.get("url") and not cfg.get("hf_hub"):
                        weights.check_reachable(cfg["url"])
                    checkpoint = open_clip.download_pretrained(cfg)
            except weights.network_errors() + (RuntimeError,) as exc:
                hub = cfg.get("hf_hub") or cfg.get("url")
                raise weights.missing_weights(
                    f"clip:{model_name}/{tag}",
                    f"Fetch '{hub}' on a machine with internet "
                    f"(python -c \"import open_clip; open_clip.create_model_and_transforms('{model_name}', pretrained='{tag}')\")\n"
                    "and copy the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME) to this machine "
                    "(set HF_HUB_OFFLINE=1 to skip the network retries), "
                    f"or pass a local checkpoint file as 'clip:{model_name}//path/to/weights.bin'.",
                    exc,
                ) from exc
            if not checkpoint:
                raise RuntimeError(f"open_clip returned no checkpoint for clip:{model_name}/{tag}")
        elif os.path.isfile(tag):
            checkpoint = tag
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(f"unknown pretrained tag {tag!r} for {model_name!r}: known tags {tags}, or a checkpoint file path")

    def build() -> tuple[nn.Module, Any]:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=checkpoint,
            device=torch.get_default_device(),  # "meta" inside encoder_config(): no weights allocated
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            force_image_size=image_size,
            image_mean=cfg.get("mean"),
            image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
        )
        return model, preprocess

    model, preprocess = build() if pretrained else weights.seeded(build)
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    return Encoder(
        _ClipImageTower(visual),
        name=f"clip:{model_name}/{tag}",
        embed_dim=int(visual.output_dim),
        image_size=size,
        preprocess=T.Compose([ToRGB(), preprocess]),
        pretrained=pretrained,
    )
