"""Model inputs per caption level, read from the store: one place for the data rules of training and inference.

clip     all tokens of the 4-s window (from `features/.../tokens`)
segment  `num_feat` CLS rows sampled in the segment window (zero-padded, masked)
         + the clip captions inside it, joined with no separator (official)
video    `num_feat` CLS rows sampled over the whole video (zero-padded, masked)
         + the segment descriptions, each stripped of '.', joined with '. '
A lower-level caption belongs to a window when it starts at or after the
window's start and ends at or before its end. A reordered or composed
summary's example (training only) reads part after part in the order it tells
them: the CLS rows inside the part, and the captions of the part's video that
overlap it for more than half their length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from store import FeatureSet

EPS = 1e-6


@dataclass
class Example:
    video_id: str
    start_s: float
    end_s: float
    video: np.ndarray            # (F, D) features: tokens of one window, or sampled CLS rows
    video_mask: np.ndarray       # (F,) 1 = real row
    text: str | None = None      # lower-level captions, joined (None at the clip level)
    target: str | None = None    # reference caption, when training


def sample_indices(n: int, k: int) -> np.ndarray:
    """k of n rows, uniformly: all of them when n <= k, else the official rule
    arange(0, n, n / (k + 1))[1:] (also how official query counts are subsampled)."""
    if n <= k:
        return np.arange(n)
    return np.arange(0, n, n / (k + 1)).astype(int)[1:k + 1]


def pad_rows(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((k, rows.shape[-1]), np.float32)
    out[: len(rows)] = rows
    mask = np.zeros(k, np.int64)
    mask[: len(rows)] = 1
    return out, mask


def inside(windows: np.ndarray, start: float, end: float) -> np.ndarray:
    """Boolean mask of [n, 2] windows lying within [start, end]."""
    return (windows[:, 0] >= start - EPS) & (windows[:, 1] <= end + EPS)


def join_clip_captions(texts: list[str]) -> str:
    return "".join(texts)


def join_segment_descriptions(texts: list[str]) -> str:
    return "".join(t.strip(".").strip() + ". " for t in texts).strip()


def lower_texts(lower: list[tuple[float, float, str]], start: float, end: float) -> list[str]:
    """The texts of the (start, end, text) captions inside [start, end], in time order."""
    return [t for s, e, t in sorted(lower) if s >= start - EPS and e <= end + EPS]


def told_texts(lower: dict[str, list[tuple[float, float, str]]],
               parts: tuple[tuple[str, float, float], ...]) -> list[str] | None:
    """The texts of each (video, start, end) part in turn: the captions of its video that overlap it for more than
    half their length (a last window joined with the tail overlaps its segment for nearly all of it); None when a
    part has none."""
    texts = []
    for video, start, end in parts:
        found = [t for s, e, t in sorted(lower.get(video, [])) if min(e, end) - max(s, start) > (e - s) / 2]
        if not found:
            return None
        texts += found
    return texts


def best_window(windows: np.ndarray, start: float, end: float) -> int:
    """Row of the feature window overlapping [start, end) most (ground truth windows need not align)."""
    overlap = np.minimum(windows[:, 1], end) - np.maximum(windows[:, 0], start)
    return int(np.argmax(overlap))


class ExampleReader:
    """Builds examples of one level from a feature set; caches per-video windows."""

    def __init__(self, features: FeatureSet, level: str, num_feat: int):
        self.features, self.level, self.num_feat = features, level, num_feat
        self._windows: dict[str, np.ndarray] = {}

    def windows(self, video_id: str) -> np.ndarray:
        if video_id not in self._windows:
            self._windows[video_id] = self.features.windows(video_id)
        return self._windows[video_id]

    def clip(self, video_id: str, spans: list[tuple[float, float]], targets=None) -> list[Example]:
        """One example per (start, end) span, from the tokens of its best-matching window."""
        windows = self.windows(video_id)
        rows = [best_window(windows, s, e) for s, e in spans]
        lo, hi = min(rows), max(rows) + 1
        tokens = self.features.read_tokens(video_id, slice(lo, hi)).astype(np.float32)
        return [Example(video_id, s, e, tokens[r - lo], np.ones(tokens.shape[1], np.int64),
                        target=None if targets is None else targets[i])
                for i, ((s, e), r) in enumerate(zip(spans, rows))]

    def span(self, video_id: str, start: float, end: float, lower: list[tuple[float, float, str]],
             target: str | None = None) -> Example:
        """Segment or video example: CLS rows sampled in [start, end] + lower-level captions inside it."""
        rows = self._rows_inside(video_id, start, end)
        video, mask = pad_rows(self.features.read_cls(video_id, rows[sample_indices(len(rows), self.num_feat)])
                               .astype(np.float32), self.num_feat)
        return Example(video_id, start, end, video, mask, self._join(lower_texts(lower, start, end)), target)

    def told(self, parts: tuple[tuple[str, float, float], ...], lower: dict[str, list[tuple[float, float, str]]],
             target: str | None = None) -> Example:
        """A reordered or composed summary's example: part after part in the order told, the CLS rows inside it
        and its captions (`told_texts`); the rows of all parts sampled as one video's."""
        texts = told_texts(lower, parts)
        if texts is None:
            raise ValueError(f"the parts {parts} do not all have a lower-level caption")
        rows = np.concatenate([self.features.read_cls(video, self._rows_inside(video, start, end))
                               for video, start, end in parts]).astype(np.float32)
        video, mask = pad_rows(rows[sample_indices(len(rows), self.num_feat)], self.num_feat)
        return Example(parts[0][0], 0.0, sum(e - s for _, s, e in parts), video, mask, self._join(texts), target)

    def _rows_inside(self, video_id: str, start: float, end: float) -> np.ndarray:
        windows = self.windows(video_id)
        rows = np.flatnonzero(inside(windows, start, end))
        if len(rows) == 0:  # a window shorter than one clip: take the one overlapping it most
            rows = np.array([best_window(windows, start, end)])
        return rows

    def _join(self, texts: list[str]) -> str:
        return join_clip_captions(texts) if self.level == "segment" else join_segment_descriptions(texts)


def collate(examples: list[Example], tokenizer, max_text_tokens: int = 512, max_target_tokens: int = 77):
    """Tensors for RecapModel: video, video_mask, text_ids/text_mask (if any text), caption_tokens (if targets)."""
    batch = {"video": torch.from_numpy(np.stack([e.video for e in examples])),
             "video_mask": torch.from_numpy(np.stack([e.video_mask for e in examples]))}
    if examples[0].text is not None:
        ids, mask = tokenizer.batch([e.text for e in examples], max_length=max_text_tokens)
        batch["text_ids"], batch["text_mask"] = ids, mask
    if examples[0].target is not None:
        batch["caption_tokens"], _ = tokenizer.batch([e.target for e in examples],
                                                     max_length=max_target_tokens, add_bos_eos=True)
    return batch
