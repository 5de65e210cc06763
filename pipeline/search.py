"""`recap search "text"`: the current index's rows ranked against a query, coarse to fine.

A row's score is the mean of two cosine similarities to the query's text embedding: its caption's text
embedding and its span's video embedding. That is one dot product with the mean of the two vectors, so the
index is held as one float16 matrix (`joint`, rows x E) and scored exactly, a float32 matrix product over
every row (`exact_scores`; `bench/search.py` measures it against the number of rows). Then, coarse to fine:

1. videos: a video's score is its summary row's (summary text and whole-video embedding); a video without
   a summary yet takes its best row. The best `videos` are kept.
2. segments of those videos (description text and segment embedding): the best `segments` are kept.
3. clips inside the kept segments (all clips of a kept video that has no segment rows): the best
   HITS_PER_RESULT x `top` are hits; adjacent or overlapping hits of one video merge into one span, with the
   best hit's score and caption.

`level` picks what is returned: videos (step 1), segments (step 2, from the kept videos) or clip spans (3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import Config
from store import LEVELS, Store
from store.index import IndexRows, read_index

CLIP, SEGMENT, VIDEO = (LEVELS.index(level) for level in ("clip", "segment", "video"))
HITS_PER_RESULT = 3  # clip hits taken per row asked for, before merging
BLOCK_ROWS = 4096    # rows converted to float32 at a time: the buffer stays in cache


@dataclass
class SearchIndex:
    """Every committed row of one index version, as arrays; row i of each belongs to one caption."""

    video_ids: list[str]
    offsets: np.ndarray   # (videos + 1,): rows offsets[v]:offsets[v + 1] are video v's
    video: np.ndarray     # (rows,) int32, index into video_ids
    level: np.ndarray     # (rows,) int8, index into store.LEVELS
    start: np.ndarray     # (rows,) float64 seconds
    end: np.ndarray
    caption: pa.Array     # (rows,) string
    joint: np.ndarray     # (rows, E) float16: (text + video) / 2

    @classmethod
    def from_rows(cls, rows: IndexRows) -> SearchIndex:
        t = rows.table
        joint = np.empty(rows.text.shape, np.float16)
        for i in range(0, len(joint), 1 << 16):
            text, video = (torch.from_numpy(a[i:i + (1 << 16)]).float() for a in (rows.text, rows.video))
            joint[i:i + len(text)] = ((text + video) / 2).half().numpy()
        codes = {level: i for i, level in enumerate(LEVELS)}
        return cls(video_ids=rows.video_ids, offsets=rows.offsets,
                   video=np.repeat(np.arange(len(rows.video_ids), dtype=np.int32), np.diff(rows.offsets)),
                   level=np.array([codes[v] for v in t["level"].to_pylist()], np.int8),
                   start=t["start_s"].to_numpy(), end=t["end_s"].to_numpy(), caption=t["caption"].combine_chunks(),
                   joint=joint)

    def use_fused(self, fused: pa.Table) -> None:
        """Score the video and segment rows by the given unit embeddings (video_id, level, start_s, end_s,
        embedding), ECS's: those rows' `joint` becomes their unit's embedding; rows without one keep theirs."""
        position = {(vid, LEVELS.index(lv), round(s, 3), round(e, 3)): i for i, (vid, lv, s, e) in enumerate(zip(
            *(fused[c].to_pylist() for c in ("video_id", "level", "start_s", "end_s"))))}
        embedding = fused["embedding"].combine_chunks().flatten().to_numpy().reshape(len(fused), -1)
        for r in np.flatnonzero(self.level != CLIP):
            i = position.get((self.video_ids[self.video[r]], int(self.level[r]), round(float(self.start[r]), 3),
                              round(float(self.end[r]), 3)))
            if i is not None:
                self.joint[r] = embedding[i]


def exact_scores(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """matrix (rows, E) float16 times query (E,), in float32, exactly. One thread: the product is bound by
    reading the matrix, and on a busy 2-core machine a second thread cost 20x in waits (bench/search.py)."""
    rows = torch.from_numpy(matrix)
    q = torch.from_numpy(np.ascontiguousarray(query, np.float32))
    out = torch.empty(len(rows))
    buf = torch.empty(BLOCK_ROWS, rows.shape[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, len(rows), BLOCK_ROWS):
            n = min(BLOCK_ROWS, len(rows) - i)
            buf[:n].copy_(rows[i:i + n])
            torch.mv(buf[:n], q, out=out[i:i + n])
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


def search(index: SearchIndex, query: np.ndarray, level: str = "clip", top: int = 10, videos: int = 10,
           segments: int = 20) -> list[dict]:
    """Ranked rows {video_id, start_s, end_s, level, caption, score} for a unit-length query embedding."""
    if level not in LEVELS:
        raise ValueError(f"--level {level!r}: expected one of {', '.join(LEVELS)}")
    if top < 1:
        raise ValueError(f"--top {top}: must be >= 1")
    scores = exact_scores(index.joint, query)
    if not len(scores):
        return []
    # 1. videos: the summary row's score, else the video's best row
    filled = np.flatnonzero(np.diff(index.offsets) > 0)
    video_score = np.full(len(index.video_ids), -np.inf, np.float32)
    video_score[filled] = np.maximum.reduceat(scores, index.offsets[filled])
    summaries = np.flatnonzero(index.level == VIDEO)
    video_score[index.video[summaries]] = scores[summaries]
    ranked = _best(video_score, len(filled))
    if level == "video":
        return [_video_row(index, v, float(video_score[v])) for v in ranked[:top]]
    kept_videos = ranked[:videos]
    in_kept = np.isin(index.video, kept_videos)
    # 2. segments of the kept videos
    segment_rows = np.flatnonzero(in_kept & (index.level == SEGMENT))
    if level == "segment":
        return [_row(index, r, float(scores[r])) for r in segment_rows[_best(scores[segment_rows], top)]]
    kept_segments = segment_rows[_best(scores[segment_rows], segments)]
    # 3. clips inside the kept segments; a kept video without segment rows gives all its clips
    clip_rows = np.flatnonzero(in_kept & (index.level == CLIP))
    middle = (index.start[clip_rows] + index.end[clip_rows]) / 2
    inside = np.isin(index.video[clip_rows], np.setdiff1d(kept_videos, index.video[segment_rows]))
    for s in kept_segments:
        inside |= (index.video[clip_rows] == index.video[s]) & (middle >= index.start[s]) & (middle < index.end[s])
    candidates = clip_rows[inside]
    hits = candidates[_best(scores[candidates], HITS_PER_RESULT * top)]
    return merge_hits(index, hits, scores)[:top]


def merge_hits(index: SearchIndex, hits: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Adjacent or overlapping clip hits of one video as one span: the best hit's score and caption."""
    spans: list[dict] = []
    for r in sorted(hits.tolist(), key=lambda r: (index.video[r], index.start[r], index.end[r])):
        last = spans[-1] if spans else None
        if last and last["video_id"] == index.video_ids[index.video[r]] and index.start[r] <= last["end_s"] + 1e-6:
            last["end_s"] = max(last["end_s"], float(index.end[r]))
            if scores[r] > last["score"]:
                last.update(score=float(scores[r]), caption=index.caption[r].as_py())
        else:
            spans.append(_row(index, r, float(scores[r])))
    return sorted(spans, key=lambda s: (-s["score"], s["video_id"], s["start_s"]))


def _best(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite values, best first (ties: the lower index first)."""
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(-values[finite], kind="stable")]
    return order[:k]


def _row(index: SearchIndex, r: int, score: float) -> dict:
    return {"video_id": index.video_ids[index.video[r]], "start_s": float(index.start[r]),
            "end_s": float(index.end[r]), "level": LEVELS[index.level[r]], "caption": index.caption[r].as_py(),
            "score": score}


def _video_row(index: SearchIndex, v: int, score: float) -> dict:
    """The video's summary row; without one, its span from its rows and no caption."""
    rows = np.arange(index.offsets[v], index.offsets[v + 1])
    summary = rows[index.level[rows] == VIDEO]
    if len(summary):
        return _row(index, int(summary[0]), score)
    return {"video_id": index.video_ids[v], "start_s": float(index.start[rows].min()),
            "end_s": float(index.end[rows].max()), "level": "video", "caption": "", "score": score}


def run_search(config: Config, store: Store, text: str, level: str = "clip", top: int = 10,
               fusion: str = "mean") -> list[dict]:
    """The query against the index version the store's settings make current, with that index's text tower;
    fusion "ecs": video and segment rows scored by the newest ECS model's embeddings of their units."""
    from pipeline.dag import index_stage

    stage = index_stage(config, store)
    index = SearchIndex.from_rows(read_index(store, stage.version()))
    if fusion == "ecs":
        from pipeline.ecs import latest_fused

        index.use_fused(latest_fused(store, stage.version()))
    stage.model, stage.tokenizer = stage.load_encoder()
    return search(index, stage.embed_texts([text])[0], level, top)


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def format_results(rows: list[dict]) -> str:
    table = [["#", "score", "video", "span", "level", "caption"]] + [
        [str(i), f"{r['score']:.3f}", r["video_id"], f"{clock(r['start_s'])}–{clock(r['end_s'])}", r["level"],
         "".join(c if c.isprintable() else " " for c in r["caption"] or "")] for i, r in enumerate(rows, 1)]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return "\n".join("  ".join([*(c.rjust(w) if i < 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))),
                                row[5]]).rstrip() for row in table)
