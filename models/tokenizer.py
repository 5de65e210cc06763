"""Caption tokenizer: a local GPT-2 tokenizer folder, or a small byte-level BPE trained on captions.

Official convention: captions are `[bos] + ids + [eos]` padded with id 0, and bos = eos
is the last id (GPT-2's <|endoftext|> = 50256). A trained BPE follows it: `<pad>` is id 0 and
`<|endoftext|>` the last id. Only local paths are read; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as BPETokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"


class Tokenizer:
    """A transformers fast tokenizer with the caption ids: bos = eos (its eos token), pad = 0."""

    pad_id = 0  # official convention, whatever the tokenizer calls its pad token

    def __init__(self, hf: PreTrainedTokenizerFast):
        if hf.eos_token_id is None:
            raise ValueError("tokenizer has no eos token")
        self.hf = hf
        self.bos_id = self.eos_id = hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A folder saved by `save`, a transformers GPT-2 tokenizer folder, or bare vocab.json + merges.txt."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: tokenizer folder not found")
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            return cls(AutoTokenizer.from_pretrained(path, local_files_only=True))
        return cls(GPT2Tokenizer.from_pretrained(path, local_files_only=True))

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 1000) -> Tokenizer:
        bpe = BPETokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1, special_tokens=[PAD],  # PAD first -> id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(texts, trainer)
        bpe.add_special_tokens([EOS])  # appended -> last id
        return cls(PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=PAD))

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True).strip()

    def batch(self, texts: list[str], max_length: int | None = None, add_bos_eos: bool = False):
        """Right-padded (ids, attention mask), both (B, L) long. Each text is truncated to
        `max_length` tokens before BOS/EOS are added, as the official caption collator does."""
        rows = [self.encode(t)[:max_length] for t in texts]
        if add_bos_eos:
            rows = [[self.bos_id, *r, self.eos_id] for r in rows]
        L = max(map(len, rows), default=0)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r, dtype=torch.long), 1
        return ids, mask
