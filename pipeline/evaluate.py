"""`recap evaluate`: every caption level of the current config against its ground truth."""

from __future__ import annotations

import sys

import pandas as pd

from pipeline.config import Config
from pipeline.dag import build_stages
from stages.evaluate import evaluate_level, format_metrics, meteor_scorer, write_metrics
from store import Store, read_groundtruth


def evaluate_all(config: Config, store: Store, by: str | None = None, name: str | None = None,
                 stream=None) -> pd.DataFrame | None:
    """Scores per level and protocol, written to metrics/<name>.parquet (its path in `.attrs["path"]`) and
    printed as a table on `stream` (None: not printed, `recap evaluate --json`); None if nothing to score."""
    split = config.evaluate.split
    levels = [s for s in build_stages(config, store)[1:]
              if read_groundtruth(store, s.level, split) is not None and store.exists(s.output_dir)]
    if not levels:
        print(f"[evaluate] nothing to score: no captions with {split} ground truth", file=sys.stderr)
        return None
    frames = []
    with meteor_scorer() as meteor:
        for stage in levels:
            for protocol in config.evaluate.protocols:
                frames.append(evaluate_level(store, stage.level, stage.version(), split, protocol, by, meteor))
    metrics = pd.concat(frames, ignore_index=True)
    name = name or f"{split}-" + "-".join(s.version() for s in levels)
    rel = write_metrics(store, metrics, name)
    metrics.attrs["path"] = rel
    if stream is not None:
        print(format_metrics(metrics), file=stream)
    print(f"[evaluate] wrote {rel}", file=sys.stderr)
    return metrics
