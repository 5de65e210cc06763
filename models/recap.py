"""The Video ReCap captioning model: Q-Former mappers over video features and previous-level text,
feeding a GPT-2 decoder with gated cross-attention.

    video (pixels -> TimeSformer tokens, or CLS features) --video_mapper--> video queries --+
    previous-level ids -> wte + wpe ---------------------------text_mapper--> text queries --+-> text_decoder
                                   +------(text_tokens_to_decoder: the tokens themselves)----+

Module and parameter names are the official ones, so `from_official` loads Video ReCap and ReCap-U
`.pth` files strictly.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, GPT2Config
from transformers.pytorch_utils import Conv1D

from models import SIZES
from models.gpt2_gated import GatedGPT2LMHeadModel
from models.official import args_dict, check_keys, load_official, strip_prefix
from models.qformer import QFormerMapper
from models.timesformer import TimeSformer, TimeSformerConfig

LEVELS = ("clip", "segment", "video", "unified")
LATER_FIELDS = {"text_sentence_rows": 0, "text_sentence_end_id": -1}  # and their defaults (RecapConfig.to_dict)
# `demo`: small enough to train from scratch on 2 CPU cores in minutes. Widths, then per level
# (features per example, video queries, text queries); clip examples take all tokens of a window.
# Trained from scratch, the official layout underfits: each of these was measured on the demo
# corpus (docs/caption-accuracy.md): cross-attention in every Q-Former layer, open decoder gates,
# a LayerNorm on the text context, learned positions of the clip level's tokens (`models.training.level_config`),
# no dropout, whitened features and each description's index (`text_sentence_rows`) at the video level.
DEMO_WIDTHS = dict(qformer_hidden_size=128, qformer_num_layers=2, qformer_num_heads=4, qformer_intermediate_size=256,
                   qformer_cross_attention_freq=1, gate_init=1.0, dropout=0.0, text_context_norm=True,
                   qformer_vocab_size=30, qformer_max_positions=16,
                   n_positions=256, n_embd=128, n_layer=3, n_head=4, n_inner=512)
DEMO_LEVELS = {"clip": dict(num_video_queries=16),
               "segment": dict(num_video_feat=16, num_video_queries=8, num_text_queries=32),
               "video": dict(num_video_feat=32, num_video_queries=16, num_text_queries=96, video_feature_norm=True,
                             video_feature_whiten=True, text_sentence_rows=16)}

OFFICIAL_DATASETS = {"clip_caption": "clip", "segment_description": "segment", "video_summary": "video"}


@dataclass
class RecapConfig:
    level: str = "clip"  # clip | segment | video | unified (ReCap-U)
    # Video input: "pixel" runs `vision` (TimeSformer) on 4-frame clips; "cls" takes precomputed features.
    video_feature_type: str = "pixel"
    video_feature_width: int = 768
    num_video_feat: int = 4  # features per sample the data side provides (frames at the clip level)
    num_video_queries: int = 256
    num_text_queries: int = 0  # 0: no text mapper (clip level)
    # Rows of a learned position embedding added to the video mapper's context; 0 = none (official). The
    # Q-Former reads its context as a set: without this, the order of frames or sparse features is only
    # known where the encoder wrote it into the features.
    video_positions: int = 0
    # A LayerNorm on the text mapper's context (the decoder's word + position embeddings of the lower-level
    # text); off officially. GPT-2's pretrained embeddings have norms of a few units; freshly initialised ones
    # (std 0.02) are so small that the text mapper's attention reads them as a uniform blur.
    text_context_norm: bool = False
    # Rows of a learned embedding of each previous-level token's sentence index (how many sentence ends,
    # `text_sentence_end_id`, come before it), added to the text mapper's context; 0 = none (official). Absolute
    # positions tell which description a token lies in only roughly, and worse with each description: a summary
    # that copies its descriptions in order needs to know it.
    text_sentence_rows: int = 0
    text_sentence_end_id: int = -1
    # The decoder's cross-attention also reads the previous-level text tokens themselves (the text mapper's
    # context, projected to the queries' width if it differs), pads masked; off officially. A summary copies
    # its descriptions in order, which a few learned queries of a small Q-Former do not hold.
    text_tokens_to_decoder: bool = False
    # Standardise CLS / token features per channel (buffers `video_feature_mean` / `_std`, the training split's
    # statistics, set by the trainer and saved with the model); off officially. A contrastively trained encoder
    # puts most of the features' variance in a few directions; what the caption needs (the place) may lie in the
    # others, which a linear probe finds after standardising and a small model trained from scratch does not.
    video_feature_norm: bool = False
    # With `video_feature_norm`: standardise along the training rows' principal axes instead of the channels
    # (PCA whitening, buffer `video_feature_basis`). Per-channel scaling leaves directions that mix channels as
    # they were; a contrastively trained encoder's few dominant directions do.
    video_feature_whiten: bool = False
    # Initial value of the decoder's cross-attention gates (alpha; the gate is tanh(alpha)). 0, the official
    # value, leaves a pretrained GPT-2 as it was; a decoder trained from scratch learns faster with open gates.
    gate_init: float = 0.0
    vision: TimeSformerConfig | None = field(default_factory=TimeSformerConfig.base)
    # Q-Former (BERT-base layout)
    qformer_hidden_size: int = 768
    qformer_num_layers: int = 12
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    qformer_cross_attention_freq: int = 2
    qformer_vocab_size: int = 30522
    qformer_max_positions: int = 512
    # GPT-2 decoder (base)
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 3072
    cross_attn_freq: int = 1
    dropout: float = 0.1
    # Tokens and generation
    max_gen_tokens: int = 77
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = TimeSformerConfig(**self.vision)
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.video_feature_type not in ("pixel", "cls"):
            raise ValueError(f"video_feature_type must be 'pixel' or 'cls', got {self.video_feature_type!r}")
        if self.video_feature_whiten and not self.video_feature_norm:
            raise ValueError("video_feature_whiten needs video_feature_norm")
        if self.video_feature_type == "pixel" and self.vision is None:
            raise ValueError("video_feature_type 'pixel' needs a vision (TimeSformer) config")
        widths = {"n_head": (self.n_embd, self.n_head),
                  "qformer_num_heads": (self.qformer_hidden_size, self.qformer_num_heads)}
        if self.vision is not None:
            widths["vision.num_heads"] = (self.vision.embed_dim, self.vision.num_heads)
        for name, (width, heads) in widths.items():
            if width % heads:
                raise ValueError(f"{name}={heads} does not divide the width {width} (official checkpoints "
                                 "do not record head counts: set them with config overrides)")

    @classmethod
    def preset(cls, level: str, size: str = "base") -> RecapConfig:
        """A level's configuration at a size: `base` is the official one, `tiny` the reference fixtures',
        `demo` the one trained from scratch on 2 CPU cores (DEMO_WIDTHS, DEMO_LEVELS)."""
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
        per_level = {  # (video_feature_type, num_video_feat, video queries, text queries, max_gen_tokens)
            "clip": ("pixel", 4, 256, 0, 77),
            "segment": ("cls", 80, 32, 256, 77),
            "video": ("cls", 256, 256, 256, 120),
        }
        tiny_queries = {"clip": (4, 8, 0), "segment": (10, 4, 6), "video": (12, 5, 7)}
        kind, feats, nv, nt, max_gen = per_level[level]
        config = cls(level=level, video_feature_type=kind, num_video_feat=feats, num_video_queries=nv,
                     num_text_queries=nt, max_gen_tokens=max_gen,
                     vision=TimeSformerConfig.base() if kind == "pixel" else None)
        if size == "demo":
            return config.with_overrides({**DEMO_WIDTHS, **DEMO_LEVELS[level]})
        if size == "tiny":
            feats, nv, nt = tiny_queries[level]
            config = dataclasses.replace(
                config, num_video_feat=feats, num_video_queries=nv, num_text_queries=nt,
                vision=TimeSformerConfig.tiny() if kind == "pixel" else None, video_feature_width=64,
                qformer_hidden_size=64, qformer_num_layers=2, qformer_num_heads=4, qformer_intermediate_size=128,
                qformer_vocab_size=30, qformer_max_positions=16,
                vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                bos_token_id=99, eos_token_id=99)
        return config

    def to_dict(self) -> dict:
        """The fields; those added after runs were named are left out at their defaults, so that a run's name
        (pipeline.train fingerprints this) changes only where the model does."""
        return {k: v for k, v in dataclasses.asdict(self).items() if LATER_FIELDS.get(k, ...) != v}

    @classmethod
    def from_dict(cls, d: dict) -> RecapConfig:
        return cls(**d)

    def with_overrides(self, overrides: dict | None) -> RecapConfig:
        """Replace fields; a dict under "vision" updates single TimeSformer fields."""
        return RecapConfig.from_dict(_merge(self.to_dict(), overrides))

    def qformer_config(self, encoder_width: int) -> BertConfig:
        return BertConfig(
            vocab_size=self.qformer_vocab_size, hidden_size=self.qformer_hidden_size,
            num_hidden_layers=self.qformer_num_layers, num_attention_heads=self.qformer_num_heads,
            intermediate_size=self.qformer_intermediate_size, max_position_embeddings=self.qformer_max_positions,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout, pad_token_id=0, is_decoder=True, add_cross_attention=True,
            encoder_width=encoder_width, cross_attention_freq=self.qformer_cross_attention_freq,
            attn_implementation="eager")

    def gpt2_config(self) -> GPT2Config:
        return GPT2Config(
            vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd, n_layer=self.n_layer,
            n_head=self.n_head, n_inner=self.n_inner, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            resid_pdrop=self.dropout, embd_pdrop=self.dropout, attn_pdrop=self.dropout,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            cross_attn_freq=self.cross_attn_freq, encoder_width=self.qformer_hidden_size)

    @classmethod
    def from_official_state_dict(cls, sd: dict, args: dict | None = None, overrides: dict | None = None):
        """What an official checkpoint holds: sizes from tensor shapes, the rest from its training
        args. Head counts are not recorded anywhere: BERT/GPT-2/ViT base (12) unless overridden."""
        args = args or {}

        def count(pattern):
            return len({m.group(1) for k in sd if (m := re.match(pattern, k))})

        def cross_freq(pattern):
            idx = sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})
            return idx[1] - idx[0] if len(idx) > 1 else None

        qf = "video_mapper.mapper.bert."
        kw = dict(
            video_feature_width=sd[qf + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
            num_video_queries=sd["video_queries"].shape[0],
            num_text_queries=sd["text_queries"].shape[0] if "text_queries" in sd else 0,
            qformer_hidden_size=sd["video_queries"].shape[1],
            qformer_num_layers=count(rf"{re.escape(qf)}encoder\.layer\.(\d+)\."),
            qformer_intermediate_size=sd[qf + "encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            qformer_cross_attention_freq=cross_freq(rf"{re.escape(qf)}encoder\.layer\.(\d+)\.crossattention") or 2,
            qformer_vocab_size=sd[qf + "embeddings.word_embeddings.weight"].shape[0],
            qformer_max_positions=sd[qf + "embeddings.position_embeddings.weight"].shape[0],
            vocab_size=sd["text_decoder.transformer.wte.weight"].shape[0],
            n_positions=sd["text_decoder.transformer.wpe.weight"].shape[0],
            n_embd=sd["text_decoder.transformer.wte.weight"].shape[1],
            n_layer=count(r"text_decoder\.transformer\.h\.(\d+)\."),
            n_inner=sd["text_decoder.transformer.h.0.mlp.c_fc.weight"].shape[1],
            cross_attn_freq=cross_freq(r"text_decoder\.transformer\.h\.(\d+)\.crossattention")
            or args.get("cross_attn_freq", 1),
            num_video_feat=args.get("num_video_feat", 4),
            max_gen_tokens=args.get("max_gen_tokens", 77),
        )
        kw["bos_token_id"] = kw["eos_token_id"] = kw["vocab_size"] - 1  # GPT-2 convention: <|endoftext|> is last
        if "vision_model.cls_token" in sd:
            patch = sd["vision_model.patch_embed.proj.weight"]
            dim = patch.shape[0]
            kw.update(video_feature_type="pixel", vision=dict(
                img_size=round((sd["vision_model.pos_embed"].shape[1] - 1) ** 0.5) * patch.shape[-1],
                patch_size=patch.shape[-1], in_chans=patch.shape[1], embed_dim=dim,
                depth=count(r"vision_model\.blocks\.(\d+)\."),
                num_frames=sd["vision_model.temporal_embed"].shape[1],
                mlp_ratio=sd["vision_model.blocks.0.mlp.fc1.weight"].shape[0] / dim,
                ln_pre="vision_model.ln_pre.weight" in sd))
        else:
            kw.update(video_feature_type="cls", vision=None)
        layout_level = "clip" if kw["video_feature_type"] == "pixel" else "segment"
        kw["level"] = "unified" if args.get("unify_type") else OFFICIAL_DATASETS.get(args.get("dataset"), layout_level)
        return cls.from_dict(_merge(kw, overrides))


def _merge(fields: dict, overrides: dict | None) -> dict:
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(RecapConfig)}
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    if isinstance(overrides.get("vision"), dict) and fields.get("vision") is not None:
        overrides["vision"] = {**fields["vision"], **overrides["vision"]}
    return {**fields, **overrides}


def official_state_dict(ckpt: dict) -> dict:
    """The model state dict of an official checkpoint, without DDP's `module.` prefix."""
    sd = ckpt["state_dict"]
    return strip_prefix(sd, "module.") if all(k.startswith("module.") for k in sd) else sd


class RecapOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor


class RecapModel(nn.Module):
    def __init__(self, config: RecapConfig):
        super().__init__()
        self.config = config
        width = config.qformer_hidden_size
        if config.video_feature_type == "pixel":
            self.vision_model = TimeSformer(config.vision)
        self.video_queries = nn.Parameter(0.02 * torch.randn(config.num_video_queries, width))
        self.video_mapper = QFormerMapper(config.qformer_config(config.video_feature_width))
        if config.video_positions:
            self.video_position = nn.Embedding(config.video_positions, config.video_feature_width)
        if config.video_feature_norm:
            self.register_buffer("video_feature_mean", torch.zeros(config.video_feature_width))
            self.register_buffer("video_feature_std", torch.ones(config.video_feature_width))
            if config.video_feature_whiten:
                self.register_buffer("video_feature_basis", torch.eye(config.video_feature_width))
        if config.num_text_queries:
            self.text_queries = nn.Parameter(0.02 * torch.randn(config.num_text_queries, width))
            self.text_mapper = QFormerMapper(config.qformer_config(config.n_embd))
        if config.text_context_norm and (config.num_text_queries or config.text_tokens_to_decoder):
            self.text_context_norm = nn.LayerNorm(config.n_embd)
        if config.text_tokens_to_decoder and config.n_embd != width:
            self.text_token_proj = nn.Linear(config.n_embd, width)
        self.text_decoder = GatedGPT2LMHeadModel(config.gpt2_config())
        self.apply(self._init_weights)
        with torch.no_grad():
            if config.video_positions:  # the scale of the LayerNorm'd encoder outputs they are added to
                self.video_position.weight.normal_(0.0, 1.0)
            for name, p in self.text_decoder.named_parameters():
                if name.rsplit(".", 1)[-1] in ("alpha_cattn", "alpha_dense"):
                    p.fill_(config.gate_init)
        if config.text_sentence_rows:  # made last: the models trained before it draw the same initial weights
            if config.text_sentence_end_id < 0:
                raise ValueError("text_sentence_rows needs text_sentence_end_id (the tokenizer's id of '.')")
            self.text_sentence = nn.Embedding(config.text_sentence_rows, config.n_embd)
            with torch.no_grad():
                self.text_sentence.weight.normal_(0.0, 0.02)
        # Shared tensors, alias -> first name: lm_head = wte; each MLM head's decoder = word embeddings + head bias.
        first = {}
        self.tied_weights = {name: first[id(p)] for name, p in self.named_parameters(remove_duplicate=False)
                             if first.setdefault(id(p), name) != name}

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2/BERT initialisation, for training without pretrained weights."""
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """The video mapper's context: pixels (B, T, C, H, W) become all TimeSformer tokens (B, 1+T*N, D);
        features (B, N, D) (CLS features, or stored tokens) pass through; learned positions are added."""
        context = self.vision_model.forward_tokens(video) if video.dim() == 5 else video
        if self.config.video_feature_norm and video.dim() != 5:
            # in float32 whatever the features were stored in, and outside autocast: a bf16 product would bury the
            # low-variance axes that whitening exists to bring out
            with torch.autocast(context.device.type, enabled=False):
                context = context.float() - self.video_feature_mean
                if self.config.video_feature_whiten:
                    context = context @ self.video_feature_basis
                context = context / self.video_feature_std
        if self.config.video_positions:
            if context.size(1) != self.config.video_positions:
                raise ValueError(f"the video context has {context.size(1)} rows; the model's position embedding "
                                 f"has {self.config.video_positions}")
            context = context + self.video_position.weight
        return context

    @torch.no_grad()
    def set_feature_stats(self, rows: torch.Tensor) -> None:
        """`video_feature_norm`'s statistics from feature rows (N, D) of the training split: the mean, and the
        standard deviation per channel, or with `video_feature_whiten` along each principal axis (the columns of
        `video_feature_basis`)."""
        rows = rows.double()
        mean = rows.mean(0)
        if self.config.video_feature_whiten:
            variance, basis = torch.linalg.eigh(torch.cov((rows - mean).T))
            self.video_feature_basis.copy_(basis)
            std = variance.clamp_min(0).sqrt()
            # LayerNorm'd features have a null axis (and float16 storage puts rounding noise on it): never
            # stretched more than 100-fold beyond the widest axis's scale
            floor = 1e-2 * float(std.max())
        else:
            std = rows.std(0)
            floor = 1e-3 * float(std.mean())  # a channel constant in training must not be scaled up 1e6-fold
        floor = max(floor, 1e-6)
        self.video_feature_mean.copy_(mean)
        self.video_feature_std.copy_(std.clamp_min(floor))

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Previous-level GPT-2 ids -> the decoder's own wte + wpe, positions 0..L-1, as officially."""
        return self.text_decoder.transformer.embed(text_ids)

    def text_context(self, text_ids: torch.Tensor) -> torch.Tensor:
        context = self.embed_text(text_ids)
        if hasattr(self, "text_sentence"):
            ends = (text_ids == self.config.text_sentence_end_id).long()
            sentence = (ends.cumsum(1) - ends).clamp_max(self.config.text_sentence_rows - 1)  # a '.' is its sentence's
            context = context + self.text_sentence(sentence)
        return self.text_context_norm(context) if hasattr(self, "text_context_norm") else context

    def map_features(self, video, video_mask=None, text_ids=None, text_mask=None) -> torch.Tensor:
        """Queries for the decoder (B, n_video [+ n_text], width): video first, then text.
        Text queries are made when the model has a text mapper and text is given, so one ReCap-U
        model also captions clips (video only)."""
        B = video.size(0)
        queries = [self.video_mapper(self.video_queries.expand(B, -1, -1), self.encode_video(video), video_mask)]
        if text_ids is not None and hasattr(self, "text_mapper"):
            text = self.text_queries.expand(B, -1, -1)
            queries.append(self.text_mapper(text, self.text_context(text_ids), text_mask))
        return torch.cat(queries, dim=1)

    def decoder_context(self, video, video_mask=None, text_ids=None, text_mask=None):
        """What the decoder cross-attends, and its mask (B, n; 0 = padding, None = all real): the queries
        of `map_features`, then with `text_tokens_to_decoder` the text tokens themselves."""
        queries = self.map_features(video, video_mask, text_ids, text_mask)
        if text_ids is None or not self.config.text_tokens_to_decoder:
            return queries, None
        tokens = self.text_context(text_ids)
        if hasattr(self, "text_token_proj"):
            tokens = self.text_token_proj(tokens)
        mask = None
        if text_mask is not None:
            mask = torch.cat([text_mask.new_ones(queries.shape[:2]), text_mask], dim=1)
        return torch.cat([queries, tokens], dim=1), mask

    def forward(self, video, caption_tokens, video_mask=None, text_ids=None, text_mask=None) -> RecapOutput:
        """Teacher-forced logits for caption_tokens ([bos] + ids + [eos] + pad) and the official loss:
        cross-entropy over all B*(L-1) targets, pads counting as 0 in the mean, as officially."""
        context, mask = self.decoder_context(video, video_mask, text_ids, text_mask)
        logits = self.text_decoder(caption_tokens[:, :-1], context, mask)[0]
        loss = F.cross_entropy(logits.transpose(1, 2), caption_tokens[:, 1:],
                               ignore_index=self.config.pad_token_id, reduction="none").mean()
        return RecapOutput(loss, logits)

    @classmethod
    def from_state_dict(cls, config: RecapConfig, state_dict: dict, source="state dict") -> RecapModel:
        """Build without a throwaway init and take the tensors strictly (a tied tensor may be given under
        its first name only). Fails naming missing and unexpected keys and wrong shapes."""
        with torch.device("meta"):
            model = cls(config)
        state = {alias: state_dict[src] for alias, src in model.tied_weights.items() if src in state_dict}
        state.update(state_dict)
        check_keys(source, model.state_dict(), state)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        return model.eval()

    @classmethod
    def from_official(cls, path: str | Path, config_overrides: dict | None = None) -> RecapModel:
        """Load a Video ReCap / ReCap-U `.pth` strictly, in eval mode. Sizes come from the tensors;
        head counts (not recorded) from `config_overrides`, else the base models' 12."""
        ckpt = load_official(path)
        sd = official_state_dict(ckpt)
        try:
            config = RecapConfig.from_official_state_dict(sd, args_dict(ckpt), config_overrides)
        except KeyError as e:
            raise ValueError(f"{path}: not a Video ReCap checkpoint, missing key {e}") from None
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # fp32 whatever a copy was saved in
        return cls.from_state_dict(config, sd, path)

    def tie_weights(self):
        """Re-share tensors after `load_state_dict(assign=True)`, which assigns each name separately."""
        for alias, source in self.tied_weights.items():
            module, name = alias.rsplit(".", 1)
            setattr(self.get_submodule(module), name, self.get_parameter(source))
