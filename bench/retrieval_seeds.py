"""Retrieval over corpus seeds: the mean and the worst seed of each figure of `recap evaluate --task retrieval`.

Each store is one corpus seed, evaluated beforehand; per store the newest retrieval table of the split is read
(metrics/retrieval-<split>-<index version>.parquet). Worst: the lowest R@k, the highest MdR and MnR.

    for seed in 0 1 2; do
        recap demo --seed $seed --store recap-store/demo-$seed --data data/demo-$seed
        recap index --store recap-store/demo-$seed
        recap evaluate --task retrieval --store recap-store/demo-$seed
    done
    python bench/retrieval_seeds.py recap-store/demo-0 recap-store/demo-1 recap-store/demo-2 [--split test]
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from pipeline.retrieval import ARMS, METRIC_NAMES, TASKS
from store import Store

LOWER_IS_BETTER = {"MdR", "MnR"}


def newest_retrieval(store: Store, split: str) -> pd.DataFrame:
    names = [n for n in store.listdir("metrics") if n.startswith(f"retrieval-{split}-") and n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"{store.url('metrics')}: no retrieval table of split {split!r}; run "
                                f"`recap evaluate --task retrieval --store {store.root} --split {split}`")
    tables = [store.read_table(f"metrics/{n}").to_pandas() for n in names]
    return max(tables, key=lambda t: t["computed_at"].max())


def combine(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows task x arm; per metric its mean over the tables and its worst, and the queries per seed."""
    rows = pd.concat([t.assign(seed=i) for i, t in enumerate(tables)], ignore_index=True)
    out = []
    for task in TASKS:
        for arm in ARMS:
            group = rows[(rows["level"] == task) & (rows["protocol"] == arm)]
            if group.empty:
                continue
            line = {"task": task, "arm": arm}
            for metric in METRIC_NAMES:
                values = group[group["metric"] == metric]["value"]
                worst = values.max() if metric in LOWER_IS_BETTER else values.min()
                line |= {f"{metric} mean": values.mean(), f"{metric} worst": worst}
            line["queries"] = "/".join(str(n) for n in group.drop_duplicates("seed")["n_pairs"])
            out.append(line)
    return pd.DataFrame(out).set_index(["task", "arm"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs="+", help="One evaluated store per corpus seed")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    try:
        tables = [newest_retrieval(Store(root, create=False), args.split) for root in args.stores]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    versions = ", ".join(t["version"].iloc[0] for t in tables)
    print(f"retrieval, split {args.split}, {len(tables)} seeds (indexes {versions}): R@k x100, MdR/MnR ranks; "
          "worst = lowest R@k, highest rank")
    print(combine(tables).to_string(float_format="{:.1f}".format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
