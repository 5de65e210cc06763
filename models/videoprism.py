"""VideoPrism (Zhao et al., ICML 2024) through transformers: the vision encoder for the features stage, and the
video-text model (`VideoPrismClipModel`, the "LvT" checkpoints) for the search index.

The model is a factorised ViViT: spatial layers over each frame's patches, then
temporal layers over each patch position's frames. It has no CLS token; its
`last_hidden_state` is (B, T*N, D), frame-major like the TimeSformer's tokens.

Per-window vector: the mean of `last_hidden_state` over all T*N tokens. This
is what the feature store calls "CLS" for VideoPrism. `window_features` returns
it together with the tokens, with it prepended, so `tokens[:, 0] == cls` for
every encoder.

Video-text (`VideoPrismClipModel`, the index's `encoder = "videoprism"`): its video model is this same vision
encoder followed by auxiliary layers and an attention-pooling head over all T*N tokens, so the stored mean cannot
give its embedding but the stored tokens can, without decoding pixels again: `embed_video` runs what follows the
encoder on `tokens[:, 1:]` (float16 in the store: within 1e-3 of the float32 path). That holds only for features
extracted with the folder's own vision weights, which `recap index` checks; `load` reads a clip folder's vision
encoder, so one folder serves both stages.

`VideoPrismVisionConfig()` defaults are videoprism-base-f16r288: 16 frames at
288 px, 18-px patches (16x16 per frame, 4096 tokens), 768-d, 12 spatial and 4
temporal layers. Pixels are RGB in [0, 1]: its processor rescales by 1/255 and
does not normalise.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    VideoPrismClipModel, VideoPrismConfig, VideoPrismTextConfig, VideoPrismTokenizer, VideoPrismVisionConfig,
    VideoPrismVisionModel,
)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # its bars would interleave with our progress lines

# On the 0-255 scale, i.e. x / 255.
MEAN = (0.0, 0.0, 0.0)
STD = (255.0, 255.0, 255.0)
VISION, CLIP = "videoprism_vision_model", "videoprism"  # config.json model_type of the two kinds of folder


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


def tiny_clip_config(vocab_size: int) -> VideoPrismConfig:
    """`tiny_config`'s video tower (plus its 2 auxiliary layers and pooling head) and a 2-layer 64-d text tower."""
    text = VideoPrismTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64)
    return VideoPrismConfig(vision_config=tiny_config(), text_config=text)


def tiny_tokenizer() -> VideoPrismTokenizer:
    """A unigram vocabulary of single ASCII characters, each also as a word start: any caption of the synthetic
    corpus tokenizes, none to <unk>. Ids 0-2 are <pad>, </s>, <unk>, as in the real one."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return VideoPrismTokenizer(vocab=pieces, extra_ids=0)


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A seeded random tiny VideoPrismClipModel and its tokenizer, as a local folder `load_clip` reads."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoPrismClipModel(tiny_clip_config(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def config(name: str, checkpoint: str | Path | None = None) -> VideoPrismVisionConfig:
    """A checkpoint folder's own (vision) config, else base (`videoprism`) or tiny (`videoprism-tiny`)."""
    if checkpoint:
        model_type(checkpoint)
        return VideoPrismVisionConfig.from_pretrained(checkpoint, local_files_only=True)  # a clip's vision_config
    return VideoPrismVisionConfig() if name == "videoprism" else tiny_config()


def model_type(path: str | Path) -> str:
    """The folder's config.json `model_type`; FileNotFoundError / ValueError naming the folder otherwise."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such folder (a VideoPrism model is a local save_pretrained folder)")
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a VideoPrism model folder (no config.json)")
    try:
        return json.loads(file.read_text()).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{file}: not a valid config.json ({e})") from None


def load(path: str | Path) -> VideoPrismVisionModel:
    """The vision encoder from a local `save_pretrained` folder of VideoPrismVisionModel (e.g. a copy of
    google/videoprism-base-f16r288) or of VideoPrismClipModel (its video tower's encoder), in float32."""
    kind = model_type(path)
    if kind == CLIP:
        return _from_pretrained(VideoPrismClipModel, path).video_model.vision_model
    if kind != VISION:
        raise ValueError(f"{path}: model_type {kind!r} is not a VideoPrism vision ({VISION!r}) or video-text "
                         f"({CLIP!r}) folder")
    return _from_pretrained(VideoPrismVisionModel, path)


def check_clip_folder(path: str | Path) -> None:
    """Cheap, before loading: a VideoPrismClipModel config.json and a tokenizer file, or an error naming the folder."""
    kind = model_type(path)
    if kind != CLIP:
        raise ValueError(f"{path}: model_type {kind!r}, not a VideoPrismClipModel ({CLIP!r}) folder: the index "
                         "needs the video-text model (text tower and video pooling head)")
    if not any((Path(path) / name).is_file() for name in VideoPrismTokenizer.vocab_files_names.values()):
        # transformers would quietly build a default 104-token vocabulary instead
        raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.json or spiece.model) in the folder")


def load_clip(path: str | Path) -> tuple[VideoPrismClipModel, VideoPrismTokenizer]:
    """The video-text model and its tokenizer from one local `save_pretrained` folder (e.g. a copy of
    google/videoprism-lvt-base-f16r288), in float32."""
    check_clip_folder(path)
    return _from_pretrained(VideoPrismClipModel, path), VideoPrismTokenizer.from_pretrained(path, local_files_only=True)


def _from_pretrained(cls, path):
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:  # no weights file, shapes that do not fit config.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load {cls.__name__} ({first})") from None
    # transformers initialises missing weights at random and only reports it
    missing = sorted(set(info["missing_keys"]) & {name for name, _ in model.named_parameters()})
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {cls.__name__}'s weights missing from the folder (e.g. "
                         f"{', '.join(missing[:3])})")
    return model.eval()


def window_features(model: VideoPrismVisionModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels: (B, T, C, H, W) in [0, 1]. Returns cls (B, D), the token mean, and tokens (B, 1+T*N, D), cls first."""
    hidden = model(pixel_values_videos=pixels).last_hidden_state
    cls = hidden.mean(dim=1)
    return cls, torch.cat([cls[:, None], hidden], dim=1)


def embed_video(model: VideoPrismClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T*N, D): the vision encoder's `last_hidden_state` (the stored tokens without their first, the
    mean) -> (B, D) in the shared space, unit length. `VideoPrismVideoModel.forward` after its encoder."""
    video = model.video_model
    x = tokens.to(video.dtype)
    for layer in video.auxiliary_layers:
        x = layer(x)
    pooled = video.head_layernorm(video.head(x)[0])  # (B, 1, D): one pooling query
    return F.normalize(pooled.reshape(len(x), -1), dim=-1)


def embed_text(model: VideoPrismClipModel, tokenizer: VideoPrismTokenizer, texts: list[str]) -> torch.Tensor:
    """Texts -> (B, D) in the shared space, unit length. Padded to the model's length as VideoPrismProcessor
    does; the attention mask makes the text tower causal (without it every token sees the padding)."""
    batch = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                      max_length=model.config.text_config.max_position_embeddings).to(model.device)
    out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.normalize(out.pooler_output, dim=-1)
