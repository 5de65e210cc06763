"""Example searches on a store, each hit judged by the ground truth: `recap search` (coarse to fine, over every
video) for a few of the corpus's held-out test queries, 2 clip, 2 segment and 1 video by default.

A hit is right when it lies in the query's own video (video queries) or overlaps, with IoU >= 0.5, a ground-truth
unit of the query's level with the query's facts (pipeline.retrieval.relevant_spans), in any split.

    python bench/example_queries.py recap-store/demo [--fusion mean|ecs] [--top 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import settle  # noqa: E402
from pipeline.dag import index_stage  # noqa: E402
from pipeline.retrieval import overlaps, relevant_spans  # noqa: E402
from pipeline.search import SearchIndex, search  # noqa: E402
from store import Store, read_groundtruth, read_queries  # noqa: E402
from store.index import read_index  # noqa: E402

PICKS = {"clip": 2, "segment": 2, "video": 1}


def right(hit: dict, spans) -> bool:
    """In the query's own video (video queries), or overlapping one of `spans` with IoU >= 0.5."""
    if any(e == np.inf and hit["video_id"] == v for v, _, e in spans):
        return True
    return bool(overlaps(np.array([hit["video_id"]], dtype=object), np.array([hit["start_s"]]),
                         np.array([hit["end_s"]]), spans)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--fusion", default="mean", choices=("mean", "ecs"))
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="Which queries are picked")
    args = parser.parse_args()
    store = Store(args.store, create=False)
    config = settle(args.store, record=False)
    stage = index_stage(config, store)
    index = SearchIndex.from_rows(read_index(store, stage.version()))
    if args.fusion == "ecs":
        from pipeline.ecs import latest_fused

        index.use_fused(latest_fused(store, stage.version()))
    stage.model, stage.tokenizer = stage.load_encoder()
    queries = read_queries(store, "test").to_pandas()
    rng = np.random.default_rng(args.seed)
    groundtruth = pd.concat([read_groundtruth(store, level).select(["video_id", "level", "start_s", "end_s", "facts"])
                             .to_pandas() for level in ("clip", "segment")], ignore_index=True)
    total = correct = 0
    for level, n in PICKS.items():
        chosen = queries[queries["level"] == level]
        chosen = chosen.iloc[sorted(rng.choice(len(chosen), n, replace=False))]
        spans = relevant_spans(chosen, groundtruth) if level != "video" else \
            [[(v, 0.0, np.inf)] for v in chosen["video_id"]]
        for (_, q), relevant in zip(chosen.iterrows(), spans):
            hits = search(index, stage.embed_texts([q["text"]])[0], level, args.top)
            marks = [right(h, relevant) for h in hits]
            total, correct = total + len(hits), correct + sum(marks)
            print(f"\n{level} query: {q['text']!r} ({q['video_id']} {q['start_s']:.0f}-{q['end_s']:.0f} s): "
                  f"{sum(marks)}/{len(hits)} right")
            for h, ok in zip(hits, marks):
                print(f"  {'right' if ok else 'wrong'}  {h['score']:.3f}  {h['video_id']} {h['start_s']:.0f}-"
                      f"{h['end_s']:.0f} s  {h['caption'][:110]}")
    print(f"\n{correct} of {total} hits right ({args.fusion} fusion)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
