"""`recap evaluate --task retrieval`: text-to-video and text-to-moment retrieval on one split, from the index.

Queries: the corpus's held-out paraphrases (synth.queries; groundtruth/queries.parquet in the store), one per
video, segment and clip, worded by templates that no ground-truth caption uses, embedded by the index's own text
tower.

Arms: each index row has a text embedding (of its caption) and a video embedding (of its span's feature windows).
A row scores the query's cosine with its video embedding (`video`), with its text embedding (`captions`), or the
mean of the two (`both`), which is what `recap search` scores (pipeline.search).

Text-to-video ranks the split's videos; a video scores as its summary row, else (no summary yet) as its best row,
as search's first step does. A video query's one relevant video is its own.

Text-to-moment ranks every clip and segment row of the split's videos, exactly: no coarse-to-fine pruning, which
would cap recall at what its video and segment steps keep. Synthetic corpora repeat facts (an action on the same
object recurs within a segment and across videos), so a moment query's relevant spans are its own unit's and
every ground-truth unit of its level in the split with the same facts (a segment: the same activity and the same
objects, in any order). A row is a hit when it lies in the video of a relevant span with temporal IoU >= 0.5, as
the caption evaluation pairs windows; a row of the other level never qualifies (a clip is a sixth of a segment).

Rank: the position of the first hit, ties counted against it (1 + the non-hits scoring at least as high as the
best hit), so that identical captions, whose embeddings are identical, earn nothing from row order. A query
without any hit among the candidates (its level not captioned yet) ranks one past the last candidate and is
counted as missing. Metrics: R@1, R@5, R@10 (x100), median rank (MdR) and mean rank (MnR).

The table goes to metrics/<name>.parquet in the caption evaluation's schema (stages.evaluate.METRICS_SCHEMA):
level = the task, protocol = the arm, version = the index version, n_pairs = the queries, n_missing = the queries
without a hit.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.search import VIDEO, SearchIndex
from stages.evaluate import METRICS_SCHEMA, SCALE, write_metrics
from store import QUERIES_REL, Store, now_iso, read_groundtruth, read_queries
from store.index import IndexRows, read_index

TASKS = {"text-to-video": ("video",), "text-to-moment": ("clip", "segment")}  # task -> query levels
ARMS = ("video", "captions", "both")
KS = (1, 5, 10)
METRIC_NAMES = (*(f"R@{k}" for k in KS), "MdR", "MnR")
MIN_IOU = 0.5


# ---- ranks and metrics ---------------------------------------------------------------------------------

def first_hit_rank(scores: np.ndarray, hits: np.ndarray) -> int:
    """1-based rank of the best-scoring hit among all candidates, ties against it; len + 1 without a hit."""
    if not hits.any():
        return len(scores) + 1
    return 1 + int(np.count_nonzero(scores[~hits] >= scores[hits].max()))


def rank_metrics(ranks) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=float)
    return {**{f"R@{k}": SCALE * float(np.mean(ranks <= k)) for k in KS},
            "MdR": float(np.median(ranks)), "MnR": float(np.mean(ranks))}


# ---- relevance -----------------------------------------------------------------------------------------

def fact_key(level: str, facts: str | None) -> str | None:
    """Facts (JSON) in a form equal for equal facts: a segment's objects as a sorted list."""
    if facts is None:
        return None
    parsed = json.loads(facts)
    if level == "segment":
        parsed["objects"] = sorted(parsed["objects"])
    return json.dumps(parsed, sort_keys=True)


def relevant_spans(queries: pd.DataFrame, groundtruth: pd.DataFrame) -> list[list[tuple[str, float, float]]]:
    """Per query: (video_id, start_s, end_s) of its own unit and of every ground-truth unit of its level with
    the same facts."""
    same_facts = defaultdict(set)
    for r in groundtruth.itertuples():
        key = fact_key(r.level, r.facts)
        if key is not None:
            same_facts[r.level, key].add((r.video_id, r.start_s, r.end_s))
    return [sorted({(q.video_id, q.start_s, q.end_s)} | same_facts[q.level, fact_key(q.level, q.facts)])
            for q in queries.itertuples()]


def overlaps(videos: np.ndarray, start: np.ndarray, end: np.ndarray, spans: list[tuple[str, float, float]]) -> np.ndarray:
    """Which of the rows (video id, start, end) overlap one of `spans` in its video with IoU >= MIN_IOU."""
    hits = np.zeros(len(videos), bool)
    for video_id, s, e in spans:
        inter = np.clip(np.minimum(e, end) - np.maximum(s, start), 0, None)
        hits |= (videos == video_id) & (inter / ((e - s) + (end - start) - inter) >= MIN_IOU)
    return hits


def hit_mask(index: SearchIndex, candidates: np.ndarray, spans: list[tuple[str, float, float]]) -> np.ndarray:
    """Which candidate rows overlap one of `spans` in its video with IoU >= MIN_IOU."""
    videos = np.asarray(index.video_ids, dtype=object)[index.video[candidates]]
    return overlaps(videos, index.start[candidates], index.end[candidates], spans)


# ---- scoring -------------------------------------------------------------------------------------------

def video_scores(index: SearchIndex, scores: np.ndarray) -> np.ndarray:
    """(videos, queries) from row scores (rows, queries): each video's summary row (the best of several), else
    its best row; -inf for a video without rows."""
    out = np.full((len(index.video_ids), scores.shape[1]), -np.inf, np.float32)
    for v in range(len(index.video_ids)):
        rows = np.arange(index.offsets[v], index.offsets[v + 1])
        summaries = rows[index.level[rows] == VIDEO]
        chosen = summaries if len(summaries) else rows
        if len(chosen):
            out[v] = scores[chosen].max(axis=0)
    return out


def restrict(rows: IndexRows, video_ids: list[str]) -> IndexRows:
    """The rows of `video_ids` alone; a video not indexed is a FileNotFoundError."""
    position = {v: i for i, v in enumerate(rows.video_ids)}
    missing = [v for v in video_ids if v not in position]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(video_ids)} videos to search are not indexed "
                                f"(first: {missing[0]}); run `recap index`")
    chosen = sorted(position[v] for v in video_ids)
    take = np.concatenate([np.arange(rows.offsets[i], rows.offsets[i + 1]) for i in chosen]).astype(np.int64)
    counts = np.diff(rows.offsets)[chosen]
    return IndexRows(rows.table.take(take), rows.text[take], rows.video[take], [rows.video_ids[i] for i in chosen],
                     np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def query_ranks(rows: IndexRows, queries: pd.DataFrame, groundtruth: pd.DataFrame,
                embeddings: np.ndarray) -> pd.DataFrame:
    """Per query and arm: task, arm, query (row number in `queries`), rank, candidates. `rows`: the index of
    the split's videos; `queries`: video_id, level, start_s, end_s, facts; `groundtruth`: the split's clip and
    segment units, the same columns; `embeddings`: the queries' unit text embeddings, in `queries` order."""
    index = SearchIndex.from_rows(rows)
    arms = {"video": rows.video, "captions": rows.text, "both": index.joint}
    is_video = (queries["level"] == "video").to_numpy()
    video_queries, moment_queries = np.flatnonzero(is_video), np.flatnonzero(~is_video)
    number = {v: i for i, v in enumerate(index.video_ids)}
    own_video = [np.arange(len(number)) == number[v] for v in queries["video_id"].to_numpy()[video_queries]]
    moment_rows = np.flatnonzero(index.level != VIDEO)
    hits = [hit_mask(index, moment_rows, spans) for spans in relevant_spans(queries.iloc[moment_queries], groundtruth)]
    out = []
    for arm, matrix in arms.items():
        scores = np.asarray(matrix, np.float32) @ np.asarray(embeddings, np.float32).T  # (rows, queries)
        per_video = video_scores(index, scores[:, video_queries])
        for j, q in enumerate(video_queries):
            out.append(("text-to-video", arm, q, first_hit_rank(per_video[:, j], own_video[j]), len(number)))
        moments = scores[np.ix_(moment_rows, moment_queries)]
        for j, q in enumerate(moment_queries):
            out.append(("text-to-moment", arm, q, first_hit_rank(moments[:, j], hits[j]), len(moment_rows)))
    return pd.DataFrame(out, columns=["task", "arm", "query", "rank", "candidates"])


def summarise(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per task and arm (in TASKS x ARMS order) and metric: value, queries, missing (queries without a hit)."""
    out = []
    for task in TASKS:
        for arm in ARMS:
            group = ranks[(ranks["task"] == task) & (ranks["arm"] == arm)]
            if group.empty:
                continue
            missing = int((group["rank"] > group["candidates"]).sum())
            out += [{"task": task, "arm": arm, "metric": metric, "value": value, "queries": len(group),
                     "missing": missing} for metric, value in rank_metrics(group["rank"]).items()]
    return pd.DataFrame(out, columns=["task", "arm", "metric", "value", "queries", "missing"])


# ---- the command ---------------------------------------------------------------------------------------

def evaluate_retrieval(config: Config, store: Store, name: str | None = None, stream=None) -> pd.DataFrame:
    """Retrieval metrics of the current index on `evaluate.split` (`summarise`'s columns, with version and
    split), written to metrics/<name>.parquet (its path in `.attrs["path"]`) and printed as a table on
    `stream` (None: not printed)."""
    from pipeline.dag import index_stage  # pipeline.dag imports the stages, torch among them

    split = config.evaluate.split
    queries = read_queries(store, split)
    if queries is None or not queries.num_rows:
        raise FileNotFoundError(f"{store.url(QUERIES_REL)}: no retrieval queries of split {split!r}; they come with "
                                "a synthetic corpus (`python -m synth`), read by `recap ingest ego4d-hcap`")
    queries = queries.to_pandas()
    stage = index_stage(config, store)
    version = stage.version()
    rows = restrict(read_index(store, version), sorted(set(queries["video_id"])))
    groundtruth = pd.concat([_table(read_groundtruth(store, level, split)) for level in TASKS["text-to-moment"]],
                            ignore_index=True)
    stage.model, stage.tokenizer = stage.load_encoder()
    ranks = query_ranks(rows, queries, groundtruth, stage.embed_texts(queries["text"].tolist()))
    metrics = summarise(ranks).assign(version=version, split=split)
    name = name or f"retrieval-{split}-{version}"
    metrics.attrs["path"] = write_metrics(store, _as_metrics_rows(metrics), name)
    if stream is not None:
        print(format_retrieval(metrics), file=stream)
    print(f"[evaluate] wrote {metrics.attrs['path']}", file=sys.stderr)
    return metrics


def _table(table) -> pd.DataFrame:
    columns = ["video_id", "level", "start_s", "end_s", "facts"]
    return pd.DataFrame(columns=columns) if table is None else table.select(columns).to_pandas()


def _as_metrics_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The caption evaluation's columns: level = task, protocol = arm, n_pairs = queries, n_missing = missing."""
    rows = metrics.rename(columns={"task": "level", "arm": "protocol", "queries": "n_pairs", "missing": "n_missing"})
    return rows.assign(video_id=None, computed_at=now_iso())[[n for n in METRICS_SCHEMA.names if n != "run"]]


def format_retrieval(metrics: pd.DataFrame) -> str:
    """One line per task and arm: R@1 R@5 R@10 (x100), MdR, MnR and the number of queries."""
    table = metrics.pivot_table(index=["task", "arm"], columns="metric", values="value", sort=False)
    table = table[list(METRIC_NAMES)]
    table["queries"] = metrics.groupby(["task", "arm"], sort=False)["queries"].first()
    table.index.names = [None, None]
    table.columns.name = None
    first = metrics.iloc[0]
    header = (f"retrieval, index {first['version']}, split {first['split']} "
              "(R@k x100; MdR, MnR: median and mean rank of the first relevant result, 1 = best)")
    return f"{header}\n{table.to_string(float_format='{:.1f}'.format)}"
