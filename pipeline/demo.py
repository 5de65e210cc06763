"""The main job on the embedded synthetic corpus, end to end; every step is resumable.

synth -> ingest -> pretrain the dual encoder -> features (its visual tower) -> train clip -> clip
captions -> train segment (on predicted clip captions) -> segment descriptions -> train video ->
summaries -> index -> evaluate (test split: captions, and retrieval with held-out queries),
then a table per level against two baselines: the most frequent training caption, and a
non-recursive model (same training, no lower-level text) at the segment and video levels.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

import synth
from pipeline.config import Config, load_config, record_settings
from pipeline.current import publish_current
from pipeline.dag import caption_stage, features_stage, index_stage
from pipeline.ingest import ingest_hcap
from pipeline.pretrain import pretrain
from pipeline.progress import Summary
from pipeline.retrieval import evaluate_retrieval
from pipeline.runner import run_stage
from pipeline.train import train
from stages.evaluate import METRICS, SEMANTIC, evaluate_level, evaluate_pairs, meteor_scorer, semantic_scores, write_metrics
from store import LEVEL, LEVELS, Store, read_groundtruth, record_latest

PROTOCOL = "videorecap"

# Sized for 2 CPU cores: the synthetic frames are 128 px, the tiny encoder reads 32 px, the
# `demo` model is a few-layer GPT-2 trained from scratch (so everything trains, not the official
# frozen subset that assumes pretrained GPT-2 weights).
DEMO_SETTINGS = {
    "features": {"encoder": "tsf-tiny", "tokens": True, "batch_size": 32},
    "train": {"size": "demo", "freeze": "none", "lower": "predicted", "batch_size": 16, "lr": 1e-3,
              "warmup_frac": 0.05, "vocab_size": 600},
    # Beam search for the summaries: more of them parse, so more name the right place (docs/caption-accuracy.md)
    "captions": {"batch_size": 128, "video_method": "beam"},
    # The tiny dual encoder learns from the 2,144 train narrations (then its text tower alone from those and the
    # segment descriptions and summaries); its visual tower then extracts the features.
    "pretrain": {"size": "tiny", "epochs": 6, "text_epochs": 3, "batch_size": 64, "lr": 1e-3},
}
# Training examples: 2,144 clips, 260 segments, 64 videos + ~600 runs of segments + 256 reordered and 512 composed
# summaries (recursive only). With the pretrained encoder 12 clip epochs reach the clip targets and the segment
# activity needs 30. The video level trains 15 epochs at twice the others' learning rate (over six runs 2e-3 took the
# place from 93.1 to 97.2% and the sequence from 31.9 to 47.9% of test videos), in batches of summaries of like length
# (its summaries run from 1 to 5 activities: 14% less time, no loss measured; not the non-recursive model's).
# docs/caption-accuracy.md, sessions 15-16.
LEVEL_TRAIN = {"clip": {"epochs": 12}, "segment": {"epochs": 30},
               "video": {"epochs": 15, "lr": 2e-3, "group_by_length": True}}


def demo_config(store: str, segment_s: float) -> Config:
    return load_config(store=store, windows={"segment_s": segment_s}, **DEMO_SETTINGS)


def _with(config: Config, section: str, **values) -> Config:
    return replace(config, **{section: replace(getattr(config, section), **values)})


def run_demo(store_root: str, data: Path, preset: str = "demo", seed: int = 0, pretrain_encoder: bool = True,
             retry_failed: bool = False, stream=None) -> list[Summary]:
    """`pretrain_encoder=False` is the ablation of the pretrained encoder: the features come from the randomly
    initialised tiny encoder, and nothing is indexed (no dual encoder to embed the text with). `retry_failed`: the
    stages work again on the units that failed in an earlier run (else they are skipped, as with every stage)."""
    stream = sys.stderr if stream is None else stream  # at the call: --log-file replaces it
    # Training runs here, while no stage works: it takes every core (faster than one: docs/caption-accuracy.md).
    # Stage workers set their own thread counts.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.monotonic()
    step = lambda text: print(f"[demo] {text} ({time.monotonic() - start:.0f} s)", file=stream, flush=True)
    step(f"corpus: synthetic '{preset}' preset, seed {seed}, in {data}")
    synth.generate(preset, data, seed=seed)
    segment_s = float(json.loads((data / "manifest.json").read_text())["segment_s"])
    config = record_settings(demo_config(store_root, segment_s), stream)  # later commands need no flags
    store = Store(config.store)
    summaries = [ingest_hcap(store, str(data), str(data / "videos"), stream=stream)]
    if pretrain_encoder:
        step("pretrain the dual encoder (contrastive, on the train narrations)")
        encoder = pretrain(config, store, stream=stream)
        config = record_settings(_with(config, "features", checkpoint=store.abs(encoder.checkpoint)), stream)

    def stage_run(stage):
        summaries.append(run_stage(stage, store, executor=config.run.executor, max_retries=config.run.max_retries,
                                   retry_failed=retry_failed, stream=stream))
        return stage

    def stopped() -> bool:
        """A stage left units failed: what comes next reads every unit's output, so the demo stops there."""
        if summaries[-1].failed:
            step(f"stopped: {summaries[-1].failed} unit(s) of {summaries[-1].stage} failed; `recap demo "
                 f"--retry-failed` tries them again")
        return summaries[-1].failed > 0

    features = stage_run(features_stage(config))
    if stopped():
        return summaries
    chain = {"features": features}
    lower_stage = features
    for level in LEVELS:
        step(f"train {level}")
        init = store.abs(chain[f"{LEVEL[level].lower}-checkpoint"]) if LEVEL[level].lower else None
        lower = [lower_stage.version()] if LEVEL[level].lower else []
        trained = train(_with(config, "train", **LEVEL_TRAIN[level]), store, level, init_from=init,
                        lower_versions=lower, stream=stream)
        chain[f"{level}-checkpoint"] = trained.checkpoint
        step(f"caption {level}")
        lower_stage = stage_run(caption_stage(config, level, store.abs(trained.checkpoint), lower_stage, features))
        chain[level] = lower_stage
        if stopped():
            return summaries

    baselines, init = {}, chain["clip-checkpoint"]
    for level in ("segment", "video"):  # the same curriculum, without the lower level's text
        step(f"train non-recursive {level} (no lower-level text)")
        # Batches of like length left it summarising one activity (seed 1: CIDEr 72.7 -> 6.2): no descriptions to count
        flat = _with(config, "train", **{**LEVEL_TRAIN[level], "group_by_length": False}, recursive=False)
        trained = train(flat, store, level, init_from=store.abs(init), stream=stream)
        init = trained.checkpoint
        baselines[level] = stage_run(caption_stage(config, level, store.abs(trained.checkpoint),
                                                   chain[LEVEL[level].lower], features))
        if stopped():
            return summaries

    for level in LEVELS:  # the baselines trained last: caption commands default to the recursive models again
        record_latest(store, level, chain[f"{level}-checkpoint"])
    publish_current(config, store)  # current/: the recursive models' captions
    if pretrain_encoder:
        step("index the captions for `recap search`")
        stage_run(index_stage(config, store))
        if stopped():
            return summaries
    step("evaluate on the test split")
    table = evaluation_table(store, {lvl: chain[lvl] for lvl in LEVELS}, baselines)
    print(format_table(table), file=sys.stdout)
    if pretrain_encoder:
        print(file=sys.stdout)
        evaluate_retrieval(config, store, stream=sys.stdout)
    step("done")
    return summaries


def frequent_caption(store: Store, level: str) -> str:
    """The most frequent training caption of a level (ties: the alphabetically first); at the video level,
    of whole videos (the summaries of runs of segments are extra supervision, not what is scored)."""
    rows = read_groundtruth(store, level, "train").to_pylist()
    if level == "video":
        ends = {}
        for r in rows:
            ends[r["video_id"]] = max(ends.get(r["video_id"], 0.0), r["end_s"])
        rows = [r for r in rows if r["start_s"] == 0.0 and r["end_s"] == ends[r["video_id"]]]
    counts = Counter(r["text"] for r in rows)
    return min(counts, key=lambda text: (-counts[text], text))


def evaluation_table(store: Store, ours: dict, non_recursive: dict) -> list[dict]:
    """Rows (level, method, metric values) on the test split: CIDEr, ROUGE_L, METEOR and, where the ground
    truth has facts, semantic accuracy and distinct captions. The models' scores go to metrics/demo.parquet."""
    rows, frames = [], []
    with meteor_scorer() as meteor:
        for level in LEVELS:
            gt = read_groundtruth(store, level, "test")
            refs = gt["text"].to_pylist()
            constant = [frequent_caption(store, level)] * len(refs)
            frequent = evaluate_pairs(constant, refs, PROTOCOL, meteor)
            if gt["facts"].null_count == 0:
                frequent |= semantic_scores(level, constant, gt["facts"].to_pylist())
            rows.append({"level": level, "method": "most frequent training caption", **frequent})
            candidates = [("non-recursive (no lower-level text)", non_recursive.get(level)),
                          ("Video ReCap (recursive)", ours[level])]
            for method, stage in candidates:
                if stage is None:
                    continue
                scores = evaluate_level(store, level, stage.version(), "test", PROTOCOL, meteor=meteor)
                frames.append(scores)
                corpus = scores[scores["video_id"].isna()].set_index("metric")["value"]
                rows.append({"level": level, "method": method, **corpus.to_dict()})
    import pandas as pd

    write_metrics(store, pd.concat(frames, ignore_index=True), "demo")
    return rows


# Column headings and widths of the demo table; semantic columns are x100 except the edit distance.
COLUMNS = {"CIDEr": "CIDEr", "ROUGE_L": "ROUGE-L", "METEOR": "METEOR", "action": "action", "colour": "colour",
           "shape": "shape", "all_three": "all 3", "activity": "activity", "object_f1": "obj F1", "place": "place",
           "sequence_exact": "seq exact", "sequence_edit": "seq edit", "distinct": "distinct"}


def format_table(rows: list[dict]) -> str:
    lines = [f"Test split, protocol '{PROTOCOL}'; scores x100 but 'seq edit' (mean edit distance of the activity "
             f"sequence) and 'distinct' (distinct captions)"]
    for level in LEVELS:
        level_rows = [r for r in rows if r["level"] == level]
        names = [m for m in (*METRICS, *SEMANTIC[level], "distinct") if any(m in r for r in level_rows)]
        widths = [max(7, len(COLUMNS[m]) + 1) for m in names]
        lines += ["", f"{level:<8} {'method':<37}" + "".join(f"{COLUMNS[m]:>{w}}" for m, w in zip(names, widths))]
        for r in level_rows:
            cells = "".join(f"{r[m]:>{w}.{0 if m == 'distinct' else 2 if m == 'sequence_edit' else 1}f}"
                            if m in r else f"{'':>{w}}" for m, w in zip(names, widths))
            lines.append(f"{'':<8} {r['method']:<37}{cells}")
    return "\n".join(lines)
