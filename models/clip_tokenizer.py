"""OpenAI CLIP's byte-level BPE tokenizer: the text side of LaViLa's dual encoder.

    tok = ClipTokenizer()
    tok.encode("a diagram")   # [320, 22697]
    tok(["a diagram"])        # (1, 77) long: [49406, 320, 22697, 49407, 0, ...]

The merges are `bpe_simple_vocab_16e6.txt.gz` as the `openai-clip` package ships it; only the file
is read (that package's `clip` module needs torchvision). Ids: the 256 byte symbols, the same 256
ending a word (`</w>`), one id per merge in rank order, then <|startoftext|> 49406 and
<|endoftext|> 49407: 49,408 in all.
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import math
from pathlib import Path

import ftfy
import regex
import torch

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 48_894  # CLIP uses the first 48,894 merges of the file (after its version line)
CONTEXT_LENGTH = 77
# Special tokens, English contractions, runs of letters, single digits, runs of other non-space characters.
PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def vocab_file() -> Path:
    """The merges file inside the installed `openai-clip` distribution."""
    try:
        dist = importlib.metadata.distribution("openai-clip")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the CLIP vocabulary comes with the 'openai-clip' package; install it") from None
    path = Path(dist.locate_file("clip/bpe_simple_vocab_16e6.txt.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the 'openai-clip' package is installed without its vocabulary file")
    return path


def byte_symbols() -> dict[int, str]:
    """One visible character per byte, in id order: the printable Latin-1 bytes stand for themselves,
    then the other 68 (controls, space, soft hyphen...) take code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def clean(text: str) -> str:
    """CLIP's normalisation: fix mojibake, unescape HTML (twice), collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    pad_id = 0  # rows are padded with 0 (which is also '!'); the end-of-text token ends the text

    def __init__(self, path: str | Path | None = None):
        with gzip.open(path or vocab_file(), "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1: NUM_MERGES + 1]]
        self.byte_encoder = byte_symbols()
        self.byte_decoder = {s: b for b, s in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.tokens = vocab
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.ids[SOT], self.ids[EOT]
        self.cache: dict[str, list[int]] = {SOT: [self.sot_id], EOT: [self.eot_id]}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, every occurrence left to right."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            rank, first, second = min((self.ranks.get(p, math.inf), *p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        """Ids of the text, without start and end tokens."""
        ids = []
        for piece in PATTERN.findall(clean(text)):
            if piece not in self.cache:
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                self.cache[piece] = [self.ids[t] for t in self.bpe(word)]
            ids += self.cache[piece]
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text up to the first end-of-text token (the start token is skipped); words end in a space,
        so punctuation comes back spaced: "hello, world!" -> "hello , world !"."""
        data = bytearray()
        for i in ids:
            if i == self.eot_id:
                break
            if i != self.sot_id:
                token = self.tokens[i]
                data += bytes(self.byte_decoder[c] for c in token.removesuffix(END_OF_WORD))
                data += b" " if token.endswith(END_OF_WORD) else b""
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """(B, context_length) long: start token, ids, end token, then 0s. A text that does not fit is cut
        and keeps its end token in the last slot, so pooling at the end token stays defined (LaViLa's
        own tokenizer cuts it off instead; captions that long do not occur in Ego4D narrations)."""
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[: context_length - 2], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
