"""LaViLa's "frozen-in-time" TimeSformer (SpaceTimeTransformer), the Video ReCap clip encoder.

State-dict keys and shapes are the official ones, so a LaViLa dual-encoder
checkpoint (`module.visual.*`) or a Video ReCap clip checkpoint
(`module.vision_model.*`) loads strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.official import check_keys, load_official, strip_prefix


@dataclass(frozen=True)
class TimeSformerConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    num_frames: int = 4
    mlp_ratio: float = 4.0
    ln_pre: bool = True  # CLIP-initialised variants (LaViLa's TIMESFORMER_BASE) have it
    ln_pre_eps: float = 1e-5
    norm_eps: float = 1e-6  # every block norm and the final norm

    @classmethod
    def base(cls) -> TimeSformerConfig:
        return cls()

    @classmethod
    def tiny(cls) -> TimeSformerConfig:
        return cls(img_size=32, embed_dim=64, depth=2, num_heads=4)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VarAttention(nn.Module):
    """Divided attention. CLS attends to every token; each patch attends to CLS plus its group:
    the patches of its frame (`space`) or the patches at its position in every frame (`time`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, groups: Literal["space", "time"], frames: int) -> torch.Tensor:
        B, L, D = x.shape
        h, f, n = self.num_heads, frames, (L - 1) // frames
        q, k, v = self.qkv(x).view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)  # each (B, h, L, d)
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)

        def grouped(t):  # (B, h, 1+f*n, d) -> (B*G, h, S, d), frame-major patches regrouped
            t = t[:, :, 1:].unflatten(2, (f, n))
            t = t.permute(0, 2, 1, 3, 4) if groups == "space" else t.permute(0, 3, 1, 2, 4)
            return t.flatten(0, 1)

        g = f if groups == "space" else n
        cls_k, cls_v = (t[:, :, :1].repeat_interleave(g, dim=0) for t in (k, v))
        k, v = torch.cat([cls_k, grouped(k)], dim=2), torch.cat([cls_v, grouped(v)], dim=2)
        out = F.scaled_dot_product_attention(grouped(q), k, v)
        out = out.unflatten(0, (B, g))
        out = out.permute(0, 2, 1, 3, 4) if groups == "space" else out.permute(0, 2, 3, 1, 4)
        out = torch.cat([cls_out, out.flatten(2, 3)], dim=2)  # (B, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = VarAttention(dim, config.num_heads)
        self.timeattn = VarAttention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        t = self.timeattn(self.norm3(x), "time", frames)
        # Frozen-in-time: the time output feeds space attention but is not added to the residual.
        x = x + self.attn(self.norm1(x + t), "space", frames)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T*N, D), frame-major
        B = x.shape[0]
        return self.proj(x.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(B, -1, self.proj.out_channels)


class TimeSformer(nn.Module):
    def __init__(self, config: TimeSformerConfig):
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        # Random init (tests, benchmarks); real weights come from checkpoints.
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + config.num_patches, D))
        self.temporal_embed = nn.Parameter(0.02 * torch.randn(1, config.num_frames, D))
        self.ln_pre = nn.LayerNorm(D, eps=config.ln_pre_eps) if config.ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C, H, W) normalised pixels, T <= num_frames. All tokens after the final norm,
        (B, 1+T*N, D): [CLS, frame 0 patches, frame 1, ...] (the official `cls_at_last=False`)."""
        B, frames, n = x.shape[0], x.shape[1], self.config.num_patches
        x = self.patch_embed(x)
        pos = self.pos_embed[:, 1:].repeat(1, self.config.num_frames, 1)
        pos = pos + self.temporal_embed.repeat_interleave(n, dim=1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x + pos[:, : frames * n]], dim=1)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x, frames)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS feature (B, D) (the official `cls_at_last=True`)."""
        return self.forward_tokens(x)[:, 0]

    @classmethod
    def from_lavila(cls, path: str | Path, config: TimeSformerConfig | None = None) -> TimeSformer:
        """Load strictly from a LaViLa dual-encoder checkpoint (`module.visual.*`) or a
        Video ReCap clip checkpoint (`module.vision_model.*`); other towers are ignored."""
        ckpt = load_official(path)
        if "state_dict" not in ckpt:
            raise ValueError(f"{path}: no 'state_dict' in checkpoint (top-level keys: {sorted(ckpt)})")
        state_dict = ckpt["state_dict"]
        found = state_dict
        for prefix in ("module.visual.", "module.vision_model.", "visual.", "vision_model."):
            if any(k.startswith(prefix) for k in state_dict):
                found = strip_prefix(state_dict, prefix)
                break
        with torch.device("meta"):  # no throwaway init: the checkpoint's tensors are assigned
            model = cls(config or TimeSformerConfig.base())
        check_keys(path, model.state_dict(), found)
        model.load_state_dict(found, strict=True, assign=True)
        return model.float().eval()
