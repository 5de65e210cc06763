"""LaViLa's dual encoder (CLIP_OPENAI_TIMESFORMER_BASE): the TimeSformer video tower, OpenAI CLIP's
text transformer, and projections of both into one 256-d space.

    model = DualEncoder.from_lavila("clip_openai_timesformer_base.baseline.ep_0003.pth")
    v = model.encode_video(pixels)    # normalised (B, T, C, H, W) -> (B, 256), unit length
    v = model.embed_video_cls(cls)    # the same from stored CLS features (Zarr `cls`), no re-encoding
    t = model.encode_text(ClipTokenizer()(["#C C opens the fridge"]))
    logits = model.logits(v, t)       # exp(logit_scale) * v @ t.T

Embeddings are L2-normalised, as LaViLa trains and evaluates this model (`--norm-embed`). Module
and parameter names are the official ones, so a checkpoint loads strictly once `module.` is stripped.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.official import check_keys, load_official
from models.timesformer import QuickGELU, TimeSformer, TimeSformerConfig


@dataclass(frozen=True)
class LavilaConfig:
    vision: TimeSformerConfig = field(default_factory=TimeSformerConfig.base)
    embed_dim: int = 256  # the shared space (`--project-embed-dim`)
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    temperature_init: float = 0.07  # logit_scale starts at log(1 / temperature)

    @classmethod
    def base(cls) -> LavilaConfig:
        return cls()

    @classmethod
    def tiny(cls) -> LavilaConfig:
        """Small towers; the CLIP vocabulary and context, so the real tokenizer fits."""
        return cls(vision=TimeSformerConfig.tiny(), embed_dim=32, text_width=32, text_layers=2, text_heads=4)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LavilaConfig:
        return cls(**{**values, "vision": TimeSformerConfig(**values["vision"])})


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: causal self-attention, then a QuickGELU MLP (4x width)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The official `transformer`: a stack of causal residual blocks."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        # Built per call, not a buffer: the official model keeps it as a plain attribute, so no key.
        mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        for block in self.resblocks:
            x = block(x, mask)
        return x


class DualEncoder(nn.Module):
    def __init__(self, config: LavilaConfig):
        super().__init__()
        self.config = config
        c = config
        self.visual = TimeSformer(c.vision)
        self.transformer = TextTransformer(c.text_width, c.text_layers, c.text_heads)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = nn.LayerNorm(c.text_width)
        self.image_projection = nn.Parameter(torch.empty(c.vision.embed_dim, c.embed_dim))
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / c.temperature_init)))
        self._init_weights()

    def _init_weights(self):
        """CLIP's initialisation (tests, demo); real weights come from checkpoints."""
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = c.text_width**-0.5 * (2 * c.text_layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=c.text_width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * c.text_width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=c.vision.embed_dim**-0.5)
        nn.init.normal_(self.text_projection, std=c.text_width**-0.5)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L), L <= context_length -> every position after the final norm, (B, L, text_width).
        The official model always runs 77 positions; fewer give the same features at the positions
        kept, because attention is causal."""
        L = ids.shape[1]
        if L > self.config.context_length:
            raise ValueError(f"{L} tokens exceed the context length {self.config.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        return self.ln_final(self.transformer(x))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) from `ClipTokenizer` -> (B, embed_dim), unit length. The feature is taken at the
        end-of-text token, found as the largest id in each row (49407, the last id of the vocabulary)."""
        x = self.text_features(ids)
        x = x[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        return F.normalize(x @ self.text_projection, dim=-1)

    def embed_video_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """TimeSformer CLS features (B, vision width), e.g. the features stage's stored `cls`
        -> (B, embed_dim), unit length."""
        return F.normalize(cls @ self.image_projection, dim=-1)

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, T, C, H, W) -> (B, embed_dim), unit length."""
        return self.embed_video_cls(self.visual(pixels))

    def logits(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Similarity logits (B_video, B_text) of embeddings from the encode methods."""
        return self.logit_scale.exp() * video @ text.T

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_video(pixels), self.encode_text(ids))

    def save_lavila(self, path: str | Path, epoch: int = 0) -> None:
        """Write LaViLa's own layout (`state_dict` with `module.*` keys, `args`, `epoch`): what `from_lavila`
        reads, and what the features stage reads the visual tower from (`TimeSformer.from_lavila`)."""
        state = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        torch.save({"state_dict": state, "args": {"model": "CLIP_OPENAI_TIMESFORMER", **self.config.to_dict()},
                    "epoch": epoch}, path)

    @classmethod
    def from_lavila(cls, path: str | Path, config: LavilaConfig | None = None) -> DualEncoder:
        """Load strictly from a LaViLa dual-encoder checkpoint (`state_dict`, keys `module.*`)."""
        ckpt = load_official(path)
        if "state_dict" not in ckpt:
            raise ValueError(f"{path}: no 'state_dict' in checkpoint (top-level keys: {sorted(ckpt)})")
        found = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        with torch.device("meta"):  # no throwaway init: the checkpoint's tensors are assigned
            model = cls(config or LavilaConfig.base())
        check_keys(path, model.state_dict(), found)
        model.load_state_dict(found, strict=True, assign=True)
        return model.float().eval()
