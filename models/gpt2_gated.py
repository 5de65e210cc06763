"""GPT-2 with gated cross-attention to the mapped queries, the Video ReCap text decoder (`text_decoder`).

Blocks whose index is a multiple of `cross_attn_freq` first read the queries,
    h = h + tanh(alpha_cattn) * XAttn(ln_cross_attn(h), queries)
    h = h + tanh(alpha_dense) * MLP_relu2(ln_2_crossattention(h))
and then run the standard GPT-2 block. The attention module keeps the GPT-2 layout of transformers
4.x (persistent uint8 `bias` and `masked_bias` buffers, also on the cross-attention) so official
checkpoints load strictly; 5.x's `GPT2Attention` has neither buffer.

Caching: `cross_kv(queries, mask)` projects the queries to keys/values once per generation; self-attention
keys/values of earlier positions are passed back in as `past_key_values`. A mask (B, n) of the queries
(1 = read, 0 = padding) rides in each layer's cross cache, so whatever selects rows of the cache selects it too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config
from transformers.activations import ACT2FN
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D

KV = tuple[torch.Tensor, ...]  # keys, values (B, heads, length, head_dim); cross-attention may add keep (B, 1, 1, length)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, is_cross_attention: bool = False):
        super().__init__()
        n = config.n_positions
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.uint8))[None, None])
        self.register_buffer("masked_bias", torch.tensor(-1e4))
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.is_cross_attention = is_cross_attention
        if is_cross_attention:
            self.c_attn = Conv1D(2 * config.n_embd, config.encoder_width)
            self.q_attn = Conv1D(config.n_embd, config.n_embd)
        else:
            self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, h, L, D/h)
        return x.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

    def cross_kv(self, queries: torch.Tensor) -> KV:
        k, v = self.c_attn(queries).split(self.n_embd, dim=2)
        return self._heads(k).contiguous(), self._heads(v).contiguous()  # else every step's matmul copies them

    def forward(self, x: torch.Tensor, kv: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Self-attention: `kv` caches earlier positions (or None); returns the keys/values of all positions.
        Cross-attention: `kv` is a layer's `cross_kv` (keys, values [, keep]); returns the keys and values."""
        if self.is_cross_attention:
            q, (k, v) = self._heads(self.q_attn(x)), kv[:2]
        else:
            q, k, v = map(self._heads, self.c_attn(x).split(self.n_embd, dim=2))
            if kv is not None:
                k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        w = q @ k.transpose(-1, -2) / math.sqrt(v.size(-1))
        if not self.is_cross_attention:
            q_len, k_len = q.size(-2), k.size(-2)
            causal = self.bias[:, :, k_len - q_len : k_len, :k_len].bool()
            w = torch.where(causal, w, self.masked_bias.to(w.dtype))  # replaced, not added
        elif len(kv) > 2:  # padded queries
            w = w.masked_fill(~kv[2], torch.finfo(w.dtype).min)
        w = self.attn_dropout(F.softmax(w, dim=-1))
        y = (w @ v).transpose(1, 2).flatten(2)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class GatedGPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        d, eps = config.n_embd, config.layer_norm_epsilon
        inner = config.n_inner or 4 * d
        self.has_cross_attention = layer_idx % config.cross_attn_freq == 0
        if self.has_cross_attention:
            self.alpha_cattn = nn.Parameter(torch.zeros(()))
            self.alpha_dense = nn.Parameter(torch.zeros(()))
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        if self.has_cross_attention:
            self.crossattention = GPT2Attention(config, is_cross_attention=True)
            self.ln_cross_attn = nn.LayerNorm(d, eps=eps)
            self.mlp_crossattention = GPT2MLP(inner, config)
            self.mlp_crossattention.act = ACT2FN["relu2"]  # squared ReLU in the gated branch
            self.ln_2_crossattention = nn.LayerNorm(d, eps=eps)
        self.mlp = GPT2MLP(inner, config)

    def forward(self, h: torch.Tensor, cross_kv: KV | None, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        if self.has_cross_attention:
            h = h + self.alpha_cattn.tanh() * self.crossattention(self.ln_cross_attn(h), cross_kv)[0]
            h = h + self.alpha_dense.tanh() * self.mlp_crossattention(self.ln_2_crossattention(h))
        a, present = self.attn(self.ln_1(h), past)
        h = h + a
        return h + self.mlp(self.ln_2(h)), present


class GatedGPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GatedGPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token + position embeddings (no dropout); also how the text mapper embeds previous-level text."""
        pos = torch.arange(start, start + input_ids.size(1), device=input_ids.device)
        return self.wte(input_ids) + self.wpe(pos)

    def forward(self, input_ids, cross_kv: list[KV | None], past_key_values: list[KV] | None = None):
        start = past_key_values[0][0].size(2) if past_key_values else 0
        h = self.drop(self.embed(input_ids, start))
        presents = []
        for i, block in enumerate(self.h):
            h, present = block(h, cross_kv[i], past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.ln_f(h), presents


class GatedGPT2LMHeadModel(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GatedGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def cross_kv(self, queries: torch.Tensor, mask: torch.Tensor | None = None) -> list[KV | None]:
        """Per-layer keys/values of the queries (None where a layer has no cross-attention), with
        `mask` (B, n; 0 = padding) as a third element when given."""
        keep = () if mask is None else (mask[:, None, None, :].bool(),)
        return [b.crossattention.cross_kv(queries) + keep if b.has_cross_attention else None
                for b in self.transformer.h]

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        *,
        cross_kv: list[KV | None] | None = None,
        past_key_values: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits (B, L, vocab) and the self-attention keys/values of all positions so far.
        Give the queries as `encoder_hidden_states` (+ `encoder_attention_mask`, 0 = padding) or, when
        decoding step by step, as `cross_kv`."""
        if cross_kv is None:
            cross_kv = self.cross_kv(encoder_hidden_states, encoder_attention_mask)
        h, presents = self.transformer(input_ids, cross_kv, past_key_values)
        return self.lm_head(h), presents
