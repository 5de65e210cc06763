"""Small random captioning checkpoints in our format, for stage tests (weights untrained on purpose)."""

from pathlib import Path

import torch

from models import checkpoint
from models.recap import RecapConfig, RecapModel
from models.tokenizer import Tokenizer

TEXTS = ["#C C picks up the red cube", "#C C puts down the blue ball", "C sorted the cubes.",
         "C was in the kitchen. C sorted the cubes, then painted the ball red."]


def tiny_checkpoint(path: Path, level: str, feature_dim: int = 64, tokens_per_window: int = 17,
                    text_queries: int | None = None, seed: int = 0) -> Path:
    tokenizer = Tokenizer.train(TEXTS * 4, vocab_size=300)
    config = RecapConfig(
        level=level, video_feature_type="cls", vision=None, video_feature_width=feature_dim,
        num_video_feat=tokens_per_window if level == "clip" else 8, num_video_queries=4,
        num_text_queries=(0 if level == "clip" else 4) if text_queries is None else text_queries,
        qformer_hidden_size=32, qformer_num_layers=2, qformer_num_heads=2, qformer_intermediate_size=64,
        qformer_vocab_size=30, qformer_max_positions=16, vocab_size=tokenizer.vocab_size, n_positions=64,
        n_embd=32, n_layer=1, n_head=2, n_inner=64, max_gen_tokens=8,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(seed)
    return checkpoint.save(RecapModel(config).eval(), tokenizer, path)
