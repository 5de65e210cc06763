"""What training does to a model: the configuration a level trains at, the transfer of an init checkpoint's
weights, and which parameters train."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from models import FREEZE, checkpoint
from models.recap import RecapConfig, RecapModel
from models.tokenizer import Tokenizer

# The version of how `level_config` builds a model from a size; part of every run's name, so a change
# trains anew instead of resuming an incompatible checkpoint. 3: the demo size's changes (models.recap.DEMO_WIDTHS);
# 4: 96 text queries at the video level (a summary copies 3-6 descriptions in order; 32 queries garbled them).
MODEL_RULES = 4

# What the official training updates when freezing (everything else keeps its init).
OFFICIAL_TRAINABLE = re.compile(
    r"(video_queries|text_queries"
    r"|(video|text)_mapper\.mapper\.bert\.encoder\.layer\.\d+\.crossattention\."
    r"|text_decoder\.transformer\.h\.\d+\.(crossattention|ln_cross_attn|mlp_crossattention|ln_2_crossattention"
    r"|alpha_cattn|alpha_dense|ln_1|ln_2)\b)")


def level_config(size: str, level: str, feature_dim: int, tokens_per_window: int, tokenizer: Tokenizer,
                 init: RecapConfig | None = None, recursive: bool = True) -> RecapConfig:
    """The model trained here: an init checkpoint's widths (else the size's), the level's query and feature
    counts at `size`, fed stored features (no pixel tower), with the tokenizer's vocabulary. ReCap-U takes
    the video level's counts. Not `recursive`: no text mapper (the non-recursive baseline)."""
    sized = RecapConfig.preset("video" if level == "unified" else level, size)
    num_feat = tokens_per_window if level == "clip" else sized.num_video_feat
    return (init or sized).with_overrides({
        "level": level, "video_feature_type": "cls", "vision": None, "video_feature_width": feature_dim,
        "num_video_feat": num_feat, "video_positions": num_feat if size == "demo" and level == "clip" else 0,
        "num_video_queries": sized.num_video_queries,
        "num_text_queries": sized.num_text_queries if recursive else 0,
        "text_tokens_to_decoder": sized.text_tokens_to_decoder and recursive,
        "text_sentence_rows": sized.text_sentence_rows if recursive else 0,
        "text_sentence_end_id": sentence_end_id(tokenizer) if sized.text_sentence_rows and recursive else -1,
        # ReCap-U reads window tokens and CLS rows through one set of weights: one set of statistics fits neither
        "video_feature_norm": sized.video_feature_norm and level != "unified",
        "video_feature_whiten": sized.video_feature_whiten and level != "unified",
        "dropout": sized.dropout,  # the level's own size's, not its init checkpoint's
        "max_gen_tokens": sized.max_gen_tokens, "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})


def sentence_end_id(tokenizer: Tokenizer) -> int:
    ids = tokenizer.encode(".")
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits '.' into {len(ids)} tokens; text_sentence_rows needs one")
    return ids[0]


def query_rows(n: int, k: int) -> np.ndarray:
    """Rows of n learned queries that make k: the official arange(0, n, n/(k+1))[1:],
    which also repeats rows when k > n."""
    return np.arange(0, n, n / (k + 1)).astype(int)[1:k + 1]


def load_init(model: RecapModel, path: str) -> list[str]:
    """Copy an init checkpoint's tensors (our folder or an official .pth) into `model`; query counts that
    differ are subsampled. Tensors the init lacks (the text mapper of a clip checkpoint) keep their fresh
    init. Returns what was adapted."""
    source = (checkpoint.load(path)[0] if Path(path).is_dir() else RecapModel.from_official(path)).state_dict()
    own = model.state_dict()
    notes = []
    with torch.no_grad():
        for name, tensor in own.items():
            value = source.get(name)
            if value is None:
                continue
            if name.endswith("_queries") and value.shape[0] != tensor.shape[0] and value.shape[1:] == tensor.shape[1:]:
                notes.append(f"{name}: {value.shape[0]} -> {tensor.shape[0]} rows")
                value = value[torch.from_numpy(query_rows(value.shape[0], tensor.shape[0]))]
            if name == "video_position.weight" and value.shape != tensor.shape:
                notes.append(f"{name}: {value.shape[0]} -> {tensor.shape[0]} rows, freshly initialised")
                continue
            if value.shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {list(value.shape)}; the {model.config.level} model "
                                 f"trained here needs {list(tensor.shape)}")
            tensor.copy_(value)
    notes += [f"{top}: freshly initialised" for top in sorted({n.split(".")[0] for n in own if n not in source})]
    notes += [f"{top}: not used" for top in sorted({n.split(".")[0] for n in source if n not in own})]
    return notes


def set_trainable(model: RecapModel, freeze: str) -> None:
    """`official`: what the official training updates; `none`: everything. The pixel tower never trains
    (training reads features it computed)."""
    if freeze not in FREEZE:
        raise ValueError(f"unknown freeze policy {freeze!r}; expected one of {', '.join(FREEZE)}")
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("vision_model.") and (
            freeze == "none" or OFFICIAL_TRAINABLE.match(name) is not None)
