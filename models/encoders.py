"""The video encoders the features stage can use, behind one interface.

    enc = build_encoder("tsf-base", checkpoint="clip_openai_timesformer_base.baseline.ep_0003.pth")
    cls, tokens = enc.encode(frames)  # uint8 (B, T, H, W, 3) -> (B, D), (B, N, D)

Without a checkpoint the weights are random, seeded (benchmarks, tests), and
`weights_id` says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models import ENCODERS
from models.timesformer import TimeSformer, TimeSformerConfig

# LaViLa / Video ReCap pixel statistics, 0-255 scale.
LAVILA_MEAN = (108.3272985, 116.7460125, 104.09373615)
LAVILA_STD = (68.5005327, 66.6321579, 70.32316305)

Features = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder consumes and produces, known without loading its weights."""

    num_frames: int
    image_size: int
    dim: int
    num_tokens: int  # per window, CLS included
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(eq=False)
class VideoEncoder:
    """A frozen video encoder: uint8 frames of one window in, its CLS vector and tokens out."""

    name: str
    model: nn.Module
    features: Features  # (model, normalised (B, T, C, H, W)) -> (cls, tokens)
    spec: EncoderSpec
    weights_id: str
    device: torch.device
    autocast: torch.dtype | None = None  # e.g. torch.bfloat16 on CUDA
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(self.spec.std, device=self.device).view(3, 1, 1)

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames: uint8 (B, num_frames, image_size, image_size, 3) RGB, already resized and cropped.
        Returns float32 cls (B, dim) and tokens (B, num_tokens, dim) on the encoder's device;
        tokens[:, 0] is cls."""
        s = self.spec
        expected = (s.num_frames, s.image_size, s.image_size, 3)
        if frames.dtype != torch.uint8 or frames.ndim != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(
                f"{self.name}: expected uint8 frames of shape (B, {', '.join(map(str, expected))}), "
                f"got {frames.dtype} {tuple(frames.shape)}"
            )
        x = frames.to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3).float()
        x = (x - self._mean) / self._std
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            cls, tokens = self.features(self.model, x)
        return cls.float(), tokens.float()


def _timesformer_config(name: str) -> TimeSformerConfig:
    return TimeSformerConfig.base() if name == "tsf-base" else TimeSformerConfig.tiny()


def _videoprism():
    """models.videoprism imports transformers (2 s here): only VideoPrism needs it, so workers that
    run TimeSformer start without it."""
    from models import videoprism

    return videoprism


def describe_encoder(name: str, checkpoint: str | Path | None = None) -> EncoderSpec:
    """Shapes and pixel statistics of an encoder, from its config alone (cheap: for planning)."""
    if name in ("tsf-base", "tsf-tiny"):
        c = _timesformer_config(name)
        return EncoderSpec(c.num_frames, c.img_size, c.embed_dim, 1 + c.num_frames * c.num_patches,
                           LAVILA_MEAN, LAVILA_STD)
    if name in ("videoprism", "videoprism-tiny"):
        vp = _videoprism()
        c = vp.config(name, checkpoint)
        if not isinstance(c.image_size, int):
            raise ValueError(f"{name}: only square inputs are supported, config has image_size={c.image_size}")
        _, patch_h, patch_w = c.tubelet_size
        tokens = 1 + c.num_frames * (c.image_size // patch_h) * (c.image_size // patch_w)
        return EncoderSpec(c.num_frames, c.image_size, c.hidden_size, tokens, vp.MEAN, vp.STD)
    raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")


def build_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    autocast: torch.dtype | None = None,
) -> VideoEncoder:
    """`tsf-*`: a LaViLa or Video ReCap clip `.pth` checkpoint, loaded strictly at the named size.
    `videoprism*`: a local `save_pretrained` folder, whose own config decides the size."""
    spec = describe_encoder(name, checkpoint)
    if name.startswith("tsf-"):
        config = _timesformer_config(name)
        model = TimeSformer.from_lavila(checkpoint, config) if checkpoint else _seeded(seed, TimeSformer, config)
        features = _timesformer_features
    else:
        vp = _videoprism()
        model = vp.load(checkpoint) if checkpoint else _seeded(seed, vp.VideoPrismVisionModel, vp.config(name))
        features = vp.window_features
    digest = weights_digest(model)
    device = torch.device(device)
    return VideoEncoder(
        name=name,
        model=model.to(device).eval().requires_grad_(False),
        features=features,
        weights_id=digest if checkpoint else f"random-seed{seed}-{digest}",
        spec=spec,
        device=device,
        autocast=autocast,
    )


def weights_digest(model: nn.Module) -> str:
    """A short hash of the weights (names, dtypes, shapes and bytes): the same weights give the same
    digest whatever file format they came from."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _timesformer_features(model: TimeSformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.forward_tokens(x)
    return tokens[:, 0], tokens


def _seeded(seed: int, build, *args):
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return build(*args)
