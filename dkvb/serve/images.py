"""Images to embeddings for ``POST /predict/images``: the encoder the store records, built once.

A store records its encoder (``manifest.json``'s ``encoder_config``: name, image size,
preprocessing). The server builds that encoder on the first image request and checks that it
describes itself the same way (so images are embedded as the model's training set was). An
encoder that cannot be built here (a name the registry lacks, weights that need a download)
makes image requests fail with one message; embeddings are served as before.
"""
from __future__ import annotations

import io
import threading
from typing import Any

import torch
from torch import Tensor

MAX_PIXELS = 40_000_000  # per image; a larger one is refused before decoding


class ImageEncoder:
    """Lazily built encoder of a store's images, described by ``config`` (the manifest's
    ``encoder_config``, or ``None`` when the store records none)."""

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.config = config
        self._encoder: Any = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def _build(self) -> Any:
        with self._lock:
            if self._encoder is None and self._error is None:
                self._encoder, self._error = _build(self.config)
        if self._error is not None:
            raise LookupError(self._error)
        return self._encoder

    def encode(self, images: list[bytes]) -> Tensor:
        """(N, embed_dim) embeddings of encoded image files. Raises ``LookupError`` when the
        encoder cannot be built here and ``ValueError`` naming the first image that cannot be read."""
        from PIL import Image, UnidentifiedImageError

        encoder = self._build()
        batch = []
        for i, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    if img.width * img.height > MAX_PIXELS:
                        raise ValueError(f"files[{i}]: {img.width} x {img.height} pixels, over the limit of "
                                         f"{MAX_PIXELS}")
                    batch.append(encoder.preprocess(img.convert("RGB")))
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
                raise ValueError(f"files[{i}]: not a readable image ({' '.join(str(e).split())})") from None
        with torch.no_grad():
            return encoder.encode(torch.stack(batch))


def _build(config: dict[str, Any] | None) -> tuple[Any, str | None]:
    """(encoder, None), or (None, why images cannot be served)."""
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        return None, "the store records no encoder configuration, so images cannot be embedded here; send embeddings"
    from ..encoders import create_encoder

    name = config["name"]
    try:
        encoder = create_encoder(name, image_size=config.get("image_size"), pretrained=config.get("pretrained", True))
    except (ValueError, RuntimeError, ImportError, OSError) as e:
        return None, f"the store's encoder {name!r} cannot be built here ({' '.join(str(e).split())}); send embeddings"
    built = encoder.config()
    differs = [k for k in ("embed_dim", "image_size", "preprocess", "pretrained") if k in config
               and built.get(k) != config[k]]
    if differs:
        return None, (f"the encoder {name!r} built here differs from the store's in {differs}; send embeddings "
                      "made by the store's encoder")
    return encoder, None


__all__ = ["ImageEncoder", "MAX_PIXELS"]
