"""VideoPrism (Zhao et al., ICML 2024) through transformers' `VideoPrismVisionModel`.

The model is a factorised ViViT: spatial layers over each frame's patches, then
temporal layers over each patch position's frames. It has no CLS token; its
`last_hidden_state` is (B, T*N, D), frame-major like the TimeSformer's tokens.

Per-window vector: the mean of `last_hidden_state` over all T*N tokens. This
is what the feature store calls "CLS" for VideoPrism (VideoPrism's own pooled
embedding needs the attention-pooling head of the video-text model, which the
vision model does not have). `window_features` returns it together with the
tokens, with it prepended, so `tokens[:, 0] == cls` for every encoder.

`VideoPrismVisionConfig()` defaults are videoprism-base-f16r288: 16 frames at
288 px, 18-px patches (16x16 per frame, 4096 tokens), 768-d, 12 spatial and 4
temporal layers. Pixels are RGB in [0, 1]: its processor rescales by 1/255 and
does not normalise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import VideoPrismVisionConfig, VideoPrismVisionModel
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # its bars would interleave with our progress lines

# On the 0-255 scale, i.e. x / 255.
MEAN = (0.0, 0.0, 0.0)
STD = (255.0, 255.0, 255.0)


def tiny_config() -> VideoPrismVisionConfig:
    """4 frames at 36 px (2x2 patches), 64-d: for tests and the demo."""
    return VideoPrismVisionConfig(
        image_size=36,
        num_frames=4,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        num_spatial_layers=2,
        num_temporal_layers=1,
    )


def config(name: str, checkpoint: str | Path | None = None) -> VideoPrismVisionConfig:
    """A checkpoint folder's own config, else base (`videoprism`) or tiny (`videoprism-tiny`)."""
    if checkpoint:
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"{checkpoint}: not a VideoPrism model folder (config.json + weights)")
        return VideoPrismVisionConfig.from_pretrained(checkpoint, local_files_only=True)
    return VideoPrismVisionConfig() if name == "videoprism" else tiny_config()


def load(path: str | Path) -> VideoPrismVisionModel:
    """From a local folder written by `save_pretrained` (e.g. a copy of google/videoprism-base-f16r288),
    in float32 whatever the stored dtype."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: not a VideoPrism model folder (config.json + weights)")
    return VideoPrismVisionModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


def window_features(model: VideoPrismVisionModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels: (B, T, C, H, W) in [0, 1]. Returns cls (B, D), the token mean, and tokens (B, 1+T*N, D), cls first."""
    hidden = model(pixel_values_videos=pixels).last_hidden_state
    cls = hidden.mean(dim=1)
    return cls, torch.cat([cls[:, None], hidden], dim=1)
