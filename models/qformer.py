"""Q-Former mapper: learned queries read a context (video features or text embeddings) through BERT layers.

Layout and computation of the official `QformerMapper`: a BLIP-2 style
`BertLMHeadModel` under `mapper`, of which only `bert` runs on the queries. The word/position
tables, the text FFN (`intermediate`/`output`) and the `cls` MLM head are never used but are part
of the checkpoint, so they exist here with the official names, shapes and ties.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOnlyMLMHead, BertOutput


class QFormerEmbeddings(nn.Module):
    """No token types; the queries only go through LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None])  # persistent

    def forward(self, query_embeds: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(query_embeds))


class QFormerLayer(nn.Module):
    def __init__(self, config: BertConfig, has_cross_attention: bool):
        super().__init__()
        self.attention = BertAttention(config)
        if has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
            # Keys and values read the context, whose width need not be the queries'.
            self.crossattention.self.key = nn.Linear(config.encoder_width, config.hidden_size)
            self.crossattention.self.value = nn.Linear(config.encoder_width, config.hidden_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.intermediate_query = BertIntermediate(config)
        self.output_query = BertOutput(config)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x)[0]
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, encoder_hidden_states=context, encoder_attention_mask=context_bias)[0]
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(config, i % config.cross_attention_freq == 0) for i in range(config.num_hidden_layers)
        )

    def forward(self, x, context, context_bias):
        for layer in self.layer:
            x = layer(x, context, context_bias)
        return x


class QFormerModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)

    def forward(self, queries, context, context_mask=None):
        bias = None
        if context_mask is not None:  # 1 = attend, 0 = padding, as transformers' invert_attention_mask
            bias = (1.0 - context_mask[:, None, None, :].to(context.dtype)) * torch.finfo(context.dtype).min
        return self.encoder(self.embeddings(queries), context, bias)


class QFormerLMHeadModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = QFormerModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias


class QFormerMapper(nn.Module):
    """queries (B, n, hidden) + context (B, N, encoder_width) [+ mask (B, N)] -> (B, n, hidden)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.mapper = QFormerLMHeadModel(config)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        return self.mapper.bert(queries, context, context_mask)
