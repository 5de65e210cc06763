"""Text-to-video with the ground-truth summaries in place of the predicted ones: is the query wording the limit?

On a store that `recap demo` made (indexed), embeds the split's held-out video queries and its ground-truth
whole-video summaries with the index's text tower and prints R@1 / R@5 and the median rank of each query's own
summary, how often the top summary is in the query's place (against chance), and the same for the bare phrase
"in the <place>":

    python bench/summary_retrieval.py recap-store/demo [--split test]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pipeline.config import settle
from pipeline.dag import index_stage
from store import Store, read_groundtruth, read_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    store = Store(args.store)
    stage = index_stage(settle(args.store, record=False), store)
    stage.model, stage.tokenizer = stage.load_encoder()
    queries = read_queries(store, args.split).to_pandas()
    queries = queries[queries["level"] == "video"].reset_index(drop=True)
    summaries = read_groundtruth(store, "video", args.split).to_pandas()
    whole = summaries.loc[summaries.groupby("video_id")["end_s"].idxmax()].set_index("video_id").loc[queries["video_id"]]
    places = np.array([json.loads(f)["place"] for f in whole["facts"]])
    summary_emb = stage.embed_texts(whole["text"].tolist())
    scores = stage.embed_texts(queries["text"].tolist()) @ summary_emb.T
    rank = (scores > np.diag(scores)[:, None]).sum(1) + 1
    same_place = lambda s: float(np.mean(places[s.argmax(1)] == places))
    chance = float(np.mean(places[:, None] == places[None, :]))
    phrase = stage.embed_texts([f"in the {p}" for p in places]) @ summary_emb.T
    print(f"{len(queries)} video queries against their ground-truth summaries, split {args.split}: "
          f"R@1 {100 * np.mean(rank == 1):.1f}, R@5 {100 * np.mean(rank <= 5):.1f}, MdR {np.median(rank):.1f}; "
          f"top summary in the query's place {100 * same_place(scores):.1f}% (chance {100 * chance:.1f}%); "
          f"'in the <place>' alone: {100 * same_place(phrase):.1f}%")


if __name__ == "__main__":
    main()
